"""The GPU check's stages, in order of value, each a command with a time cap; the CPU rehearsal's toy shapes.

    from benchmarks.gpu_check.plan import stages
    for s in stages(work, rehearsal=False): print(s.name, s.cap_s, s.cmd)

Caps (CAPS: GPU, rehearsal) add up to at most the default budget; the runner gives each stage min(cap, what is
left of the budget). Every stage writes its figures to `work/<name>.json` (bench_loss: `work/loss_7b/bench_loss.json`),
which figures.py turns into the report's numbers. A stage whose `skip` is set is reported as skipped with
that reason (the rehearsal's CUDA-only checks); one whose `needs` (stages of this run's plan) did not all pass
is skipped too. `planned_memory` is the memory planner's worst case for a trainer stage, before it runs.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Test files whose tests take the GPU path when CUDA is present (the `device` fixture, CUDA-only marks, bf16
# cases the interpreter cannot run). Packed attention and packing first: their real-GPU varlen tests are the
# ones nothing else runs, and xdist hands tests out in this order.
DEVICE_TESTS = (
    "tests/test_attention.py",
    "tests/test_packing.py",
    "tests/test_linear_policy_loss.py",
    "tests/test_linear_policy_loss_inputs.py",
    "tests/test_logprob_triton.py",
    "tests/test_policy_loss.py",
    "tests/test_policy_loss_golden.py",
    "tests/test_policy_loss_inputs.py",
    "tests/test_workspace.py",
)
REHEARSAL_TESTS = ("tests/test_packing.py",)  # the interpreter runs the kernel files in minutes, not seconds
LOSS_VARIANTS = "naive,gemm-floor,triton,liger,trl,cce"  # most valuable first: a cut stage keeps the core figures
TRITON = ("environment",)  # what a stage that compiles Triton kernels needs (a compiler, Python.h, one launch)
GPU_MEMORY = 80 * 2**30  # the GPU the plan is sized for: an H100 80 GB (an H200 has 141)
# Each stage's time cap in seconds: (on the GPU, in the CPU rehearsal). The GPU caps fit the default budget
# (GPU_BUDGET_S, less the machine probe); the rehearsal's are sized for a shared 2-core CPU (REHEARSAL_BUDGET_S).
CAPS = {
    "environment": (15, 30),
    "tests": (60, 120),
    "kernel_regs": (25, 30),
    "make_model": (25, 60),
    "update": (70, 90),
    "loss_7b": (60, 240),
    "update_ckpt": (60, 90),
    "fsdp": (30, 90),
    "fsdp_offload": (30, 30),
    "default": (40, 120),
}
GPU_BUDGET_S, REHEARSAL_BUDGET_S = 420, 900


@dataclass
class Stage:
    name: str
    title: str  # what it checks, one line
    cmd: list[str]
    cap_s: int
    needs: tuple[str, ...] = ()  # stages that must have passed first (when they are in the run's plan)
    skip: str | None = None  # why it cannot run here
    env: dict = field(default_factory=dict)

    def trainer_argv(self) -> list[str] | None:
        """The argv this stage gives gcpo_fast.train (None: not a trainer stage)."""
        return self.cmd[self.cmd.index("--") + 1 :] if "benchmarks.gpu_check.run_train" in self.cmd else None


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
    """64 rollouts per optimizer step in 4 micro-batches of 16 (golden rows on top: 18 rows of <= 24 prompt + 372
    completion tokens, which a random model fills), 3 steps from one generation round of 24 prompts x 8 (steps
    2-3 reuse it: old log-probs), bf16 autocast, no evaluation. max_prompt_length 24 holds every builtin prompt
    (9-22 tokens), so the planner's worst case is the length the run has."""
    rows, accumulation, completion, g = (4, 2, 24, 4) if rehearsal else (16, 4, 372, 8)
    return [
        "--max_steps", "3", "--per_device_train_batch_size", str(rows), "--gradient_accumulation_steps",
        str(accumulation), "--steps_per_generation", str(3 * accumulation), "--num_generations", str(g),
        "--max_prompt_length", "24", "--max_completion_length", str(completion), "--bf16", "true",
        "--eval_steps", "0", "--sample_steps", "0", "--logging_steps", "1",
    ]  # fmt: skip


