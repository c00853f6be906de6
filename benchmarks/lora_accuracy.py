"""Held-out accuracy after 300 steps: LoRA at several ranks against full fine-tuning, on the shipped default.

    OMP_NUM_THREADS=1 python -m benchmarks.lora_accuracy                         # ranks 8 16 64 + full, seed 42
    OMP_NUM_THREADS=1 python -m benchmarks.lora_accuracy --seeds 42 43 --variants full 16
    python -m benchmarks.lora_accuracy --report_only                             # the CSV from finished runs

Each (variant, seed) is one `python -m gcpo_fast.train --seed SEED` run (every other option at the trainer's
default: the shipped model and task, 300 steps, GCPO), one at a time; a LoRA variant adds `--use_peft --lora_r R
--lora_alpha 2R --learning_rate LORA_LR`. Full fine-tuning keeps the shipped learning rate (SHIPPED_MODEL_LR,
gcpo_fast/update.py; the figures in docs/results.md were measured when it was 3e-4). LORA_LR (3e-3 by default) is
the rule of thumb of Schulman et al., "LoRA Without Regret" (Thinking Machines, 2025): LoRA's best learning rate is
about 10x full fine-tuning's, nearly independent of the rank; the task has no validation split
(gcpo_fast/data/tasks.py: train and held-out only), so no rate is tuned here. Writes
benchmarks/results/lora_accuracy.csv: greedy eval/mean@1 on the held-out problems at step 0 and at the last step
(all, and level 5, the word problems), and the wall time, per run.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gcpo_fast.update import SHIPPED_MODEL_LR

FIELDS = (
    "variant",
    "lora_r",
    "learning_rate",
    "seed",
    "steps",
    "eval_step0",
    "eval_last",
    "level5_step0",
    "level5_last",
    "wall_time_s",
)


def run_dir(args, variant: str, seed: int) -> Path:
    return Path(args.runs_dir) / f"{variant}-seed{seed}"


def train_args(variant: str, seed: int, args) -> list[str]:
    cmd = ["--seed", str(seed), "--output_dir", str(run_dir(args, variant, seed))]
    if variant == "full":
        return cmd
    r = int(variant)
    return cmd + ["--use_peft", "--lora_r", str(r), "--lora_alpha", str(2 * r), "--learning_rate", str(args.lora_lr)]


def run_one(variant: str, seed: int, args) -> None:
    out = run_dir(args, variant, seed)
    if (out / "wall_time.json").is_file():
        return  # finished earlier
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gcpo_fast.train", *train_args(variant, seed, args)]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"{variant} seed {seed}: the run failed (rc {proc.returncode}); see {out / 'train.log'}")
    (out / "wall_time.json").write_text(json.dumps({"wall_time_s": time.perf_counter() - start}))


def read_run(variant: str, seed: int, args) -> dict:
    out = run_dir(args, variant, seed)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [line for line in lines if "eval/mean@1" in line]
    return {
        "variant": "full" if variant == "full" else "lora",
        "lora_r": "" if variant == "full" else variant,
        "learning_rate": SHIPPED_MODEL_LR if variant == "full" else args.lora_lr,
        "seed": seed,
        "steps": max(line.get("step", 0) for line in lines),
        "eval_step0": evals[0]["eval/mean@1"],
        "eval_last": evals[-1]["eval/mean@1"],
        "level5_step0": evals[0]["eval/level_5/mean@1"],  # the word problems, which golden answers teach
        "level5_last": evals[-1]["eval/level_5/mean@1"],
        "wall_time_s": round(json.loads((out / "wall_time.json").read_text())["wall_time_s"]),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lora_accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["full", "8", "16", "64"], help="full and/or LoRA ranks")
    ap.add_argument("--seeds", nargs="+", type=int, default=[42])
    ap.add_argument("--lora_lr", type=float, default=3e-3)
    ap.add_argument("--runs_dir", default="runs/lora_accuracy")
    ap.add_argument("--out", default="benchmarks/results/lora_accuracy.csv")
    ap.add_argument("--report_only", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            if not args.report_only:
                run_one(variant, seed, args)
            if (run_dir(args, variant, seed) / "wall_time.json").is_file():
                rows.append(read_run(variant, seed, args))
                print(rows[-1], flush=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
