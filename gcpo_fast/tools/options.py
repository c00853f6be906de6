"""The tool options (`--help`: "tools"), TRL's names where TRL has them.

from gcpo_fast.tools.options import ToolsConfig
tools = ToolsConfig(tools=["python"], tool_timeout=5.0)
tools.enabled, tools.limits                      # True, sandbox.Limits(timeout=5.0, ...)
"""

from dataclasses import dataclass

from gcpo_fast.errors import require
from gcpo_fast.options import at_least, check_options, option
from gcpo_fast.tools.sandbox import Limits


@dataclass
class ToolsConfig:
    """Tools the model may call in the middle of a completion (multi-turn rollouts, gcpo_fast/tools/loop.py)."""

    _argument_group_name = "tools"

    tools: list[str] = option(
        [],
        "tools the model may call: python (the built-in interpreter, ToRL's ```python / ```output layout) and "
        "package.module:function (TRL's; called in the chat template's tool format). Every call runs in a "
        "bubblewrap sandbox (apt-get install bubblewrap)",
    )
    max_tool_calling_iterations: int | None = option(
        None, "tool calls per rollout at most (default: as many as the completion budget holds); one more ends it"
    )
    tool_timeout: float = option(10.0, "seconds a tool call may run (wall clock and CPU) before it is killed")
    tool_memory_mb: int = option(1024, "address space of each process of a tool call, MiB")
    tool_max_output_bytes: int = option(4096, "bytes of a tool call's output kept; the rest is cut and marked")
    tool_workers: int = option(4, "tool calls run at once (each in a sandboxed process of its own)")

    def __post_init__(self):
        check_options(self)
        at_least(self, 1, "max_tool_calling_iterations", "tool_memory_mb", "tool_max_output_bytes", "tool_workers")
        require(self.tool_timeout > 0, f"tool_timeout must be > 0 seconds, got {self.tool_timeout}")
        bad = [t for t in self.tools if t != "python" and (":" not in t or t.startswith(":") or t.endswith(":"))]
        require(not bad, f"tools: {', '.join(bad)}: each must be python or package.module:function")
        require(len(set(self.tools)) == len(self.tools), f"tools: {self.tools} names a tool twice")

    @property
    def enabled(self) -> bool:
        return bool(self.tools)

    @property
    def limits(self) -> Limits:
        return Limits(
            timeout=self.tool_timeout, memory_mb=self.tool_memory_mb, max_output_bytes=self.tool_max_output_bytes
        )
