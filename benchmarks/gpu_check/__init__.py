"""The GPU check: every CUDA path of the project in one command under a time budget, and one report.

    python -m benchmarks.gpu_check --out $OUT --budget 420     # on the GPU machine (benchmarks/README.md)
    python -m benchmarks.gpu_check --cpu-rehearsal --out /tmp/r  # the same stages at toy shapes, here
    python -m benchmarks.gpu_check --dry_run                   # the stages' commands and caps
    python -m benchmarks.gpu_check --stages loss_7b,fsdp --budget 200 --out $OUT   # a rerun of some stages

Stages, in order of value (plan.py): tests (CUDA tests of the kernels and packed attention), kernel_regs
(registers/spills as the device's Triton compiled them), make_model (a random Qwen2.5-1.5B), update and
update_ckpt (the trainer at ~64 rows x 384 tokens, bf16, gradient checkpointing off/on: time, tokens/s, MFU,
peak memory, the fused op's input dtypes), loss_7b (bench_loss at Qwen2.5-7B's head, N=16384, bf16, against
naive, the GEMM floor, Liger and CCE), fsdp and fsdp_offload (FSDP2, a world of one on NCCL), default (the
shipped default, 3 steps). Each runs in its own process group with timeout min(cap, budget left); the report
(OUT/gpu_report.md, OUT/gpu_report.json; full output in OUT/gpu_check.log, bench_loss.json) is rewritten after
each stage (runner.py). Without CUDA, and without --cpu-rehearsal, it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_check.plan import ROOT, stages


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_check", help="folder for the report (a few files)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all stages together")
    ap.add_argument("--cpu-rehearsal", action="store_true", help="toy shapes on the CPU; the report says REHEARSAL")
    ap.add_argument("--stages", default=None, help="comma list of stage names to run (default: all)")
    ap.add_argument("--work", default=None, help="scratch folder (model folders, runs); default: a temporary one")
    ap.add_argument("--peak_tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU")
    ap.add_argument("--dry_run", action="store_true", help="print the stages' commands and caps, run nothing")
    return ap.parse_args(argv)


def cuda_visible() -> bool:
    """torch.cuda.is_available() in a subprocess: the runner itself never initialises CUDA."""
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def main(argv=None) -> None:
    from benchmarks.gpu_check import figures, runner

    a = parse_args(argv)
    if a.budget <= 0:
        sys.exit(f"gpu_check: error: --budget {a.budget:g}: must be positive (seconds)")
    # created only when the stages run (not for --dry_run or without CUDA); removed at the end unless --work
    work = Path(a.work) if a.work else Path(tempfile.gettempdir()) / f"gpu_check_{os.getpid()}"
    plan = stages(work, rehearsal=a.cpu_rehearsal)
    if a.stages:
        names = a.stages.split(",")
        unknown = sorted(set(names) - {s.name for s in plan})
        if unknown:
            sys.exit(f"gpu_check: error: unknown stage(s) {', '.join(unknown)}; choose from {[s.name for s in plan]}")
        plan = [s for s in plan if s.name in names]
    if a.dry_run:
        for s in plan:
            print(f"{s.name} (cap {s.cap_s} s): {' '.join(s.cmd)}")
        return
    if not a.cpu_rehearsal and not cuda_visible():
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a GPU, or "
            "--cpu-rehearsal for the same stages at toy shapes here",
            file=sys.stderr,
        )
        sys.exit(2)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_text("")
    start = time.monotonic()  # the budget counts the machine probe too
    info = runner.env_info(timeout=min(60.0, a.budget / 4))
    peak = a.peak_tflops or figures.peak_tflops(info.get("gpu"))
    report = runner.Report(out, info, a.budget, a.cpu_rehearsal, sys.argv[1:] if argv is None else argv, peak)
    try:
        runner.run_all(plan, out, work, a.budget, report, peak, start)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(out / "gpu_report.md")
