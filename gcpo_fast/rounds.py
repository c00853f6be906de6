"""A generation round: sample and score groups, add golden rows, compute advantages, cut into micro-batches.

    from gcpo_fast.rounds import sample_groups, build_rows, split_steps

    sampled, metrics = sample_groups(cfg, engine, tokenizer, sampler, reward_funcs)   # SampledGroups
    rows, samples = build_rows(cfg, tokenizer, sampled, metrics, teacher)              # update.Rows, samples.jsonl
    steps = split_steps(cfg, rows, model, ref_model)   # [optimizer step][micro-batch] of update.Rows

1. sample_groups: the next prompts (per rank its own), G completions each from the rollout engine, rewards
   (+ DAPO's overlong penalty). DAPO's dynamic sampling or GPG's threshold may sample more prompt batches;
   every rank draws as many batches as the others.
2. build_rows, over the kept groups: GCPO gives a group whose G rewards are all wrong its golden answer as a
   row (append or replace), tokenised after the same prompt ids; advantages per group over the rows. The
   golden text comes from the dataset or, by --golden_source, a teacher (gcpo_fast/golden.py). A golden
   answer longer than max_completion_length is not used: cut, it would lose its final answer yet still be
   trained on as correct. Such groups are counted (gcpo/golden_truncated) and warned about once.
3. split_steps: the rows shuffled into steps_per_generation micro-batches, gradient_accumulation_steps per
   optimizer step, the whole repeated num_iterations times. When the round is reused (more than one
   optimizer step or iteration) each micro-batch gets its old log-probs from one forward-only fused pass
   now, golden rows included; otherwise old_logp is None (on-policy). Rows from an engine that samples
   elsewhere (vLLM) get the sampling-mismatch weight exp(old - engine log-prob) in TRL's modes (the
   trainer computes old itself for that); golden rows, never sampled, weight 1.
"""

import itertools
import warnings
from dataclasses import dataclass

import torch

from gcpo_fast import groups
from gcpo_fast.golden import Teacher, golden_texts
from gcpo_fast.kernels import sampling_weights
from gcpo_fast.parallel import all_reduce
from gcpo_fast.prompt_checks import warn_if_mostly_truncated
from gcpo_fast.rewards import as_completions, compute_rewards, overlong_penalty, reward_function_name
from gcpo_fast.rollout import Rollouts, Sampling, encode_completion, encode_prompts
from gcpo_fast.timing import PhaseTimer
from gcpo_fast.update import IGNORE_INDEX, Rows, completion_logprobs, pack


@dataclass
class SampledGroups:
    """The groups of one round: P prompts, G rollouts each (rows prompt-major), and the prompts kept."""

    records: list[dict]  # [P] the prompts' dataset records
    rollouts: Rollouts  # [P * G] rows
    rewards: torch.Tensor  # [P, G]
    keep: torch.Tensor  # [K] indices of the prompts trained on, ascending (DAPO drops groups without a signal)

    def kept(self) -> "SampledGroups":
        G = self.rewards.shape[1]
        keep = self.keep.tolist()
        rows = [p * G + r for p in keep for r in range(G)]
        return SampledGroups(
            [self.records[p] for p in keep],
            self.rollouts.select(rows),
            self.rewards[self.keep],
            torch.arange(len(keep)),
        )


