"""Golden answers from a teacher: k candidates for an all-wrong prompt, verified by the rewards, cached.

    python -m gcpo_fast.train --dataset answers.jsonl --answer_column answer --golden_model ~/models/teacher
    python -m gcpo_fast.golden --golden_model ~/models/teacher --dataset answers.jsonl --answer_column answer \
        --golden_cache cache.jsonl                                                                   # offline
    python -m gcpo_fast.train --dataset answers.jsonl --answer_column answer --golden_cache cache.jsonl  # no teacher

    from gcpo_fast.golden.teacher import GoldenCache, Teacher, model_identity
    cache = GoldenCache(run_dir / "golden_cache.jsonl", model_identity(folder), prefilled=["cache.jsonl"])
    teacher = Teacher(cache, reward_funcs, engine=HFEngine(model, tok), tokenizer=tok, num_candidates=4,
                      sampling=Sampling(256, temperature=0.7), max_prompt_length=256, correct_reward=1.0)
    texts, metrics = teacher.answers(records)     # one golden text (or None) per record

A teacher answers only prompts whose G rollouts are all wrong (gcpo_fast/golden/sources.py asks it, with
--golden_source teacher, or dataset_then_teacher for the records the dataset gives no golden answer). For each it
samples k candidates (--golden_num_candidates, --golden_temperature, its own budget --golden_max_completion_length)
from the prompt encoded with the TEACHER's tokenizer and chat template; each is rewarded by the run's reward functions
with the prompt's record, exactly as a rollout; the first that reaches correct_reward and ended with an EOS becomes
the golden answer. None correct: no golden answer this time (gcpo/teacher_no_correct; the prompt is asked again when
it is all wrong again). A teacher that raises on a prompt (its template refuses the messages, generation fails)
costs that prompt its golden answer (gcpo/teacher_errors, warned), not the run. The answer is kept as text:
gcpo_fast/golden/rows.py encodes it with the POLICY's tokenizer after the policy's prompt ids, and drops one that
does not fit max_completion_length (gcpo/golden_truncated). The teacher samples under its own RNG, seeded from the
run's seed and the prompt, so whether it runs (or the cache answers) never shifts the policy's sampling.

The cache: one JSONL file, `output_dir/golden_cache.jsonl`, a line per golden answer found:
{"prompt_key", "teacher", "golden", "prompt"}. prompt_key is the SHA-256 of the prompt (text or messages,
as JSON); teacher is model_identity(folder): a hash of the folder's config, generation config, tokenizer
files and weight files (name, size, first and last MiB), so a copied folder keeps its identity and
retrained weights get a new one. It is read at the start (and the --golden_cache files with it), appended to
as answers are found (never rewritten; a partial last line from a crash is skipped), so a prompt's answer is
generated at most once per run and across resumes. Only prompts with an answer are cached. A cached answer is
rewarded again by the reward functions before use (a changed reward never trains a wrong answer). Without
--golden_model, the cache files are the teacher: an answer of any teacher is used. Under torchrun each rank
asks for its own prompts; the new answers are gathered to every rank and rank 0 alone writes the file.
"""

import hashlib
import json
import warnings
from pathlib import Path

import torch

from gcpo_fast.data.prompts import encode_prompts
from gcpo_fast.data.rewards import as_completions, compute_rewards
from gcpo_fast.distributed import parallel
from gcpo_fast.engines.base import Sampling

CACHE_NAME = "golden_cache.jsonl"


def prompt_key(prompt) -> str:
    """SHA-256 of a prompt (text or chat messages)."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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

    @classmethod
    def of(cls, golden, cache, reward_funcs, engine, tokenizer, rewards, budget, max_prompt_length, seed) -> "Teacher":
        """The teacher a run's options describe (golden: GoldenConfig, rewards: RewardConfig; budget: its tokens
        per candidate)."""
        return cls(
            cache,
            reward_funcs,
            engine=engine,
            tokenizer=tokenizer,
            num_candidates=golden.golden_num_candidates,
            sampling=Sampling(budget, golden.golden_temperature),
            max_prompt_length=max_prompt_length,
            correct_reward=rewards.correct_reward,
            reward_weights=rewards.reward_weights,
            seed=seed,
        )

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
