"""GCPO against its neighbours and its own ablations on the shipped model and task: same start, seeds and steps.

    python -m benchmarks.compare_methods --max_steps 300                   # 7 methods x seeds 0 1 2
    python -m benchmarks.compare_methods --methods gcpo,dapo --seeds 0 1 --max_steps 50 --jobs 2
    python -m benchmarks.compare_methods --report_only                     # table and plot from the finished runs
    python -m benchmarks.compare_methods --methods gcpo,gcpo_token_is,gcpo_no_golden,dapo --runs_dir runs/offpolicy \
        --out benchmarks/results/offpolicy -- --steps_per_generation 4   # the ablation off-policy (4 steps a round)
    python -m benchmarks.golden_teacher teacher runs/teacher              # then how the golden row enters:
    python -m benchmarks.compare_methods --methods gcpo,gcpo_replace,gcpo_shaped,gcpo_teacher,gcpo_no_golden \
        --golden_model runs/teacher --max_steps 300
    python -m benchmarks.compare_methods --methods gcpo_tools,grpo_tools,gcpo --max_steps 150 --runs_dir runs/tools \
        --out benchmarks/results/tools -- --builtin_levels 8 --model gcpo_fast/assets/tool_model \
        --learning_rate 1e-3 --eval_steps 50 --eval_num_problems 200    # the python tool on level 8 (docs/results.md)

Each (method, seed) is one `python -m gcpo_fast.train --loss_type METHOD --seed SEED` run in its own process
(OMP_NUM_THREADS=--threads, --jobs at a time) with every other option at the trainer's default, so each
method runs with its paper's recipe (gcpo_fast/methods.py, METHODS); anything after `--` goes to every run.
GCPO's variants (VARIANTS) change one option: token-level ratios, no golden answer, the golden row in place
of a rollout, LUFFY's shaped objective, golden answers from a teacher (--golden_model) instead of the
dataset; with the python tool (--tools python: golden answers are one-line calls, gcpo_fast/tools/task.py) for
GCPO and GRPO (the tool demo passes `--model gcpo_fast/assets/tool_model`, whose warm start wrote the tool's
layout). Every run starts from the same model, sees the same prompts in the same order for a given seed and
evaluates on the same held-out problems. DAPO runs without a cap on its prompt batches, GPG with a
cap of 3 (METHOD_ARGS). The budget is optimizer steps; DAPO's dynamic sampling and GPG's resampling draw
extra prompt batches to fill a step, so the table also gives each run's generated tokens and its held-out
accuracy at the generated-token count the thriftiest run reached (read off its evaluations).

Writes to --out (default benchmarks/results/):
    compare_methods.csv          one row per run: held-out accuracy before/after (all, per level) and at equal
                                 generated tokens, reward, all-wrong groups, golden rows, prompt batches per step,
                                 generated tokens, wall time
    compare_methods.md           the per-method table (mean ± std over seeds, the seeds named)
    compare_methods_curves.csv   per step: reward, frac_reward_all_wrong, eval/mean@1, generated tokens of every run
    compare_methods.png          reward, all-wrong groups and held-out accuracy against step, held-out accuracy
                                 against generated tokens: mean over seeds, min-max band
The runs themselves (metrics.jsonl, samples.jsonl, final checkpoint) go to --runs_dir;
`python -m benchmarks.forgetting` scores their last checkpoints on the levels they never trained on.
"""

import argparse
import csv
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ("gcpo", "dapo", "grpo", "gspo", "gpg", "dr_grpo", "bnpo")
# DAPO's dynamic sampling with the trainer's default cap of 10 prompt batches per step stops the run once too
# few groups have varied rewards (verl does the same); here it may sample as many batches as it needs
# GPG resamples until half the rows are in groups with varied rewards: with the trainer's cap of 10 it drew 9 prompt
# batches a step on this task (44 minutes a run); here it stops at 3 (generated tokens in the table say how much)
METHOD_ARGS = {"dapo": ["--max_num_gen_batches", "0"], "gpg": ["--max_num_gen_batches", "3"]}
# GCPO's ablations (the paper's: token-level ratios, no golden answer; and how the golden row enters)
VARIANTS = {
    "gcpo_token_is": ("gcpo", ["--importance_sampling_level", "token"]),
    "gcpo_no_golden": ("gcpo", ["--golden_answer", "off"]),
    "gcpo_replace": ("gcpo", ["--golden_answer", "replace"]),
    "gcpo_shaped": ("gcpo", ["--golden_objective", "shaped"]),
    "gcpo_teacher": ("gcpo", ["--golden_source", "teacher", "--golden_model", "{golden_model}"]),
    # tool-integrated reasoning: the python tool, golden answers that call it (GCPO) or none (GRPO)
    "gcpo_tools": ("gcpo", ["--tools", "python"]),
    "grpo_tools": ("grpo", ["--tools", "python"]),
}
RESULTS = Path(__file__).resolve().parent / "results"


