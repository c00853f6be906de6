"""Where prompt records come from: the builtin math task (generated in-process) or a local file.

    from gcpo_fast.sources import load_records

    train = load_records("builtin", split="train", num_problems=5000, seed=42)
    test = load_records("builtin", split="test", num_problems=100)
    train = load_records("data/train.jsonl", golden_column="solution", require_golden=True)

Records have gcpo_fast.data's shape: {"prompt", "golden", "answer", **other columns}. `builtin` is
gcpo_fast.tasks (train_split / heldout_split, which never share a prompt); a file or folder goes to
gcpo_fast.data.load_prompts, which raises ValueError naming the file, line and column of a bad row.
"""
from gcpo_fast.data import load_prompts


def load_records(dataset: str, *, split: str = "train", num_problems: int = 5000, seed: int = 0,
                 prompt_column: str = "prompt", golden_column: str = "solution", answer_column: str | None = None,
                 require_golden: bool = False) -> list[dict]:
    if dataset != "builtin":
        return load_prompts(dataset, prompt_column=prompt_column, golden_column=golden_column,
                            answer_column=answer_column, require_golden=require_golden)
    try:
        from gcpo_fast import tasks
    except ImportError as e:
        raise ValueError(f"--dataset builtin needs gcpo_fast.tasks, which cannot be imported ({e}); "
                         "pass --dataset FILE instead") from None
    make = tasks.train_split if split == "train" else tasks.heldout_split
    records = [{**r, "golden": r["solution"], "answer": r["answer"]} for r in make(num_problems, seed=seed)]
    if not records:
        raise ValueError("--dataset builtin: empty dataset (builtin_num_problems is 0)")
    return records
