"""The shipped default's recipe, searched on validation problems only (never the held-out ones), then checked.

    python -m benchmarks.tune_default search --recipes base lr1e-3 lr2e-3 --seed 0 --jobs 2   # validation
    python -m benchmarks.tune_default check --seeds 0 1 2                 # the default as it ships, held-out, timed

search: each recipe is `python -m gcpo_fast.train --seed S <its options> --eval_dataset validation.jsonl`, where
validation.jsonl holds 500 distinct problems of the trained levels from the training side of the task's split
(gcpo_fast/data/tasks.py: train_split, never a held-out prompt) that are not among the run's own training problems.
The runs' held-out evaluation is replaced by that validation set, so nothing here looks at held-out problems.
check: `python -m gcpo_fast.train --seed S` as a newcomer runs it (no options, no environment variables: the
default thread count), one run at a time, timed from the command's start to its end.

Writes to --out (default benchmarks/results/): tune_default_search.csv / .md (validation accuracy, overall and
level 5 = the word problems, wall time per recipe) and tune_default_check.csv / .md (held-out before and after,
level 5, wall time per seed).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = {  # name: options on top of the trainer's defaults
    "base": [],
    "lr6e-4": ["--learning_rate", "6e-4"],
    "lr1e-3": ["--learning_rate", "1e-3"],
    "lr2e-3": ["--learning_rate", "2e-3"],
    "lr6e-4_500steps": ["--learning_rate", "6e-4", "--max_steps", "500"],
    "lr1e-3_500steps": ["--learning_rate", "1e-3", "--max_steps", "500"],
    "lr1e-3_constant": ["--learning_rate", "1e-3", "--lr_scheduler_type", "constant"],
    "lr1e-3_G16": ["--learning_rate", "1e-3", "--num_generations", "16"],
}


def write_validation(path: Path, seed: int, levels: list[int], n: int = 500) -> None:
    """n distinct training-side problems of `levels` that the run with this seed does not train on."""
    from gcpo_fast.data import tasks

    trained = {r["prompt"] for r in tasks.train_split(5000, seed=seed, levels=levels)}
    pool = tasks.train_split(20 * n, seed=10_000 + seed, levels=levels, distinct=True)
    kept = [r for r in pool if r["prompt"] not in trained][:n]
    if len(kept) < n:
        raise SystemExit(f"only {len(kept)} validation problems outside the training set")
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def train(out: Path, options: list[str], threads: int | None) -> float:
    """One run in a subprocess; its wall time in seconds (skipped when it already finished)."""
    done = out / "wall_time.json"
    if done.exists():
        return json.loads(done.read_text())["wall_time_s"]
    env = dict(os.environ, TQDM_DISABLE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "gcpo_fast.train", "--output_dir", str(out / "run"), *options]
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): see {out / 'train.log'}")
    wall = time.time() - start
    done.write_text(json.dumps({"wall_time_s": wall}))
    return wall


def evaluations(out: Path) -> tuple[dict, dict]:
    """The first and the last evaluation line of a run."""
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [x for x in lines if "eval/mean@1" in x]
    return evals[0], evals[-1]


def summary_row(name: str, seed: int, out: Path, wall: float) -> dict:
    first, last = evaluations(out)
    return dict(
        recipe=name,
        seed=seed,
        steps=last["step"],
        before=first["eval/mean@1"],
        after=last["eval/mean@1"],
        level5_before=first.get("eval/level_5/mean@1"),
        level5_after=last.get("eval/level_5/mean@1"),
        wall_time_s=round(wall, 1),
    )


def write_table(rows: list[dict], stem: str, out: Path, note: str) -> str:
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += [
        "| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows
    ]
    if len({r["recipe"] for r in rows}) == 1 and len(rows) > 1:
        mean = {k: statistics.mean(r[k] for r in rows) for k in ("after", "level5_after", "wall_time_s")}
        spread = {k: (min(r[k] for r in rows), max(r[k] for r in rows)) for k in mean}
        lines.append(
            "| mean [min, max] | | | | "
            + " | ".join(f"{mean[k]:.3f} [{spread[k][0]:.3f}, {spread[k][1]:.3f}]" for k in ("after",))
            + " | | "
            + f"{mean['level5_after']:.3f} [{spread['level5_after'][0]:.3f}, {spread['level5_after'][1]:.3f}] | "
            + f"{mean['wall_time_s']:.0f} [{spread['wall_time_s'][0]:.0f}, {spread['wall_time_s'][1]:.0f}] |"
        )
    text = "\n".join(lines) + "\n\n" + note + "\n"
    (out / f"{stem}.md").write_text(text)
    return text


def search(args) -> None:
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    validation = runs / f"validation_seed{args.seed}.jsonl"
    write_validation(validation, args.seed, [3, 4, 5])
    jobs = []
    for name in args.recipes:
        options = [*RECIPES[name], "--seed", str(args.seed), "--eval_dataset", str(validation), "--save_steps", "0"]
        jobs.append((name, runs / f"{name}_seed{args.seed}", options))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        walls = list(pool.map(lambda job: train(job[1], job[2], 1), jobs))
    rows = [summary_row(name, args.seed, out, wall) for (name, out, _), wall in zip(jobs, walls, strict=True)]
    note = (
        f"Validation: 500 training-side problems of levels 3-5 outside seed {args.seed}'s training set; "
        f"OMP_NUM_THREADS=1, {args.jobs} runs at a time (wall times compare only within this table)."
    )
    print(write_table(rows, "tune_default_search", Path(args.out), note))


def check(args) -> None:
    runs = Path(args.runs_dir)
    rows = []
    for seed in args.seeds:
        out = runs / f"check_seed{seed}"
        wall = train(out, ["--seed", str(seed)], None)
        rows.append(summary_row("default", seed, out, wall))
    note = "Held-out: the trainer's own evaluation (500 distinct held-out problems, levels 3-5); one run at a time."
    print(write_table(rows, "tune_default_check", Path(args.out), note))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search")
    s.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--jobs", type=int, default=2)
    c = sub.add_parser("check")
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    for p in (s, c):
        p.add_argument("--runs_dir", default="/tmp/tune_default")
        p.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    search(args) if args.command == "search" else check(args)


if __name__ == "__main__":
    main()
