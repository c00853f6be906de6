"""benchmarks/gpu_check: the CPU rehearsal runs every stage to the end and writes the report; the budget cuts and
kills; without CUDA (and no --cpu-rehearsal) one line and exit status 2; the stages' commands are what the tools
accept."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import bench_loss
from benchmarks.gpu_check import plan, runner
from gcpo_fast.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args, timeout=120):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # no GPU, also on a machine with one
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def test_without_cuda_one_line_and_status_2(tmp_path):
    proc = run_module("--out", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "gpu_report.md").exists()


def test_stages_in_order_within_the_default_budget(tmp_path):
    gpu = plan.stages(tmp_path)
    assert [s.name for s in gpu] == [
        "tests", "kernel_regs", "make_model", "update", "loss_7b", "update_ckpt", "fsdp", "fsdp_offload", "default",
    ]  # fmt: skip
    assert sum(s.cap_s for s in gpu) <= 420  # the documented --budget: every stage can use its cap
    assert [s.name for s in plan.stages(tmp_path, rehearsal=True)] == [s.name for s in gpu]
    assert all(s.skip is None for s in gpu)


def test_stage_commands_parse(tmp_path, monkeypatch):
    gpu = {s.name: s.cmd for s in plan.stages(tmp_path)}
    assert all((ROOT / f).is_file() for f in gpu["tests"] if f.startswith("tests/"))
    assert "tests/test_linear_policy_loss.py" in gpu["tests"]

    loss = bench_loss.parse_args(gpu["loss_7b"][3:])  # bench_loss's own parser: exits on a flag it lacks
    assert (loss.d, loss.v, loss.n, loss.dtype) == (3584, 152064, 16384, "bf16")
    assert loss.variant_list[:3] == ["naive", "gemm-floor", "triton"] and {"liger", "cce"} <= set(loss.variant_list)

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # fsdp_cpu_offload is refused without CUDA
    for name in ("update", "update_ckpt", "fsdp", "fsdp_offload", "default"):
        cmd = gpu[name]
        cfg = parse_config(cmd[cmd.index("--") + 1 :])  # the trainer's own parser and checks
        assert cfg.run.output_dir == str(tmp_path / name)
    update = parse_config(gpu["update"][gpu["update"].index("--") + 1 :])
    assert (update.batch.per_device_train_batch_size, update.rollout.max_completion_length, update.model.bf16) == (
        64,
        372,
        True,
    )
    assert parse_config(gpu["update_ckpt"][gpu["update_ckpt"].index("--") + 1 :]).model.gradient_checkpointing
    assert gpu["fsdp"][1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in gpu["fsdp"]


def test_budget_kills_the_process_group_and_skips_what_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "KILL_GRACE_S", 1)
    monkeypatch.setattr(runner, "MIN_STAGE_S", 1)
    pid_file = tmp_path / "child.pid"
    # a stage that leaves a grandchild running, as torchrun or bench_loss would
    slow = plan.Stage("slow", "sleeps", ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], 60)
    never = plan.Stage("never", "not reached", [sys.executable, "-c", "print(1)"], 60)
    report = runner.Report(tmp_path, {}, 3, True, [], None)
    start = time.monotonic()
    runner.run_all([slow, never], tmp_path, tmp_path, 3, report, None)
    assert time.monotonic() - start < 8
    child = int(pid_file.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    saved = json.loads((tmp_path / "gpu_report.json").read_text())
    assert saved["stages"][0]["status"].startswith("timed out after 2 s")
    assert saved["stages"][1]["status"].startswith("skipped: budget spent")
    md = (tmp_path / "gpu_report.md").read_text()
    assert "| slow | timed out" in md and "| never | skipped: budget spent" in md


def test_cpu_rehearsal_runs_every_stage_to_the_end(tmp_path):
    out = tmp_path / "out"
    proc = run_module("--cpu-rehearsal", "--out", str(out), "--work", str(tmp_path / "work"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "gpu_report.md").read_text()
    assert md.startswith("# GPU check - REHEARSAL on the CPU")
    saved = json.loads((out / "gpu_report.json").read_text())
    assert saved["rehearsal"] and saved["machine"]["torch"]
    status = {s["name"]: s["status"] for s in saved["stages"]}
    assert list(status) == [s.name for s in plan.stages(tmp_path, rehearsal=True)]
    assert status.pop("fsdp_offload") == "skipped: fsdp_cpu_offload needs CUDA (CPU rehearsal)"
    assert set(status.values()) == {"passed"}, status
    fig = {s["name"]: s["figures"] for s in saved["stages"]}
    assert fig["tests"]["passed"] > 0 and "failed" not in fig["tests"]
    assert "no CUDA device" in fig["kernel_regs"]["skipped"] and fig["kernel_regs"]["jit_functions"] >= 2
    for name in ("update", "update_ckpt", "fsdp", "default"):
        f = fig[name]
        assert f["exit"] == 0 and f["steps"] >= 2 and f["tokens_per_step"] > 0 and f["peak_mem_GiB"] > 0, name
        assert f["fused_op"]["calls"] >= 1 and f["fused_op"]["hidden_dtype"] == "torch.float32", name  # CPU: fp32
    assert fig["update"]["tokens_per_step"] > 8 * 24  # 8 rows of 24 completion tokens, plus prompts
    assert {"naive", "gemm-floor"} <= set(fig["loss_7b"]) and fig["loss_7b"]["gemm-floor"]["x_floor"] == 1.0
    assert (out / "bench_loss.json").exists() and (out / "gpu_check.log").stat().st_size > 0
    assert len(list(out.iterdir())) <= 8  # what comes back from the GPU machine: 8 files at most
