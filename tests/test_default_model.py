"""The shipped default model (gcpo_fast/assets/default_model): loads with Auto classes, tokenizes, generates, stops."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from gcpo_fast.config import TrainConfig
from gcpo_fast.data.rewards import math_reward
from gcpo_fast.data.tasks import generate_problems, heldout_split
from gcpo_fast.make_default_model import DEFAULT_OUT, encode, sft_records
from gcpo_fast.models.loading import TOOL_MODEL
from gcpo_fast.tools.task import python_golden


def test_the_shipped_model_is_in_the_repository():
    """Missing, every command's default fails: that is the failure this file exists to catch, so it fails here
    (never a skip)."""
    missing = [
        name for name in ("model.safetensors", "config.json", "tokenizer.json") if not (DEFAULT_OUT / name).is_file()
    ]
    assert not missing, f"{DEFAULT_OUT} lacks {missing}: build it with `python -m gcpo_fast.make_default_model`"


@pytest.fixture(scope="module")
def shipped():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_OUT)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_OUT).eval()
    return model, tokenizer


def test_files_and_size():
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
    ):
        assert (DEFAULT_OUT / name).exists(), name
    assert (DEFAULT_OUT / "model.safetensors").stat().st_size < 8.5e6
    config = json.loads((DEFAULT_OUT / "config.json").read_text())
    assert config["tie_word_embeddings"] is True


def test_tokenizer(shipped):
    model, tok = shipped
    # transformers 5 loads a qwen2 model's tokenizer as Qwen2Tokenizer, rebuilt from vocab + merges with its own
    # pre-tokenizer: the ids must still be those of tokenizer.json, which the model was trained on
    raw = Tokenizer.from_file(str(DEFAULT_OUT / "tokenizer.json"))
    for r in generate_problems(300, seed=3):
        text = r["prompt"] + r["solution"]
        assert tok(text)["input_ids"] == raw.encode(text).ids, text
    assert len(tok) == model.config.vocab_size
    assert tok.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    for r in heldout_split(50, seed=0):
        p = tok(r["prompt"])["input_ids"]
        s = tok(r["solution"], add_special_tokens=False)["input_ids"]
        assert tok(r["prompt"] + r["solution"])["input_ids"] == p + s  # no merge across the boundary
        assert tok.decode(s) == r["solution"] and len(s) < 48
        assert p == tok(r["prompt"], add_special_tokens=False)["input_ids"]  # no special tokens added
    # the identity chat template: a prompt wrapped as a user message renders as itself
    msgs = [{"role": "user", "content": "Q: 2+3=?\n"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "Q: 2+3=?\n"


def test_generates_and_stops_at_eos(shipped):
    model, tok = shipped
    records = heldout_split(6, seed=1, levels=[1, 2, 3])
    enc = tok([r["prompt"] for r in records], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=64)
    new = out[:, enc["input_ids"].shape[1] :]
    assert new.shape[1] > 0
    for row in new.tolist():
        assert tok.eos_token_id in row, "generation did not stop"  # stopped before the token budget
        assert all(t == tok.pad_token_id for t in row[row.index(tok.eos_token_id) + 1 :])
    texts = tok.batch_decode(new, skip_special_tokens=True)
    assert all("\\boxed{" in t for t in texts)
    assert sum(math_reward(texts, [r["answer"] for r in records])) >= 1  # easy levels: mostly right


def test_the_tool_model_calls_the_tool_where_its_warm_start_did_and_seldom_on_level_8():
    """The tool demo's start (docs/results.md, "Tools on level 8"): the tool model writes the python tool's call on
    the levels its warm start solved with it, and on level 8 seldom (GCPO's golden rows must teach it)."""
    tok, model = AutoTokenizer.from_pretrained(TOOL_MODEL), AutoModelForCausalLM.from_pretrained(TOOL_MODEL).eval()
    tool_levels = json.loads((Path(TOOL_MODEL) / "build_info.json").read_text())["tool_levels"]
    assert (
        tool_levels
        and 8 not in tool_levels
        and tok.get_vocab() == AutoTokenizer.from_pretrained(DEFAULT_OUT).get_vocab()
    )

    def calls(level: int, **sampling) -> float:
        prompts = [r["prompt"] for r in heldout_split(200, seed=2, levels=[level]) if python_golden(r)][:16]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=4, pad_token_id=tok.pad_token_id, **sampling)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return sum(t.startswith("```") for t in texts) / len(texts)

    assert all(calls(level, do_sample=False) == 1.0 for level in tool_levels)
    assert calls(8, do_sample=False) <= 2 / 16  # 0 of these 16 when built; a flip or two across torch builds
    assert calls(8, do_sample=True, temperature=1.0, num_return_sequences=8) < 0.1  # 1 of 128 when built


def test_two_step_run_from_the_shipped_defaults(tmp_path):
    """`python -m gcpo_fast.train` exactly as the README runs it, cut to two steps: it finishes, evaluates on
    the builtin held-out split of the levels it trains on, before and after (per level too), saves the model
    and says where."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gcpo_fast.train", "--max_steps", "2", "--output_dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in (lines[0], lines[2]):
        problems = int(m["eval/num_problems"])
        assert problems == 500
        assert sum(m[f"eval/level_{lv}/num_problems"] for lv in set(TrainConfig().data.builtin_levels)) == problems
        assert 0 < m["eval/mean@1"] < 1
    assert lines[1]["reward"] >= 0 and "loss" in lines[1]
    cfg = TrainConfig()
    rollouts = cfg.prompts_per_round * cfg.rollout.num_generations  # one prompt batch a round (GCPO)
    generated = [0] + [m["num_generated_tokens"] for m in lines[1:]]
    for step in (1, 2):  # every sampled completion token, counted as it is generated
        assert generated[step] - generated[step - 1] == pytest.approx(lines[step]["completions/mean_length"] * rollouts)
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint-2").num_parameters() > 0
    assert f"held-out mean@1 on 500 problems: {lines[0]['eval/mean@1']:.3f} at step 0 -> " in done.stdout


def test_the_warm_start_trains_on_a_tool_s_call_never_on_its_output(shipped):
    """make_default_model --tool-levels: a plain solution is encoded whole (the shipped model's data, unchanged);
    a python-tool solution is cut where the tool loop cuts it, and its output block carries no label."""
    _, tokenizer = shipped
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    record = heldout_split(1, seed=3, levels=[8])[0]
    ids, labels = encode(tokenizer, record)
    prompt, solution = ids_of(record["prompt"]), ids_of(record["solution"]) + [tokenizer.eos_token_id]
    assert (ids, labels) == (prompt + solution, [-100] * len(prompt) + solution)

    tool = {**record, "solution": python_golden(record)}
    ids, labels = encode(tokenizer, tool)
    call, output = f"```python\nprint({record['prompt'][3:-3]})\n```\n```output", f"\n{record['answer']}\n```\n"
    boxed = ids_of(f"\\boxed{{{record['answer']}}}") + [tokenizer.eos_token_id]
    assert ids == prompt + ids_of(call) + ids_of(output) + boxed
    assert labels == [-100] * len(prompt) + ids_of(call) + [-100] * len(ids_of(output)) + boxed

    mixed = sft_records(400, seed=0, mix={7: 1.0, 8: 1.0}, tool_levels=(7,))
    assert {r["level"] for r in mixed if r["solution"].startswith("```python")} == {7}
    assert any(r["level"] == 7 and not r["solution"].startswith("```python") for r in mixed)  # word problems
