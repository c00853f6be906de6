"""A generation round: sample and reward groups, add golden rows and advantages, cut into packed micro-batches.

    from gcpo_fast.rounds import sample_groups, build_rows, pack_micro_batches, score_micro_batches

    sampled, metrics = sample_groups(ctx, sampler)                 # records, Rows, rewards [P, G], kept prompts
    rows, samples, more = build_rows(ctx, sampled)                  # golden rows + advantages; samples.jsonl
    micro_batches = pack_micro_batches(rows, batch, mask_truncated)   # shuffled, each packed once
    micro_batches = score_micro_batches(micro_batches, model, ref_model, scoring, timer)   # old / ref log-probs
    steps = batch.optimizer_steps(micro_batches)                    # [optimizer step][micro-batch]

Each stage returns what it made and its metrics; the trainer merges them (gcpo_fast/train.py, generate_round).
The data flow of a whole step is told once, in docs/design.md ("The trainer: data flow of one step").
"""

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from gcpo_fast.data.prompt_checks import warn_if_mostly_truncated
from gcpo_fast.data.prompts import encode_prompts
from gcpo_fast.data.rewards import (
    RewardConfig,
    as_completions,
    compute_rewards,
    reward_function_name,
    take_checker_timeouts,
)
from gcpo_fast.distributed.parallel import all_reduce
from gcpo_fast.engines.base import RolloutConfig, Rows
from gcpo_fast.errors import require
from gcpo_fast.golden.options import GoldenConfig
from gcpo_fast.golden.rows import Groups, add_golden, all_right_groups, all_wrong_groups
from gcpo_fast.golden.teacher import Teacher
from gcpo_fast.methods.advantages import reward_metrics
from gcpo_fast.methods.recipes import MethodConfig
from gcpo_fast.options import at_least, check_options, option
from gcpo_fast.packing import PackedBatch, pack
from gcpo_fast.run.timing import PhaseTimer
from gcpo_fast.scoring import score_logprobs
from gcpo_fast.tools.formats import ToolSet, trajectory_messages
from gcpo_fast.tools.loop import ToolEngine


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
    """What a generation round reads: its options, the engine and tokenizer, the reward functions and the teacher."""

    rollout: RolloutConfig
    method: MethodConfig
    golden: GoldenConfig
    rewards: RewardConfig
    prompts_per_round: int
    engine: object
    tokenizer: object
    reward_funcs: list
    timer: PhaseTimer
    teacher: Teacher | None = None  # golden answers from a teacher (--golden_source teacher / dataset_then_teacher)
    num_samples_to_log: int = 4
    group: object = None  # the process group of the sampling rule's all-reduce (None: the default group)
    tools: ToolSet | None = None  # --tools: the prompts' tool schemas, golden answers' calls re-run

    @classmethod
    def of(cls, cfg, engine, tokenizer, reward_funcs: list, timer: PhaseTimer | None = None, teacher=None):
        """The context of a run's rounds from its gcpo_fast.config.TrainConfig."""
        tools = engine.tools if isinstance(engine, ToolEngine) else None
        return cls(
            cfg.rollout, cfg.method, cfg.golden, cfg.rewards, cfg.prompts_per_round, engine, tokenizer, reward_funcs,
            timer or PhaseTimer(), teacher, cfg.log.num_samples_to_log, tools=tools,
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
    """Generate and reward groups until the round is full; returns (the groups, rollout metrics).
    The method's sampling rule (DAPO's dynamic sampling, GPG's threshold) may sample more prompt batches;
    every rank draws as many batches as the others."""
    G, P = ctx.rollout.num_generations, ctx.prompts_per_round
    rule = ctx.method.sampling_rule(P)
    records, rows, rewards_seen, per_func_seen = [], None, [], []
    for num_batches in itertools.count(1):
        batch = next(sampler)
        with ctx.timer("generate"):
            schemas = ctx.tools.schemas if ctx.tools else None
            prompt_ids = encode_prompts(
                ctx.tokenizer, [r["prompt"] for r in batch], ctx.rollout.max_prompt_length, schemas
            )
            out = ctx.engine.generate(prompt_ids, G, ctx.rollout.sampling)
        with ctx.timer("reward"):
            rewards, per_func = reward_rollouts(ctx, batch, out)
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


def reward_rollouts(ctx: RoundContext, batch: list[dict], out: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [P * G] of a batch's rollouts (shaped by the method: DAPO's overlong penalty) and each function's
    [P * G, F]. A function sees the whole trajectory, tool outputs included (TRL's signature): the text after the
    prompt, or for conversational prompts the assistant's and the tools' messages."""
    records = [r for r in batch for _ in range(ctx.rollout.num_generations)]
    completions = as_completions(records, out.texts)
    if out.tool_mask is not None:
        completions = [
            c if isinstance(c, str) else trajectory_messages(ctx.tokenizer, ids, mask)
            for c, ids, mask in zip(completions, out.completion_ids, out.tool_mask, strict=True)
        ]
    rewards, per_func = compute_rewards(
        ctx.reward_funcs,
        [r["prompt"] for r in records],
        completions,
        records,
        ctx.rewards.reward_weights,
        completion_ids=out.completion_ids,
    )
    lengths = [len(c) for c in out.completion_ids]
    rewards = ctx.method.shape_rewards(rewards, lengths, ctx.rollout.max_completion_length)
    return rewards, per_func


def rollout_metrics(ctx: RoundContext, rows: Rows, grid: torch.Tensor, per_func, num_batches: int) -> dict:
    """TRL's completion and reward-function metrics over every sampled rollout of the round (and its tools/*)."""
    lengths = torch.tensor([len(c) for c in rows.completion_ids], dtype=torch.float)
    return {
        **tool_metrics(rows),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(rows.truncated) / len(rows.truncated),
        "completions/num_tokens": lengths.sum().item(),  # the trainer adds it up into num_generated_tokens
        "num_gen_batches": num_batches,
        # every sampled group, kept or not (gcpo/frac_all_wrong counts the kept ones: none under DAPO's filter)
        "frac_reward_all_wrong": all_wrong_groups(grid, ctx.rewards.correct_reward).float().mean().item(),
        "frac_reward_all_right": all_right_groups(grid, ctx.rewards.correct_reward).float().mean().item(),
        "rewards/checker_timeouts": take_checker_timeouts(),  # answers math-verify ran out of time on (0 reward)
        **{
            f"rewards/{reward_function_name(f)}/mean": per_func[:, j].nanmean().nan_to_num().item()
            for j, f in enumerate(ctx.reward_funcs)
        },
    }


def tool_metrics(rows: Rows) -> dict[str, float]:
    """tools/* over the sampled rollouts: calls and model turns per rollout, the errors and timeouts counted, and
    the fraction of completion tokens that are tool output ({} without tools)."""
    if rows.tool_use is None:
        return {}
    use, n = rows.tool_use, len(rows.tool_use)
    tokens = sum(len(m) for m in rows.tool_mask)
    return {
        "tools/calls_per_rollout": sum(u.calls for u in use) / n,
        "tools/turns": sum(u.turns for u in use) / n,
        "tools/errors": sum(u.errors for u in use),
        "tools/timeouts": sum(u.timeouts for u in use),
        "tools/token_fraction": sum(len(m) - sum(m) for m in rows.tool_mask) / max(tokens, 1),
    }


def build_rows(ctx: RoundContext, sampled: SampledGroups) -> tuple[Rows, list[dict], dict[str, float]]:
    """Golden rows and advantages over the kept groups: (the round's rows, a few samples for samples.jsonl, the
    reward, gcpo/* and method metrics)."""
    records, rollouts, rewards = sampled.kept()
    g, rows, golden_metrics = add_golden(
        records,
        rollouts,
        rewards,
        options=ctx.golden,
        teacher=ctx.teacher,
        tokenizer=ctx.tokenizer,
        max_completion_length=ctx.rollout.max_completion_length,
        correct_reward=ctx.rewards.correct_reward,
        timer=ctx.timer,
        tools=ctx.tools,
    )
    advantages, method_metrics = ctx.method.method.advantages(g.rewards, g.group_index, ctx.method.scale_rewards)
    if ctx.method.all_right_advantage:  # solved groups: a push to keep what the model already gets right
        right = all_right_groups(rewards, ctx.rewards.correct_reward)[g.group_index]  # golden rows: never in one
        advantages = advantages + ctx.method.all_right_advantage * right
    rows = dataclasses.replace(rows, advantages=advantages)
    # reward_*: every sampled rollout; gcpo/*: the kept groups
    metrics = {**method_metrics, **reward_metrics(sampled.rewards), **golden_metrics}
    samples = log_samples(records, rows, g, ctx.rollout.num_generations, ctx.num_samples_to_log, ctx.tokenizer)
    return rows, samples, metrics


def log_samples(records: list[dict], rows: Rows, g: Groups, G: int, num_groups: int, tokenizer=None) -> list[dict]:
    """The first rollout and the golden row (if any) of the first groups, for samples.jsonl; with tools, each
    trajectory's runs of model and tool text too ("trajectory": assistant / tool messages)."""
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
            if rows.tool_mask is not None:
                samples[-1]["trajectory"] = trajectory_messages(tokenizer, rows.completion_ids[k], rows.tool_mask[k])
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
    """What the forward-only passes over a round need."""

    reused: bool  # the round trains more than one optimizer step: it needs its old log-probs
    temperature: float
    bf16: bool


def score_micro_batches(
    micro_batches: list[PackedBatch], model, ref_model, options: ScoringOptions, timer
) -> list[PackedBatch]:
    """The micro-batches with the log-probs of the forward-only fused passes the round needs: the policy's
    (old_logp) when the round is reused, golden rows included (otherwise old_logp stays None: on-policy, ratios
    of 1 that carry the gradient), and the reference model's (ref_logp) when beta > 0. The sampling-mismatch
    weight of rows an engine sampled elsewhere is the update's to compute, from these (gcpo_fast/update.py)."""
    if not options.reused and ref_model is None:
        return micro_batches
    scored = []
    for packed in micro_batches:
        with timer("old_logp"):
            scores = {}
            if options.reused:
                scores["old_logp"] = score_logprobs(model, packed, options.temperature, options.bf16).cpu()
            if ref_model is not None:
                scores["ref_logp"] = score_logprobs(ref_model, packed, options.temperature, options.bf16).cpu()
        scored.append(dataclasses.replace(packed, **scores))
    return scored
