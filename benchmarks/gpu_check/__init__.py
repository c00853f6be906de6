"""The GPU check: every CUDA path of the project in one command under a time budget, and one report.

    python -m benchmarks.gpu_check --out $OUT --budget 420     # on the GPU machine (benchmarks/README.md)
    python -m benchmarks.gpu_check --cpu-rehearsal --out /tmp/r  # the same stages at toy shapes, here
    python -m benchmarks.gpu_check --dry_run                   # the stages' commands and caps
    python -m benchmarks.gpu_check --stages loss_7b,fsdp --budget 200 --out $OUT   # a rerun of some stages

Stages, in order of value (plan.py): environment (a C compiler, Python.h, one tiny Triton kernel: what every
Triton stage needs), tests (CUDA tests of packed attention, packing and the kernels), kernel_regs
(registers/spills as the device's Triton compiled them), make_model (a random Qwen2.5-1.5B), update and
update_ckpt (the trainer at 64 rows a step in 4 micro-batches of 16 x ~396 tokens, bf16, gradient checkpointing
off/on: time, tokens/s, MFU, peak memory beside the planner's estimate, the fused op's input dtypes and config,
the attention implementation), loss_7b (bench_loss at Qwen2.5-7B's head, N=16384, bf16, against naive, the GEMM
floor, Liger, TRL's fused LM head and CCE), fsdp and fsdp_offload (FSDP2, a world of one on NCCL), default (the
shipped default, 3 steps). Each runs in its own process group with timeout min(cap, budget left); the report
(OUT/gpu_report.md, OUT/gpu_report.json; full output in OUT/gpu_check.log, bench_loss.json) is rewritten after
each stage (runner.py). Without CUDA, and without --cpu-rehearsal, it prints one line and exits with status 2;
after the report, status 1 when a stage failed, timed out or was skipped for the budget or a failed stage it
needs (a stage that cannot run on this machine, e.g. fsdp_offload in the rehearsal, is no failure); else 0.
--dry_run also prints the memory planner's worst case of each trainer stage on one 80 GB GPU.
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

from benchmarks.gpu_check.plan import GPU_BUDGET_S, REHEARSAL_BUDGET_S, ROOT, stages


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_check", help="folder for the report (a few files)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all stages together (default: 420 on "
                    "the GPU, 900 in the rehearsal)")  # fmt: skip
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


def planned_line(stage, work: Path) -> str:
    """The planner's worst case for a trainer stage on one 80 GB GPU (plan.planned_memory), one line: its model is
    the random Qwen2.5-1.5B make_model writes (from its config) or the shipped model."""
    from transformers import AutoConfig, Qwen2Config

    from benchmarks.gpu_check.make_model import SHAPES
    from benchmarks.gpu_check.plan import planned_memory
    from gcpo_fast.errors import ConfigError
    from gcpo_fast.models.loading import DEFAULT_MODEL

    argv = stage.trainer_argv()
    on_made = "--model" in argv and argv[argv.index("--model") + 1] == str(work / "model")
    config = Qwen2Config(**SHAPES["qwen2.5-1.5b"], tie_word_embeddings=True) if on_made else None
    try:
        plan = planned_memory(stage, config or AutoConfig.from_pretrained(DEFAULT_MODEL))
    except ConfigError as e:  # fsdp_cpu_offload's options are refused where there is no CUDA
        return f"no memory plan here: {e}"
    fits = "fits" if plan.total() <= plan.device_memory else "DOES NOT FIT"
    return f"{plan.summary('worst case, planned')}: {fits}"


def main(argv=None) -> None:
    from benchmarks.gpu_check import figures, runner

    a = parse_args(argv)
    if a.budget is None:
        a.budget = float(REHEARSAL_BUDGET_S if a.cpu_rehearsal else GPU_BUDGET_S)
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
            if not a.cpu_rehearsal and s.trainer_argv() is not None:
                print(f"  {planned_line(s, work)}")
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
        results = runner.run_all(plan, out, work, a.budget, report, peak, start)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(out / "gpu_report.md")
    bad = runner.incomplete(results)
    if bad:  # after the report is written: a failed stage still brings back what the others measured
        print(f"gpu_check: {len(bad)} stage(s) did not pass: " + "; ".join(bad), file=sys.stderr)
        sys.exit(1)
