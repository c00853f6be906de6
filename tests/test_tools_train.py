"""Training with the python tool on (--tools python) through the trainer's other paths: rollouts sampled ahead
(--async_rollouts, the HF engine in a process of its own), LoRA adapters (--use_peft) and FSDP2 on two gloo ranks
under torchrun. Each is a real run of a few steps of a model that calls the tool (the shipped model taught three
level-8 trajectories, tests/tool_setup.py), and each checks that rollouts called the tool, that the outputs they
read came from the sandbox, and that the weights moved. Last, the tool demo's start: GCPO's golden calls teach the
tool model (gcpo_fast/assets/tool_model) a call it does not make on level 8, where GRPO gets no gradient.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tools_train.py

Needs bubblewrap (skipped without it outside CI).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_model import child_env
from tool_setup import taught_python_caller

from gcpo_fast.config import parse_config
from gcpo_fast.data.tasks import train_split
from gcpo_fast.models.loading import TOOL_MODEL
from gcpo_fast.tools.sandbox import Limits, Sandbox
from gcpo_fast.tools.task import with_python_golden
from gcpo_fast.train import train

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None and not os.environ.get("CI"), reason="bubblewrap (bwrap) is not installed"
)
RECORDS = train_split(3, seed=5, levels=[8])
CALL = re.compile(r"```python\nprint\((\d+)\*(\d+)\)\n```\n```output$")


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """A model folder that calls the python tool on RECORDS' prompts, and those records as a dataset whose golden
    answers are the calls (so all-wrong groups get golden trajectories, re-run in the sandbox)."""
    root = tmp_path_factory.mktemp("tools_train")
    model, tokenizer, _, _ = taught_python_caller(RECORDS, Sandbox(Limits(timeout=5.0)))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [
        {"prompt": r["prompt"], "solution": r["golden"], "answer": r["answer"]} for r in with_python_golden(RECORDS)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_args(caller, out, *extra) -> list[str]:
    return [
        "--model",
        str(caller / "model"),
        "--dataset",
        str(caller / "train.jsonl"),
        "--tools",
        "python",
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "12",
        "--max_completion_length",
        "64",
        "--learning_rate",
        "1e-4",
        "--max_steps",
        "3",
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--logging_steps",
        "1",
        "--sample_steps",
        "1",
        "--num_samples_to_log",
        "3",
        "--output_dir",
        str(out),
        "--reward_funcs",
        "tiny_model:zero_reward",
        *extra,
    ]  # fmt: skip  (every group all wrong: each step trains the golden trajectories against the rollouts)


def check_tool_run(out, prompts: int = 3) -> list[dict]:
    """Every step's rollouts called the tool and every group got its golden trajectory (re-run, none dropped); the
    outputs the logged rollouts read are what their code prints in the sandbox. Returns the steps' metrics."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(m["tools/calls_per_rollout"] >= 0.5 and m["tools/token_fraction"] > 0 for m in steps), steps
    assert all(m["gcpo/golden_rows"] == prompts and m["gcpo/golden_tool_mismatch"] == 0 for m in steps), steps
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    checked = 0
    for sample in (s for s in samples if not s["golden"]):
        turns = sample["trajectory"]
        for call, output in zip(turns, turns[1:]):
            if output["role"] == "tool" and (code := CALL.search(call["content"])):
                assert output["content"] == f"\n{int(code[1]) * int(code[2])}\n```\n", sample
                checked += 1
    assert checked >= 3, samples
    return steps


def final_weights(out) -> dict:
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(checkpoint / name)


def test_async_rollouts_call_the_tool_and_the_correction_ignores_tool_tokens(tmp_path, caller):
    out = tmp_path / "run"
    train(parse_config(run_args(caller, out, "--async_rollouts", "--max_staleness", "1")))
    steps = check_tool_run(out)
    assert steps[0]["async/staleness_max"] == 0 and max(m["async/staleness_max"] for m in steps) <= 1
    # round 0 was sampled by the trainer's own weights in the engine's process: over the tokens the correction
    # reads, the engine's log-probs are the trainer's up to rounding; a tool token's (its placeholder 0.0 against
    # the trainer's log-prob) would be far off
    assert steps[0]["sampling/sampling_logp_difference/max"] < 1e-3, steps[0]
    weights = final_weights(out)
    taught = load_file(caller / "model" / "model.safetensors")
    assert any(not torch.equal(weights[k], taught[k]) for k in taught)


def test_lora_adapters_train_on_tool_rollouts(tmp_path, caller):
    pytest.importorskip("peft")
    out = tmp_path / "run"
    train(parse_config(run_args(caller, out, "--use_peft", "--lora_r", "4")))
    check_tool_run(out)
    adapters = final_weights(out)
    assert adapters and all("lora_" in k for k in adapters)
    assert any(k.endswith("lora_B.weight") and adapters[k].abs().max() > 0 for k in adapters)  # B starts at 0


def test_fsdp_on_two_ranks_under_torchrun_with_tools(tmp_path, caller):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gcpo_fast.train"]
    cmd += run_args(caller, out, "--parallelism", "fsdp", "--per_device_train_batch_size", "4")  # a prompt a rank
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check_tool_run(out, prompts=2)
    weights = final_weights(out)
    taught = load_file(caller / "model" / "model.safetensors")
    assert any(not torch.equal(weights[k], taught[k]) for k in taught)


def test_golden_trajectories_teach_the_tool_model_a_call_it_does_not_make(tmp_path):
    """The tool demo in four steps (docs/results.md, "Tools on level 8"): on level 8 the tool model seldom calls the
    python tool and every rollout is wrong; GCPO's golden rows are the call, and within a few updates most rollouts
    make it. GRPO with the tool has nothing to learn from (every group all wrong: no gradient)."""
    calls = {}
    for method in ("gcpo", "grpo"):
        out = tmp_path / method
        args = ["--loss_type", method, "--model", TOOL_MODEL, "--tools", "python", "--builtin_levels", "8"]
        args += ["--learning_rate", "1e-3", "--warmup_ratio", "0", "--max_steps", "4", "--eval_steps", "0"]
        train(parse_config([*args, "--save_steps", "0", "--sample_steps", "0", "--output_dir", str(out)]))
        steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in m]
        calls[method] = [m["tools/calls_per_rollout"] for m in steps]
        assert steps[0]["reward"] == 0.0 and calls[method][0] <= 0.2, steps[0]
    assert calls["gcpo"][-1] >= 0.5, calls
    assert max(calls["grpo"]) <= 0.2, calls
