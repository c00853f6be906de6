"""The shipped math task written as files: `python -m gcpo_fast.data --export DIR`.

    python -m gcpo_fast.data --export data/                  # data/train.jsonl, data/test.jsonl (TRL's layout)
    python -m gcpo_fast.data --export data/ --levels 3 4 5 --train-size 8192 --overwrite

The files hold the records of gcpo_fast/data/tasks.py (prompt, solution, answer, level) and load back through
gcpo_fast/data/files.py like any dataset of that layout.
"""

import json
from pathlib import Path


def main(argv=None) -> None:
    """`python -m gcpo_fast.data --export DIR`: write the shipped math task (gcpo_fast.data.tasks) as DIR/train.jsonl
    and DIR/test.jsonl in TRL's layout (prompt, solution; plus answer and level), readable by load_prompts.
    Existing files are replaced only with --overwrite. A usage error (bad sizes or levels, DIR a file,
    files in the way) is one line on stderr and exit status 2; a failure to write is one line and status 1."""
    from gcpo_fast.cli import ArgumentParser
    from gcpo_fast.data.tasks import heldout_split, train_split

    ap = ArgumentParser(prog="python -m gcpo_fast.data", description=main.__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, required=True, metavar="DIR", help="folder to write train.jsonl, test.jsonl")
    ap.add_argument("--train-size", type=int, default=4096)
    ap.add_argument("--test-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels", type=int, nargs="+", default=None, help="difficulty levels to draw (default: all)")
    ap.add_argument("--overwrite", action="store_true", help="replace train.jsonl / test.jsonl if DIR holds them")
    args = ap.parse_args(argv)
    for name in ("train_size", "test_size"):
        if getattr(args, name) < 1:
            ap.fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.export.exists() and not args.export.is_dir():
        ap.fail(f"--export {args.export} is a file, not a folder")
    paths = {name: args.export / f"{name}.jsonl" for name in ("train", "test")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not args.overwrite:
        ap.fail(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: pass --overwrite to replace"
        )
    try:
        # test problems are distinct, as in a real benchmark; training problems may repeat (small levels)
        splits = {
            "train": train_split(args.train_size, seed=args.seed, levels=args.levels),
            "test": heldout_split(args.test_size, seed=args.seed, levels=args.levels, distinct=True),
        }
    except ValueError as e:
        ap.fail(str(e))
    try:
        args.export.mkdir(parents=True, exist_ok=True)
        for name, records in splits.items():
            with open(paths[name], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            print(f"wrote {len(records)} {name} problems to {paths[name]}")
    except OSError as e:
        ap.fail(f"--export {args.export}: {e.strerror}: {e.filename}", status=1)
