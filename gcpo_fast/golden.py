"""Golden answers from a teacher: k candidates for an all-wrong prompt, verified by the rewards, cached.

    python -m gcpo_fast.train --dataset answers.jsonl --answer_column answer --golden_model ~/models/teacher
    python -m gcpo_fast.golden --model ~/models/teacher --dataset answers.jsonl --answer_column answer --out cache.jsonl
    python -m gcpo_fast.train --dataset answers.jsonl --answer_column answer --golden_cache cache.jsonl  # no teacher

    from gcpo_fast.golden import GoldenCache, Teacher, golden_texts, teacher_identity
    cache = GoldenCache(run_dir / "golden_cache.jsonl", teacher_identity(folder), prefilled=["cache.jsonl"])
    teacher = Teacher(cache, reward_funcs, engine=HFEngine(model, tok), tokenizer=tok, num_candidates=4,
                      sampling=Sampling(256, temperature=0.7), max_prompt_length=256, correct_reward=1.0)
    texts, metrics = teacher.answers(records)     # one golden text (or None) per record

A teacher answers only prompts whose G rollouts are all wrong (rounds.build_rows asks, through
golden_texts, with --golden_source teacher, or dataset_then_teacher for the records the dataset gives no
golden answer). For each it samples k candidates (--golden_num_candidates, --golden_temperature, its own
budget --golden_max_completion_length) from the prompt encoded with the TEACHER's tokenizer and chat
template; each is scored by the run's reward functions with the prompt's record, exactly as a rollout; the
first that reaches correct_reward and ended with an EOS becomes the golden answer. None correct: no golden
answer this time (gcpo/teacher_no_correct; the prompt is asked again when it is all wrong again). A teacher
that raises on a prompt (its template refuses the messages, generation fails) costs that prompt its golden
answer (gcpo/teacher_errors, warned), not the run. The answer is kept as text: build_rows re-encodes it with
the POLICY's tokenizer (rollout.encode_completion) after the policy's prompt ids, and drops one that does not
fit max_completion_length (gcpo/golden_truncated). The teacher samples under its own RNG, seeded from the
run's seed and the prompt, so whether it runs (or the cache answers) never shifts the policy's sampling.

The cache: one JSONL file, `output_dir/golden_cache.jsonl`, a line per golden answer found:
{"prompt_key", "teacher", "golden", "prompt"}. prompt_key is the SHA-256 of the prompt (text or messages,
as JSON); teacher is teacher_identity(folder): a hash of the folder's config, generation config, tokenizer
files and weight files (name, size, first and last MiB), so a copied folder keeps its identity and
retrained weights get a new one. It is read at the start (and the --golden_cache files with it), appended to
as answers are found (never rewritten; a partial last line from a crash is skipped), so a prompt's answer is
generated at most once per run and across resumes. Only prompts with an answer are cached. A cached answer is
scored again by the reward functions before use (a changed reward never trains a wrong answer). Without
--golden_model, the cache files are the teacher: an answer of any teacher is used. Under torchrun each rank
asks for its own prompts; the new answers are gathered to every rank and rank 0 alone writes the file.
"""

import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from gcpo_fast import groups, parallel
from gcpo_fast.errors import require
from gcpo_fast.options import at_least, check_options, option
from gcpo_fast.rewards import as_completions, compute_rewards
from gcpo_fast.rollout import Sampling, encode_prompts
from gcpo_fast.timing import PhaseTimer

CACHE_NAME = "golden_cache.jsonl"
IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MIB = 1 << 20
GOLDEN_SOURCES = ("dataset", "teacher", "dataset_then_teacher")


