"""`python -m gcpo_fast.serve --engine vllm` with real vLLM on the CPU, and the trainer against it (skipped where
vLLM is not installed).

    .ci/vllm_env /tmp/venv-vllm && OMP_NUM_THREADS=1 /tmp/venv-vllm/bin/python -m pytest -q tests/test_vllm_server.py

The shipped model in fp32 on both sides, references in fp64 from its logits on, and tests/test_vllm_engine.py's
tolerance: vLLM's log-probs agree with HF's to ~2e-5, LOGP_TOL = 1e-3, and an AdamW step at lr 1e-2 moves them
by far more (the test asks for > 100 x LOGP_TOL). The weights reach the server over gloo. One server serves
the module; the trainer's run (last) connects to it as a second client. ~1 min on a 2-core machine.
"""

import copy
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from trainer_steps import check_policy_lag  # noqa: E402

from gcpo_fast.engines.base import Sampling  # noqa: E402
from gcpo_fast.engines.remote import launch_server  # noqa: E402
from gcpo_fast.engines.server_http import API_KEY_ENV  # noqa: E402
from gcpo_fast.models.loading import DEFAULT_MODEL  # noqa: E402

LOGP_TOL = 1e-3
ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of host memory for vLLM's KV cache


@pytest.fixture(scope="module")
def engine(tokenizer):
    options = ("--dtype", "float32", "--gpu_memory_utilization", "0.2", "--max_model_len", "384")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ENV.items():
            mp.setenv(name, value)
        engine = launch_server(DEFAULT_MODEL, tokenizer, engine="vllm", timeout=300, server_args=options)
    yield engine
    engine.close()


@torch.no_grad()
def worst_gap(model, rows, temperature):
    """The largest |server's sampling log-prob - the model's fp64 log-prob at this temperature| over all tokens."""
    worst = 0.0
    for prompt, completion, logp in zip(rows.prompt_ids, rows.completion_ids, rows.sampling_logp, strict=True):
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
        ref = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(logp, dtype=torch.float64)).abs().max().item())
    return worst


def test_sampled_rows_carry_vllms_logprobs(engine, hf, prompt_ids):
    rows = engine.generate(prompt_ids, 4, Sampling(max_completion_length=24, temperature=0.7))
    assert len(rows) == 32 and rows.policy_version == [0] * 32
    assert all(len(lp) == len(c) for lp, c in zip(rows.sampling_logp, rows.completion_ids))
    assert worst_gap(hf, rows, 0.7) < LOGP_TOL


def test_weights_over_gloo_follow_the_trainer(engine, hf, prompt_ids):
    sampling = Sampling(max_completion_length=24, temperature=1.0)
    trained = copy.deepcopy(hf).train()
    width = min(len(p) for p in prompt_ids)
    batch = torch.tensor([p[:width] for p in prompt_ids])
    trained(batch, labels=batch).loss.backward()
    torch.optim.AdamW(trained.parameters(), lr=1e-2).step()
    trained.eval()
    try:
        for version in (1, 2):  # a second update reuses the group
            engine.sync_weights(trained.named_parameters(), version=version)
            rows = engine.generate(prompt_ids, 2, sampling)
            assert rows.policy_version == [version] * len(rows)
            synced, stale = worst_gap(trained, rows, 1.0), worst_gap(hf, rows, 1.0)
            print(f"version {version}: {synced:.2e} from the trained model, {stale:.2e} from the shipped one")
            assert synced < LOGP_TOL < 100 * LOGP_TOL < stale
    finally:
        engine.sync_weights(hf.named_parameters(), version=3)
    assert worst_gap(hf, engine.generate(prompt_ids[:2], 2, sampling), 1.0) < LOGP_TOL


def test_the_trainer_samples_from_the_server(engine, tmp_path):
    """`gcpo_fast.train --use_vllm --vllm_mode server`: a second client of the module's server (its own weight
    group), which gets the trainer's weights before every round: the trainer's log-probs of the server's
    samples stay within fp32 noise at a learning rate that moves them far in one step."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "gcpo_fast.train", "--use_vllm", "--vllm_mode", "server",
        "--vllm_server_base_url", engine.base_url, "--vllm_group_port", str(engine.group_port),
        "--max_steps", "2", "--output_dir", str(out), "--learning_rate", "3e-3", "--warmup_ratio", "0",
        "--eval_steps", "0",
        "--save_steps", "0", "--per_device_train_batch_size", "32",
    ]  # fmt: skip
    env = {**os.environ, **ENV, API_KEY_ENV: engine.api_key}  # the key launch_server gave the server
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["sampling/sampling_logp_difference/max"] < LOGP_TOL, m
        assert 0.99 < m["sampling/importance_sampling_ratio/mean"] < 1.01, m
        assert "timing/weight_sync" in m  # the first round's too: the server's weights are not taken on trust


def test_async_rounds_from_the_server_carry_the_true_policy_lag(engine, tmp_path):
    """--async_rollouts against the vLLM server: staleness 0, then 1; the sampling weight's logged gap equals the
    two policies' fp64 difference (tests/trainer_steps.py, check_policy_lag)."""
    server = ["--use_vllm", "--vllm_mode", "server", "--vllm_server_base_url", engine.base_url]
    server += ["--vllm_group_port", str(engine.group_port), "--async_rollouts"]
    small = ["--num_generations", "4", "--per_device_train_batch_size", "16", "--max_completion_length", "48"]
    small += ["--eval_steps", "0", "--save_steps", "0", "--output_dir", str(tmp_path / "run")]
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**ENV, API_KEY_ENV: engine.api_key}.items():
            mp.setenv(name, value)
        check_policy_lag([*server, *small])


def test_what_vllm_refuses_is_a_400_and_the_context_is_vllms(engine):
    """vLLM's own request errors (its temperature is at most 2) are the client's: 400 in one line, not 500; a prompt
    past vLLM's context (--max_model_len 384) is refused before it reaches vLLM."""
    for body, reason in [
        ({"prompts": [[1, 2]], "temperature": 3.0}, "the vllm engine refuses the request: temperature must be in"),
        ({"prompts": [[1] * 300], "max_tokens": 100}, "exceed this server's context of 384 tokens"),
    ]:
        request = urllib.request.Request(
            engine.base_url + "/generate/", data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": f"Bearer {engine.api_key}"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=60)
        assert error.value.code == 400 and reason in json.loads(error.value.read())["error"]
