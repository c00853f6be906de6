"""The trainer's command line run in this process, then what metrics.jsonl does not hold, as JSON.

    python -m benchmarks.gpu_check.run_train --json r.json -- --model M --max_steps 3 --output_dir runs/x ...
    torchrun --standalone --nproc_per_node 1 -m benchmarks.gpu_check.run_train --json r.json -- --parallelism fsdp ...

Everything after `--` goes to `gcpo_fast.train.main` unchanged. Written to --json (rank 0):
- `steps`: per optimizer step from the run's metrics.jsonl: step_time, every timing/<phase>, tokens
  (prompt + completion tokens of the step: tokens_per_second * step_time), loss, grad_norm;
- `peak_mem_bytes`: torch.cuda.max_memory_allocated() when training returns (CPU: the peak RSS, VmHWM);
- `params`: the model's parameter count (tied embeddings once), read from its config on the meta device;
- `fused_op`: the dtypes and shapes of the hidden states and lm_head weight the fused loss received, and
  how many calls (see `watch_fused_op`);
- `fused_op` also holds the backend the op resolved to and its config; `attention`: the attention
  implementation the policy was loaded with;
- `exit`, `error`: the trainer's exit status, and its error line or exception (an out-of-memory error keeps
  the peak memory it reached; SIGTERM, the GPU check's time limit, ends the run with an error too, so a cut
  stage still writes what it had).
With --skip_final_checkpoint the run writes no checkpoint (the trainer always saves at max_steps; for a
1.5 B model that is 18 GB of weights and AdamW state and tens of seconds that measure the disk).

The patches below name internals of the trainer; after a restructure, fix the import paths there only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch


def watch_fused_op(record: dict) -> None:
    """Wrap the fused loss where the update calls it (`gcpo_fast.update.linear_policy_loss(hidden, weight, targets,
    inputs, config, ...)`), recording the dtypes and shapes of hidden [N, d] and weight [V, d], the backend its
    config resolves to on that device and the config's switches into `record`."""
    from gcpo_fast import update
    from gcpo_fast.kernels.options import resolve_backend

    op = update.linear_policy_loss

    def watched(hidden, weight, targets, inputs, config, *args, **kwargs):
        record.update(
            hidden_dtype=str(hidden.dtype),
            weight_dtype=str(weight.dtype),
            hidden_shape=list(hidden.shape),
            weight_shape=list(weight.shape),
            calls=record.get("calls", 0) + 1,
            autocast=torch.is_autocast_enabled("cuda") if hidden.is_cuda else False,
            backend=resolve_backend(config.backend, hidden.device).value,
            config={k: str(v) for k, v in vars(config).items()},
        )
        return op(hidden, weight, targets, inputs, config, *args, **kwargs)

    update.linear_policy_loss = watched


def watch_attention(record: dict) -> None:
    """Record the attention implementation the trainer loads its policy with (`gcpo_fast.train.
    resolve_attn_implementation`, the name train.py calls) into record["attention"]."""
    from gcpo_fast import train

    resolve = train.resolve_attn_implementation

    def watched(*args, **kwargs):
        record["attention"] = resolve(*args, **kwargs)
        return record["attention"]

    train.resolve_attn_implementation = watched


class StoppedBySigterm(BaseException):
    """The stage's time limit. A BaseException: an `except Exception` on its way (math-verify's parse has one, and a
    run of this size spends much of its time there) would turn it into a wrong answer and let the run go on."""


def stop_on_sigterm() -> None:
    """SIGTERM (the GPU check's time limit) ends the trainer with an exception, so that the result is still
    written from what it has: the steps metrics.jsonl holds so far and the peak memory."""

    def stop(signum, frame):
        raise StoppedBySigterm("stopped by SIGTERM (the stage's time limit)")

    signal.signal(signal.SIGTERM, stop)


def skip_final_checkpoint() -> None:
    """No checkpoint: `gcpo_fast.train.save_checkpoint` (the name train() calls) does nothing."""
    from gcpo_fast import train

    train.save_checkpoint = lambda *args, **kwargs: None


def option(argv: list[str], name: str, default=None):
    """The value of --name in the trainer's argv (the last one given), or default."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == f"--{name}"]
    return values[-1] if values else default


def parameter_count(model: str) -> int | None:
    """The model folder's parameter count, None if its config cannot be read (the trainer said why)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in m.parameters())  # parameters() yields a tied weight once


def peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024, "peak RSS (VmHWM)"
    return 0, "unknown"


def read_steps(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        m = json.loads(line) if line.strip() else {}
        if "step_time" in m:  # the step-0 evaluation line has none
            keep = {k: v for k, v in m.items() if k.startswith("timing/")}
            keep.update(
                step_time=m["step_time"],
                tokens=m["tokens_per_second"] * m["step_time"],
                loss=m.get("loss"),
                grad_norm=m.get("grad_norm"),
            )
            steps.append(keep)
    return steps


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where rank 0 writes the result")
    ap.add_argument("--skip_final_checkpoint", action="store_true")
    a = ap.parse_args(argv[:split])
    train_argv = argv[split + 1 :]
    from gcpo_fast import train
    from gcpo_fast.models.loading import DEFAULT_MODEL

    fused: dict = {}
    seen: dict = {}
    watch_fused_op(fused)
    watch_attention(seen)
    stop_on_sigterm()
    if a.skip_final_checkpoint:
        skip_final_checkpoint()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    status, error = 0, None
    try:
        train.main(train_argv)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        error = None if status == 0 else str(e.code)
        if error:
            print(error, file=sys.stderr)
    except (Exception, StoppedBySigterm) as e:  # noqa: BLE001 - an out-of-memory error's peak memory is a figure too
        traceback.print_exc()
        status, error = 1, f"{type(e).__name__}: {str(e)[:500]}"
    peak, method = peak_memory()
    if int(os.environ.get("RANK", "0")) == 0:
        model = option(train_argv, "model", DEFAULT_MODEL)
        result = dict(
            exit=status,
            error=error,
            argv=train_argv,
            steps=read_steps(option(train_argv, "output_dir", "runs/gcpo")),
            peak_mem_bytes=peak,
            mem_method=method,
            params=parameter_count(model),
            fused_op=fused,
            attention=seen.get("attention"),
        )
        Path(a.json).write_text(json.dumps(result, indent=1))
    sys.exit(status)


if __name__ == "__main__":
    main()