def stages(work: Path, rehearsal: bool = False) -> list[Stage]:
    """Every stage of the check, in the order it runs."""
    tests = [t for t in (REHEARSAL_TESTS if rehearsal else DEVICE_TESTS) if (ROOT / t).exists()]
    xdist = [] if importlib.util.find_spec("xdist") is None else ["-n", "2" if rehearsal else "8"]
    model = str(work / "model")
    loss = ["--model", "qwen7b", "--n", "16384", "--dtype", "bf16", "--repeats", "5", "--warmup", "2"]
    if rehearsal:
        loss = ["--quick"]
    upd = update_args(rehearsal)
    small = ["--max_steps", "2", "--eval_steps", "0", "--sample_steps", "0"]
    default = ["--max_steps", "3"] + (["--eval_num_problems", "16"] if rehearsal else [])
    on_model = (*TRITON, "make_model")

    def cap(name: str) -> int:
        return CAPS[name][rehearsal]

    return [
        Stage("environment", "Triton's prerequisites: a C compiler, Python.h, one tiny kernel compiled and launched",
              _py("-m", "benchmarks.gpu_check.environment", "--json", str(work / "environment.json")),
              cap("environment")),
        Stage(
            "tests",
            "CUDA tests: packed attention (varlen, grouped K/V), packing, Triton kernels vs references (fp32, bf16)",
            _py("-m", "pytest", *tests, "-q", "-rfEs", "-p", "no:cacheprovider", *xdist),
            cap("tests"),
            needs=TRITON,
        ),
        Stage("kernel_regs", "registers and spills of the kernels the device's Triton compiled",
              _py("-m", "benchmarks.gpu_check.kernel_regs", "--json", str(work / "kernel_regs.json")),
              cap("kernel_regs"), needs=TRITON),
        Stage("make_model", "a random Qwen2.5-1.5B (its config; no download) as a model folder",
              _py("-m", "benchmarks.gpu_check.make_model", "--out", model,
                  "--shape", "toy" if rehearsal else "qwen2.5-1.5b"), cap("make_model")),
        Stage("update", "real-shape update, Qwen2.5-1.5B, 64 rows a step (4 x 16) x ~384 tokens, bf16, no ckpt",
              _train("update", work, model, upd, keep_checkpoint=False), cap("update"), needs=on_model),
        Stage("loss_7b", "fused op at Qwen2.5-7B's head (d=3584, V=152064), N=16384, bf16, vs naive/floor/peers",
              _py("-m", "benchmarks.bench_loss", *loss, "--case", "offpolicy-seq", "--variants", LOSS_VARIANTS,
                  "--out", str(work / "loss_7b")), cap("loss_7b"), needs=TRITON),
        Stage("update_ckpt", "the same update with gradient checkpointing",
              _train("update_ckpt", work, model, upd + ["--gradient_checkpointing", "true"], keep_checkpoint=False),
              cap("update_ckpt"), needs=on_model),
        Stage("fsdp", "FSDP2, a world of one on NCCL, bf16 mixed precision, 2 steps (shipped model)",
              _train("fsdp", work, None, small + ["--parallelism", "fsdp"], wrap=_torchrun()), cap("fsdp"),
              needs=TRITON),
        Stage("fsdp_offload", "FSDP2 with CPU offload, 2 steps (shipped model)",
              _train("fsdp_offload", work, None, small + ["--parallelism", "fsdp", "--fsdp_cpu_offload", "true"],
                     wrap=_torchrun()), cap("fsdp_offload"), needs=TRITON,
              skip="fsdp_cpu_offload needs CUDA (CPU rehearsal)" if rehearsal else None),
        Stage("default", "the shipped default, 3 steps, generation and evaluation included",
              _train("default", work, None, default), cap("default"), needs=TRITON),
    ]  # fmt: skip


def planned_memory(stage: Stage, model_config, device_memory: float = GPU_MEMORY):
    """gcpo_fast.models.memory's worst-case plan for a trainer stage on one GPU of device_memory bytes, before anything
    runs: the stage's own options (parse_config of its argv), K/V counted repeated (torch 2.11's varlen path
    when its kernel refuses grouped heads: the worst case), bf16 on CUDA; None for a stage that trains nothing."""
    from gcpo_fast.config import parse_config
    from gcpo_fast.models.memory import plan_memory, run_options

    argv = stage.trainer_argv()
    if argv is None:
        return None
    cfg = parse_config(argv)
    options = run_options(cfg, world_size=1, device="cuda", repeated_kv=True)
    return plan_memory(model_config, device_memory=device_memory, **options)
