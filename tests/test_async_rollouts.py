"""Rollouts sampled ahead of the trainer (--async_rollouts): the staleness bound, the sampling weight against the
true policy lag, resume, and two ranks under torchrun; the HF engine in a real server process of its own, which
dies with the trainer (real signals); a server restarted under the run costs a round, not the run.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_async_rollouts.py
"""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from server_process import KEY, ServerProcess
from tiny_model import child_env
from trainer_steps import check_policy_lag

from gcpo_fast.config import parse_config
from gcpo_fast.distributed.parallel import free_port
from gcpo_fast.engines.server_http import API_KEY_ENV
from gcpo_fast.errors import ConfigError, TrainingError
from gcpo_fast.train import Trainer, train

SMALL = [
    "--num_generations", "4", "--per_device_train_batch_size", "16", "--max_completion_length", "48",
    "--eval_steps", "0", "--save_steps", "0", "--logging_steps", "1",
]  # fmt: skip


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_rounds_run_ahead_but_never_past_the_bound(tmp_path, max_staleness):
    out = tmp_path / "run"
    argv = [*SMALL, "--output_dir", str(out), "--max_steps", "5", "--async_rollouts"]
    train(parse_config([*argv, "--max_staleness", str(max_staleness)]))
    steps = metrics_of(out)
    lags = [m["async/staleness_max"] for m in steps]
    assert steps[0]["async/staleness"] == 0  # the first round waits for nothing but the engine's first weights
    assert max(lags) <= max_staleness
    assert max(lags) >= 1  # it did sample ahead: a round was drawn while the trainer trained on an earlier one
    assert all(m["async/dropped_rounds"] == 0 for m in steps)
    assert all("timing/rollout/generate" in m and "async/queue_wait" in m for m in steps)
    assert all(m["rewards/checker_timeouts"] == 0 for m in steps)  # the producer's checks, counted (none ran out)
    # the engine samples elsewhere, so every round carries the sampling weight and its metrics
    assert all("sampling/sampling_logp_difference/mean" in m for m in steps)


def test_the_sampling_weight_carries_the_true_policy_lag(tmp_path):
    """Round 0 is sampled by the trainer's own weights (staleness 0: the engine's log-probs are the trainer's up to
    rounding); round 1 by the weights before step 1 (staleness 1): its logged difference is the gap between the
    two policies, computed here from fp64 forwards of each."""
    check_policy_lag([*SMALL, "--output_dir", str(tmp_path / "run"), "--async_rollouts"])


def test_resume_samples_the_rounds_in_flight_again(tmp_path):
    """The checkpoint's data cursor is that of the rounds the trainer took, not of those drawn ahead; the resumed
    run goes on within the bound."""
    out = tmp_path / "run"
    argv = [*SMALL, "--output_dir", str(out), "--async_rollouts", "--max_staleness", "2"]
    train(parse_config([*argv, "--max_steps", "2", "--save_steps", "2"]))
    state = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    prompts_per_round = 16 // 4
    assert state["sampler"]["index"] == 2 * prompts_per_round  # the producer had drawn 3 or 4 rounds by then
    train(parse_config([*argv, "--max_steps", "4", "--resume"]))
    steps = metrics_of(out)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(m["async/staleness_max"] <= 2 and m["async/dropped_rounds"] == 0 for m in steps)


def test_two_ranks_under_torchrun(tmp_path):
    out = tmp_path / "run"
    env = child_env()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gcpo_fast.train",
        *SMALL, "--output_dir", str(out), "--max_steps", "3", "--async_rollouts", "--max_staleness", "1",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = metrics_of(out)
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(m["async/staleness_max"] <= 1 for m in steps)


def test_a_killed_generation_server_stops_the_run_with_one_line(tmp_path):
    cfg = parse_config([*SMALL, "--output_dir", str(tmp_path / "run"), "--max_steps", "4", "--async_rollouts"])
    trainer = Trainer(cfg)
    try:
        trainer.resync_engine()
        trainer.producer.start()
        trainer.train_step()
        trainer.engine.process.kill()
        with pytest.raises(TrainingError) as error:
            for _ in range(3):  # the round sampled ahead may have been queued before the kill
                trainer.train_step()
    finally:
        trainer.producer.stop()
        trainer.engine.close()
        trainer.producer.close()
    message = str(error.value)
    assert "\n" not in message and trainer.engine.base_url in message, message


def test_options_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="weight_sync_steps=3 must be <= max_staleness=2"):
        parse_config(["--async_rollouts", "--max_staleness", "2", "--weight_sync_steps", "3"])
    with pytest.raises(ConfigError, match="max_staleness must be >= 1"):
        parse_config(["--async_rollouts", "--max_staleness", "0"])


def alive(pid: int) -> bool:
    """Whether process pid runs (a zombie no longer does)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def generation_server_of(pid: int, timeout: float = 300) -> int:
    """The pid of the generation server process `pid` started, once it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                command = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"gcpo_fast.serve" in command and alive(int(child)):
                    return int(child)
        time.sleep(0.5)
    raise AssertionError("the trainer started no generation server")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_the_trainers_own_server_dies_with_the_trainer(tmp_path, signum):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gcpo_fast.train", *SMALL, "--output_dir", str(out), "--max_steps", "1000"]
    with open(tmp_path / "trainer.log", "w") as log:
        trainer = subprocess.Popen([*cmd, "--async_rollouts"], env=child_env(), stdout=log, stderr=log)
    try:
        server = generation_server_of(trainer.pid)
        server_log = out / "generation_server.log"  # in the run directory, not the system's temporary folder
        deadline = time.monotonic() + 120
        while "engine for" not in (server_log.read_text() if server_log.exists() else ""):
            assert time.monotonic() < deadline, (tmp_path / "trainer.log").read_text()[-2000:]
            time.sleep(0.5)
        time.sleep(3)  # training, and the server generating
        trainer.send_signal(signum)
        trainer.wait(60)
        deadline = time.monotonic() + 30
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(server), f"the generation server outlived its trainer ({signal.Signals(signum).name})"
        assert "standard input closed: closed" in server_log.read_text()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_restarted_server_costs_a_round_not_the_run(tmp_path, monkeypatch, signum):
    """A server (the HF engine standing in for vLLM's) stopped after step 2 (SIGTERM: its generation in flight
    answered 503; SIGKILL: its connections reset) and started again on its port: the trainer waits for it, drops
    the round it samples with its initial weights, sends the weights again, and finishes every step within the
    bound."""
    port, out = free_port(), tmp_path / "run"
    monkeypatch.setenv(API_KEY_ENV, KEY)
    server_mode = ["--use_vllm", "--vllm_mode", "server", "--vllm_server_base_url", f"http://127.0.0.1:{port}"]
    server_mode += ["--vllm_group_port", str(free_port())]
    argv = [*SMALL, *server_mode, "--output_dir", str(out), "--max_steps", "6", "--async_rollouts"]
    servers = [ServerProcess(port, api_key=KEY, log=tmp_path / "server-1.log").__enter__()]

    def restart_after_step_2():
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        servers[0].process.send_signal(signum)
        servers[0].process.wait()
        servers.append(ServerProcess(port, api_key=KEY, log=tmp_path / "server-2.log").__enter__())

    restarting = threading.Thread(target=restart_after_step_2)
    restarting.start()
    try:
        train(parse_config(argv))
    finally:
        restarting.join(300)
        for server in servers:
            server.__exit__()
    steps = metrics_of(out)
    assert len(servers) == 2 and [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1]["async/dropped_rounds"] >= 1
    assert all(m["async/staleness_max"] <= 1 for m in steps)
