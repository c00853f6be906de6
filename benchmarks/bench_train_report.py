"""bench_train's report: per (shape, trainer) the first step apart and medians of the rest, the ours / TRL table,
bench_train.csv, bench_train.json and the plot of the median step by phase.

    from benchmarks.bench_train_report import write_report
    rows = write_report(Path("benchmarks/results"), info, results)  # prints the table, writes the files
    python -m benchmarks.bench_train --report_only                  # the same, from bench_train.json

`info` is the machine (bench_loss.machine_info, the load average), `results` bench_train's worker outputs (one
dict per (shape, trainer, round), its steps as phase times); the protocol is in bench_train's module docstring
and benchmarks/README.md.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

TRAINERS = ("ours", "trl")
PHASES = ("generate", "reward", "old_logp", "update", "weight_sync", "other")
CPU_PHASES = ("generate", "update")  # CPU seconds reported for these and for the whole step


def summarize(runs: list[list[dict]]) -> dict:
    """One trainer's runs (one per round, each a list of steps): each run's first step apart (warm-up, the
    median over rounds), medians over all the other steps of all rounds."""
    for steps in runs:
        if len(steps) < 2:
            raise ValueError(f"{len(steps)} step(s) logged: at least 2 are needed (the first one is warm-up)")
    firsts, rest = [steps[0] for steps in runs], [s for steps in runs for s in steps[1:]]
    med = lambda key: statistics.median(s[key] for s in rest)  # noqa: E731
    out = dict(
        first_step=statistics.median(s["step_time"] for s in firsts),
        step=med("step_time"),
        **{p: med(p) for p in PHASES},
        tokens_per_step=med("tokens"),
        tokens_per_s=statistics.median(s["tokens"] / s["step_time"] for s in rest),
        steps=sum(len(steps) for steps in runs),
    )
    if all("step_cpu" in s for s in firsts):
        out["first_step_cpu"] = statistics.median(s["step_cpu"] for s in firsts)
    for key in ("step_cpu", *(f"{p}_cpu" for p in CPU_PHASES)):
        if all(key in s for s in rest):
            out[key] = med(key)
    if all(s.get("scored_positions") is not None for s in rest):
        out["scored_positions"] = med("scored_positions")
    if all(s.get("completion_length") is not None for s in rest):
        out["completion_length"] = med("completion_length")
    return out


def build_report(results: list[dict]) -> list[dict]:
    """Rows (shape, metric, ours, trl, ratio = ours / trl) from the runs' results (worker outputs)."""
    rows = []
    for shape in dict.fromkeys(r["shape"] for r in results):
        runs = [r for r in results if r["shape"] == shape]
        by = {
            t: {
                **summarize([r["steps"] for r in runs if r["trainer"] == t]),
                "peak_mem": max(r["peak_mem"] for r in runs if r["trainer"] == t),
            }
            for t in dict.fromkeys(r["trainer"] for r in runs)
        }
        metrics = dict.fromkeys(k for s in by.values() for k in s)
        for metric in metrics:
            ours, trl = by.get("ours", {}).get(metric), by.get("trl", {}).get(metric)
            ratio = ours / trl if ours is not None and trl and metric != "steps" else None
            rows.append(dict(shape=shape, metric=metric, ours=ours, trl=trl, ratio=ratio))
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(x, metric):
        if x is None:
            return "-"
        if metric == "peak_mem":
            return f"{x / 2**20:.0f} MiB"
        return f"{x:.0f}" if metric in ("steps", "tokens_per_step", "tokens_per_s", "scored_positions") else f"{x:.4f}"

    lines = [f"{'shape':10} {'metric':18} {'ours':>12} {'trl':>12} {'ours/trl':>9}"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"{r['shape']:10} {r['metric']:18} {cell(r['ours'], r['metric']):>12} "
            f"{cell(r['trl'], r['metric']):>12} {ratio:>9}"
        )
    return "\n".join(lines)


def write_report(out: Path, info: dict, results: list[dict]) -> list[dict]:
    import csv

    rows = build_report(results)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["shape", "metric", "ours", "trl", "ratio"])
        w.writeheader()
        w.writerows(rows)
    (out / "bench_train.json").write_text(json.dumps(dict(machine=info, results=results, report=rows), indent=1))
    print(format_table(rows))
    where = info.get("gpu") or f"{info.get('cpu')}, {info.get('cpu_count')} cores, {info.get('threads')} thread(s)"
    load = info.get("loadavg")
    plot(out / "bench_train.png", rows, where + (f", load average {load[0]:.1f} at the start" if load else ""))
    print(f"\nwrote {out}/bench_train.csv, {out}/bench_train.json")
    return rows


def plot(path: Path, rows: list[dict], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no bench_train.png")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        val = {(r["metric"], t): r[t] or 0.0 for r in rows if r["shape"] == shape for t in TRAINERS}
        bottom = {t: 0.0 for t in TRAINERS}
        for phase in PHASES:
            heights = [val.get((phase, t), 0.0) for t in TRAINERS]
            ax.bar(TRAINERS, heights, bottom=[bottom[t] for t in TRAINERS], label=phase)
            for t, h in zip(TRAINERS, heights):
                bottom[t] += h
        ax.set_title(f"{shape}: median step by phase")
        ax.set_ylabel("seconds")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
