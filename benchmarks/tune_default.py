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
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# the trainer's defaults when this search began, under every recipe, so that a later default changes no recipe
PINNED = [
    *["--warmup_ratio", "0", "--lr_scheduler_type", "linear", "--builtin_levels", "3", "4", "5"],
    *["--all_right_advantage", "0"],
]
OLD_DEFAULT = ["--learning_rate", "6e-4", "--max_steps", "500"]  # the default this search started from
MIX_3445 = ["--builtin_levels", "3", "4", "4", "5"]  # two-digit subtraction drawn twice as often
LR3E4_WARMUP = ["--learning_rate", "3e-4", "--max_steps", "500", "--warmup_ratio", "0.1"]
LR4E4_MIX34455 = [  # the shipped default since 2026-12-07
    *["--learning_rate", "4e-4", "--max_steps", "500", "--warmup_ratio", "0.1"],
    *["--builtin_levels", "3", "4", "4", "5", "5"],
]
RECIPES = {  # name: options on top of the trainer's defaults, pinned so that a table stays reproducible
    # the first search (the trainer's defaults then: lr 3e-4, 300 steps)
    "base": ["--learning_rate", "3e-4", "--max_steps", "300"],
    "lr6e-4": ["--learning_rate", "6e-4", "--max_steps", "300"],
    "lr1e-3": ["--learning_rate", "1e-3", "--max_steps", "300"],
    "lr2e-3": ["--learning_rate", "2e-3", "--max_steps", "300"],
    "lr6e-4_500steps": OLD_DEFAULT,
    "lr1e-3_500steps": ["--learning_rate", "1e-3", "--max_steps", "500"],
    "lr1e-3_constant": ["--learning_rate", "1e-3", "--max_steps", "300", "--lr_scheduler_type", "constant"],
    "lr1e-3_G16": ["--learning_rate", "1e-3", "--max_steps", "300", "--num_generations", "16"],
    # why two-digit subtraction (level 4) falls: the old default with one suspect taken away
    "no_word_problems": [*OLD_DEFAULT, "--builtin_levels", "3", "4"],
    "level4_only": [*OLD_DEFAULT, "--builtin_levels", "4"],
    "no_golden": [*OLD_DEFAULT, "--golden_answer", "off"],
    "no_subtraction_golden": [*OLD_DEFAULT, "--dataset", "{no_subtraction_golden}", "--answer_column", "answer"],
    "lr3e-4_500steps": ["--learning_rate", "3e-4", "--max_steps", "500"],
    # what might hold level 4 at the old default's learning rate
    "kl0.04": [*OLD_DEFAULT, "--beta", "0.04"],
    "kl0.3": [*OLD_DEFAULT, "--beta", "0.3"],
    "kl1": [*OLD_DEFAULT, "--beta", "1.0"],
    "temperature0.7": [*OLD_DEFAULT, "--temperature", "0.7"],
    "mix3445": [*OLD_DEFAULT, "--builtin_levels", "3", "4", "4", "5"],
    "no_std": [*OLD_DEFAULT, "--scale_rewards", "none"],
    "G16": [*OLD_DEFAULT, "--num_generations", "16", "--per_device_train_batch_size", "128"],
    "batch128": [*OLD_DEFAULT, "--per_device_train_batch_size", "128"],
    "word_problems_only": [*OLD_DEFAULT, "--builtin_levels", "5"],
    "mix3455": [*OLD_DEFAULT, "--builtin_levels", "3", "4", "5", "5"],
    "eps1e-5": [*OLD_DEFAULT, "--adam_epsilon", "1e-5"],
    "eps1e-4": [*OLD_DEFAULT, "--adam_epsilon", "1e-4"],
    # a smaller step, warmed up (Adam's first steps move every weight by about the full learning rate)
    "lr3e-4_warmup": ["--learning_rate", "3e-4", "--max_steps", "500", "--warmup_ratio", "0.1"],
    "lr1e-4_warmup": ["--learning_rate", "1e-4", "--max_steps", "500", "--warmup_ratio", "0.1"],
    "lr2e-4_warmup": ["--learning_rate", "2e-4", "--max_steps", "500", "--warmup_ratio", "0.1"],
    "lr3e-4_warmup_mix3445": [
        *["--learning_rate", "3e-4", "--max_steps", "500", "--warmup_ratio", "0.1"],
        *["--builtin_levels", "3", "4", "4", "5"],
    ],
    "lr1e-4_warmup_mix3445": ["--learning_rate", "1e-4", "--max_steps", "500", "--warmup_ratio", "0.1", *MIX_3445],
    "lr2e-4_warmup_mix3445": ["--learning_rate", "2e-4", "--max_steps", "500", "--warmup_ratio", "0.1", *MIX_3445],
    "lr3e-4_warmup_kl0.04": [
        "--learning_rate",
        "3e-4",
        "--max_steps",
        "500",
        "--warmup_ratio",
        "0.1",
        "--beta",
        "0.04",
    ],
    "lr3e-4_warmup_temperature0.7": [*LR3E4_WARMUP, "--temperature", "0.7"],
    "lr3e-4_warmup_temperature0.5": [*LR3E4_WARMUP, "--temperature", "0.5"],
    # Adam's noise: weights whose gradient changes sign each step still move by a fraction of the rate; a longer
    # momentum might average those signs away
    "lr6e-4_warmup_beta1_0.98": [*OLD_DEFAULT, "--warmup_ratio", "0.1", "--adam_beta1", "0.98"],
    "lr3e-4_warmup_mix34455": [*LR3E4_WARMUP, "--builtin_levels", "3", "4", "4", "5", "5"],
    "lr3e-4_warmup_no_word_problems": [*LR3E4_WARMUP, "--builtin_levels", "3", "4"],
    # levels 3's groups are nearly all right (no advantage, no gradient): fewer of them, more of levels 4 and 5
    "lr3e-4_warmup_mix3444555": [*LR3E4_WARMUP, "--builtin_levels", "3", "4", "4", "4", "5", "5", "5"],
    "lr4e-4_warmup_mix34455": LR4E4_MIX34455,
    # what might hold level 4 at the shipped default: a cosine schedule, no std scaling (a nearly-right
    # group's one wrong rollout of 8 gets -2.5 with it, -0.875 without), a longer warm-up
    "lr4e-4_warmup_mix34455_cosine": [*LR4E4_MIX34455, "--lr_scheduler_type", "cosine"],
    "lr4e-4_warmup_mix34455_no_std": [*LR4E4_MIX34455, "--scale_rewards", "none"],
    "lr4e-4_warmup0.2_mix34455": [*LR4E4_MIX34455, "--warmup_ratio", "0.2"],
    # groups whose rollouts are all right get no advantage from a group baseline: a small positive one keeps them
    "lr4e-4_warmup_mix34455_all_right0.2": [*LR4E4_MIX34455, "--all_right_advantage", "0.2"],
    "lr4e-4_warmup_mix34455_all_right0.5": [*LR4E4_MIX34455, "--all_right_advantage", "0.5"],
    "lr4e-4_warmup_mix34455_all_right1": [*LR4E4_MIX34455, "--all_right_advantage", "1.0"],
    "lr4e-4_warmup_mix34455_all_right2": [*LR4E4_MIX34455, "--all_right_advantage", "2.0"],
    # Adam moves a weight by about the rate whatever its gradient's noise: half the steps of twice the rollouts
    # halve that drift for the same compute and give each step a less noisy gradient
    "lr4e-4_warmup_mix34455_batch128_250steps": [
        *LR4E4_MIX34455,
        "--per_device_train_batch_size",
        "128",
        "--max_steps",
        "250",
    ],
    "lr6e-4_warmup_mix34455_batch128_250steps": [
        *LR4E4_MIX34455,
        "--per_device_train_batch_size",
        "128",
        "--max_steps",
        "250",
        "--learning_rate",
        "6e-4",
    ],
    # subtraction recovers as the rate decays: a decay that falls sooner, (1 - progress) ** 2, at the default's
    # peak and at the peak that gives it the linear schedule's area (6e-4 / 3 = 4e-4 / 2)
    "lr4e-4_warmup_mix34455_poly2": [*LR4E4_MIX34455, "--lr_scheduler_type", "polynomial", "--lr_scheduler_power", "2"],
    "lr6e-4_warmup_mix34455_poly2": [
        *LR4E4_MIX34455,
        "--lr_scheduler_type",
        "polynomial",
        "--lr_scheduler_power",
        "2",
        "--learning_rate",
        "6e-4",
    ],
    "lr3e-4_warmup_constant": [
        *["--learning_rate", "3e-4", "--max_steps", "500", "--warmup_ratio", "0.1"],
        *["--lr_scheduler_type", "constant"],
    ],
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


def write_without_subtraction_golden(path: Path, seed: int) -> None:
    """The default run's own training problems (builtin, levels 3-5, this seed, the same order) in a file, the
    word problems that subtract without their worked solution: GCPO gives those prompts no golden row."""
    from gcpo_fast.data import tasks

    records = tasks.train_split(5000, seed=seed, levels=[3, 4, 5])
    for r in records:
        if r["level"] == 5 and "-" in r["solution"]:
            del r["solution"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


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


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]


def evaluations(out: Path) -> list[dict]:
    """The run's evaluation lines, first to last."""
    return [x for x in metric_lines(out) if "eval/mean@1" in x]


def levels_of(line: dict) -> list[str]:
    """The level names of an evaluation line (level_3, level_4, ...)."""
    return sorted({k.split("/")[1] for k in line if k.startswith("eval/level_")}, key=lambda v: (len(v), v))


def summary_row(name: str, seed: int, out: Path, wall: float) -> dict:
    """Accuracy before and after, overall and per level, the worst level's change, the wall time."""
    evals = evaluations(out)
    first, last = evals[0], evals[-1]
    levels = levels_of(first)
    change = {lv: last[f"eval/{lv}/mean@1"] - first[f"eval/{lv}/mean@1"] for lv in levels}
    return dict(
        recipe=name,
        seed=seed,
        steps=last["step"],
        before=first["eval/mean@1"],
        after=last["eval/mean@1"],
        **{f"{lv}_before": first[f"eval/{lv}/mean@1"] for lv in levels},
        **{f"{lv}_after": last[f"eval/{lv}/mean@1"] for lv in levels},
        worst_level_change=min(change.values()),
        wall_time_s=round(wall, 1),
    )


def curve_rows(name: str, seed: int, out: Path) -> list[dict]:
    """Per evaluation: accuracy overall and per level, and the training steps since the last one (entropy,
    reward, golden rows, completion length averaged over them)."""
    lines = metric_lines(out)
    steps = [x for x in lines if "reward" in x]
    rows, previous = [], 0
    for e in (x for x in lines if "eval/mean@1" in x):
        window = [x for x in steps if previous < x["step"] <= e["step"]]
        previous = e["step"]
        mean = lambda key, w=window: statistics.mean(x[key] for x in w) if w else ""  # noqa: E731
        rows.append(
            dict(
                recipe=name,
                seed=seed,
                step=e["step"],
                mean=e["eval/mean@1"],
                **{lv: e[f"eval/{lv}/mean@1"] for lv in levels_of(e)},
                entropy=mean("entropy"),
                reward=mean("reward"),
                golden_rows=mean("gcpo/golden_rows"),
                completion_length=mean("completions/mean_length"),
            )
        )
    return rows


def spread(values: list[float], signed: bool = False) -> str:
    """mean [min, max] over seeds (the value alone for one seed)."""
    f = "{:+.3f}" if signed else "{:.3f}"
    if len(values) == 1:
        return f.format(values[0])
    return f"{f.format(statistics.mean(values))} [{f.format(min(values))}, {f.format(max(values))}]"


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


def write_table(rows: list[dict], stem: str, out: Path, note: str) -> str:
    """rows (one per run) to stem.csv; per recipe, mean [min, max] over its seeds to stem.md."""
    write_csv(rows, out / f"{stem}.csv")
    levels = [k[: -len("_after")] for k in rows[0] if k.startswith("level_") and k.endswith("_after")]
    head = ["recipe", "seeds", "steps", "all", *[f"{lv} (change)" for lv in levels], "worst level's change"]
    lines = ["| " + " | ".join([*head, "wall time (s)"]) + " |", "|" + "---|" * (len(head) + 1)]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == name]
        cells = [name, ", ".join(str(r["seed"]) for r in rs), str(rs[0]["steps"]), spread([r["after"] for r in rs])]
        for lv in levels:
            after = [r[f"{lv}_after"] for r in rs]
            change = statistics.mean(r[f"{lv}_after"] - r[f"{lv}_before"] for r in rs)
            cells.append(f"{spread(after)} ({change:+.3f})")
        cells.append(spread([r["worst_level_change"] for r in rs], signed=True))
        cells.append(f"{statistics.mean(r['wall_time_s'] for r in rs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    (out / f"{stem}.md").write_text(text)
    return text


def recipe_options(name: str, seed: int, runs: Path) -> list[str]:
    """The recipe's options, any file it names written for this seed."""
    files = {"no_subtraction_golden": runs / f"train_no_subtraction_golden_seed{seed}.jsonl"}
    if any("{no_subtraction_golden}" in o for o in RECIPES[name]):
        write_without_subtraction_golden(files["no_subtraction_golden"], seed)
    return [*PINNED, *(o.format(**files) for o in RECIPES[name])]


def search(args) -> None:
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    jobs = []
    for seed in args.seeds:
        validation = runs / f"validation_seed{seed}.jsonl"
        write_validation(validation, seed, [3, 4, 5])
        for name in args.recipes:
            options = [*recipe_options(name, seed, runs), "--seed", str(seed), "--eval_dataset", str(validation)]
            options += ["--save_steps", "0", "--sample_steps", "1", "--num_samples_to_log", "8", *args.train_args]
            jobs.append((name, seed, runs / f"{name}_seed{seed}", options))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        walls = list(pool.map(lambda job: train(job[2], job[3], 1), jobs))
    rows = [summary_row(name, seed, out, wall) for (name, seed, out, _), wall in zip(jobs, walls, strict=True)]
    write_csv(
        [c for name, seed, out, _ in jobs for c in curve_rows(name, seed, out)],
        Path(args.out) / f"{args.stem}_curves.csv",
    )
    note = (
        f"Validation: per seed, 500 training-side problems of levels 3-5 outside that seed's training set; "
        f"OMP_NUM_THREADS=1, {args.jobs} runs at a time (wall times compare only within this table). "
        "Cells: mean [min, max] over the seeds; (change): the mean change from the run's start."
    )
    print(write_table(rows, args.stem, Path(args.out), note))
    plot_frontier(rows, Path(args.out) / f"{args.stem}.png")


def plot_frontier(rows: list[dict], path: Path) -> None:
    """Each recipe's mean accuracy at the end against its worst level's change (mean over seeds, min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == name]
        x, y = [r["worst_level_change"] for r in rs], [r["after"] for r in rs]
        mx, my = statistics.mean(x), statistics.mean(y)
        ax.errorbar(mx, my, xerr=[[mx - min(x)], [max(x) - mx]], yerr=[[my - min(y)], [max(y) - my]], fmt="o")
        ax.annotate(name, (mx, my), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(-0.02, color="grey", linestyle="--", linewidth=1, label="2 points below the start")
    ax.set_xlim(right=max(0.01, ax.get_xlim()[1]))
    ax.legend(fontsize=8, loc="lower left")
    ax.set(xlabel="worst trained level's change (end - start)", ylabel="accuracy at the end, all levels")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check(args) -> None:
    runs = Path(args.runs_dir)
    rows, curves = [], []
    name = args.recipe or "default"
    for seed in args.seeds:
        out = runs / f"check_{name}_seed{seed}"
        options = [*PINNED, *RECIPES[args.recipe]] if args.recipe else []  # none: the defaults as they ship
        wall = train(out, [*options, "--seed", str(seed)], args.threads)
        rows.append(summary_row(name, seed, out, wall))
        curves += curve_rows(name, seed, out)
    write_csv(curves, Path(args.out) / f"{args.stem}_curves.csv")
    note = "Held-out: the trainer's own evaluation (500 distinct held-out problems, levels 3-5); one run at a time."
    print(write_table(rows, args.stem, Path(args.out), note))


WINDOWS = ((1, 10), (11, 50), (51, 100), (101, 200), (201, 300), (301, 500))
STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+)\.")


def level_of(prompt: str) -> int:
    """Level 3, 4 or 5 of a builtin prompt of those levels (gcpo_fast/tasks.py's formats)."""
    if re.fullmatch(r"Q: \d+\+\d+=\?\n", prompt):
        return 3
    return 4 if re.fullmatch(r"Q: \d+-\d+=\?\n", prompt) else 5


def subtraction_outcome(prompt: str, completion: str) -> str:
    """What a two-digit subtraction rollout did: correct, a wrong first (tens) or second (ones) step, fewer steps
    than the worked solution's two, or something else."""
    x, y = map(int, re.match(r"Q: (\d+)-(\d+)", prompt).groups())
    boxed = re.search(r"\\boxed\{(-?\d+)\}", completion)
    if boxed and int(boxed.group(1)) == x - y:
        return "correct"
    steps = STEP.findall(completion)
    if len(steps) < 2:
        return "skipped a step"
    for k, (a, op, b, c) in enumerate(steps[:2]):
        if {"-": int(a) - int(b), "+": int(a) + int(b), "*": int(a) * int(b)}[op] != int(c):
            return ("wrong first step", "wrong second step")[k]
    return "other"


def failures(args) -> None:
    """Per window of steps: the level-4 rollouts' outcomes and the golden rows by level, from samples.jsonl
    (the search's runs log every group's first rollout and golden row at every step)."""
    outcomes = ("correct", "wrong first step", "wrong second step", "skipped a step", "other")
    head = ["run", "steps", "level-4 rollouts", *outcomes, "golden rows: level 3 / 4 / 5"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in args.runs:
        samples = [json.loads(x) for x in (Path(run) / "run" / "samples.jsonl").read_text().splitlines() if x]
        for lo, hi in WINDOWS:
            window = [x for x in samples if lo <= x["step"] <= hi]
            if not window:
                continue
            rollouts = [x for x in window if not x["golden"] and level_of(x["prompt"]) == 4]
            seen = [subtraction_outcome(x["prompt"], x["completion"]) for x in rollouts]
            golden = [sum(x["golden"] and level_of(x["prompt"]) == lv for x in window) for lv in (3, 4, 5)]
            shares = [f"{seen.count(o) / max(len(seen), 1):.2f}" for o in outcomes]
            cells = [Path(run).name, f"{lo}-{hi}", str(len(seen)), *shares, " / ".join(map(str, golden))]
            lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search")
    s.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    s.add_argument("--seeds", nargs="+", type=int, default=[0])
    s.add_argument("--jobs", type=int, default=2)
    s.add_argument("--stem", default="tune_default_search", help="name of the tables written to --out")
    c = sub.add_parser("check")
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    c.add_argument("--stem", default="tune_default_check", help="name of the tables written to --out")
    c.add_argument("--recipe", choices=list(RECIPES), help="a recipe's options instead of the trainer's defaults")
    c.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: unset, as a newcomer runs it)")
    for p in (s, c):
        p.add_argument("--runs_dir", default="/tmp/tune_default")
        p.add_argument("--out", default=str(RESULTS))
    f = sub.add_parser("failures")
    f.add_argument("runs", nargs="+", help="search run folders (RUNS_DIR/RECIPE_seedS)")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.train_args = argv[split + 1 :]  # after --: options for every run, after the recipe's (so they win)
    {"search": search, "check": check, "failures": failures}[args.command](args)


if __name__ == "__main__":
    main()
