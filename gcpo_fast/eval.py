"""Accuracy on held-out problems: mean@k and pass@k.

    python -m gcpo_fast.eval                                         # the shipped model, held-out levels 3-5
    python -m gcpo_fast.eval --model runs/gcpo/checkpoint-300 --builtin_levels 1 2 6 7 8     # levels it never trained
    python -m gcpo_fast.eval --model runs/gcpo/checkpoint-200 --eval_num_samples 8          # 8 samples per problem
    python -m gcpo_fast.eval --model DIR --eval_dataset test.jsonl --eval_num_problems 500 --output eval.json
    python -m gcpo_fast.eval --model runs/lora/checkpoint-300        # an adapter (--use_peft) on its base

Its options are the trainer's, under the same names (`python -m gcpo_fast.train --help` groups them), plus
--batch_size and --output. With k = eval_num_samples completions per problem (greedy decoding when k = 1, else
sampling at --temperature), c of them correct (math-verify against the record's answer):
    mean@k = mean over problems of c / k
    pass@j = mean over problems of 1 - C(k - c, j) / C(k, j)   for j = 1, 2, 4, ..., k
the unbiased estimator of Chen et al. (2021) of the chance that j samples hold a correct one
(pass@1 = mean@k; pass@k = the share of problems with at least one correct sample).
When every record has a `level` (the builtin task's difficulty, or a dataset's own column such as
MATH's), mean@k is also given per level, as eval/level_<level>/mean@k with eval/level_<level>/num_problems.
The trainer logs the same metrics every --eval_steps.

The command line is checked before anything loads (each option by its component's own checks, --model by
check_model_folder, the --output folder, the dataset): a usage error is one line on stderr and exit
status 2; a failure while loading or generating is one line and exit status 1.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gcpo_fast.cli import ArgumentParser, add_options, components
from gcpo_fast.data.prompt_checks import check_prompts
from gcpo_fast.data.prompts import encode_prompts
from gcpo_fast.data.rewards import math_reward
from gcpo_fast.data.sources import DataConfig, load_records
from gcpo_fast.engines.base import RolloutConfig, Sampling
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.models.loading import ModelConfig, check_model_folder, load_causal_lm, load_tokenizer
from gcpo_fast.models.lora import adapter_base, is_adapter_folder, load_adapted
from gcpo_fast.options import at_least, check_options, option
from gcpo_fast.run.state import RunConfig


@dataclass
class EvalConfig:
    """The held-out evaluation the trainer runs every eval_steps."""

    _argument_group_name = "evaluation"

    eval_dataset: str | None = option(
        None,
        "held-out problems for evaluation; default: the builtin held-out split (of --builtin_levels) when --dataset "
        "builtin, else no evaluation",
    )
    eval_steps: int = option(
        50, "evaluate on the held-out problems every this many steps, at the start and at the end (0: never)"
    )
    eval_num_problems: int = option(500, "held-out problems per evaluation")
    eval_num_samples: int = option(1, "completions per held-out problem: mean@k and pass@k (1: greedy)")

    def __post_init__(self):
        check_options(self)
        at_least(self, 0, "eval_steps")
        at_least(self, 1, "eval_num_problems", "eval_num_samples")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct: list[int], num_samples: int) -> dict[str, float]:
    """eval/mean@k and eval/pass@j (j = 1, 2, 4, ..., k) from per-problem correct counts."""
    ks = sorted({2**i for i in range(num_samples.bit_length()) if 2**i <= num_samples} | {num_samples})
    out = {f"eval/mean@{num_samples}": sum(correct) / (num_samples * len(correct))}
    for k in ks:
        out[f"eval/pass@{k}"] = sum(pass_at_k(num_samples, c, k) for c in correct) / len(correct)
    return out


def level_summary(records: list[dict], correct: list[int], num_samples: int) -> dict[str, float]:
    """eval/level_<level>/mean@k and .../num_problems per value of the records' `level`; {} unless all have one."""
    if not records or any(r.get("level") is None for r in records):
        return {}
    by_level: dict[str, list[int]] = {}
    for record, c in zip(records, correct, strict=True):
        by_level.setdefault(str(record["level"]).replace(" ", "_"), []).append(c)
    out = {}
    for level in sorted(by_level, key=lambda v: (len(v), v)):  # 2 before 10
        counts = by_level[level]
        out[f"eval/level_{level}/mean@{num_samples}"] = sum(counts) / (num_samples * len(counts))
        out[f"eval/level_{level}/num_problems"] = len(counts)
    return out


