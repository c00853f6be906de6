"""How a model writes a tool call and reads its output, and the set of tools a run has.

    from gcpo_fast.tools.formats import ToolSet

    tools = ToolSet(["python", "my_pkg.tools:add"], tokenizer, sandbox)
    tools.stop                                     # ("```output",): generation pauses there for a python call
    tools.schemas                                  # the user tools' JSON schemas, for the prompt's chat template
    calls = tools.calls_in(turn_text, ended_at_eos=False)    # None: the turn did not end with a call
    parts = tools.split_trajectory(golden_text)    # [(model text, call, its written output)]: a golden answer
    ids = tools.output_ids(calls, [tools.run(c) for c in calls])   # the outputs as token ids, tokenised once

Two formats:
- `python`, the built-in tool in ToRL's layout (Qwen2.5-Math's tool-integrated reasoning): the model writes
  "```python\\n<code>\\n```\\n```output"; generation stops at "```output" (a stop string), the last ```python block
  before it runs in the sandbox as a script, and "\\n<what it printed>\\n```\\n" follows as the tool's tokens.
- user tools as TRL takes them (`--tools module:function`): Python functions whose signature and docstring give
  the JSON schema (transformers.utils.get_json_schema), put in the prompt by the tokenizer's chat template
  (`tools=`); the model writes Hermes / Qwen2.5 calls, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  and ends its turn (EOS); each call runs in the sandbox, and the results go back as the template renders
  `{"role": "tool"}` messages plus the next assistant header (TRL's way: a short conversation rendered with and
  without them, the difference taken after its last EOS).
A call the model wrote wrong (no code block, JSON that does not parse, an unknown tool, arguments that are not an
object) is not run: its error goes back to the model as the output and counts as an error.
"""

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import get_json_schema

from gcpo_fast.tools.sandbox import Result, Sandbox

PYTHON = "python"
PYTHON_OPEN, OUTPUT_OPEN, FENCE = "```python", "```output", "```"
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
PYTHON_OUTPUT = re.compile(r"\n(.*?)\n```(?:\n|$)", re.S)  # what python_output_text writes, after "```output"


@dataclass(frozen=True)
class Call:
    """One tool call as the model wrote it: the python tool's code, or a user tool's name and arguments."""

    name: str
    arguments: object  # python: the code (str); a user tool: the JSON arguments
    error: str | None = None  # a malformed call: this is its output, and it is not run


def python_output_text(output: str) -> str:
    """The python tool's output as it follows the model's "```output" (ToRL's layout)."""
    return "\n" + output.strip("\n") + "\n" + FENCE + "\n"


def python_call(turn_text: str) -> Call:
    """The code of the last ```python block before the turn's final "```output"."""
    head = turn_text[: turn_text.rfind(OUTPUT_OPEN)]
    start = head.rfind(PYTHON_OPEN)
    if start < 0:
        return Call(PYTHON, "", error=f"SyntaxError: no {PYTHON_OPEN} block before {OUTPUT_OPEN}")
    body = head[start + len(PYTHON_OPEN) :]
    end = body.rfind(FENCE)
    return Call(PYTHON, (body[:end] if end >= 0 else body).strip("\n"))


def split_python_trajectory(text: str) -> list[tuple[str, Call | None, str | None]] | None:
    """A trajectory written out in the python tool's layout (a golden answer, a warm start's solution) as [(the
    model's text, the call it ends with or None, the output written after it)], or None when a "```output" block
    is not closed. Without a call, the whole text is the model's."""
    parts, start = [], 0
    while (end := text.find(OUTPUT_OPEN, start)) >= 0:
        model = text[start : end + len(OUTPUT_OPEN)]
        block = PYTHON_OUTPUT.match(text, end + len(OUTPUT_OPEN))
        if block is None:
            return None
        parts.append((model, python_call(model), block.group(1)))
        start = block.end()
    return [*parts, (text[start:], None, None)]


@dataclass(frozen=True)
class UserTool:
    """A user's function as a tool: where it lives (imported again inside the sandbox) and its JSON schema."""

    module: str
    function: str
    schema: dict
    root: str  # the import root of its module, bound read-only into the sandbox

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