@dataclass
class GoldenConfig:
    """Where GCPO's golden answers come from: the dataset, or a teacher model and its cache."""

    _argument_group_name = "golden answers"

    golden_source: str | None = option(
        None,
        "GCPO: where golden answers come from: the dataset's golden column, a teacher (--golden_model, "
        "--golden_cache), or the dataset and, for records without one, the teacher (default: dataset_then_teacher "
        "when a teacher or cache is given, else dataset)",
        choices=GOLDEN_SOURCES,
    )
    golden_model: str | None = option(
        None,
        "GCPO: a teacher, a local Hugging Face causal LM folder, that writes golden answers for all-wrong prompts "
        "(verified by the reward functions, cached in output_dir/golden_cache.jsonl)",
    )
    golden_cache: str | None = option(
        None,
        "GCPO: a golden-answer cache filled offline (python -m gcpo_fast.golden), read at the start; without "
        "--golden_model it is the only teacher",
    )
    golden_num_candidates: int = option(
        4,
        "GCPO teacher: candidates per all-wrong prompt; the first the reward functions call correct becomes its "
        "golden answer",
    )
    golden_temperature: float = option(0.7, "GCPO teacher: sampling temperature of its candidates")
    golden_max_completion_length: int | None = option(
        None, "GCPO teacher: token budget per candidate, in the teacher's tokens (default: max_completion_length)"
    )

    def __post_init__(self):
        check_options(self)
        teacher = [f"--{name}" for name in ("golden_model", "golden_cache") if getattr(self, name)]
        if self.golden_source is None:
            self.golden_source = "dataset_then_teacher" if teacher else "dataset"
        require(
            self.golden_source == "dataset" or bool(teacher),
            f"golden_source {self.golden_source} needs a teacher: --golden_model FOLDER or --golden_cache FILE",
        )
        require(
            not teacher or self.golden_source != "dataset",
            f"{' and '.join(teacher)} would never be asked with golden_source dataset: use golden_source "
            "teacher or dataset_then_teacher",
        )
        at_least(self, 1, "golden_num_candidates", "golden_max_completion_length")
        require(self.golden_temperature > 0, f"golden_temperature must be > 0, got {self.golden_temperature}")

    @property
    def uses_teacher(self) -> bool:
        return self.golden_source != "dataset"


def prompt_key(prompt) -> str:
    """SHA-256 of a prompt (text or chat messages)."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def teacher_identity(folder) -> str:
    """A 16-hex-digit hash of what makes a teacher: its config, tokenizer and weights. Weight files count by
    name, size and their first and last MiB, so that a 100 GB teacher is identified in milliseconds."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.name in IDENTITY_FILES:
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix in WEIGHT_SUFFIXES:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(MIB)
                f.seek(max(size - MIB, 0))
                digest.update(path.name.encode() + str(size).encode() + head + f.read(MIB))
    return digest.hexdigest()[:16]


class GoldenCache:
    """Golden answers by prompt and teacher, read from JSONL files, new ones appended to `path` (rank 0)."""

    def __init__(self, path, teacher: str | None, prefilled=()):
        self.path, self.teacher = (Path(path) if path is not None else None), teacher
        self.entries: dict[str, dict[str, str]] = {}  # prompt_key -> {teacher: golden text}
        self._newline = False  # the file ends in a partial line: the next append starts a new one
        for file in [*map(Path, prefilled), *([self.path] if self.path is not None else [])]:
            if file.exists():
                self._read(file)
            elif file != self.path:
                raise ValueError(f"--golden_cache {file}: no such file")

    def _read(self, file: Path) -> None:
        text = file.read_text(encoding="utf-8")
        lines = text.split("\n")
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.entries.setdefault(entry["prompt_key"], {})[entry["teacher"]] = entry["golden"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if n == len(lines):  # the last line, no newline after it: a write cut short, which loses one answer
                    self._newline = file == self.path
                    continue
                raise ValueError(f"golden cache {file}, line {n}: not a cache entry ({e})") from None

    def get(self, prompt) -> str | None:
        answers = self.entries.get(prompt_key(prompt), {})
        if self.teacher is None:
            return next(iter(answers.values()), None)
        return answers.get(self.teacher)

    def add(self, entries: list[dict]) -> None:
        """Remember entries ({"prompt_key", "teacher", "golden", "prompt"}); rank 0 appends them to the file."""
        for e in entries:
            self.entries.setdefault(e["prompt_key"], {})[e["teacher"]] = e["golden"]
        if entries and self.path is not None and parallel.rank_and_world()[0] == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n" * self._newline + "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
            self._newline = False


class Teacher:
    """Golden answers from the cache, else from k candidates of a teacher engine (engine None: the cache only)."""

    def __init__(
        self,
        cache: GoldenCache,
        reward_funcs,
        *,
        engine=None,
        tokenizer=None,
        num_candidates: int = 4,
        sampling: Sampling | None = None,
        max_prompt_length: int = 256,
        correct_reward: float = 1.0,
        reward_weights=None,
        seed: int = 0,
    ):
        self.cache, self.reward_funcs, self.engine, self.tokenizer = cache, reward_funcs, engine, tokenizer
        self.num_candidates, self.sampling, self.max_prompt_length = num_candidates, sampling, max_prompt_length
        self.correct_reward, self.reward_weights, self.seed = correct_reward, reward_weights, seed

    def correct(self, records: list[dict], texts: list[str], completion_ids=None) -> list[bool]:
        """Whether the run's reward functions call each text correct for its record (completion_ids, when given:
        the teacher's token ids, as a rollout's reward gets the policy's)."""
        if not texts:
            return []
        ids = {} if completion_ids is None else {"completion_ids": completion_ids}
        rewards, _ = compute_rewards(
            self.reward_funcs,
            [r["prompt"] for r in records],
            as_completions(records, texts),
            records,
            self.reward_weights,
            **ids,
        )
        return (rewards >= self.correct_reward).tolist()

    def candidates(self, prompt):
        """k candidates of one prompt (rollout.Rollouts), sampled under an RNG of their own."""
        ids = encode_prompts(self.tokenizer, [prompt], self.max_prompt_length)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + int(prompt_key(prompt)[:12], 16))
            return self.engine.generate(ids, self.num_candidates, self.sampling)

    def generate(self, record: dict) -> str | None:
        """The first correct candidate that ended with an EOS, or None. Raises what the teacher raises."""
        out = self.candidates(record["prompt"])
        ok = self.correct([record] * len(out.texts), out.texts, completion_ids=out.completion_ids)
        return next((t for t, good, cut in zip(out.texts, ok, out.truncated) if good and not cut), None)

    def answers(self, records: list[dict]) -> tuple[list[str | None], dict[str, float]]:
        """A golden text (or None) per record, and gcpo/golden_cache_hits, teacher_no_correct, teacher_errors.
        Under torchrun every rank must call it once per round (the new answers are gathered)."""
        cached = [self.cache.get(r["prompt"]) for r in records]
        hit = [p for p, t in enumerate(cached) if t is not None]
        still_correct = self.correct([records[p] for p in hit], [cached[p] for p in hit])
        texts = [None] * len(records)
        for p, ok in zip(hit, still_correct):
            texts[p] = cached[p] if ok else None
        metrics = {"gcpo/golden_cache_hits": sum(still_correct), "gcpo/teacher_no_correct": 0, "gcpo/teacher_errors": 0}
        new = []
        for p, record in enumerate(records):
            if texts[p] is not None or self.engine is None:
                continue
            try:
                texts[p] = self.generate(record)
            except Exception as e:  # noqa: BLE001 -- any failure of the teacher on one prompt costs that prompt only
                metrics["gcpo/teacher_errors"] += 1
                warnings.warn(
                    f"the golden-answer teacher failed on a prompt, which gets no golden answer this time "
                    f"(gcpo/teacher_errors counts them): {type(e).__name__}: {e}",
                    stacklevel=2,
                )
                continue
            if texts[p] is None:
                metrics["gcpo/teacher_no_correct"] += 1
            else:
                new.append(
                    {
                        "prompt_key": prompt_key(record["prompt"]),
                        "teacher": self.cache.teacher,
                        "golden": texts[p],
                        "prompt": record["prompt"],
                    }
                )
        self.cache.add([e for part in parallel.all_gather_objects(new) for e in part])
        return texts, metrics