def sample_groups(
    cfg, engine, tokenizer, sampler, reward_funcs, timer: PhaseTimer | None = None
) -> tuple[SampledGroups, dict]:
    """Generate and score groups until the round is full; returns (the groups, rollout metrics).
    DAPO keeps only groups with varied rewards until it has a round's worth; GPG samples whole extra
    batches until valid rows / rows >= min_inverse_alpha. timer: charged with generate and reward."""
    G, P = cfg.num_generations, cfg.prompts_per_round
    timer = timer or PhaseTimer()
    sampling = Sampling(cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k)
    records, rollouts, rewards_seen, per_func_seen = [], None, [], []
    for num_batches in itertools.count(1):
        batch = next(sampler)
        with timer("generate"):
            out = engine.generate(
                encode_prompts(tokenizer, [r["prompt"] for r in batch], cfg.max_prompt_length), G, sampling
            )
        rows = [r for r in batch for _ in range(G)]
        with timer("reward"):
            rewards, per_func = compute_rewards(
                reward_funcs,
                [r["prompt"] for r in rows],
                as_completions(rows, out.texts),
                rows,
                cfg.reward_weights,
                completion_ids=out.completion_ids,
            )
            if cfg.overlong_buffer_len:
                rewards += torch.tensor(
                    overlong_penalty(
                        [len(c) for c in out.completion_ids],
                        cfg.max_completion_length,
                        cfg.overlong_buffer_len,
                        cfg.overlong_penalty_factor,
                    )
                )
        records += batch
        rollouts = out if rollouts is None else rollouts + out
        rewards_seen.append(rewards.view(-1, G))
        per_func_seen.append(per_func)
        grid = torch.cat(rewards_seen)
        if cfg.dynamic_sampling:
            kept = int(groups.dapo_filter(grid).sum())
            if groups.dapo_sampling_done(int(all_reduce([kept], "min")[0]), P, num_batches, cfg.max_num_gen_batches):
                break
        elif cfg.min_inverse_alpha > 0:
            zero = groups.zero_std_groups(grid.flatten(), groups.grid_group_index(*grid.shape))
            done = groups.gpg_sampling_done(int((~zero).sum()) * G, grid.numel(), cfg.min_inverse_alpha)
            if all_reduce([float(done)], "min")[0] or 0 < cfg.max_num_gen_batches <= num_batches:
                break
        else:
            break
    keep = torch.arange(grid.shape[0])
    if cfg.dynamic_sampling:
        keep = groups.dapo_filter(grid).nonzero().flatten()[:P]  # trim the surplus, as verl does
    per_func = torch.cat(per_func_seen)
    warn_if_mostly_truncated(rollouts.truncated, cfg.max_completion_length)  # TRL #5697's trap, with the count
    lengths = torch.tensor([len(c) for c in rollouts.completion_ids], dtype=torch.float)
    metrics = {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(rollouts.truncated) / len(rollouts.truncated),
        "num_gen_batches": num_batches,
        # every sampled group, kept or not (gcpo/frac_all_wrong counts the kept ones: none under DAPO's filter)
        "frac_reward_all_wrong": groups.all_wrong_groups(grid, cfg.correct_reward).float().mean().item(),
        **{
            f"rewards/{reward_function_name(f)}/mean": per_func[:, j].nanmean().nan_to_num().item()
            for j, f in enumerate(reward_funcs)
        },
    }
    return SampledGroups(records, rollouts, grid, keep), metrics


def build_rows(
    cfg,
    tokenizer,
    sampled: SampledGroups,
    metrics: dict,
    teacher: Teacher | None = None,
    timer: PhaseTimer | None = None,
) -> tuple[Rows, list[dict]]:
    """Golden rows and advantages over the kept groups, group by group: (rows, a few samples for samples.jsonl).
    Adds the reward and gcpo/* metrics to `metrics`. teacher: golden answers for all-wrong prompts by
    --golden_source (gcpo_fast/golden.py); timer: charged with teacher."""
    kept = sampled.kept()
    texts, from_teacher = golden_texts(cfg, kept.records, kept.rewards, teacher, metrics, timer)
    golden_ids = {
        p: encode_completion(tokenizer, text, cfg.max_completion_length)
        for p, text in enumerate(texts)
        if text is not None
    }
    fits = [p in golden_ids and not golden_ids[p][1] for p in range(len(kept.records))]
    g = groups.add_golden_rows(kept.rewards, fits, mode=cfg.golden_answer, correct_reward=cfg.correct_reward)
    if cfg.loss_type == "gpg":
        advantages, alpha = groups.gpg_advantages(g.rewards, g.group_index, cfg.scale_rewards)
        metrics["gpg/alpha"] = alpha
    else:
        advantages = groups.group_advantages(g.rewards, g.group_index, cfg.scale_rewards)
    metrics.update(groups.group_metrics(sampled.rewards, g))  # reward stats: every sampled rollout; gcpo/*: kept
    too_long = sum(1 for p, (_, cut) in golden_ids.items() if cut and g.all_wrong[p])
    metrics["gcpo/golden_truncated"] = too_long
    if teacher is not None:
        metrics["gcpo/golden_from_teacher"] = sum(bool(g.golden_prompts[p]) for p in from_teacher)
    if too_long:  # the same text from the same line: Python's default filter shows it once
        warnings.warn(
            f"golden answers longer than max_completion_length={cfg.max_completion_length} tokens are not "
            "used (cut, they would lose their final answer); gcpo/golden_truncated counts the groups left "
            "without one: raise --max_completion_length to use them"
        )
    G, out = cfg.num_generations, kept.rollouts
    rows = Rows([], [], [], advantages, sampling_logp=None if out.logprobs is None else [], golden=g.is_golden.tolist())
    samples = []
    for k, (p, r) in enumerate(zip(g.group_index.tolist(), g.rollout_index.tolist())):
        record = kept.records[p]
        if g.is_golden[k]:
            (ids, cut), text = golden_ids[p], texts[p]
        else:
            ids, cut, text = out.completion_ids[r], out.truncated[r], out.texts[r]
        rows.prompt_ids.append(out.prompt_ids[p * G])
        rows.completion_ids.append(ids)
        rows.truncated.append(cut)
        if rows.sampling_logp is not None:  # a golden row was never sampled: it has no engine log-probs
            rows.sampling_logp.append(None if g.is_golden[k] else out.logprobs[r])
        if p < cfg.num_samples_to_log and (g.is_golden[k] or r % G == 0):  # first rollout + golden row per group
            prompt = record["prompt"] if isinstance(record["prompt"], str) else record["prompt"][-1]["content"]
            samples.append(
                dict(
                    prompt=prompt,
                    completion=text,
                    answer=record["answer"],
                    golden=bool(g.is_golden[k]),
                    reward=g.rewards[k].item(),
                    advantage=advantages[k].item(),
                    truncated=cut,
                )
            )
    return rows, samples


