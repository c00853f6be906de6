"""Forgetting: held-out accuracy on the levels a run never trained on, before and after it.

    python -m benchmarks.compare_methods --methods gcpo,grpo --max_steps 300     # the runs (runs/compare_methods)
    python -m benchmarks.forgetting --methods gcpo,grpo --seeds 0 1 2             # levels 1-2 and 6-8 before/after
    python -m benchmarks.forgetting --runs_dir runs/offpolicy --methods gcpo,gcpo_no_golden --builtin_levels 1 2

The default run trains on levels 3-5 (--builtin_levels): levels 1-2 (one-digit arithmetic, which the shipped
model mostly solves) and 6-8 (multiplication by and of two digits, several operations, which it mostly fails)
are never in its prompts. Each model is
scored by `python -m gcpo_fast.eval --model DIR --builtin_levels ... --eval_num_problems N` (greedy mean@1 on distinct
held-out problems; levels 1 and 2 hold only 24 and 29), the shipped model once as "before", and each run's
last checkpoint as "after". Writes to --out: forgetting.csv (one row per model and level) and forgetting.md
(per method and level: before, after as mean ± std over seeds, and the change).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.compare_methods import RESULTS, mean_spread
from gcpo_fast.models.loading import DEFAULT_MODEL


def last_checkpoint(run: Path) -> Path:
    """The run's checkpoint of its highest step."""
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise SystemExit(f"{run}: no checkpoint-* folder (is the run finished?)")
    return checkpoints[-1]


def evaluate(model: Path | str, out: Path, args) -> dict:
    """Per-level greedy accuracy of one model, by gcpo_fast.eval in its own process; cached in `out`."""
    if not out.exists():
        cmd = [sys.executable, "-m", "gcpo_fast.eval", "--model", str(model), "--output", str(out)]
        cmd += ["--builtin_levels", *map(str, args.builtin_levels), "--eval_num_problems", str(args.eval_num_problems)]
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads(out.read_text())
    return {
        lv: (metrics[f"eval/level_{lv}/mean@1"], int(metrics[f"eval/level_{lv}/num_problems"]))
        for lv in args.builtin_levels
    }


def table(before: dict, after: dict[str, list[dict]], levels: list[int]) -> str:
    """The shipped model's accuracy per level, then each method's after its runs: mean ± std (mean change)."""
    head = ["model", "seeds", *[f"level {lv} ({before[lv][1]} problems)" for lv in levels]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| " + " | ".join(["shipped (before)", "", *[f"{before[lv][0]:.3f}" for lv in levels]]) + " |")
    for method, runs in after.items():
        cells = [method, str(len(runs))]
        for lv in levels:
            values = [r[lv][0] for r in runs]
            change = round(statistics.mean(values) - before[lv][0], 3) + 0.0  # + 0.0: no "-0.000"
            cells.append(f"{mean_spread(values)} ({change:+.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nGreedy mean@1 on held-out problems; after: mean ± std over seeds (mean change).\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.forgetting", description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="gcpo,grpo", help="comma-separated run names (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    ap.add_argument("--runs_dir", type=Path, default=Path("runs/compare_methods"), help="compare_methods' runs")
    ap.add_argument(
        "--builtin_levels", type=int, nargs="+", default=[1, 2, 6, 7, 8], help="levels (default: 1 2 6 7 8)"
    )
    ap.add_argument(
        "--eval_num_problems", type=int, default=500, help="held-out problems over the levels (default: 500)"
    )
    ap.add_argument("--jobs", type=int, default=2, help="evaluations at a time (default: 2)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the table goes (default: benchmarks/results)")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    runs = [(m, s, args.runs_dir / f"{m}_seed{s}") for m in methods for s in args.seeds]
    missing = [str(run) for *_, run in runs if not run.is_dir()]
    if missing:
        ap.error(f"no such run folders: {', '.join(missing)} (run benchmarks.compare_methods first)")
    cache = (
        f"forgetting_levels{'-'.join(map(str, args.builtin_levels))}_n{args.eval_num_problems}.json"  # one per question
    )
    jobs = [("shipped", -1, DEFAULT_MODEL, args.runs_dir / f"shipped_{cache}")]
    jobs += [(m, s, last_checkpoint(run), run / cache) for m, s, run in runs]
    with ThreadPoolExecutor(args.jobs) as pool:
        scores = list(pool.map(lambda job: evaluate(job[2], job[3], args), jobs))
    before = scores[0]
    after: dict[str, list[dict]] = {}
    for (m, _, _, _), score in zip(jobs[1:], scores[1:]):
        after.setdefault(m, []).append(score)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "forgetting.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "checkpoint", "level", "mean@1", "num_problems"])
        for (m, s, model, _), score in zip(jobs, scores):
            name = Path(model).name  # checkpoint-<step>, or default_model for the shipped one
            writer.writerows([m, s if s >= 0 else "", name, lv, acc, n] for lv, (acc, n) in score.items())
    text = table(before, after, args.builtin_levels)
    (args.out / "forgetting.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'forgetting.csv'}, {args.out / 'forgetting.md'}")


if __name__ == "__main__":
    main()
