"""Prompt datasets: local JSONL / Parquet files or cached hub datasets in TRL's or verl's layout, and a resumable
sampler.

    from gcpo_fast.data.files import load_prompts, PromptSampler

    records = load_prompts("data/train.jsonl")           # a .jsonl or .parquet file, or a directory of them
    records = load_prompts("gsm8k/", prompt_column="question", golden_column="answer", require_golden=True)
    records = load_prompts("openai/gsm8k", dataset_config="main", prompt_column="question", golden_column="answer")
    sampler = PromptSampler(records, batch_size=8, seed=0)
    batch = next(sampler)                                # a list of 8 records
    state = sampler.state_dict()                         # save with the checkpoint; later:
    sampler.load_state_dict(state)                       # the next batch is the one that would have come

Every record is a plain dict:
    {"prompt": str | [{"role": ..., "content": ...}, ...], "golden": str | None, "answer": str, **other columns}
- TRL layout: `prompt` (text or chat messages) and `solution`, the worked answer. `golden` is the solution;
  `answer`, the ground truth the reward checks, is extracted from it (its last \\boxed{}, else GSM8K's
  `#### x`, else what math-verify extracts).
- verl layout: `prompt` (chat messages), `reward_model` = {"ground_truth": ..., "style": ...}, `extra_info`
  = {...}. `answer` is reward_model.ground_truth; `golden` is the row's golden column, else
  extra_info[golden column] (pass golden_column="extra_info.answer" for verl's GSM8K files), else None.
Column names are arguments (prompt_column, golden_column, answer_column); a dotted name reads a nested
field. The row's other columns are kept (TRL reward functions receive them); the keys "prompt",
"golden" and "answer" are ours and replace columns of the same name. A row's own `answer` column that the
answer the reward checks replaced (it came from another column) and that differs from it is kept as
"dataset_answer", so the dataset's fingerprint sees it, and warned about unless math-verify reads the two as
equal (warn_disagreeing_answers).

A name that is no local path but a hub repository id (openai/gsm8k) is a hub dataset, read with the datasets
library (the `data` extra; imported only then) from the local Hugging Face cache only, never downloaded
(read_hub_dataset): split `dataset_split` of configuration `dataset_config`, rows named "NAME (split), row i".

Bad data raises ValueError naming the file, the line (JSONL, counted from 1) or row (Parquet, counted
from 0), and the column. Answers the accuracy reward can never verify as meant (math-verify cannot parse
them, or reads a word as a product of variables: rewards.unverifiable_reason) are reported when the data
loads, with their count and first examples, as a warning: a dataset may hold some, and a custom reward
function may not use the answer at all. Plain numbers (integers, decimals, fractions) are known to verify and
skip math-verify's parse, the slow part of a large load; with more than PROGRESS_FROM other distinct answers
a progress bar shows. Parquet needs pyarrow (`pip install pyarrow`, or the `data` extra).
"""

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gcpo_fast.data.rewards import extract_answer, math_reward, unverifiable_reason

SUFFIXES = (".jsonl", ".parquet")
_MISSING = object()


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise ValueError(f"{path}: directory holds no {' or '.join(SUFFIXES)} files")
        return files
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use {' or '.join(SUFFIXES)})")
    return [path]


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}, line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}, row {i}", row


def _lookup(row: dict, column: str):
    """row[column], or for a dotted name absent at the top level the nested field; _MISSING if absent."""
    if column in row:
        return row[column]
    value = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _text(value, where: str, column: str) -> str:
    # numbers are common as ground truths (GSM8K-style "72" stored as an int)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: column {column!r} is empty")
    return value


def _prompt(row: dict, where: str, column: str) -> str | list[dict]:
    value = _lookup(row, column)
    if value is _MISSING:
        raise ValueError(f"{where}: missing prompt column {column!r} (columns: {', '.join(row)})")
    if isinstance(value, list):
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: column {column!r}, message {j}: expected {{'role': str, 'content': str}}")
        if not value:
            raise ValueError(f"{where}: column {column!r} is an empty message list")
        return value
    if not isinstance(value, str):  # a number would train on "1", "2": a column mix-up, not a prompt
        raise ValueError(
            f"{where}: column {column!r} must be a string or a list of chat messages, got {type(value).__name__}"
        )
    return _text(value, where, column)


def _golden(row: dict, where: str, column: str, require: bool) -> str | None:
    value = _lookup(row, column)
    if value is _MISSING and isinstance(row.get("extra_info"), dict):
        value = row["extra_info"].get(column, _MISSING)
    if value is _MISSING or value is None:
        if require:
            raise ValueError(f"{where}: missing golden column {column!r} (required: require_golden=True)")
        return None
    return _text(value, where, column)


