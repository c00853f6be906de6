"""benchmarks/gpu_check: the CPU rehearsal runs every stage to the end and writes the report; the budget cuts and
kills; without CUDA (and no --cpu-rehearsal) one line and exit status 2; the stages' commands are what the tools
accept."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import bench_loss
from benchmarks.gpu_check import plan, run_train, runner
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
        "environment", "tests", "kernel_regs", "make_model", "update", "loss_7b", "update_ckpt", "fsdp",
        "fsdp_offload", "default",
    ]  # fmt: skip
    assert sum(s.cap_s for s in gpu) <= plan.GPU_BUDGET_S - 5  # the default --budget, less the machine probe
    rehearsal = plan.stages(tmp_path, rehearsal=True)
    assert [s.name for s in rehearsal] == [s.name for s in gpu]
    assert sum(s.cap_s for s in rehearsal) <= plan.REHEARSAL_BUDGET_S
    assert all(s.skip is None for s in gpu)
    assert all("environment" in s.needs for s in gpu if s.name not in ("environment", "make_model"))


def test_the_update_stage_fits_80_gb_as_planned(tmp_path):
    """The update stages at their real shape, planned (not run): Qwen2.5-1.5B (make_model's config), 64 rollouts a
    step in micro-batches of 16 with golden rows on top, bf16, K/V counted repeated."""
    from transformers import Qwen2Config

    from benchmarks.gpu_check.make_model import SHAPES
    from gcpo_fast.models.memory import GIB

    config = Qwen2Config(**SHAPES["qwen2.5-1.5b"], tie_word_embeddings=True)
    stages = {s.name: s for s in plan.stages(tmp_path)}
    update, ckpt = (plan.planned_memory(stages[name], config) for name in ("update", "update_ckpt"))
    assert update.total() < 0.75 * 80 * GIB and ckpt.total() < update.total()  # fits with room for the allocator
    assert 20 * GIB < update.activations < 30 * GIB  # 18 rows x (24 + 372) tokens: a micro-batch, not the step's 72
    assert plan.planned_memory(stages["tests"], config) is None


def test_inputs_are_built_on_the_device_at_the_real_shape():
    """loss_7b's and kernel_regs' input builder at Qwen2.5-7B's head (N=16384, V=152064, d=3584) on the meta device:
    no tensor of more than 64k elements may be made on the CPU (sampling there took ~80 s of a 95 s stage)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from benchmarks.variants import device_inputs

    class NoLargeCpuTensor(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 65536:
                    raise AssertionError(f"{func} made a CPU tensor of shape {tuple(t.shape)}")
            return out

    with NoLargeCpuTensor():
        inp = device_inputs(16384, 3584, 152064, 8, torch.bfloat16, "meta", 1.0, 1.0, 0.05, 441, seed=0)
    assert inp["weight"].shape == (152064, 3584) and inp["targets"].shape == (16384,)
    assert all(t.device.type == "meta" for t in inp.values() if isinstance(t, torch.Tensor))


def test_stage_commands_parse(tmp_path, monkeypatch):
    gpu = {s.name: s.cmd for s in plan.stages(tmp_path)}
    test_files = [f for f in gpu["tests"] if f.startswith("tests/")]
    assert all((ROOT / f).is_file() for f in test_files) and "tests/test_linear_policy_loss.py" in test_files
    assert test_files[:2] == ["tests/test_attention.py", "tests/test_packing.py"]  # the real-GPU varlen tests first
    assert "-rfEs" in gpu["tests"]  # failures and errors by name, skips with their reasons

    loss = bench_loss.parse_args(gpu["loss_7b"][3:])  # bench_loss's own parser: exits on a flag it lacks
    assert (loss.d, loss.v, loss.n, loss.dtype) == (3584, 152064, 16384, "bf16")
    assert loss.variant_list[:3] == ["naive", "gemm-floor", "triton"] and {"liger", "trl", "cce"} <= set(
        loss.variant_list
    )

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # fsdp_cpu_offload is refused without CUDA
    for name in ("update", "update_ckpt", "fsdp", "fsdp_offload", "default"):
        cmd = gpu[name]
        cfg = parse_config(cmd[cmd.index("--") + 1 :])  # the trainer's own parser and checks
        assert cfg.run.output_dir == str(tmp_path / name)
    update = parse_config(gpu["update"][gpu["update"].index("--") + 1 :])
    b = update.batch
    assert (b.per_device_train_batch_size, b.gradient_accumulation_steps, b.steps_per_generation) == (16, 4, 12)
    assert (update.rollout.max_prompt_length, update.rollout.max_completion_length, update.model.bf16) == (
        24,
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
    results = runner.run_all([slow, never], tmp_path, tmp_path, 3, report, None)
    assert time.monotonic() - start < 8
    assert [line.split(":")[0] for line in runner.incomplete(results)] == ["slow", "never"]  # exit status 1
    child = int(pid_file.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    saved = json.loads((tmp_path / "gpu_report.json").read_text())
    assert saved["stages"][0]["status"].startswith("timed out after 2 s")
    assert saved["stages"][1]["status"].startswith("skipped: budget spent")
    md = (tmp_path / "gpu_report.md").read_text()
    assert "| slow | timed out" in md and "| never | skipped: budget spent" in md


def test_cpu_rehearsal_runs_every_stage_to_the_end(tmp_path):
    out = tmp_path / "out"
    proc = run_module("--cpu-rehearsal", "--out", str(out), "--work", str(tmp_path / "work"), timeout=1000)
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
    assert fig["environment"]["compiler_ok"] and fig["environment"]["python_h_ok"]
    assert fig["tests"]["passed"] > 0 and "failed" not in fig["tests"]
    assert "no CUDA device" in fig["kernel_regs"]["skipped"] and fig["kernel_regs"]["jit_functions"] >= 2
    for name in ("update", "update_ckpt", "fsdp", "default"):
        f = fig[name]
        assert f["exit"] == 0 and f["steps"] >= 2 and f["tokens_per_step"] > 0 and f["peak_mem_GiB"] > 0, name
        assert f["fused_op"]["calls"] >= 1 and f["fused_op"]["hidden_dtype"] == "torch.float32", name  # CPU: fp32
        assert f["fused_op"]["backend"] == "torch" and f["attention"] == "packed_sdpa", name
        assert 0 < f["estimate_round_GiB"] <= f["estimate_worst_GiB"] and f["worst_over_measured"] > 0, name
    assert fig["update"]["tokens_per_step"] > 2 * 4 * 24  # 2 micro-batches of 4 rows of 24 completion tokens
    assert {"naive", "gemm-floor", "trl"} <= set(fig["loss_7b"]) and fig["loss_7b"]["gemm-floor"]["x_floor"] == 1.0
    assert fig["loss_7b"]["inputs"]["device"] == "cpu"
    assert (out / "bench_loss.json").exists() and (out / "gpu_check.log").stat().st_size > 0
    assert len(list(out.iterdir())) <= 8  # what comes back from the GPU machine: 8 files at most


def test_a_failed_stage_makes_the_exit_status_1_after_the_report(tmp_path):
    """A real failure: the update stage rerun (--stages update) on a work folder without the model it trains."""
    out = tmp_path / "out"
    proc = run_module("--cpu-rehearsal", "--stages", "update", "--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_check: 1 stage(s) did not pass: update: failed")
    saved = json.loads((out / "gpu_report.json").read_text())
    assert [s["status"] for s in saved["stages"]] == ["failed (exit status 1)"]
    assert "| update | failed (exit status 1)" in (out / "gpu_report.md").read_text()


def test_a_stage_that_cannot_run_here_is_no_failure(tmp_path):
    skipped = plan.Stage("offload", "cannot run here", [sys.executable, "-c", "1"], 10, skip="needs CUDA")
    ok = plan.Stage("ok", "passes", [sys.executable, "-c", "1"], 10)
    results = runner.run_all(
        [skipped, ok], tmp_path, tmp_path, 60, runner.Report(tmp_path, {}, 60, True, [], None), None
    )
    assert [r["status"] for r in results] == ["skipped: needs CUDA", "passed"] and runner.incomplete(results) == []


def test_the_environment_stage_names_a_missing_compiler_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_check.environment", "--json", str(tmp_path / "env.json")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    here = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert here.returncode == 0, here.stderr
    found = json.loads((tmp_path / "env.json").read_text())
    assert found["compiler"]["ok"] and found["python_h"]["ok"] and "no CUDA device" in found["kernel"]["skipped"]
    broken = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**env, "CC": "/nonexistent/cc"})
    assert broken.returncode == 1
    assert broken.stderr.strip().splitlines() == [
        "environment: C compiler /nonexistent/cc does not run (No such file or directory)"
    ]


def test_a_stage_cut_by_sigterm_still_writes_its_json(tmp_path):
    """The time limit's SIGTERM: run_train writes the steps metrics.jsonl holds so far, not nothing."""
    result, run = tmp_path / "r.json", tmp_path / "run"
    train = ["--output_dir", str(run), "--max_steps", "200", "--eval_steps", "0", "--sample_steps", "0",
             "--logging_steps", "1", "--max_completion_length", "16", "--per_device_train_batch_size", "8"]  # fmt: skip
    cmd = [sys.executable, "-m", "benchmarks.gpu_check.run_train", "--json", str(result), "--", *train]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.exists() and '"step_time"' in metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-2000:]
    saved = json.loads(result.read_text())
    assert saved["exit"] == 1 and "SIGTERM" in saved["error"] and 1 <= len(saved["steps"]) < 200
    assert saved["attention"] == "packed_sdpa" and saved["fused_op"]["backend"] == "torch"  # what ran, on the CPU


def test_the_time_limit_passes_an_except_exception_on_its_way(monkeypatch):
    """SIGTERM while math-verify parses (its parse catches every Exception and returns []): the stage still ends."""
    import math_verify.parser

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        return ["not reached"]

    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", interrupted)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        run_train.stop_on_sigterm()
        with pytest.raises(run_train.StoppedBySigterm, match="SIGTERM"):
            math_verify.parser.parse("3", parsing_timeout=None)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_plan_7b_without_peft():
    """`python -m benchmarks.bench_memory --plan_7b` where peft is not installed (the GPU machine's image)."""
    code = "import sys; sys.modules['peft'] = None; from benchmarks.bench_memory import main; main(['--plan_7b'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LoRA r=16: no estimate: the adapters are counted with peft" in proc.stdout
    assert "full fine-tuning: memory per device (estimate): 160.32 GiB" in proc.stdout


def test_bench_loss_writes_its_json_after_each_variant(tmp_path):
    """A loss_7b stage cut after its first variant still brings back that variant's figures."""
    cmd = [sys.executable, "-m", "benchmarks.bench_loss", "--quick", "--case", "offpolicy-seq",
           "--variants", "naive,gemm-floor", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    saved = None
    try:
        for line in proc.stdout:
            if "[offpolicy-seq / naive]" in line:  # printed once naive's worker is done, before gemm-floor's starts
                saved = json.loads((tmp_path / "bench_loss.json").read_text())
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert saved is not None, "bench_loss ended without finishing naive"
    assert [r["variant"] for r in saved["results"]] == ["naive"] and saved["results"][0]["status"] == "ok"
    assert saved["config"]["device"] == "cpu" and saved["config"]["inputs_s"] > 0
