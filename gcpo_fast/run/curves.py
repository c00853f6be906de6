"""A picture of a run: curves.png beside metrics.jsonl, drawn from it at each evaluation and at the end.

    from gcpo_fast.run.curves import write_curves
    path = write_curves("runs/gcpo", title="gcpo, seed 42")   # runs/gcpo/curves.png, or None without matplotlib
    python -m gcpo_fast.run.curves runs/gcpo                       # draw it again for a finished run

Four panels against the optimizer step: the training reward, the held-out accuracy (overall and per level,
when the records have one), the mean completion length, and the golden rows a step (GCPO's all-wrong groups
that got one). Per-step series are drawn faint with a trailing moving average over them. Everything comes
from metrics.jsonl, so a resumed run's picture holds its whole history. matplotlib is optional
(`pip install matplotlib`, or the `plot` extra): without it nothing is drawn and `MISSING` says how to get it.
"""

import json
import statistics
from pathlib import Path

from gcpo_fast.cli import ArgumentParser

FILENAME = "curves.png"
MISSING = "curves.png: not drawn, matplotlib is not installed (pip install matplotlib, or pip install -e '.[plot]')"
SMOOTH = 20  # steps in the moving average drawn over the per-step series


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def series(lines: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the lines that hold `key`."""
    points = [(line["step"], line[key]) for line in lines if key in line]
    return [s for s, _ in points], [v for _, v in points]


def held_out_keys(lines: list[dict]) -> tuple[str | None, list[str]]:
    """The overall held-out key (eval/mean@k) and the per-level ones, in level order."""
    evals = [line for line in lines if any(k.startswith("eval/mean@") for k in line)]
    if not evals:
        return None, []
    mean = next(k for k in evals[0] if k.startswith("eval/mean@"))
    suffix = mean[len("eval/") :]
    levels = [k for k in evals[0] if k.startswith("eval/level_") and k.endswith("/" + suffix)]
    return mean, sorted(levels, key=lambda k: (len(k), k))


def draw_per_step(ax, lines: list[dict], key: str, title: str) -> None:
    steps, values = series(lines, key)
    if not steps:
        ax.text(0.5, 0.5, f"no {key} in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    else:
        (faint,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
        ax.plot(steps, moving_average(values, SMOOTH), color=faint.get_color(), label=f"mean of {SMOOTH} steps")
        ax.legend(fontsize=8, loc="best")
    ax.set(title=title)


def draw_held_out(ax, lines: list[dict]) -> None:
    mean, levels = held_out_keys(lines)
    if mean is None:
        ax.text(0.5, 0.5, "no held-out evaluation (--eval_steps 0?)", ha="center", va="center", transform=ax.transAxes)
    else:
        for key in levels:
            steps, values = series(lines, key)
            ax.plot(steps, values, marker="o", markersize=3, label=key[len("eval/") :].split("/")[0].replace("_", " "))
        steps, values = series(lines, mean)
        ax.plot(steps, values, marker="o", color="black", linewidth=2, label="all")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, loc="best")
    ax.set(title=f"held-out accuracy ({(mean or 'eval/mean@1')[len('eval/') :]})")


def write_curves(run_dir, title: str = "") -> Path | None:
    """Draw run_dir/curves.png from run_dir/metrics.jsonl; None (nothing drawn) without matplotlib."""
    if not available():
        return None
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    lines = read_metrics(run_dir)
    steps = [line for line in lines if "reward" in line]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    draw_per_step(axes[0, 0], steps, "reward", "training reward")
    draw_held_out(axes[0, 1], lines)
    draw_per_step(axes[1, 0], steps, "completions/mean_length", "completion length (tokens, mean of the step)")
    draw_per_step(axes[1, 1], steps, "gcpo/golden_rows", "golden rows a step")
    last = steps[-1]["step"] if steps else 0
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_xlim(0, max(last, 1))
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(f"{title}{', ' if title else ''}step {last}")
    fig.tight_layout()
    path = Path(run_dir) / FILENAME
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = ArgumentParser(prog="python -m gcpo_fast.run.curves", description="Draw RUN_DIR/curves.png again.")
    ap.add_argument("run_dir", help="a run directory (the trainer's --output_dir), with its metrics.jsonl")
    args = ap.parse_args(argv)
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        ap.fail(f"{args.run_dir}: no metrics.jsonl there (not a run directory)")
    path = write_curves(args.run_dir, title=Path(args.run_dir).name)
    print(path or MISSING)


if __name__ == "__main__":
    main()