def _answer(
    row: dict, where: str, answer_column: str | None, golden_column: str, golden: str | None
) -> tuple[str, str]:
    """The answer the reward checks and the column it comes from."""
    if answer_column is not None:
        value = _lookup(row, answer_column)
        if value is _MISSING or value is None:
            raise ValueError(f"{where}: missing answer column {answer_column!r}")
        return _text(value, where, answer_column), answer_column
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        return _text(reward_model["ground_truth"], where, "reward_model.ground_truth"), "reward_model.ground_truth"
    if golden is None:
        raise ValueError(
            f"{where}: no ground-truth answer: column {golden_column!r} and reward_model.ground_truth are "
            "both missing (pass answer_column=...)"
        )
    answer = extract_answer(golden)
    if answer is None:
        raise ValueError(
            f"{where}: column {golden_column!r}: no final answer found (no \\boxed{{}}, no '####', nothing "
            "math-verify can parse); pass answer_column=..."
        )
    return answer, golden_column


def load_prompts(
    path: str | Path,
    *,
    prompt_column: str = "prompt",
    golden_column: str = "solution",
    answer_column: str | None = None,
    require_golden: bool = False,
    dataset_config: str | None = None,
    dataset_split: str = "train",
) -> list[dict]:
    """Read every row of a .jsonl / .parquet file (or of the sorted files of a directory), or of split
    `dataset_split` of a hub dataset in the local Hugging Face cache (`dataset_config`: its configuration), as a
    record."""
    records, wheres, own_answers = [], [], []
    if not names_hub_dataset(str(path)):
        files = _files(Path(path))
        label = ", ".join(map(str, files))
        rows = (
            row for file in files for row in (_read_parquet(file) if file.suffix == ".parquet" else _read_jsonl(file))
        )
    else:
        label = f"{path} ({dataset_split})"
        rows = read_hub_dataset(str(path), dataset_config, dataset_split)
    for where, row in rows:
        prompt = _prompt(row, where, prompt_column)
        golden = _golden(row, where, golden_column, require_golden)
        answer, source = _answer(row, where, answer_column, golden_column, golden)
        others = {k: v for k, v in row.items() if k != prompt_column}
        record = {**others, "prompt": prompt, "golden": golden, "answer": answer}
        own = row.get("answer") if "answer" not in (source, golden_column) else None
        if own is not None and str(own).strip() != answer:  # the row's own answer, replaced: kept, compared below
            record["dataset_answer"] = own
            own_answers.append((where, str(own).strip(), answer, source))
        records.append(record)
        wheres.append(where)
    if not records:
        raise ValueError(f"{label}: empty dataset (no rows)")
    warn_unverifiable([r["answer"] for r in records], wheres)
    warn_disagreeing_answers(own_answers, len(records))
    return records


def warn_disagreeing_answers(own_answers: list[tuple[str, str, str, str]], num_rows: int, shown: int = 3) -> int:
    """Warn once about rows whose own `answer` column differs from the answer the reward checks (taken from
    another column), unless math-verify reads the two as equal ("0.5" and "\\frac{1}{2}"); returns their count.
    own_answers: (where, the row's answer, the checked answer, its column); each distinct pair is verified once."""
    pairs = list(dict.fromkeys((own, ours) for _, own, ours, _ in own_answers))
    equal = dict(zip(pairs, math_reward([f"\\boxed{{{own}}}" for own, _ in pairs], [ours for _, ours in pairs])))
    bad = [(where, own, ours, source) for where, own, ours, source in own_answers if not equal[own, ours]]
    if bad:
        examples = "; ".join(f"{where}: {own[:40]!r} against {ours[:40]!r}" for where, own, ours, _ in bad[:shown])
        warnings.warn(
            f"{len(bad)} of {num_rows} rows have an answer column that disagrees with the answer the reward checks, "
            f"from column {bad[0][3]!r}: {examples}{'; ...' if len(bad) > shown else ''}. Pass "
            "answer_column='answer' (--answer_column answer) to check the dataset's own",
            stacklevel=3,
        )
    return len(bad)