def load_user_tool(spec: str) -> UserTool:
    """`package.module:function` -> UserTool; ValueError naming the spec when it cannot be a tool."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--tools {spec!r}: expected 'python' or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--tools {spec!r}: cannot import module {module_name!r}: {e}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"--tools {spec!r}: module {module_name!r} has no function {attr!r}")
    try:
        schema = get_json_schema(func)
    except Exception as e:  # transformers' DocstringParsingException / TypeHintParsingException
        raise ValueError(
            f"--tools {spec!r}: its signature and docstring must give a JSON schema (type hints, and a Google-style "
            f"docstring with an Args section): {e}"
        ) from None
    root = import_root(module)
    if os.geteuid() == 0:  # the call runs as an unprivileged uid of its own (gcpo_fast/tools/sandbox.py)
        closed = _closed_to_others(Path(root), Path(module.__file__).resolve())
        if closed:
            raise ValueError(
                f"--tools {spec!r}: {closed} is not readable by other users, and each call runs as an unprivileged "
                f"uid of its own: chmod o+rX the module's folders and file (under {root})"
            )
    return UserTool(module_name, attr, schema, root)


def _closed_to_others(root: Path, file: Path) -> str | None:
    """The first folder from the import root down to the module, or the module's file, that other users cannot
    read (a folder: list and enter), else None."""
    folders = [root, *reversed([p for p in file.parents if p.is_relative_to(root) and p != root])]
    for folder in folders:
        if folder.stat().st_mode & 0o005 != 0o005:
            return str(folder)
    return None if file.stat().st_mode & 0o004 else str(file)


def import_root(module) -> str:
    """The sys.path folder a module was imported from (the folder above its top-level package)."""
    path = Path(module.__file__).resolve()
    levels = module.__name__.count(".") + 1 + (path.name == "__init__.py")
    for _ in range(levels):
        path = path.parent
    return str(path)


def user_tool_calls(turn_text: str, tools: dict[str, UserTool]) -> list[Call]:
    """The Hermes calls of a turn, each parsed or marked malformed."""
    calls = [_parse_call(m.group(1), tools) for m in TOOL_CALL.finditer(turn_text)]
    if turn_text.count("<tool_call>") > len(calls):
        calls.append(Call("unknown", {}, error="SyntaxError: a <tool_call> without its </tool_call>"))
    return calls


def _parse_call(body: str, tools: dict[str, UserTool]) -> Call:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return Call("unknown", {}, error=f"JSONDecodeError: the tool call is not JSON: {e}")
    name = call.get("name") if isinstance(call, dict) else None
    arguments = call.get("arguments", {}) if isinstance(call, dict) else None
    if isinstance(arguments, str):  # some templates write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if name not in tools:
        return Call(str(name), {}, error=f"NameError: no tool named {name!r} (tools: {', '.join(tools)})")
    if not isinstance(arguments, dict):
        return Call(name, {}, error='TypeError: "arguments" must be a JSON object')
    return Call(name, arguments)


class ToolSet:
    """The run's tools (--tools): how calls are found in a turn, run in the sandbox and turned into token ids."""

    def __init__(self, specs: list[str], tokenizer, sandbox: Sandbox):
        self.tokenizer, self.sandbox = tokenizer, sandbox
        self.python = PYTHON in specs
        self.functions = {t.name: t for t in (load_user_tool(s) for s in specs if s != PYTHON)}
        if PYTHON in self.functions:
            raise ValueError(f"--tools: a user tool may not be named {PYTHON!r} (the built-in python tool's name)")
        self.stop = (OUTPUT_OPEN,) if self.python else ()
        self.schemas = [t.schema for t in self.functions.values()] or None
        if self.functions:
            tool_suffix_ids(tokenizer, [{"role": "tool", "name": next(iter(self.functions)), "content": "1"}])

    def calls_in(self, turn_text: str, ended_at_eos: bool) -> list[Call] | None:
        """The calls a turn ended with, or None: a python call when it stopped at "```output", user tools' calls
        when it ended its turn (EOS) holding <tool_call>."""
        if self.python and not ended_at_eos and turn_text.rstrip().endswith(OUTPUT_OPEN):
            return [python_call(turn_text)]
        if self.functions and ended_at_eos and "<tool_call>" in turn_text:
            return user_tool_calls(turn_text, self.functions)
        return None

    def split_trajectory(self, text: str) -> list[tuple[str, Call | None, str | None]] | None:
        """split_python_trajectory with this run's tools: without the python tool the whole text is the model's."""
        return split_python_trajectory(text) if self.python else [(text, None, None)]

    def run(self, call: Call) -> Result:
        """One call in the sandbox (a malformed one is not run: its error is its output)."""
        if call.error is not None:
            return Result(call.error, "error")
        if call.name == PYTHON:
            return self.sandbox.run_python(call.arguments)
        tool = self.functions[call.name]
        return self.sandbox.call(tool.module, tool.function, call.arguments, roots=(tool.root,))

    def output_ids(self, calls: list[Call], results: list[Result]) -> list[int]:
        """The token ids that follow the turn: the python tool's output block, or the chat template's tool
        messages and the next assistant header."""
        if calls[0].name == PYTHON:  # one per turn: the turn stopped at its "```output"
            return self.tokenizer(python_output_text(results[0].output), add_special_tokens=False).input_ids
        messages = [{"role": "tool", "name": c.name, "content": r.output.strip("\n")} for c, r in zip(calls, results)]
        return tool_suffix_ids(self.tokenizer, messages)


def tool_suffix_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids the chat template puts after an assistant turn that called a tool: the tool messages and the next
    assistant header. ValueError when the template renders no tool message after such a turn."""
    call = {"type": "function", "function": {"name": messages[0]["name"], "arguments": {}}}
    dummy = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    try:
        prefix = tokenizer.apply_chat_template(dummy, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(
            dummy + messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
    except Exception as e:  # jinja's TemplateError, or a template that assumes fields
        raise ValueError(f"the tokenizer's chat template cannot render a tool call and its result: {e}") from None
    eos = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    prefix = prefix[: eos[-1] + 1] if eos else prefix
    if full[: len(prefix)] != prefix or len(full) == len(prefix):
        raise ValueError(
            "the tokenizer's chat template does not render a tool result after an assistant turn that called a "
            "tool (its rendering of the turn is not a prefix of the rendering with the result)"
        )
    return full[len(prefix) :]


def trajectory_messages(tokenizer, ids: list[int], tool_mask: list[int]) -> list[dict]:
    """A completion as its runs of model and tool tokens, decoded: [{"role": "assistant" | "tool", "content"}]
    (what conversational reward functions receive, and how samples.jsonl marks tool outputs)."""
    messages, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or tool_mask[end] != tool_mask[start]:
            role = "assistant" if tool_mask[start] else "tool"
            messages.append({"role": role, "content": tokenizer.decode(ids[start:end], skip_special_tokens=True)})
            start = end
    return messages
