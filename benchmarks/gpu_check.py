"""The GPU check: CUDA tests, the fused loss at a 7B lm_head shape, and a short training benchmark, in one report.

    python -m benchmarks.gpu_check                 # on a CUDA machine: under 10 minutes on one H100 / H200
    python -m benchmarks.gpu_check --all_tests     # the whole test suite instead of the device-dependent files
    python -m benchmarks.gpu_check --dry_run       # print the commands it would run (any machine), run nothing

Stages, each a subprocess with its own time limit (the limits add up to under 10 minutes; a stage that hits
its limit is killed and reported as timed out, and the next stage runs):
1. tests: `pytest` on the test files whose tests run on the GPU when one is present (Triton kernels compiled
   instead of interpreted, bf16 cases that the interpreter cannot run, the flash-attention varlen path when
   flash-attn is installed, torch's varlen_attn in packed attention), `-rs` so that every skip is listed
   with its reason.
2. bench_loss: Qwen2.5-7B's lm_head (d=3584, V=152064, `--model qwen7b`), N=16384 packed tokens, bf16, both
   cases, variants naive, torch, triton, liger, cce and gemm-floor (bench_loss skips, with the reason, a
   peer that is not installed).
3. bench_train: both shapes, 6 steps, one round, ours against TRL's GRPOTrainer (ours alone without trl).

Writes benchmarks/results/gpu_check.md (or --out/gpu_check.md): the machine (GPU, driver, torch, triton and
the peers' versions), each stage's command, status and wall time, and the tail of its output (pytest's
summary and skip reasons, bench_loss's and bench_train's tables); the stages' own CSV/JSON/PNG go to
--out/gpu_check/. Prints the report's path. Without CUDA it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# Test files whose tests take the GPU path when CUDA is present (the `device` fixture, CUDA-only marks).
DEVICE_TESTS = (
    "tests/test_linear_policy_loss.py",
    "tests/test_logprob_triton.py",
    "tests/test_policy_loss.py",
    "tests/test_packing.py",
    "tests/test_attention.py",
    "tests/test_aot_compile.py",
)
PEERS = ("triton", "liger-kernel", "cut-cross-entropy", "flash-attn", "trl", "transformers")
TAIL_LINES = 60


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", default="benchmarks/results", help="folder for gpu_check.md (stage outputs: OUT/gpu_check/)"
    )
    ap.add_argument("--all_tests", action="store_true", help="run `pytest tests` (the whole suite) in stage 1")
    ap.add_argument("--dry_run", action="store_true", help="print the stages' commands and exit")
    return ap.parse_args(argv)


def stages(out: Path, all_tests: bool = False, trl: bool = True) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each stage."""
    py, sub = sys.executable, out / "gpu_check"
    tests = ["tests"] if all_tests else list(DEVICE_TESTS)
    return [
        ("tests", [py, "-m", "pytest", *tests, "-q", "-rs", "-p", "no:cacheprovider"], 240),
        (
            "bench_loss",
            [
                py,
                "-m",
                "benchmarks.bench_loss",
                "--model",
                "qwen7b",
                "--n",
                "16384",
                "--dtype",
                "bf16",
                "--variants",
                "naive,torch,triton,liger,cce,gemm-floor",
                "--repeats",
                "5",
                "--warmup",
                "2",
                "--out",
                str(sub),
            ],
            200,
        ),
        (
            "bench_train",
            [
                py,
                "-m",
                "benchmarks.bench_train",
                "--steps",
                "6",
                "--rounds",
                "1",
                "--trainers",
                "ours,trl" if trl else "ours",
                "--out",
                str(sub),
            ],
            140,
        ),
    ]


def run_stage(cmd: list[str], limit: int) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        status = "passed" if proc.returncode == 0 else f"failed (exit status {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit} s"
        output = "".join(x.decode() if isinstance(x, bytes) else x for x in (e.stdout or "", e.stderr or ""))
    return dict(status=status, seconds=time.perf_counter() - start, output=output)


def machine() -> list[str]:
    import torch

    props = torch.cuda.get_device_properties(0)
    lines = [
        f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}",
    ]
    for name in PEERS:
        try:
            lines.append(f"- {name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"- {name}: not installed")
    smi = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        if _has("nvidia-smi")
        else None
    )
    if smi is not None and smi.returncode == 0:
        lines.append(f"- driver {smi.stdout.strip()}")
    return lines


def _has(program: str) -> bool:
    return any(os.access(os.path.join(d, program), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


def report(machine_lines: list[str], results: list[tuple[str, list[str], dict]]) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [
        f"# GPU check, {date}",
        "",
        "`python -m benchmarks.gpu_check` (benchmarks/gpu_check.py).",
        "",
        *machine_lines,
        "",
        "| stage | status | wall s |",
        "|---|---|---|",
    ]
    md += [f"| {name} | {res['status']} | {res['seconds']:.0f} |" for name, _, res in results]
    for name, cmd, res in results:
        tail = "\n".join(res["output"].rstrip().splitlines()[-TAIL_LINES:])
        md += [
            "",
            f"## {name}: {res['status']}",
            "",
            "```",
            shlex.join(cmd),
            "```",
            "",
            f"Last {TAIL_LINES} lines of its output:",
            "",
            "```",
            tail,
            "```",
        ]
    return "\n".join(md) + "\n"


def main(argv=None) -> None:
    a = parse_args(argv)
    out = Path(a.out)
    plan = stages(out, a.all_tests, trl=importlib.util.find_spec("trl") is not None)
    if a.dry_run:
        for name, cmd, limit in plan:
            print(f"{name} (limit {limit} s): {shlex.join(cmd)}")
        return
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); this check runs only on a GPU "
            "(--dry_run prints its commands)",
            file=sys.stderr,
        )
        sys.exit(2)
    machine_lines = machine()
    results = []
    for name, cmd, limit in plan:
        print(f"[{name}] {shlex.join(cmd)}", flush=True)
        res = run_stage(cmd, limit)
        print(f"[{name}] {res['status']} in {res['seconds']:.0f} s", flush=True)
        results.append((name, cmd, res))
    (out / "gpu_check").mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.md"
    path.write_text(report(machine_lines, results))
    print(path)


if __name__ == "__main__":
    main()
