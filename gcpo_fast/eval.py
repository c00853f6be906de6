"""Accuracy on held-out problems: mean@k and pass@k.

    python -m gcpo_fast.eval                                                   # shipped model, builtin held-out split
    python -m gcpo_fast.eval --model runs/gcpo/checkpoint-300 --levels 3 4 5   # the levels the default run trains on
    python -m gcpo_fast.eval --model runs/gcpo/checkpoint-200 --num_samples 8  # 8 samples per problem
    python -m gcpo_fast.eval --model DIR --dataset test.jsonl --num_problems 500 --output eval.json
    python -m gcpo_fast.eval --model runs/lora/checkpoint-300                  # an adapter (--use_peft) on its base

With k = num_samples completions per problem (greedy decoding when k = 1, else sampling at
--temperature), c of them correct (math-verify against the record's answer):
    mean@k = mean over problems of c / k
    pass@j = mean over problems of 1 - C(k - c, j) / C(k, j)   for j = 1, 2, 4, ..., k
the unbiased estimator of Chen et al. (2021) of the chance that j samples hold a correct one
(pass@1 = mean@k; pass@k = the share of problems with at least one correct sample).
When every record has a `level` (the builtin task's difficulty, or a dataset's own column such as
MATH's), mean@k is also given per level, as eval/level_<level>/mean@k with eval/level_<level>/num_problems.
The trainer logs the same metrics every --eval_steps.

The command line is checked before anything loads (option ranges, --model with gcpo_fast.models'
check_model_folder, the --output folder, the dataset): a usage error is one line on stderr and exit
status 2; a failure while loading or generating is one line and exit status 1.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gcpo_fast.cli import ArgumentParser
from gcpo_fast.lora import adapter_base, is_adapter_folder, load_adapted
from gcpo_fast.models import DEFAULT_MODEL, check_model_folder, load_causal_lm, load_tokenizer
from gcpo_fast.options import at_least, check_options, option
from gcpo_fast.prompt_checks import check_prompts
from gcpo_fast.rewards import math_reward
from gcpo_fast.rollout import HFEngine, RolloutConfig, Sampling, encode_prompts
from gcpo_fast.sources import load_records


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
    """How many of num_samples completions of each record (from the rollout engine, gcpo_fast/rollout.py)
    are correct. The global RNG is left as it was (a training run that evaluates draws the same samples
    as one that does not)."""
    correct = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in batch], max_prompt_length)
            out = engine.generate(prompt_ids, num_samples, sampling)
            rewards = math_reward(out.texts, [r["answer"] for r in batch for _ in range(num_samples)])
            correct += [int(sum(rewards[i * num_samples : (i + 1) * num_samples])) for i in range(len(batch))]
    return correct


def check_args(args) -> str | None:
    """What is wrong with the command line, before anything loads; None if nothing."""
    for name in ("num_problems", "num_samples", "batch_size", "max_prompt_length", "max_completion_length"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(args, name)):
            return f"--{name} must be a finite number, got {getattr(args, name)}"
    if args.num_samples > 1 and args.temperature <= 0:
        return (
            f"--temperature must be > 0 to sample --num_samples {args.num_samples} completions, got "
            f"{args.temperature} (--num_samples 1 decodes greedily)"
        )
    if not 0 < args.top_p <= 1:
        return f"--top_p must be in (0, 1], got {args.top_p}"
    if args.top_k < 0:
        return f"--top_k must be >= 0 (0: off), got {args.top_k}"
    if args.levels is not None and args.dataset != "builtin":
        return "--levels picks levels of --dataset builtin; a file is evaluated as it is"
    if args.output is not None:
        output = Path(args.output)
        if output.is_dir():
            return f"--output {output} is a folder; expected a file name"
        if not output.parent.is_dir():
            return f"--output {output}: folder {output.parent} does not exist"
        if not os.access(output.parent, os.W_OK):
            return f"--output {output}: folder {output.parent} is not writable"
    return None


def main(argv=None) -> None:
    """Usage errors (bad options, --model, --dataset) exit with status 2 and runtime errors with status 1, each
    as one line on stderr, before the model loads where the problem is in the arguments."""
    ap = ArgumentParser(prog="python -m gcpo_fast.eval", description="mean@k and pass@k on held-out problems")
    ap.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="local Hugging Face causal LM folder, or the hub id of one in "
        "the local Hugging Face cache (default: the shipped model)",
    )
    ap.add_argument(
        "--dataset",
        default="builtin",
        help="'builtin' (its held-out split), a .jsonl/.parquet file, or a hub dataset in the local cache "
        "(its test split)",
    )
    ap.add_argument("--dataset_config", default=None, help="a hub dataset's configuration (main for openai/gsm8k)")
    ap.add_argument("--num_problems", type=int, default=500, help="problems to evaluate (the first ones of a file)")
    ap.add_argument(
        "--levels", type=int, nargs="+", default=None, help="builtin only: the difficulty levels to draw (default: all)"
    )
    ap.add_argument("--num_samples", type=int, default=1, help="completions per problem, k (1: greedy)")
    ap.add_argument("--max_prompt_length", type=int, default=RolloutConfig.max_prompt_length)
    ap.add_argument("--max_completion_length", type=int, default=RolloutConfig.max_completion_length)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when k > 1")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=32, help="problems per generate call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt_column", default="prompt")
    ap.add_argument("--answer_column", default=None, help="default: extracted from --golden_column")
    ap.add_argument("--golden_column", default="solution")
    ap.add_argument("--output", default=None, help="also write the metrics to this JSON file (its folder must exist)")
    ap.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run the Python files the model folder maps to (auto_map in config.json): a stranger's code",
    )
    args = ap.parse_args(argv)
    try:
        problem = check_args(args)
        if problem:
            ap.fail(problem)
        adapter = is_adapter_folder(args.model)  # a --use_peft checkpoint: the adapter on its base model
        check_model_folder(
            adapter_base(args.model) if adapter else args.model, trust_remote_code=args.trust_remote_code
        )
        records = load_records(
            args.dataset,
            split="test",
            dataset_config=args.dataset_config,
            num_problems=args.num_problems,
            levels=args.levels,
            prompt_column=args.prompt_column,
            golden_column=args.golden_column,
            answer_column=args.answer_column,
        )[: args.num_problems]
    except ValueError as e:
        ap.fail(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        trust = args.trust_remote_code
        tokenizer = load_tokenizer(adapter_base(args.model) if adapter else args.model, trust_remote_code=trust)
        check_prompts(tokenizer, {args.dataset: records}, args.max_prompt_length)  # before the model loads
        if adapter:
            model = load_adapted(args.model, device=device, dtype="auto", trust_remote_code=trust)[0]
        else:  # the dtype the model was saved in
            model = load_causal_lm(args.model, device=device, dtype="auto", trust_remote_code=trust)
        sampling = Sampling(
            args.max_completion_length, args.temperature, args.top_p, args.top_k, greedy=args.num_samples == 1
        )
        correct = count_correct(
            HFEngine(model, tokenizer),
            tokenizer,
            records,
            sampling,
            num_samples=args.num_samples,
            max_prompt_length=args.max_prompt_length,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ValueError as e:
        ap.fail(str(e), status=1)
    metrics = {
        "num_problems": len(records),
        **summarize(correct, args.num_samples),
        **level_summary(records, correct, args.num_samples),
    }
    print(json.dumps(metrics, indent=2))
    if args.output:
        try:
            Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            ap.fail(f"--output {args.output}: {e.strerror}", status=1)


if __name__ == "__main__":
    main()