def golden_texts(
    source: str,
    records: list[dict],
    rewards: torch.Tensor,
    correct_reward: float,
    teacher: Teacher | None,
    metrics: dict,
    timer: PhaseTimer | None = None,
) -> tuple[list[str | None], set[int]]:
    """The golden text of each kept prompt by --golden_source (None: none), and the prompts whose text is the
    teacher's. rewards: [P, G]; the teacher is asked only for all-wrong prompts. Adds the teacher's metrics."""
    texts = [None if source == "teacher" else r["golden"] for r in records]
    if teacher is None:
        return texts, set()
    all_wrong = groups.all_wrong_groups(rewards, correct_reward).tolist()
    asked = [p for p, t in enumerate(texts) if t is None and all_wrong[p]]
    with (timer or PhaseTimer())("teacher"):  # entered on every rank every round: the same timing keys everywhere
        found, teacher_metrics = teacher.answers([records[p] for p in asked])
    metrics.update(teacher_metrics)
    for p, text in zip(asked, found):
        texts[p] = text
    return texts, {p for p, text in zip(asked, found) if text is not None}


def main(argv=None) -> None:
    """`python -m gcpo_fast.golden --model TEACHER --dataset FILE --out cache.jsonl`: fill a golden-answer cache
    offline, for every prompt of the dataset not yet in --out (so an interrupted fill continues)."""
    from tqdm.auto import tqdm

    from gcpo_fast.cli import ArgumentParser
    from gcpo_fast.errors import ConfigError
    from gcpo_fast.models import check_model_folder, load_causal_lm, load_tokenizer
    from gcpo_fast.rewards import RewardConfig, load_reward_function
    from gcpo_fast.rollout import HFEngine, RolloutConfig
    from gcpo_fast.run import RunConfig
    from gcpo_fast.sources import DataConfig, load_records

    ap = ArgumentParser(prog="python -m gcpo_fast.golden", description=main.__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the teacher: a local Hugging Face causal LM folder")
    ap.add_argument(
        "--dataset",
        required=True,
        help="'builtin' (its training split), a .jsonl/.parquet file or folder, or a hub dataset in the local cache "
        "(its train split)",
    )
    ap.add_argument("--dataset_config", default=None, help="a hub dataset's configuration (main for openai/gsm8k)")
    ap.add_argument(
        "--out", required=True, help="the cache file (JSONL; appended to); pass it to the trainer as --golden_cache"
    )
    ap.add_argument("--num_candidates", type=int, default=GoldenConfig.golden_num_candidates)
    ap.add_argument("--temperature", type=float, default=GoldenConfig.golden_temperature)
    ap.add_argument(
        "--max_completion_length",
        type=int,
        default=RolloutConfig.max_completion_length,
        help="the teacher's token budget per candidate",
    )
    ap.add_argument("--max_prompt_length", type=int, default=RolloutConfig.max_prompt_length)
    ap.add_argument(
        "--reward_funcs",
        nargs="+",
        default=RewardConfig().reward_funcs,
        help="the training run's reward functions (built-in names or 'package.module:function')",
    )
    ap.add_argument("--reward_weights", type=float, nargs="+", default=None)
    ap.add_argument("--correct_reward", type=float, default=RewardConfig.correct_reward)
    ap.add_argument("--prompt_column", default="prompt")
    ap.add_argument("--answer_column", default=None)
    ap.add_argument("--golden_column", default="solution")
    ap.add_argument("--builtin_num_problems", type=int, default=DataConfig.builtin_num_problems)
    ap.add_argument("--builtin_levels", type=int, nargs="+", default=DataConfig().builtin_levels)
    ap.add_argument(
        "--seed", type=int, default=RunConfig.seed, help="the training run's seed (sampling and builtin data)"
    )
    ap.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run the Python files the model folder maps to (auto_map in config.json): a stranger's code",
    )
    args = ap.parse_args(argv)
    for name in ("num_candidates", "max_completion_length", "max_prompt_length"):
        if getattr(args, name) < 1:
            ap.fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        ap.fail(f"--temperature must be > 0, got {args.temperature}")
    try:  # the trainer's own checks of the reward options
        RewardConfig(args.reward_funcs, args.reward_weights, args.correct_reward)
    except ConfigError as e:
        ap.fail(str(e))
    try:
        folder = check_model_folder(args.model, trust_remote_code=args.trust_remote_code)
        records = load_records(
            args.dataset,
            split="train",
            dataset_config=args.dataset_config,
            num_problems=args.builtin_num_problems,
            seed=args.seed,
            levels=args.builtin_levels,
            prompt_column=args.prompt_column,
            golden_column=args.golden_column,
            answer_column=args.answer_column,
        )
        funcs = [load_reward_function(spec) for spec in args.reward_funcs]
        if not Path(args.out).resolve().parent.is_dir():
            raise ValueError(f"--out {args.out}: its folder does not exist")
        cache = GoldenCache(args.out, teacher_identity(folder))
    except (ValueError, OSError) as e:
        ap.fail(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = load_tokenizer(folder, trust_remote_code=args.trust_remote_code)
        model = (
            load_causal_lm(folder, device=device, dtype="auto", trust_remote_code=args.trust_remote_code)
            .eval()
            .requires_grad_(False)
        )
    except ValueError as e:
        ap.fail(str(e), status=1)
    teacher = Teacher(
        cache,
        funcs,
        engine=HFEngine(model, tokenizer),
        tokenizer=tokenizer,
        num_candidates=args.num_candidates,
        sampling=Sampling(args.max_completion_length, args.temperature),
        max_prompt_length=args.max_prompt_length,
        correct_reward=args.correct_reward,
        reward_weights=args.reward_weights,
        seed=args.seed,
    )
    todo = list({prompt_key(r["prompt"]): r for r in records if cache.get(r["prompt"]) is None}.values())
    totals = {"answered": 0, "gcpo/teacher_no_correct": 0, "gcpo/teacher_errors": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # errors are counted below, not printed once per prompt over the bar
        for record in tqdm(todo, desc="golden answers", dynamic_ncols=True):
            texts, metrics = teacher.answers([record])
            totals["answered"] += texts[0] is not None
            for name in ("gcpo/teacher_no_correct", "gcpo/teacher_errors"):
                totals[name] += metrics[name]
    print(
        f"{args.out}: {totals['answered']} new golden answers for {len(todo)} prompts ({len(records) - len(todo)} "
        f"already cached or repeated); no correct candidate: {totals['gcpo/teacher_no_correct']}, teacher errors: "
        f"{totals['gcpo/teacher_errors']}",
        file=sys.stdout,
    )


if __name__ == "__main__":
    main()
