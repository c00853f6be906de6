"""Run logging: one JSON line per step in metrics.jsonl, sample rollouts in samples.jsonl, optional
TensorBoard / W&B every logging_steps, one console line per evaluation, and curves.png (gcpo_fast/run/curves.py)
drawn at each evaluation and at the end.

    from gcpo_fast.run.logger import RunLogger

    log = RunLogger("runs/x", report_to=["tensorboard"], config=cfg.to_dict(), logging_steps=10, resume_step=None)
    log.metrics(step, {"reward": 0.4, "loss": 0.01, ...})
    log.samples(step, [{"prompt": ..., "completion": ..., "reward": 1.0, "golden": False}, ...])
    log.close()
    print(log.summary())           # held-out accuracy at the first and last evaluation, where the files are

The console stays short (the progress bar, gcpo_fast/run/progress.py, carries the reward and the latest held-out
figure): one line per evaluation, `step 50: held-out mean@1 0.712 (level 3 0.983, level 4 0.900, ...)`, and the
closing summary.

Only rank 0 logs (the trainer creates a RunLogger there only). On resume, lines of steps after the
checkpoint (written before the run stopped) are dropped from both files, so each step appears once, and
a last line cut short by a crash mid-write is dropped with a warning (the files are valid JSONL again).
TensorBoard needs the `tensorboard` package and W&B the `wandb` package; the config check asks for them
before the run starts (W&B reads WANDB_PROJECT etc. from the environment as usual).
"""

import importlib.util
import json
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from gcpo_fast.errors import require
from gcpo_fast.options import at_least, check_options, option
from gcpo_fast.run import curves
from gcpo_fast.run.checkpoint import list_checkpoints

REPORTERS = ("none", "tensorboard", "wandb")


@dataclass
class LogConfig:
    """What a run reports, and where beyond metrics.jsonl."""

    _argument_group_name = "logging"

    logging_steps: int = option(
        10,
        "report to TensorBoard/W&B and refresh the progress bar's reward every this many steps (metrics.jsonl "
        "gets every step)",
    )
    sample_steps: int = option(10, "write a few rollouts to samples.jsonl every this many steps (0: never)")
    num_samples_to_log: int = option(4, "groups written each time (their first rollout, and golden row if any)")
    report_to: list[str] = option([], "also log to these, when installed", choices=REPORTERS)

    def __post_init__(self):
        check_options(self)
        at_least(self, 1, "logging_steps", "num_samples_to_log")
        at_least(self, 0, "sample_steps")
        for reporter in set(self.report_to) - {"none"}:
            require(
                importlib.util.find_spec(reporter) is not None,
                f"report_to {reporter}: the {reporter} package is not installed",
            )


TITLE = (("loss_type", ""), ("learning_rate", "lr"), ("seed", "seed"))  # curves.png's title: "gcpo, lr 0.0006, seed 42"


