"""The multi-turn loop (gcpo_fast/tools/loop.py) on Hugging Face generate: the shipped model taught a few
trajectories calls the python tool, and a user tool from a module through a Hermes chat template; the tool tokens
are masked, the outputs come from the sandbox, and the budget, the call limit and malformed calls are handled.
Needs bubblewrap (skipped without it outside CI)."""

import json
import os
import shutil

import pytest
import torch
from tool_setup import HERMES_TEMPLATE, taught_python_caller, teach
from transformers import AutoModelForCausalLM, AutoTokenizer

from gcpo_fast.data.prompts import encode_prompts
from gcpo_fast.data.rewards import math_reward
from gcpo_fast.data.tasks import train_split
from gcpo_fast.engines.base import Sampling, ToolUse
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.models.loading import DEFAULT_MODEL
from gcpo_fast.tools.formats import ToolSet, load_user_tool, tool_suffix_ids
from gcpo_fast.tools.loop import ToolEngine
from gcpo_fast.tools.sandbox import Limits, Sandbox

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None and not os.environ.get("CI"), reason="bubblewrap (bwrap) is not installed"
)
RECORDS = train_split(3, seed=5, levels=[8])


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout=5.0))


@pytest.fixture(scope="module")
def python_model(sandbox):
    """The shipped model taught the python-tool trajectories of three level-8 problems."""
    return taught_python_caller(RECORDS, sandbox)


def test_the_python_tool_runs_between_turns_and_its_tokens_are_masked(python_model):
    model, tokenizer, tools, prompts = python_model
    rows = ToolEngine(HFEngine(model, tokenizer), tools).generate(prompts, 1, Sampling(128, greedy=True))
    answers = [r["answer"] for r in RECORDS]
    assert rows.tool_use == [ToolUse(calls=1, errors=0, timeouts=0, turns=2)] * 3
    assert math_reward(rows.texts, answers) == [1.0] * 3 and rows.truncated == [False] * 3
    for ids, mask, answer in zip(rows.completion_ids, rows.tool_mask, answers):
        tool = [t for t, m in zip(ids, mask) if m == 0]
        assert tool == tokenizer(f"\n{answer}\n```\n", add_special_tokens=False).input_ids  # the sandbox's output
        first_tool = mask.index(0)
        assert tokenizer.decode(ids[:first_tool]).endswith("```output")  # the model's own tokens, up to the stop
        assert ids[-1] == tokenizer.eos_token_id and len(mask) == len(ids)


def test_the_budget_and_the_call_limit_end_a_rollout(python_model):
    model, tokenizer, tools, prompts = python_model
    short = ToolEngine(HFEngine(model, tokenizer), tools).generate(prompts, 1, Sampling(40, greedy=True))
    assert all(len(ids) <= 40 for ids in short.completion_ids) and all(short.truncated)
    limited = ToolEngine(HFEngine(model, tokenizer), tools, max_calls=0)
    rows = limited.generate(prompts, 2, Sampling(128, greedy=True))
    assert [u.calls for u in rows.tool_use] == [0] * 6 and all(rows.truncated)  # ends on the call it may not make
    assert all(text.endswith("```output") for text in rows.texts) and all(min(m) == 1 for m in rows.tool_mask)