def names_hub_dataset(name: str) -> bool:
    """Whether a dataset name is a hub dataset's: no local path, and a hub repository id (namespace/name) that is
    not a data file's name (data/x.jsonl is a file that is missing)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name == "builtin" or Path(name).expanduser().exists() or Path(name).suffix in SUFFIXES:
        return False
    try:
        validate_repo_id(name)
        return True
    except HFValidationError:
        return False


def read_hub_dataset(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    """The rows of split `split` of hub dataset `name`, read by the datasets library from the local Hugging Face
    cache only: the repository's files in the hub cache (`hf download --repo-type dataset NAME`), else what
    `datasets.load_dataset(NAME)` left in the datasets cache. Nothing is downloaded: a dataset in neither is one
    line saying so. (TRL's scripts call load_dataset(name, config, split=...), which downloads.)"""
    try:
        import datasets
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f'{name}: no such file or folder; as a hub dataset it needs the datasets library: pip install -e ".[data]"'
        ) from None
    try:
        source = snapshot_download(name, repo_type="dataset", local_files_only=True)
    except OSError:  # not in the hub cache (LocalEntryNotFoundError)
        source = name
    try:
        with _offline(datasets):
            table = datasets.load_dataset(source, config, split=split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        if source != name:  # the hub cache has the repository, without the files of this split
            raise ValueError(
                f"{name}: its files in the Hugging Face cache ({source}) hold no data for it "
                f"({' '.join(str(e).split())[:200]}): `hf download --repo-type dataset {name}` again (nothing is "
                "downloaded at run time)"
            ) from None
        raise ValueError(
            f"{name}: no such file or folder, nor a dataset in the local Hugging Face cache (nothing is downloaded "
            f"at run time: `hf download --repo-type dataset {name}` first, or pass a .jsonl/.parquet file)"
        ) from None
    except ValueError as e:  # an unknown configuration or split, with the ones there are
        raise ValueError(f"{name}: {' '.join(str(e).split())[:300]}") from None
    for i, row in enumerate(table):
        yield f"{name} ({split}), row {i}", row


@contextmanager
def _offline(datasets):
    """The datasets library in offline mode for the call: it reads HF_HUB_OFFLINE once, at import, and would
    otherwise ask the hub (or wait for it) before it looks in its cache. Its warning that the hub could not be
    reached (we did not ask it) is silenced for the call."""
    saved, verbosity = datasets.config.HF_HUB_OFFLINE, datasets.logging.get_verbosity()
    datasets.config.HF_HUB_OFFLINE = True
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
        datasets.logging.set_verbosity(verbosity)


# An integer, decimal or fraction of integers (as text or \frac): what most math datasets' answers are, and what
# math-verify always reads as meant, so the load skips parsing them (the slow part of loading 100k rows).
PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d+)?|\d+/\d+|\\d?frac\{\d+\}\{\d+\})")
PROGRESS_FROM = 2000  # distinct answers to parse before the load shows a progress bar (~1 ms to 1 s each)


def warn_unverifiable(answers: list[str], wheres: list[str], shown: int = 3) -> int:
    """Warn once, with the count and the first `shown` examples, about answers the accuracy reward can
    never verify as meant; returns their count. math-verify parses each distinct answer once."""
    distinct = [a for a in dict.fromkeys(answers) if not PLAIN_NUMBER.fullmatch(a)]  # numbers always verify
    slow = len(distinct) > PROGRESS_FROM
    bar = tqdm(distinct, desc="checking answers with math-verify", disable=not slow, leave=False, mininterval=1)
    reasons: dict[str, str | None] = {a: unverifiable_reason(a) for a in bar}
    bad = []
    for answer, where in zip(answers, wheres, strict=True):
        if reasons.get(answer):
            bad.append(f"{where}: {answer[:60]!r} ({reasons[answer]})")
    if bad:
        warnings.warn(
            f"{len(bad)} of {len(answers)} answers can never be verified by the accuracy reward (their "
            f"rollouts would all get reward 0): {'; '.join(bad[:shown])}{'; ...' if len(bad) > shown else ''}. "
            "Check answer_column; write text answers as \\text{...}",
            stacklevel=2,
        )
    return len(bad)


class PromptSampler:
    """Endless batches of `batch_size` prompt records with a seeded shuffle per epoch and a resumable cursor.

    Epoch e visits the records in the order torch.randperm(n) drawn from a generator seeded with
    seed + e (the global RNG is never touched); an epoch's last partial batch is skipped, so every
    batch holds distinct prompts. With world_size > 1 all ranks walk the same order in global
    batches of batch_size * world_size and rank r takes its r-th slice: disjoint prompts, one cursor.
    """

    def __init__(
        self,
        records: list[dict],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"PromptSampler: rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or batch_size * world_size > len(records):
            raise ValueError(
                f"PromptSampler: a global batch of {batch_size} x {world_size} ranks needs at least that many "
                f"prompts; the dataset has {len(records)}"
            )
        self.records, self.batch_size, self.seed, self.shuffle = records, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0  # the cursor: next global batch starts at order[index] of this epoch
        self._order = self._epoch_order()

    def _epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.records))
        return torch.randperm(len(self.records), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self) -> "PromptSampler":
        return self

    def __next__(self) -> list[dict]:
        global_batch = self.batch_size * self.world_size
        if self.index + global_batch > len(self.records):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        start = self.index + self.rank * self.batch_size
        batch = [self.records[i] for i in self._order[start : start + self.batch_size].tolist()]
        self.index += global_batch
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_records": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken; its seed wins (the cursor only means something under it)."""
        if state["num_records"] != len(self.records):
            raise ValueError(
                f"PromptSampler: the checkpoint's dataset had {state['num_records']} prompts, this one has "
                f"{len(self.records)}: cannot resume the data cursor"
            )
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        self._order = self._epoch_order()
