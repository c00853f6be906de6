"""`python -m gcpo_fast.train --use_vllm` for real on the CPU (skipped where vLLM is not installed).

    .ci/vllm_env /tmp/venv-vllm && OMP_NUM_THREADS=1 /tmp/venv-vllm/bin/python -m pytest -q tests/test_vllm_train.py

Three steps of the shipped default with rollouts and evaluation from vLLM, at a learning rate large enough
that the weights move far in one step: the trainer's own log-probs of vLLM's samples stay within fp32
noise of vLLM's after every step (the engine was synced; without a sync the gap after a step at this
rate is orders of magnitude larger: tests/test_vllm_engine.py), so the correction's ratios stay near 1.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")


def test_a_short_vllm_run_leaves_the_sampling_metrics(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}  # 1 GiB of host memory for the cache
    cmd = [
        sys.executable,
        "-m",
        "gcpo_fast.train",
        "--use_vllm",
        "--max_steps",
        "3",
        "--output_dir",
        str(out),
        "--learning_rate",
        "3e-3",
        "--warmup_ratio",
        "0",
        "--eval_steps",
        "3",
        "--eval_num_problems",
        "16",
        "--save_steps",
        "0",
        "--per_device_train_batch_size",
        "32",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3] and "eval/mean@1" in lines[0] and "eval/mean@1" in lines[3]
    for m in lines[1:]:
        assert m["sampling/sampling_logp_difference/max"] < 1e-3, m
        assert 0.99 < m["sampling/importance_sampling_ratio/mean"] < 1.01, m
        assert m["sampling/importance_sampling_ratio/min"] <= m["sampling/importance_sampling_ratio/max"]
    assert ["timing/weight_sync" in m for m in lines[1:]] == [False, True, True]  # before rounds 2 and 3
    assert lines[3]["eval/mean@1"] != lines[0]["eval/mean@1"] or lines[3]["loss"] != 0  # it trained
    assert "s in phases: " in done.stdout


def test_the_teacher_is_served_by_vllm_too(tmp_path):
    """--use_vllm with --golden_model: the teacher's candidates come from a second vLLM engine (its folder is
    the one vLLM loads), asked for every all-wrong group of the word problems the shipped model fails."""
    import shutil

    from gcpo_fast.models.loading import DEFAULT_MODEL

    teacher = tmp_path / "teacher"
    shutil.copytree(DEFAULT_MODEL, teacher)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "gcpo_fast.train",
        "--use_vllm",
        "--max_steps",
        "2",
        "--output_dir",
        str(out),
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--builtin_levels",
        "5",
        "--per_device_train_batch_size",
        "32",
        "--golden_source",
        "teacher",
        "--golden_model",
        str(teacher),
        "--golden_num_candidates",
        "2",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"model='{teacher}'" in done.stdout + done.stderr  # vLLM's engine-config log names the teacher folder
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    asked = sum(
        m["gcpo/golden_from_teacher"] + m["gcpo/teacher_no_correct"] + m["gcpo/golden_cache_hits"] for m in lines
    )
    assert asked > 0 and all(m["gcpo/teacher_errors"] == 0 and "timing/teacher" in m for m in lines)