def test_a_user_tool_from_a_module_in_the_chat_templates_tool_format(sandbox):
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    tokenizer.chat_template = HERMES_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    tools = ToolSet(["tool_setup:multiply"], tokenizer, sandbox)
    assert tools.schemas[0]["function"]["name"] == "multiply" and tools.stop == ()
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in RECORDS], 512, tools=tools.schemas)
    assert '"multiply"' in tokenizer.decode(prompts[0])  # the template wrote the schema into the prompt
    examples = []
    for prompt, record in zip(prompts, RECORDS):
        a, b = record["prompt"][3:-3].split("*")
        call = json.dumps({"name": "multiply", "arguments": {"a": int(a), "b": int(b)}})
        model_ids = tokenizer(f"<tool_call>\n{call}\n</tool_call>", add_special_tokens=False).input_ids + [0]
        tool_ids = tool_suffix_ids(tokenizer, [{"role": "tool", "name": "multiply", "content": record["answer"]}])
        end = tokenizer(f"\\boxed{{{record['answer']}}}", add_special_tokens=False).input_ids + [0]
        examples.append(
            (prompt, model_ids + tool_ids + end, [1] * len(model_ids) + [0] * len(tool_ids) + [1] * len(end))
        )
    teach(model, tokenizer, examples, steps=200)
    rows = ToolEngine(HFEngine(model, tokenizer), tools).generate(prompts, 1, Sampling(160, greedy=True))
    assert [u.calls for u in rows.tool_use] == [1, 1, 1] and [u.errors for u in rows.tool_use] == [0, 0, 0]
    for ids, mask in zip(rows.completion_ids, rows.tool_mask):
        call = json.loads(tokenizer.decode(ids[: mask.index(0)]).split("<tool_call>")[1].split("</tool_call>")[0])
        product = str(call["arguments"]["a"] * call["arguments"]["b"])  # what the call the model made returns
        expected = tool_suffix_ids(tokenizer, [{"role": "tool", "name": "multiply", "content": product}])
        tool = [t for t, m in zip(ids, mask) if m == 0]
        assert tool == expected, (tokenizer.decode(tool), tokenizer.decode(expected), rows.tool_use)


def test_malformed_and_failing_calls_are_errors_returned_as_output(sandbox):
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    tokenizer.chat_template = HERMES_TEMPLATE
    tools = ToolSet(["python", "tool_setup:multiply", "tool_setup:fail"], tokenizer, sandbox)
    cases = {
        "<tool_call>\n{not json}\n</tool_call>": "JSONDecodeError",
        '<tool_call>\n{"name": "divide", "arguments": {}}\n</tool_call>': "NameError: no tool named 'divide'",
        '<tool_call>\n{"name": "multiply", "arguments": [1, 2]}\n</tool_call>': "TypeError",
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 2}}\n</tool_call>': "TypeError",  # raised inside
        '<tool_call>\n{"name": "fail", "arguments": {"reason": "boom"}}\n</tool_call>': "RuntimeError: boom",
        "<tool_call>\n{": "SyntaxError",
    }
    for text, error in cases.items():
        calls = tools.calls_in(text, ended_at_eos=True)
        result = tools.run(calls[-1])
        assert result.status == "error" and error in result.output, (text, result)
        assert tools.output_ids(calls, [result])  # it goes back to the model
    no_code = tools.calls_in("just words ```output", ended_at_eos=False)
    assert tools.run(no_code[0]).output.startswith("SyntaxError: no ```python block")
    assert tools.calls_in("\\boxed{3}", ended_at_eos=True) is None  # an answer, not a call
    with pytest.raises(ValueError, match="no function 'nope'"):
        ToolSet(["tool_setup:nope"], tokenizer, sandbox)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'tool' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="does not render a tool result"):
        ToolSet(["tool_setup:multiply"], tokenizer, sandbox)  # a template that drops tool messages


@pytest.mark.skipif(os.geteuid() != 0, reason="as root each call runs as a uid of its own; otherwise as the trainer's")
def test_a_user_tool_others_cannot_read_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "closed_tools.py").write_text(
        'def add(a: int) -> int:\n    """Add.\n\n    Args:\n        a: a.\n    """\n'
    )
    tmp_path.chmod(0o700)  # pytest's own folders are; a umask of 077 makes every checkout so
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=f"{tmp_path} is not readable by other users") as e:
        load_user_tool("closed_tools:add")
    assert "\n" not in str(e.value)
    tmp_path.chmod(0o755)
    assert load_user_tool("closed_tools:add").root == str(tmp_path)
