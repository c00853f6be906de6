"""The GPU check's stages, in order of value, each a command with a time cap; the CPU rehearsal's toy shapes.

    from benchmarks.gpu_check.plan import stages
    for s in stages(work, rehearsal=False): print(s.name, s.cap_s, s.cmd)

GPU caps add up to the default budget (420 s); the runner gives each stage min(cap, what is left of the
budget). Every stage writes its figures to `work/<name>.json` (bench_loss: `work/loss_7b/bench_loss.json`),
which figures.py turns into the report's numbers. A stage whose `skip` is set is reported as skipped with
that reason (the rehearsal's CUDA-only checks); one whose `needs` stage did not pass is skipped too.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Test files whose tests take the GPU path when CUDA is present (the `device` fixture, CUDA-only marks, bf16
# cases the interpreter cannot run); tests/test_attention.py joins when it exists (packed attention backends).
DEVICE_TESTS = (
    "tests/test_linear_policy_loss.py",
    "tests/test_linear_policy_loss_inputs.py",
    "tests/test_logprob_triton.py",
    "tests/test_policy_loss.py",
    "tests/test_policy_loss_golden.py",
    "tests/test_policy_loss_inputs.py",
    "tests/test_workspace.py",
    "tests/test_packing.py",
    "tests/test_attention.py",
)
REHEARSAL_TESTS = ("tests/test_packing.py",)  # the interpreter runs the kernel files in minutes, not seconds
LOSS_VARIANTS = "naive,gemm-floor,triton,cce,liger"  # most valuable first: a cut stage keeps the core figures


@dataclass
class Stage:
    name: str
    title: str  # what it checks, one line
    cmd: list[str]
    cap_s: int
    needs: str | None = None  # a stage that must have passed first
    skip: str | None = None  # why it cannot run here
    env: dict = field(default_factory=dict)


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _train(name: str, work: Path, model: str | None, extra: list[str], wrap=None, keep_checkpoint=True) -> list[str]:
    """run_train around `python -m gcpo_fast.train` (under torchrun when `wrap` is given)."""
    runner = [*(wrap or [sys.executable]), "-m", "benchmarks.gpu_check.run_train", "--json", str(work / f"{name}.json")]
    if not keep_checkpoint:
        runner.append("--skip_final_checkpoint")
    argv = ["--output_dir", str(work / name), "--seed", "0", *(["--model", model] if model else []), *extra]
    return [*runner, "--", *argv]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]


def update_args(rehearsal: bool) -> list[str]:
    """~64 rows x 384 tokens per optimizer step (prompts ~11 tokens + 372 completion tokens, which a random model
    fills), 3 steps from one generation round (steps 2-3 reuse it: old log-probs), bf16 autocast, no evaluation."""
    rows, completion, g = (8, 24, 4) if rehearsal else (64, 372, 8)
    return [
        "--max_steps", "3", "--steps_per_generation", "3", "--per_device_train_batch_size", str(rows),
        "--num_generations", str(g), "--max_completion_length", str(completion), "--bf16", "true",
        "--eval_steps", "0", "--sample_steps", "0", "--logging_steps", "1",
    ]  # fmt: skip


def stages(work: Path, rehearsal: bool = False) -> list[Stage]:
    """Every stage of the check, in the order it runs."""
    tests = [t for t in (REHEARSAL_TESTS if rehearsal else DEVICE_TESTS) if (ROOT / t).exists()]
    xdist = [] if rehearsal or importlib.util.find_spec("xdist") is None else ["-n", "8"]
    model = str(work / "model")
    loss = ["--model", "qwen7b", "--n", "16384", "--dtype", "bf16", "--repeats", "5", "--warmup", "2"]
    if rehearsal:
        loss = ["--quick"]
    upd = update_args(rehearsal)
    small = ["--max_steps", "2", "--eval_steps", "0", "--sample_steps", "0"]
    default = ["--max_steps", "3"] + (["--eval_num_problems", "16"] if rehearsal else [])
    return [
        Stage(
            "tests",
            "CUDA tests: Triton kernels vs references (fp32, bf16), packed attention vs per-row SDPA",
            _py("-m", "pytest", *tests, "-q", "-rs", "-p", "no:cacheprovider", *xdist),
            70,
        ),
        Stage("kernel_regs", "registers and spills of the kernels the device's Triton compiled",
              _py("-m", "benchmarks.gpu_check.kernel_regs", "--json", str(work / "kernel_regs.json")), 25),
        Stage("make_model", "a random Qwen2.5-1.5B (its config; no download) as a model folder",
              _py("-m", "benchmarks.gpu_check.make_model", "--out", model,
                  "--shape", "toy" if rehearsal else "qwen2.5-1.5b"), 30),
        Stage("update", "real-shape update, Qwen2.5-1.5B, ~64 rows x 384 tokens, bf16, no gradient checkpointing",
              _train("update", work, model, upd, keep_checkpoint=False), 70, needs="make_model"),
        Stage("loss_7b", "fused op at Qwen2.5-7B's head (d=3584, V=152064), N=16384, bf16, vs naive/floor/peers",
              _py("-m", "benchmarks.bench_loss", *loss, "--case", "offpolicy-seq", "--variants", LOSS_VARIANTS,
                  "--out", str(work / "loss_7b")), 95),
        Stage("update_ckpt", "the same update with gradient checkpointing",
              _train("update_ckpt", work, model, upd + ["--gradient_checkpointing", "true"], keep_checkpoint=False),
              50, needs="make_model"),
        Stage("fsdp", "FSDP2, a world of one on NCCL, bf16 mixed precision, 2 steps (shipped model)",
              _train("fsdp", work, None, small + ["--parallelism", "fsdp"], wrap=_torchrun()), 25),
        Stage("fsdp_offload", "FSDP2 with CPU offload, 2 steps (shipped model)",
              _train("fsdp_offload", work, None, small + ["--parallelism", "fsdp", "--fsdp_cpu_offload", "true"],
                     wrap=_torchrun()), 25, skip="fsdp_cpu_offload needs CUDA (CPU rehearsal)" if rehearsal else None),
        Stage("default", "the shipped default, 3 steps, generation and evaluation included",
              _train("default", work, None, default), 25),
    ]  # fmt: skip
