"""Fill a golden-answer cache offline, before training: `python -m gcpo_fast.golden`.

    python -m gcpo_fast.golden --golden_model ~/models/teacher --dataset answers.jsonl --answer_column answer \
        --golden_cache cache.jsonl
    python -m gcpo_fast.train --dataset answers.jsonl --answer_column answer --golden_cache cache.jsonl

Its options are the trainer's, under the same names. Every prompt of the dataset not yet in the cache is asked of
the teacher, as the trainer asks it for an all-wrong prompt (gcpo_fast/golden/teacher.py), so an interrupted fill
continues where it stopped.
"""

import sys
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gcpo_fast.cli import ArgumentParser, add_options, components
from gcpo_fast.data.rewards import RewardConfig, load_reward_function
from gcpo_fast.data.sources import DataConfig, load_records
from gcpo_fast.engines.base import RolloutConfig
from gcpo_fast.engines.factory import make_teacher_engine
from gcpo_fast.engines.vllm_engine import VLLMConfig
from gcpo_fast.golden.options import GoldenConfig
from gcpo_fast.golden.teacher import GoldenCache, Teacher, prompt_key
from gcpo_fast.models.identity import model_identity
from gcpo_fast.models.loading import ModelConfig, check_model_folder, load_tokenizer
from gcpo_fast.run.state import RunConfig


def build_parser() -> ArgumentParser:
    """The trainer's options that filling a cache reads, under the trainer's names."""
    ap = ArgumentParser(prog="python -m gcpo_fast.golden", description="fill a golden-answer cache from a teacher")
    golden = (
        "golden_model",
        "golden_cache",
        "golden_num_candidates",
        "golden_temperature",
        "golden_max_completion_length",
    )
    add_options(ap, GoldenConfig, *golden)
    data = "dataset", "dataset_config", "prompt_column", "answer_column", "golden_column"
    data += ("builtin_num_problems", "builtin_levels")
    add_options(ap, DataConfig, *data)
    add_options(ap, RewardConfig, "reward_funcs", "reward_weights", "correct_reward")
    add_options(ap, RolloutConfig, "max_prompt_length", "max_completion_length")
    add_options(ap, ModelConfig, "bf16", "trust_remote_code")
    add_options(ap, RunConfig, "seed")
    return ap


def main(argv=None) -> None:
    """`python -m gcpo_fast.golden --golden_model TEACHER --dataset FILE --golden_cache cache.jsonl`: fill a
    golden-answer cache offline, for every prompt of the dataset not yet in it (so an interrupted fill continues)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("golden_model", "golden_cache"):
        if not getattr(args, name):
            ap.fail(f"--{name} is required: the teacher's folder, and the cache file it fills (JSONL, appended to)")
    parts = GoldenConfig, DataConfig, RewardConfig, RolloutConfig, ModelConfig, RunConfig
    golden, data, rewards, rollout, model_cfg, run = components(ap, args, *parts)
    trust = model_cfg.trust_remote_code
    try:
        folder = check_model_folder(golden.golden_model, trust_remote_code=trust)
        records = load_records(
            data.dataset,
            split="train",
            dataset_config=data.dataset_config,
            num_problems=data.builtin_num_problems,
            seed=run.seed,
            levels=data.builtin_levels,
            **data.columns,
        )
        funcs = [load_reward_function(spec) for spec in rewards.reward_funcs]
        if not Path(golden.golden_cache).resolve().parent.is_dir():
            raise ValueError(f"--golden_cache {golden.golden_cache}: its folder does not exist")
        cache = GoldenCache(golden.golden_cache, model_identity(folder))
    except (ValueError, OSError) as e:
        ap.fail(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = golden.golden_max_completion_length or rollout.max_completion_length
    try:
        tokenizer = load_tokenizer(folder, trust_remote_code=trust)
        engine = make_teacher_engine(
            VLLMConfig(), folder, tokenizer, device=device, bf16=model_cfg.bf16, seed=run.seed,
            max_model_len=rollout.max_prompt_length + budget, trust_remote_code=trust,
        )  # fmt: skip
    except ValueError as e:
        ap.fail(str(e), status=1)
    teacher = Teacher.of(golden, cache, funcs, engine, tokenizer, rewards, budget, rollout.max_prompt_length, run.seed)
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
        f"{golden.golden_cache}: {totals['answered']} new golden answers for {len(todo)} prompts "
        f"({len(records) - len(todo)} already cached or repeated); no correct candidate: "
        f"{totals['gcpo/teacher_no_correct']}, teacher errors: {totals['gcpo/teacher_errors']}",
        file=sys.stdout,
    )
