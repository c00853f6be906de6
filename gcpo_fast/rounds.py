"""A generation round: sample and score groups, add golden rows and advantages, cut into packed micro-batches.

    from gcpo_fast.rounds import sample_groups, build_rows, pack_micro_batches, score_micro_batches

    groups, metrics = sample_groups(ctx, sampler)                  # records, Rows, rewards [P, G], kept prompts
    rows, samples = build_rows(ctx, groups, metrics, teacher)       # golden rows + advantages; samples.jsonl
    micro_batches = pack_micro_batches(rows, batch, mask_truncated)   # shuffled, each packed once
    score_micro_batches(micro_batches, model, ref_model, scoring, timer, metrics)   # old/ref log-probs, weights
    steps = batch.optimizer_steps(micro_batches)                    # [optimizer step][micro-batch]

The data flow of a whole step is told once, in docs/design.md ("The trainer: data flow of one step").
"""

import itertools
import warnings
from dataclasses import dataclass

import torch

from gcpo_fast import groups
from gcpo_fast.errors import require
from gcpo_fast.golden import Teacher, golden_texts
from gcpo_fast.methods import MethodConfig
from gcpo_fast.options import at_least, check_options, option
from gcpo_fast.packing import PackedBatch, pack
from gcpo_fast.parallel import all_reduce
from gcpo_fast.prompt_checks import warn_if_mostly_truncated
from gcpo_fast.rewards import (
    RewardConfig,
    as_completions,
    compute_rewards,
    overlong_penalty,
    reward_function_name,
    take_checker_timeouts,
)
from gcpo_fast.rollout import RolloutConfig, Rows, encode_completion, encode_prompts
from gcpo_fast.scoring import SamplingCorrection, score_logprobs
from gcpo_fast.timing import PhaseTimer


@dataclass
class BatchConfig:
    """How many completions a micro-batch, an optimizer step and a generation round hold (TRL's names: batch sizes
    count completions; golden rows come on top)."""

    _argument_group_name = "batch"

    per_device_train_batch_size: int = option(
        64, "completions per device per micro-batch, as in TRL (golden rows come on top)"
    )
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    steps_per_generation: int | None = option(
        None,
        "micro-batches per generation round (default: gradient_accumulation_steps; more means several optimizer "
        "steps per round)",
    )
    num_iterations: int = option(1, "optimizer passes over each generation round (TRL's mu)")

    def __post_init__(self):
        check_options(self)
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        at_least(self, 1, "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation")
        at_least(self, 1, "num_iterations")
        require(
            self.steps_per_generation % self.gradient_accumulation_steps == 0,
            f"steps_per_generation={self.steps_per_generation} must be a multiple of gradient_accumulation_steps="
            f"{self.gradient_accumulation_steps} (a generation round holds whole optimizer steps)",
        )

    @property
    def completions_per_round(self) -> int:
        return self.per_device_train_batch_size * self.steps_per_generation

    @property
    def reused(self) -> bool:
        """Whether a round trains more than one optimizer step (then it needs its old log-probs)."""
        return self.steps_per_generation > self.gradient_accumulation_steps or self.num_iterations > 1

    def optimizer_steps(self, micro_batches: list) -> list[list]:
        """The round's micro-batches, gradient_accumulation_steps per optimizer step, num_iterations times."""
        gas = self.gradient_accumulation_steps
        return [micro_batches[i : i + gas] for i in range(0, len(micro_batches), gas)] * self.num_iterations


@dataclass
class RoundContext:
    """What a generation round reads: its options, the engine and tokenizer, and the reward functions."""

    rollout: RolloutConfig
    method: MethodConfig
    rewards: RewardConfig
    prompts_per_round: int
    engine: object
    tokenizer: object
    reward_funcs: list
    timer: PhaseTimer
    num_samples_to_log: int = 4
    group: object = None  # the process group of the sampling rule's all-reduce (None: the default group)

    @classmethod
    def of(cls, cfg, engine, tokenizer, reward_funcs: list, timer: PhaseTimer | None = None) -> "RoundContext":
        """The context of a run's rounds from its gcpo_fast.config.TrainConfig."""
        return cls(
            cfg.rollout, cfg.method, cfg.rewards, cfg.prompts_per_round, engine, tokenizer, reward_funcs,
            timer or PhaseTimer(), cfg.log.num_samples_to_log,
        )  # fmt: skip


@dataclass
class SampledGroups:
    """The groups a round sampled: P prompts' records, their G rollouts each (rows prompt-major), rewards [P, G],
    and the prompts kept for training (DAPO drops groups without a signal)."""

    records: list[dict]
    rows: Rows
    rewards: torch.Tensor
    keep: list[int]  # ascending

    def kept(self) -> tuple[list[dict], Rows, torch.Tensor]:
        G = self.rewards.shape[1]
        rows = self.rows.select([p * G + r for p in self.keep for r in range(G)])
        return [self.records[p] for p in self.keep], rows, self.rewards[self.keep]


