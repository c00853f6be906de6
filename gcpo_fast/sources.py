"""Where prompt records come from: the builtin math task (generated in-process) or a local file.

    from gcpo_fast.sources import load_records

    train = load_records("builtin", split="train", num_problems=5000, seed=42, levels=[1, 2, 3, 4, 5])
    test = load_records("builtin", split="test", num_problems=100)
    train = load_records("data/train.jsonl", golden_column="solution", require_golden=True)

Records have gcpo_fast.data's shape: {"prompt", "golden", "answer", **other columns}. `builtin` is
gcpo_fast.tasks (train_split / heldout_split, which never share a prompt; test problems are distinct); a
file or folder goes to gcpo_fast.data.load_prompts, which raises ValueError naming the file, line and column of a bad row.
"""

from gcpo_fast.data import load_prompts


def load_records(
    dataset: str,
    *,
    split: str = "train",
    num_problems: int = 5000,
    seed: int = 0,
    levels: list[int] | None = None,
    prompt_column: str = "prompt",
    golden_column: str = "solution",
    answer_column: str | None = None,
    require_golden: bool = False,
) -> list[dict]:
    if dataset != "builtin":
        return load_prompts(
            dataset,
            prompt_column=prompt_column,
            golden_column=golden_column,
            answer_column=answer_column,
            require_golden=require_golden,
        )
    try:
        from gcpo_fast import tasks
    except ImportError as e:
        raise ValueError(
            f"--dataset builtin needs gcpo_fast.tasks, which cannot be imported ({e}); pass --dataset FILE instead"
        ) from None
    # held-out problems are distinct, so an evaluation never counts one problem twice
    drawn = (
        tasks.train_split(num_problems, seed=seed, levels=levels)
        if split == "train"
        else tasks.heldout_split(num_problems, seed=seed, levels=levels, distinct=True)
    )
    records = [{**r, "golden": r["solution"], "answer": r["answer"]} for r in drawn]
    if not records:
        raise ValueError("--dataset builtin: empty dataset (builtin_num_problems is 0)")
    return records
