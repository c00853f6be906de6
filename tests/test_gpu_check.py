"""benchmarks/gpu_check: without CUDA, one line and exit status 2; its commands are what the tools accept."""

import os
import subprocess
import sys
from pathlib import Path

from benchmarks import bench_loss, bench_train, gpu_check

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a machine that has one
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_without_cuda_one_line_and_status_2(tmp_path):
    proc = run_module("--out", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "gpu_check.md").exists()


def test_dry_run_prints_every_stage(tmp_path):
    proc = run_module("--dry_run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.strip().splitlines()
    assert [line.split(" ")[0] for line in printed] == ["tests", "bench_loss", "bench_train"]
    assert sum(limit for _, _, limit in gpu_check.stages(tmp_path)) < 600  # the whole check in under 10 minutes


def test_stage_commands_parse(tmp_path):
    plan = {name: cmd for name, cmd, _ in gpu_check.stages(tmp_path)}
    assert plan["tests"][1:3] == ["-m", "pytest"]
    assert all((ROOT / f).is_file() for f in plan["tests"][3:] if f.startswith("tests/"))
    assert gpu_check.stages(tmp_path, all_tests=True)[0][1][3] == "tests"

    assert plan["bench_loss"][1:3] == ["-m", "benchmarks.bench_loss"]
    loss = bench_loss.parse_args(plan["bench_loss"][3:])  # bench_loss's own parser: exits on a flag it lacks
    assert (loss.d, loss.v, loss.n, loss.dtype) == (3584, 152064, 16384, "bf16")
    assert set(loss.variant_list) == {"naive", "torch", "triton", "liger", "cce", "gemm-floor"}
    assert set(loss.cases) == {"onpolicy-token", "offpolicy-seq"}

    assert plan["bench_train"][1:3] == ["-m", "benchmarks.bench_train"]
    train = bench_train.parse_args(plan["bench_train"][3:])
    assert (
        train.steps >= 2
        and train.rounds == 1
        and train.trainer_list == ["ours", "trl"]
        and train.shape_list == list(bench_train.SHAPES)
    )
    no_trl = {name: cmd for name, cmd, _ in gpu_check.stages(tmp_path, trl=False)}
    assert bench_train.parse_args(no_trl["bench_train"][3:]).trainer_list == ["ours"]


def test_report_lists_every_stage():
    results = [
        ("tests", ["pytest", "tests/x.py"], dict(status="passed", seconds=12.3, output="3 passed\n")),
        (
            "bench_loss",
            ["python", "-m", "benchmarks.bench_loss"],
            dict(status="timed out after 200 s", seconds=200.0, output="\n".join(f"line {i}" for i in range(100))),
        ),
    ]
    md = gpu_check.report(["- GPU: test"], results)
    assert "| tests | passed | 12 |" in md and "| bench_loss | timed out after 200 s | 200 |" in md
    assert "3 passed" in md and "line 99" in md and f"line {99 - gpu_check.TAIL_LINES}\n" not in md
