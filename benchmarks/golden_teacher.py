"""GCPO with golden answers from a teacher, against the dataset's worked solutions and against none (GSPO-like).

    python -m benchmarks.golden_teacher teacher /tmp/gt/teacher          # the teacher (~5 min on one CPU thread)
    python -m benchmarks.golden_teacher data /tmp/gt                      # train.jsonl with and without solutions
    R="--eval_dataset /tmp/gt/test/test.jsonl --eval_steps 150 --save_steps 0 --max_steps 150 --sample_steps 50"
    python -m gcpo_fast.train $R --output_dir /tmp/gt/runs/dataset --dataset /tmp/gt/gold/train.jsonl
    python -m gcpo_fast.train $R --output_dir /tmp/gt/runs/teacher --dataset /tmp/gt/nogold/train.jsonl \\
        --answer_column answer --golden_model /tmp/gt/teacher
    python -m gcpo_fast.train $R --output_dir /tmp/gt/runs/none --dataset /tmp/gt/nogold/train.jsonl \\
        --answer_column answer
    python -m benchmarks.golden_teacher report /tmp/gt/runs/dataset /tmp/gt/runs/teacher /tmp/gt/runs/none

The teacher is the shipped model trained further with make_default_model's supervised recipe (its `train`,
AdamW, cosine schedule) for 600 steps of 32 problems of levels 1-5, word problems (5) included, lr 1e-3: it
solves most held-out word problems that the shipped model (the policy) almost never does, and it shares the
policy's tokenizer. The training data are the builtin task's training split of the default run (5000
problems of levels 3-5, seed 42), written once with the worked solution and once with only the final answer;
the held-out problems are the trainer's builtin evaluation split (500 distinct problems, seed 0).
`report` prints a markdown table from the runs' metrics.jsonl: held-out greedy accuracy at every evaluation
(all, per level), golden rows and where they came from, the teacher's misses and its time.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SFT_STEPS, SFT_LR, SFT_MIX = 600, 1e-3, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 0.0, 7: 0.0, 8: 0.0}


def build_teacher(out: Path) -> None:
    import torch

    from gcpo_fast.make_default_model import evaluate, train
    from gcpo_fast.models.loading import DEFAULT_MODEL, load_causal_lm, load_tokenizer

    torch.set_num_threads(1)
    tokenizer, model = load_tokenizer(DEFAULT_MODEL), load_causal_lm(DEFAULT_MODEL, device="cpu")
    start = time.time()
    losses = train(model, tokenizer, 7, SFT_STEPS, 32, SFT_LR, SFT_MIX)
    print(f"SFT {SFT_STEPS} steps in {time.time() - start:.0f} s, final loss {sum(losses[-20:]) / 20:.4f}")
    print(
        "held-out greedy per level:",
        {k: f"{c}/{n}" for k, (c, n) in evaluate(model, tokenizer, 0, per_level=100).items()},
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def export_data(root: Path) -> None:
    run = lambda *args: subprocess.run([sys.executable, "-m", "gcpo_fast.data", *args], check=True)  # noqa: E731
    run(
        "--export",
        str(root / "gold"),
        "--seed",
        "42",
        "--train-size",
        "5000",
        "--test-size",
        "1",
        "--levels",
        "3",
        "4",
        "5",
    )
    run(
        "--export",
        str(root / "test"),
        "--seed",
        "0",
        "--train-size",
        "1",
        "--test-size",
        "500",
        "--levels",
        "3",
        "4",
        "5",
    )
    (root / "nogold").mkdir(exist_ok=True)
    rows = [json.loads(line) for line in (root / "gold" / "train.jsonl").read_text().splitlines()]
    (root / "nogold" / "train.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "solution"}) + "\n" for r in rows)
    )


def report(runs: list[Path]) -> str:
    lines = [
        "| run | steps | held-out all | level 3 | level 4 | level 5 | golden rows | from teacher | cache hits "
        "| teacher: no correct | teacher errors | teacher time (s) | wall time (s) |",
        "|" + "---|" * 13,
    ]
    for run in runs:
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [m for m in metrics if "eval/mean@1" in m]
        steps = [m for m in metrics if "loss" in m]

        def arrow(key, evals=evals):
            return " -> ".join(f"{m[key]:.3f}" for m in evals)

        def total(key, steps=steps):
            return sum(m.get(key, 0) for m in steps)

        lines.append(
            f"| {run.name} | {len(steps)} | {arrow('eval/mean@1')} | {arrow('eval/level_3/mean@1')} | "
            f"{arrow('eval/level_4/mean@1')} | {arrow('eval/level_5/mean@1')} | {total('gcpo/golden_rows'):.0f} | "
            f"{total('gcpo/golden_from_teacher'):.0f} | {total('gcpo/golden_cache_hits'):.0f} | "
            f"{total('gcpo/teacher_no_correct'):.0f} | {total('gcpo/teacher_errors'):.0f} | "
            f"{total('timing/teacher'):.0f} | {total('step_time'):.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.golden_teacher", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("teacher", help="build the teacher").add_argument("out", type=Path)
    sub.add_parser("data", help="write the training and held-out files").add_argument("root", type=Path)
    sub.add_parser("report", help="the table of finished runs").add_argument("runs", type=Path, nargs="+")
    args = ap.parse_args(argv)
    if args.command == "teacher":
        build_teacher(args.out)
    elif args.command == "data":
        export_data(args.root)
    else:
        print(report(args.runs))


if __name__ == "__main__":
    main()