def run_dir(args, method: str, seed: int) -> Path:
    """The run folder of (method, seed); it holds wall_time.json once the run has finished."""
    return Path(args.runs_dir) / f"{method}_seed{seed}"


def run_one(method: str, seed: int, args) -> dict:
    """Train one (method, seed) in a subprocess; returns its wall time. Skips a run that already finished."""
    out = run_dir(args, method, seed)
    done = out / "wall_time.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():  # a run cut short earlier: start it again from scratch
        shutil.rmtree(out)
    cmd = [
        sys.executable,
        "-m",
        "gcpo_fast.train",
        "--loss_type",
        VARIANTS.get(method, (method,))[0],
        "--seed",
        str(seed),
        "--output_dir",
        str(out),
        "--save_steps",
        "0",
        "--logging_steps",
        "50",
        *METHOD_ARGS.get(method, []),
        *[arg.format(golden_model=args.golden_model) for arg in VARIANTS.get(method, (None, []))[1]],
        *args.train_args,
    ]
    if args.max_steps:
        cmd += ["--max_steps", str(args.max_steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    start = time.perf_counter()
    out.mkdir(parents=True)
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}: see {out / 'train.log'}")
    result = {"wall_time_s": time.perf_counter() - start}
    done.write_text(json.dumps(result))
    print(f"{method} seed {seed}: {result['wall_time_s']:.0f} s", flush=True)
    return result


def read_run(method: str, seed: int, args) -> dict:
    """The figures of one finished run, from its metrics.jsonl."""
    out = run_dir(args, method, seed)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [line for line in lines if "reward" in line]
    evals = [line for line in lines if "eval/mean@1" in line]
    if not steps or len(evals) < 2:
        raise RuntimeError(f"{out}: expected training steps and two evaluations in metrics.jsonl")
    first, last = evals[0], evals[-1]
    levels = sorted({k.split("/")[1] for k in first if k.startswith("eval/level_")}, key=lambda v: (len(v), v))
    row = {
        "method": method,
        "seed": seed,
        "steps": steps[-1]["step"],
        "eval_before": first["eval/mean@1"],
        "eval_after": last["eval/mean@1"],
        "eval_problems": int(first.get("eval/num_problems", 0)),
        **{f"{lv}_before": first[f"eval/{lv}/mean@1"] for lv in levels},
        **{f"{lv}_after": last[f"eval/{lv}/mean@1"] for lv in levels},
        **{f"{lv}_problems": int(first[f"eval/{lv}/num_problems"]) for lv in levels},
        "reward_first_20": statistics.mean(s["reward"] for s in steps[:20]),
        "reward_last_20": statistics.mean(s["reward"] for s in steps[-20:]),
        "frac_all_wrong_first_20": statistics.mean(s["frac_reward_all_wrong"] for s in steps[:20]),
        "frac_all_wrong_last_20": statistics.mean(s["frac_reward_all_wrong"] for s in steps[-20:]),
        "golden_rows": sum(s.get("gcpo/golden_rows", 0) for s in steps),
        "prompt_batches_per_step": statistics.mean(s["num_gen_batches"] for s in steps),
        "generated_tokens": steps[-1]["num_generated_tokens"],
        "wall_time_s": json.loads((out / "wall_time.json").read_text())["wall_time_s"],
        # --tools runs: tool calls per sampled rollout ("" for a run without tools)
        "tool_calls_first_20": mean_of(steps[:20], "tools/calls_per_rollout"),
        "tool_calls_last_20": mean_of(steps[-20:], "tools/calls_per_rollout"),
    }
    curves = [
        {
            "method": method,
            "seed": seed,
            "step": s["step"],
            "reward": s["reward"],
            "frac_reward_all_wrong": s["frac_reward_all_wrong"],
            "eval_mean@1": s.get("eval/mean@1", ""),
            "generated_tokens": s["num_generated_tokens"],
            "tool_calls_per_rollout": s.get("tools/calls_per_rollout", ""),
        }
        for s in steps
    ]
    curves.insert(
        0,
        {
            "method": method,
            "seed": seed,
            "step": 0,
            "reward": "",
            "frac_reward_all_wrong": "",
            "eval_mean@1": first["eval/mean@1"],
            "generated_tokens": 0,
            "tool_calls_per_rollout": "",
        },
    )
    return {"row": row, "curves": curves}


def mean_of(steps: list[dict], key: str) -> float | str:
    """The mean of a per-step metric over these steps, or "" when the run did not log it."""
    values = [s[key] for s in steps if key in s]
    return statistics.mean(values) if values else ""


def eval_at_tokens(curves: list[dict], tokens: float) -> float:
    """One run's held-out accuracy after `tokens` generated tokens, linear between its evaluations."""
    points = [(c["generated_tokens"], c["eval_mean@1"]) for c in curves if c["eval_mean@1"] != ""]
    for (t0, e0), (t1, e1) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            return e0 + (e1 - e0) * (tokens - t0) / (t1 - t0) if t1 > t0 else e1
    raise ValueError(f"{tokens} generated tokens is past the run's last evaluation ({points[-1][0]})")


def mean_spread(values: list[float]) -> str:
    """'mean ± sample std' over seeds (just the value for one seed; "-" for a metric the runs did not log)."""
    if any(v == "" for v in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict], budget: float) -> str:
    """The per-method markdown table: mean ± std over seeds; held-out at `budget` generated tokens too."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    levels = [k[: -len("_before")] for k in rows[0] if k.startswith("level_") and k.endswith("_before")]
    head = [
        "method",
        "seeds",
        "held-out before",
        "held-out after",
        "change",
        f"held-out at {budget / 1e6:.2f}M generated tokens",
        *[f"{lv} after" for lv in levels],
        "reward (first 20 steps)",
        "reward (last 20)",
        "all-wrong groups (first 20)",
        "all-wrong (last 20)",
        "golden rows",
        "prompt batches / step",
        "generated tokens (M)",
        "wall time (s)",
        "held-out after [min, max]",
        "tool calls / rollout (first 20)",
        "tool calls / rollout (last 20)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]

        def col(key, rs=rs):
            return mean_spread([r[key] for r in rs])

        cells = [
            m,
            ", ".join(str(r["seed"]) for r in rs),
            col("eval_before"),
            col("eval_after"),
            mean_spread([r["eval_after"] - r["eval_before"] for r in rs]),
            col("eval_at_budget"),
            *[col(f"{lv}_after") for lv in levels],
            col("reward_first_20"),
            col("reward_last_20"),
            col("frac_all_wrong_first_20"),
            col("frac_all_wrong_last_20"),
            f"{statistics.mean(r['golden_rows'] for r in rs):.0f}",
            col("prompt_batches_per_step"),
            f"{statistics.mean(r['generated_tokens'] for r in rs) / 1e6:.2f}",
            f"{statistics.mean(r['wall_time_s'] for r in rs):.0f}",
            f"[{min(r['eval_after'] for r in rs):.3f}, {max(r['eval_after'] for r in rs):.3f}]",
            col("tool_calls_first_20"),
            col("tool_calls_last_20"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    problems = rows[0]["eval_problems"]
    levels_n = ", ".join(
        f"{lv.split('_')[1]}: {rows[0][f'{lv}_problems']}" for lv in levels if f"{lv}_problems" in rows[0]
    )
    note = f"Held-out: greedy mean@1 on {problems} distinct held-out problems" + (
        f" (per level {levels_n})" if levels_n else ""
    )
    return (
        "\n".join(lines)
        + "\n\n"
        + note
        + "; mean ± std over seeds. Generated tokens: every completion token the policy sampled, kept or not "
        + f"(golden rows are not generated); held-out at {budget / 1e6:.2f}M generated tokens, the fewest any "
        + "run here generated, is read off each run's evaluations, linear between them.\n"
    )


def band(ax, xs: list[float], runs: list[list[float]], label: str, **style) -> None:
    """The mean over seeds as a line, their min-max as a shaded band."""
    mean = [statistics.mean(v) for v in zip(*runs)]
    (line,) = ax.plot(xs, mean, label=label, **style)
    if len(runs) > 1:
        ax.fill_between(
            xs, [min(v) for v in zip(*runs)], [max(v) for v in zip(*runs)], color=line.get_color(), alpha=0.2
        )


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average of a noisy per-step statistic."""
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot(curves: list[dict], path: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = any(c["tool_calls_per_rollout"] != "" for c in curves)  # a panel of tool calls when a run had tools
    fig, axes = plt.subplots(1, 4 + tools, figsize=(21 + 5 * tools, 4.8))
    ax_reward, ax_wrong, ax_eval, ax_tokens = axes[:4]
    for method in dict.fromkeys(c["method"] for c in curves):
        runs = {}
        for c in curves:
            if c["method"] == method:
                runs.setdefault(c["seed"], []).append(c)
        trained = [[c for c in run if c["reward"] != ""] for run in runs.values()]
        n = min(len(run) for run in trained)  # a run stopped early shortens the band to the steps all have
        steps = [c["step"] for c in trained[0][:n]]
        panels = [(ax_reward, "reward"), (ax_wrong, "frac_reward_all_wrong")]
        if tools and trained[0][0]["tool_calls_per_rollout"] != "":
            panels.append((axes[4], "tool_calls_per_rollout"))
        for ax, key in panels:
            band(ax, steps, [smoothed([c[key] for c in run[:n]], smooth) for run in trained], method)
        evals = [[c for c in run if c["eval_mean@1"] != ""] for run in runs.values()]
        k = min(len(e) for e in evals)
        accuracy = [[c["eval_mean@1"] for c in e[:k]] for e in evals]
        band(ax_eval, [c["step"] for c in evals[0][:k]], accuracy, method, marker="o")
        tokens = [statistics.mean(e[i]["generated_tokens"] for e in evals) / 1e6 for i in range(k)]
        band(ax_tokens, tokens, accuracy, method, marker="o")
    ax_reward.set(title=f"training reward (moving mean of {smooth} steps)", xlabel="step")
    ax_wrong.set(title=f"all-wrong groups (moving mean of {smooth} steps)", xlabel="step")
    ax_eval.set(title="held-out accuracy (greedy mean@1)", xlabel="step")
    ax_tokens.set(title="held-out accuracy against generation", xlabel="generated tokens (M, mean over seeds)")
    if tools:
        axes[4].set(title=f"tool calls per rollout (moving mean of {smooth} steps)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    ax_tokens.legend(fontsize=8)
    seeds = sorted({c["seed"] for c in curves})
    fig.suptitle(f"mean over seeds {', '.join(map(str, seeds))}, shaded: min to max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_methods",
        description=__doc__.split("\n")[0],
        epilog="Anything after -- goes to every gcpo_fast.train run, e.g. -- --learning_rate 1e-4",
    )
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated loss types (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    ap.add_argument("--max_steps", type=int, default=0, help="optimizer steps per run (default: the trainer's)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default: 2, one per core here)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    ap.add_argument("--runs_dir", default="runs/compare_methods", help="where the runs go (default: %(default)s)")
    ap.add_argument(
        "--out", type=Path, default=RESULTS, help="where the table and plot go (default: benchmarks/results)"
    )
    ap.add_argument(
        "--golden_model",
        help="gcpo_teacher's teacher (build it: python -m benchmarks.golden_teacher teacher DIR)",
    )
    ap.add_argument("--smooth", type=int, default=20, help="moving-average window of the plotted curves (default: 20)")
    ap.add_argument("--report_only", action="store_true", help="only rebuild the table and plot from finished runs")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS and m not in VARIANTS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join([*METHODS, *VARIANTS])}")
    if "gcpo_teacher" in methods and not args.golden_model and not args.report_only:
        ap.error("gcpo_teacher needs --golden_model DIR (python -m benchmarks.golden_teacher teacher DIR)")
    runs = [(m, s) for s in args.seeds for m in methods]
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda ms: run_one(*ms, args), runs))
    finished = [(m, s) for m, s in runs if (run_dir(args, m, s) / "wall_time.json").exists()]
    for m, s in sorted(set(runs) - set(finished)):  # only with --report_only: a run that did not finish is left out
        print(f"left out: {m} seed {s} (not finished in {args.runs_dir})")
    results = [read_run(m, s, args) for m, s in finished]
    budget = min(r["row"]["generated_tokens"] for r in results)  # equal generation: what every run reached
    for r in results:
        r["row"]["eval_at_budget"] = eval_at_tokens(r["curves"], budget)
    rows = sorted((r["row"] for r in results), key=lambda r: (methods.index(r["method"]), r["seed"]))
    curves = [c for r in results for c in r["curves"]]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in (("compare_methods.csv", rows), ("compare_methods_curves.csv", curves)):
        with open(args.out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    text = table(rows, budget)
    (args.out / "compare_methods.md").write_text(text)
    written = ["compare_methods.csv", "compare_methods.md", "compare_methods_curves.csv"]
    if importlib.util.find_spec("matplotlib") is None:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
    else:
        plot(curves, args.out / "compare_methods.png", args.smooth)
        written.append("compare_methods.png")
    print(text)
    print("wrote " + ", ".join(str(args.out / name) for name in written))


if __name__ == "__main__":
    main()
