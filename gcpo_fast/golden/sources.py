"""Where golden answers come from: the dataset's golden column, a teacher model, or its cache (--golden_source).

    from gcpo_fast.golden.sources import check_dataset_answers, golden_texts, open_cache

    check_dataset_answers(cfg.golden, records, dataset="train.jsonl", golden_column="solution", loss_type="gcpo")
    cache = open_cache(cfg.golden, output_dir, trust_remote_code=False)     # None without a teacher
    texts, from_teacher, metrics = golden_texts("dataset_then_teacher", records, all_wrong, teacher)

Both checks run before any model loads (gcpo_fast/prepare.py). The teacher itself (gcpo_fast/golden/teacher.py)
is asked only for all-wrong prompts, and only for those the dataset gives no answer under dataset_then_teacher.
"""

import warnings
from pathlib import Path

from gcpo_fast.golden.options import GoldenConfig
from gcpo_fast.golden.teacher import CACHE_NAME, GoldenCache, Teacher
from gcpo_fast.models.identity import model_identity
from gcpo_fast.models.loading import check_model_folder
from gcpo_fast.run.timing import PhaseTimer


def check_dataset_answers(
    options: GoldenConfig, records: list[dict], *, dataset: str, golden_column: str, loss_type: str
) -> None:
    """With golden answers from the dataset only, every record needs one; with none at all GCPO is GSPO (warned)."""
    if options.golden_answer == "off" or options.golden_source != "dataset":
        return
    missing = [i for i, r in enumerate(records) if r["golden"] is None]
    if len(missing) == len(records):
        warnings.warn(
            f"--dataset {dataset} has no golden column {golden_column!r} and no teacher is given "
            f"(--golden_model, --golden_cache): loss_type {loss_type} has no golden answers and runs as "
            "GSPO would",
            stacklevel=2,
        )
    elif missing:
        raise ValueError(
            f"--dataset {dataset}: {len(missing)} of {len(records)} records have no golden column "
            f"{golden_column!r} (the first: record {missing[0]}); give them a teacher (--golden_model, "
            "--golden_source dataset_then_teacher) or pass --golden_answer off"
        )


def open_cache(options: GoldenConfig, output_dir, *, trust_remote_code: bool) -> GoldenCache | None:
    """The run's golden-answer cache (output_dir/golden_cache.jsonl, with --golden_cache read first), keyed by the
    teacher's identity; None when no teacher is asked."""
    if not options.uses_teacher:
        return None
    folder = options.golden_model
    teacher = model_identity(check_model_folder(folder, trust_remote_code=trust_remote_code)) if folder else None
    prefilled = [options.golden_cache] if options.golden_cache else []
    return GoldenCache(Path(output_dir) / CACHE_NAME, teacher, prefilled=prefilled)


def golden_texts(
    source: str, records: list[dict], all_wrong: list[bool], teacher: Teacher | None, timer: PhaseTimer | None = None
) -> tuple[list[str | None], set[int], dict[str, float]]:
    """The golden text of each kept prompt by --golden_source (None: none), the prompts whose text is the
    teacher's, and the teacher's metrics. The teacher is asked only for all-wrong prompts (all_wrong [P])."""
    texts = [None if source == "teacher" else r["golden"] for r in records]
    if teacher is None:
        return texts, set(), {}
    asked = [p for p, t in enumerate(texts) if t is None and all_wrong[p]]
    with (timer or PhaseTimer())("teacher"):  # entered on every rank every round: the same timing keys everywhere
        found, metrics = teacher.answers([records[p] for p in asked])
    for p, text in zip(asked, found):
        texts[p] = text
    return texts, {p for p, text in zip(asked, found) if text is not None}, metrics