def sample_groups(ctx: RoundContext, sampler) -> tuple[SampledGroups, dict]:
    """Generate and score groups until the round is full; returns (the groups, rollout metrics).
    The method's sampling rule (DAPO's dynamic sampling, GPG's threshold) may sample more prompt batches;
    every rank draws as many batches as the others."""
    G, P = ctx.rollout.num_generations, ctx.prompts_per_round
    rule = ctx.method.sampling_rule(P)
    records, rows, rewards_seen, per_func_seen = [], None, [], []
    for num_batches in itertools.count(1):
        batch = next(sampler)
        with ctx.timer("generate"):
            prompt_ids = encode_prompts(ctx.tokenizer, [r["prompt"] for r in batch], ctx.rollout.max_prompt_length)
            out = ctx.engine.generate(prompt_ids, G, ctx.rollout.sampling)
        with ctx.timer("reward"):
            rewards, per_func = score_rollouts(ctx, batch, out)
        records += batch
        rows = out if rows is None else rows + out
        rewards_seen.append(rewards.view(-1, G))
        per_func_seen.append(per_func)
        grid = torch.cat(rewards_seen)
        if rule is None or rule.done(grid, num_batches, lambda x: all_reduce([x], "min", ctx.group)[0]):
            break
    keep = torch.arange(grid.shape[0]) if rule is None else rule.keep(grid)
    warn_if_mostly_truncated(rows.truncated, ctx.rollout.max_completion_length)  # TRL #5697's trap, with the count
    metrics = rollout_metrics(ctx, rows, grid, torch.cat(per_func_seen), num_batches)
    return SampledGroups(records, rows, grid, keep.tolist()), metrics


def score_rollouts(ctx: RoundContext, batch: list[dict], out: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [P * G] of a batch's rollouts (+ DAPO's overlong penalty) and each function's [P * G, F]."""
    records = [r for r in batch for _ in range(ctx.rollout.num_generations)]
    rewards, per_func = compute_rewards(
        ctx.reward_funcs,
        [r["prompt"] for r in records],
        as_completions(records, out.texts),
        records,
        ctx.rewards.reward_weights,
        completion_ids=out.completion_ids,
    )
    if ctx.method.overlong_buffer_len:
        lengths = [len(c) for c in out.completion_ids]
        m = ctx.method
        rewards += torch.tensor(
            overlong_penalty(
                lengths, ctx.rollout.max_completion_length, m.overlong_buffer_len, m.overlong_penalty_factor
            )
        )
    return rewards, per_func


def rollout_metrics(ctx: RoundContext, rows: Rows, grid: torch.Tensor, per_func, num_batches: int) -> dict:
    """TRL's completion and reward-function metrics over every sampled rollout of the round."""
    lengths = torch.tensor([len(c) for c in rows.completion_ids], dtype=torch.float)
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(rows.truncated) / len(rows.truncated),
        "completions/num_tokens": lengths.sum().item(),  # the trainer adds it up into num_generated_tokens
        "num_gen_batches": num_batches,
        # every sampled group, kept or not (gcpo/frac_all_wrong counts the kept ones: none under DAPO's filter)
        "frac_reward_all_wrong": groups.all_wrong_groups(grid, ctx.rewards.correct_reward).float().mean().item(),
        "rewards/checker_timeouts": take_checker_timeouts(),  # answers math-verify ran out of time on (scored 0)
        **{
            f"rewards/{reward_function_name(f)}/mean": per_func[:, j].nanmean().nan_to_num().item()
            for j, f in enumerate(ctx.reward_funcs)
        },
    }


