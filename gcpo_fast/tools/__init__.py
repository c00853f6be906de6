"""Tool-integrated reasoning: completions that call tools between the model's turns, and the sandbox the calls run
in. Nothing here imports a round, an update, the golden path or a model; the engines never import this wing.

    options.py         --tools, --max_tool_calling_iterations, --tool_timeout and the sandbox's limits
    sandbox.py         every call in a bubblewrap sandbox of its own: namespaces, rlimits, killed at its limit
    sandbox_runner.py  the one program a call runs inside the sandbox (stdlib only)
    formats.py         the python tool (ToRL's ```python / ```output layout) and user tools (TRL's functions, the
                       chat template's <tool_call> format): finding calls, outputs as token ids, ToolSet
    loop.py            ToolEngine: the multi-turn rollout loop around any engine; Rows.tool_mask marks tool tokens
    task.py            the shipped math task's golden answers as python-tool trajectories
"""