def split_steps(
    cfg, rows: Rows, model, ref_model, timer: PhaseTimer | None = None, metrics: dict | None = None
) -> list[list[Rows]]:
    """Shuffle the rows into steps_per_generation micro-batches, gradient_accumulation_steps per optimizer step,
    with old log-probs when the round is reused and reference log-probs when beta > 0; repeated
    num_iterations times. Rows sampled by another engine (with sampling log-probs) also get the
    sampling-mismatch weight, from the trainer's own old log-probs, and its sampling/* metrics go into
    `metrics`. timer: charged with old_logp."""
    reused = cfg.steps_per_generation > cfg.gradient_accumulation_steps or cfg.num_iterations > 1
    correct = rows.sampling_logp is not None and cfg.vllm_importance_sampling_correction
    order = torch.randperm(len(rows))
    micro_batches, weight_metrics = [], []
    timer = timer or PhaseTimer()
    for index in torch.tensor_split(order, cfg.steps_per_generation):
        mb = rows.select(index)
        with timer("old_logp"):
            old = completion_logprobs(model, mb, cfg).cpu() if reused or correct else None
            mb.old_logp = old if reused else None  # on-policy: ratios of 1 that carry the gradient
            mb.ref_logp = completion_logprobs(ref_model, mb, cfg).cpu() if ref_model is not None else None
            if correct:
                mb.sampling_weight, found = sampling_correction(cfg, mb, old)
                weight_metrics.append(found)
        micro_batches.append(mb)
    if weight_metrics and metrics is not None:
        for name in weight_metrics[0]:
            values = [m[name] for m in weight_metrics]
            reduce = min if name.endswith("/min") else max if name.endswith("/max") else lambda v: sum(v) / len(v)
            metrics[name] = reduce(values)
    gas = cfg.gradient_accumulation_steps
    steps = [micro_batches[i : i + gas] for i in range(0, len(micro_batches), gas)]
    return steps * cfg.num_iterations


def sampling_correction(cfg, mb: Rows, old_logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's vLLM importance-sampling weight [N] of a micro-batch and its sampling/* metrics; golden rows 1."""
    packed = pack(mb, cfg.mask_truncated_completions, "cpu")  # the row spans and the tokens the loss counts
    golden = torch.tensor([v is None for v in mb.sampling_logp])
    engine_logp = torch.tensor([x for v, c in zip(mb.sampling_logp, mb.completion_ids) for x in (v or [0.0] * len(c))])
    weight, found = sampling_weights(
        old_logp,
        engine_logp,
        packed.completion_cu_seqlens,
        packed.targets != IGNORE_INDEX,
        mode=cfg.vllm_importance_sampling_mode,
        clip_min=cfg.vllm_importance_sampling_clip_min,
        clip_max=cfg.vllm_importance_sampling_clip_max,
        not_sampled=golden,
    )
    return weight, {name: float(v) for name, v in found.items()}