def count_correct(
    engine,
    tokenizer,
    records: list[dict],
    sampling: Sampling,
    *,
    num_samples: int = 1,
    max_prompt_length: int = 256,
    batch_size: int = 32,
    seed: int = 0,
) -> list[int]:
    """How many of num_samples completions of each record (from the rollout engine, gcpo_fast/engines/base.py)
    are correct. The global RNG is left as it was (a training run that evaluates draws the same samples
    as one that does not)."""
    correct = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            tools = getattr(engine, "tool_schemas", None)  # a ToolEngine's user tools (gcpo_fast/tools/loop.py)
            prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in batch], max_prompt_length, tools)
            out = engine.generate(prompt_ids, num_samples, sampling)
            rewards = math_reward(out.texts, [r["answer"] for r in batch for _ in range(num_samples)])
            correct += [int(sum(rewards[i * num_samples : (i + 1) * num_samples])) for i in range(len(batch))]
    return correct


def check_output(output: str | None) -> str | None:
    """What is wrong with --output, before anything loads; None if nothing."""
    if output is None:
        return None
    path = Path(output)
    if path.is_dir():
        return f"--output {path} is a folder; expected a file name"
    if not path.parent.is_dir():
        return f"--output {path}: folder {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK):
        return f"--output {path}: folder {path.parent} is not writable"
    return None


def build_parser() -> ArgumentParser:
    """The trainer's options that an evaluation reads, under the trainer's names, and the command's own two."""
    ap = ArgumentParser(prog="python -m gcpo_fast.eval", description="mean@k and pass@k on held-out problems")
    add_options(ap, ModelConfig, "model", "trust_remote_code")
    add_options(ap, EvalConfig, "eval_dataset", "eval_num_problems", "eval_num_samples")
    add_options(ap, DataConfig, "dataset_config", "builtin_levels", "prompt_column", "answer_column", "golden_column")
    add_options(ap, RolloutConfig, "max_prompt_length", "max_completion_length", "temperature", "top_p", "top_k")
    add_options(ap, RunConfig, "seed")
    ap.add_argument("--batch_size", type=int, default=32, help="problems per generate call")
    ap.add_argument("--output", default=None, help="also write the metrics to this JSON file (its folder must exist)")
    return ap


def main(argv=None) -> None:
    """Usage errors (bad options, --model, --eval_dataset) exit with status 2 and runtime errors with status 1,
    each as one line on stderr, before the model loads where the problem is in the arguments."""
    ap = build_parser()
    args = ap.parse_args(argv)
    parts = ModelConfig, EvalConfig, DataConfig, RolloutConfig, RunConfig
    model_cfg, evaluation, data, rollout, run = components(ap, args, *parts)
    dataset = evaluation.eval_dataset or "builtin"
    try:
        if args.batch_size < 1:
            ap.fail(f"--batch_size must be >= 1, got {args.batch_size}")
        problem = check_output(args.output)
        if problem:
            ap.fail(problem)
        trust = model_cfg.trust_remote_code
        adapter = is_adapter_folder(model_cfg.model)  # a --use_peft checkpoint: the adapter on its base model
        base = adapter_base(model_cfg.model) if adapter else model_cfg.model
        check_model_folder(base, trust_remote_code=trust)
        n, levels = evaluation.eval_num_problems, sorted(set(data.builtin_levels))
        config = data.dataset_config
        records = load_records(
            dataset, split="test", dataset_config=config, num_problems=n, levels=levels, **data.columns
        )
        records = records[:n]
    except ValueError as e:
        ap.fail(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_samples = evaluation.eval_num_samples
    try:
        tokenizer = load_tokenizer(base, trust_remote_code=trust)
        check_prompts(tokenizer, {dataset: records}, rollout.max_prompt_length)  # before the model loads
        if adapter:
            model = load_adapted(model_cfg.model, device=device, dtype="auto", trust_remote_code=trust)[0]
        else:  # the dtype the model was saved in
            model = load_causal_lm(model_cfg.model, device=device, dtype="auto", trust_remote_code=trust)
        sampling = Sampling(
            rollout.max_completion_length, rollout.temperature, rollout.top_p, rollout.top_k, greedy=num_samples == 1
        )
        correct = count_correct(
            HFEngine(model, tokenizer),
            tokenizer,
            records,
            sampling,
            num_samples=num_samples,
            max_prompt_length=rollout.max_prompt_length,
            batch_size=args.batch_size,
            seed=run.seed,
        )
    except ValueError as e:
        ap.fail(str(e), status=1)
    metrics = {
        "num_problems": len(records),
        **summarize(correct, num_samples),
        **level_summary(records, correct, num_samples),
    }
    print(json.dumps(metrics, indent=2))
    if args.output:
        try:
            Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            ap.fail(f"--output {args.output}: {e.strerror}", status=1)


if __name__ == "__main__":
    main()
