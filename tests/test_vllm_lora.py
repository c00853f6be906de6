"""`python -m gcpo_fast.train --use_vllm --use_peft` for real on the CPU (skipped where vLLM or PEFT is missing).

    OMP_NUM_THREADS=1 /tmp/venv-vllm/bin/python -m pytest -q tests/test_vllm_lora.py

Three LoRA steps of the shipped default with rollouts from vLLM, at a learning rate large enough that the
adapters move the policy far in one step: after every step the engine gets the merged weights (W + delta under
the base model's names, gcpo_fast/lora.py), so the trainer's log-probs of vLLM's samples stay within fp32 noise
of vLLM's own (an engine left on the base weights would be far off: tests/test_vllm_engine.py measures that gap
for a full-weight step; with the base weights sent instead of the merged ones, the gap after step 1 is ~10
nats). --lora_dropout 0: dropout would make the trainer's log-probs noisy on purpose.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("peft")


def test_vllm_samples_from_the_merged_adapters(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "gcpo_fast.train", "--use_vllm", "--use_peft", "--lora_dropout", "0"]
    cmd += ["--max_steps", "3", "--output_dir", str(out), "--learning_rate", "3e-2", "--eval_steps", "0"]
    cmd += ["--save_steps", "0", "--per_device_train_batch_size", "32"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert m["sampling/sampling_logp_difference/max"] < 1e-3, m
        assert 0.99 < m["sampling/importance_sampling_ratio/mean"] < 1.01, m
    assert all("timing/weight_sync" in m for m in lines)  # the first round too: the engine loaded the bare base
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