def build_rows(
    ctx: RoundContext, sampled: SampledGroups, metrics: dict, teacher: Teacher | None, golden_source: str
) -> tuple[Rows, list[dict]]:
    """Golden rows and advantages over the kept groups: (the round's rows, a few samples for samples.jsonl).
    Adds the reward and gcpo/* metrics to `metrics`. A golden answer longer than max_completion_length is not
    used (cut, it would lose its final answer yet still be trained on as correct): counted and warned about."""
    method, budget = ctx.method, ctx.rollout.max_completion_length
    records, out, rewards = sampled.kept()
    texts, from_teacher = [None] * len(records), set()
    if method.golden_answer != "off":
        texts, from_teacher = golden_texts(
            golden_source, records, rewards, ctx.rewards.correct_reward, teacher, metrics, ctx.timer
        )
    golden_ids = {p: encode_completion(ctx.tokenizer, t, budget) for p, t in enumerate(texts) if t is not None}
    fits = [p in golden_ids and not golden_ids[p][1] for p in range(len(records))]
    g = groups.add_golden_rows(rewards, fits, mode=method.golden_answer, correct_reward=ctx.rewards.correct_reward)
    advantages, method_metrics = method.method.advantages(g.rewards, g.group_index, method.scale_rewards)
    metrics.update(method_metrics)
    metrics.update(groups.group_metrics(sampled.rewards, g))  # reward stats: every sampled rollout; gcpo/*: kept
    too_long = sum(1 for p, (_, cut) in golden_ids.items() if cut and g.all_wrong[p])
    metrics["gcpo/golden_truncated"] = too_long
    if teacher is not None:
        metrics["gcpo/golden_from_teacher"] = sum(bool(g.golden_prompts[p]) for p in from_teacher)
    if too_long:  # the same text from the same line: Python's default filter shows it once
        warnings.warn(
            f"golden answers longer than max_completion_length={budget} tokens are not used (cut, they would "
            "lose their final answer); gcpo/golden_truncated counts the groups left without one: raise "
            "--max_completion_length to use them",
            stacklevel=2,
        )
    golden_text = {p: (ids, texts[p]) for p, (ids, _) in golden_ids.items()}
    rows = Rows([], [], [], [], None if out.sampling_logp is None else [], g.is_golden.tolist(), advantages)
    rows.policy_version = None if out.policy_version is None else []
    for k, (p, r) in enumerate(zip(g.group_index.tolist(), g.rollout_index.tolist())):
        golden = bool(g.is_golden[k])
        ids, text = golden_text[p] if golden else (out.completion_ids[r], out.texts[r])
        rows.prompt_ids.append(out.prompt_ids[p * ctx.rollout.num_generations])
        rows.completion_ids.append(ids)
        rows.truncated.append(False if golden else out.truncated[r])
        rows.texts.append(text)
        if rows.sampling_logp is not None:  # a golden row was never sampled: it has no engine log-probs
            rows.sampling_logp.append(None if golden else out.sampling_logp[r])
        if rows.policy_version is not None:
            rows.policy_version.append(None if golden else out.policy_version[r])
    return rows, log_samples(records, rows, g, ctx.rollout.num_generations, ctx.num_samples_to_log)


def log_samples(records: list[dict], rows: Rows, g: groups.Groups, G: int, num_groups: int) -> list[dict]:
    """The first rollout and the golden row (if any) of the first groups, for samples.jsonl."""
    samples = []
    for k, (p, r) in enumerate(zip(g.group_index.tolist(), g.rollout_index.tolist())):
        if p < num_groups and (rows.golden[k] or r % G == 0):
            record = records[p]
            prompt = record["prompt"] if isinstance(record["prompt"], str) else record["prompt"][-1]["content"]
            samples.append(
                dict(
                    prompt=prompt,
                    completion=rows.texts[k],
                    answer=record["answer"],
                    golden=rows.golden[k],
                    reward=g.rewards[k].item(),
                    advantage=rows.advantages[k].item(),
                    truncated=rows.truncated[k],
                )
            )
    return samples


def pack_micro_batches(rows: Rows, batch: BatchConfig, mask_truncated: bool) -> list[PackedBatch]:
    """The round's rows shuffled into steps_per_generation micro-batches, each packed once (on the CPU)."""
    order = torch.randperm(len(rows))
    return [
        pack(rows.select(index.tolist()), mask_truncated)
        for index in torch.tensor_split(order, batch.steps_per_generation)
    ]


@dataclass
class ScoringOptions:
    """What the forward-only passes over a round need: whether it is reused, the sampling correction."""

    reused: bool
    temperature: float
    bf16: bool
    correction: SamplingCorrection | None = None  # for rows from an engine that samples elsewhere


def score_micro_batches(
    micro_batches: list[PackedBatch], model, ref_model, options: ScoringOptions, timer, metrics: dict
) -> None:
    """Forward-only fused passes over each micro-batch, as the round needs them: the policy's old log-probs when
    the round is reused (golden rows included; otherwise old_logp stays None: on-policy), the reference model's
    when beta > 0, and, for rows an engine sampled elsewhere (packed.engine_logp) of a reused round, the
    sampling-mismatch weight exp(old - engine log-prob) with its sampling/* metrics (into `metrics`). A round
    trained once needs no pass for it: its old log-probs are the update's own forward's, so the update computes
    the weight there (gcpo_fast/update.py) and sampling_weight stays None."""
    found = []
    for packed in micro_batches:
        correct = options.correction is not None and packed.engine_logp is not None and options.reused
        with timer("old_logp"):
            old = score_logprobs(model, packed, options.temperature, options.bf16).cpu() if options.reused else None
            packed.old_logp = old  # None: on-policy, ratios of 1 that carry the gradient
            if ref_model is not None:
                packed.ref_logp = score_logprobs(ref_model, packed, options.temperature, options.bf16).cpu()
            if correct:
                packed.sampling_weight, weight_metrics = options.correction.weight(packed, old)
                found.append({name: float(v) for name, v in weight_metrics.items()})
    for name in found[0] if found else ():
        values = [m[name] for m in found]
        reduce = min if name.endswith("/min") else max if name.endswith("/max") else lambda v: sum(v) / len(v)
        metrics[name] = reduce(values)