def _truncate_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= step. A last line cut short by a crash mid-write is dropped with a
    warning; a malformed line anywhere else is damage we do not guess about (ValueError naming it)."""
    if not path.exists():
        return
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if line.strip()]
    kept = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(
                    f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno}); only a cut-off last "
                    "line is dropped on resume"
                ) from None
            warnings.warn(
                f"{path}, line {n}: dropped a partial last line (the run stopped while writing it)", stacklevel=2
            )
            continue
        if row["step"] <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept), encoding="utf-8")


def _time_summary(steps: list[dict]) -> list[str]:
    """Each phase's share of the time spent in phases (timing/*), and the first step against the median one
    (the first carries the warm-up: compilation, allocator, caches)."""
    if not steps:
        return []
    totals: dict[str, float] = {}
    for line in steps:
        for key, value in line.items():
            if key.startswith("timing/"):
                totals[key[len("timing/") :]] = totals.get(key[len("timing/") :], 0.0) + value
    whole = sum(totals.values()) or 1.0
    shares = ", ".join(f"{name} {100 * t / whole:.0f}%" for name, t in sorted(totals.items(), key=lambda kv: -kv[1]))
    median = statistics.median(line["step_time"] for line in steps)
    return [
        f"time: {whole:.1f} s in phases: {shares}",
        f"step {steps[0]['step']} took {steps[0]['step_time']:.2f} s (warm-up included), the median step "
        f"{median:.2f} s",
    ]


class RunLogger:
    def __init__(self, output_dir, *, report_to: list[str], config: dict, logging_steps: int, resume_step: int | None):
        self.dir, self.logging_steps = Path(output_dir), logging_steps
        self.title = ", ".join(f"{name} {config[k]:g}" if name else str(config[k]) for k, name in TITLE if k in config)
        self.last_step = self.drawn_step = None  # the last step logged; the step curves.png was last drawn at
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl"):
            if resume_step is None:
                (self.dir / name).unlink(missing_ok=True)
            else:
                _truncate_after(self.dir / name, resume_step)
        self.tensorboard = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(config=config, dir=str(self.dir), resume="allow")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.last_step = step
        evaluated = any(k.startswith("eval/mean@") for k in values)
        if evaluated:
            tqdm.write(evaluation_line(step, values))
            self.draw_curves(step)
        if step % self.logging_steps and not evaluated:
            return
        if self.tensorboard is not None:
            for k, v in values.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        """Append rows to samples.jsonl; a text longer than SAMPLE_CHARS keeps its start and end (a 10 MB prompt
        would otherwise be written whole at every sample step)."""
        with open(self.dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"step": step, **{k: _clip(v) for k, v in row.items()}}) + "\n" for row in rows)

    def draw_curves(self, step: int) -> None:
        self.drawn_step = step if curves.write_curves(self.dir, self.title) else None

    def close(self) -> None:
        if self.last_step is not None and self.last_step != self.drawn_step:  # the last step had no evaluation
            self.draw_curves(self.last_step)
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def summary(self) -> str:
        """Where the run's files are, and the held-out accuracy of its first and last evaluation (read back
        from metrics.jsonl, so a resumed run still reports the accuracy it started from)."""
        lines = [
            json.loads(line)
            for line in (self.dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        evals = [line for line in lines if any(k.startswith("eval/") for k in line)]
        samples = self.dir / "samples.jsonl"
        out = [f"metrics: {self.dir / 'metrics.jsonl'}" + (f"   rollouts: {samples}" if samples.exists() else "")]
        checkpoints = list_checkpoints(self.dir)  # checkpoint-<step> folders only (not a stray checkpoint-best/)
        if checkpoints:
            out.append(f"model: {checkpoints[-1]}")
        if (self.dir / curves.FILENAME).exists():
            out.append(f"curves: {self.dir / curves.FILENAME}")
        elif not curves.available():
            out.append(curves.MISSING)
        out += _time_summary([line for line in lines if "step_time" in line])
        if not evals:
            return "\n".join(out)
        first, last = evals[0], evals[-1]
        mean = next(k for k in first if k.startswith("eval/mean@"))
        levels = [k for k in first if k.startswith("eval/level_") and k.endswith(mean[len("eval/") :])]
        count = f" on {int(first['eval/num_problems'])} problems" if "eval/num_problems" in first else ""
        out.append(
            f"held-out {mean[len('eval/') :]}{count}: {first[mean]:.3f} at step {first['step']} -> "
            f"{last.get(mean, float('nan')):.3f} at step {last['step']}"
        )
        for key in levels:
            name = key[len("eval/") :].split("/")[0]
            count = first.get(f"eval/{name}/num_problems")
            out.append(
                f"  {name:<12} {first[key]:.3f} -> {last.get(key, float('nan')):.3f}"
                + (f"   ({int(count)} problems)" if count is not None else "")
            )
        return "\n".join(out)


def evaluation_line(step: int, values: dict) -> str:
    """One console line per evaluation: the overall figure, then each level's."""
    mean = next(k for k in values if k.startswith("eval/mean@"))
    suffix = "/" + mean[len("eval/") :]
    levels = [
        (k[len("eval/") : -len(suffix)], v)
        for k, v in values.items()
        if k.startswith("eval/level_") and k.endswith(suffix)
    ]
    per_level = ", ".join(f"{name.replace('_', ' ')} {v:.3f}" for name, v in levels)
    return f"step {step}: held-out {mean[len('eval/') :]} {values[mean]:.3f}" + (f" ({per_level})" if per_level else "")


SAMPLE_CHARS = 4000  # at most this many characters of each text in samples.jsonl


def _clip(value):
    if not isinstance(value, str) or len(value) <= SAMPLE_CHARS:
        return value
    half = SAMPLE_CHARS // 2
    return f"{value[:half]} [... {len(value) - SAMPLE_CHARS} characters cut ...] {value[-half:]}"
