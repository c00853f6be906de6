"""The update: packed micro-batches -> hidden states -> fused policy loss -> backward -> one optimizer step.

    from gcpo_fast.update import ModelWithLoss, Rows, completion_logprobs, build_optimizer, optimizer_step

    policy = parallel.parallelize(ModelWithLoss(model, cfg.loss_config(), cfg.temperature))
    optimizer, scheduler = build_optimizer(model, cfg)
    mb.old_logp = completion_logprobs(model, mb, cfg)          # only when a rollout batch is reused
    metrics = optimizer_step(policy, optimizer, scheduler, micro_batches, cfg)

A micro-batch is `Rows`: prompt_ids and completion_ids (lists of token-id lists), truncated (list of
bool), advantages ([B] tensor), old_logp and ref_logp ([N] tensors over its completion tokens, or None).
Rows are packed into one stream without padding (gcpo_fast.packing); the model runs to its last hidden
states only, and `linear_policy_loss` takes the states that predict completion tokens together with the
lm_head weight, so [N, V] logits never exist.

The aggregation's denominator is the whole optimizer step's, summed over micro-batches and ranks
(docs/algorithms.md, "Aggregation and the normaliser"): token-mean divides by the step's unmasked completion tokens, seq-mean-*
by its rows (seq-mean-token-sum-norm, Dr. GRPO, by rows x max_completion_length, as TRL does), each divided
by the world size because DDP and FSDP average gradients. So a step's gradient does not depend on how it was split.
"""

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import get_scheduler

from gcpo_fast.errors import TrainingError
from gcpo_fast.kernels import PolicyLossConfig, linear_logprobs, linear_policy_loss
from gcpo_fast.packing import PackedBatch, forward_hidden, head_inputs, pack_rows
from gcpo_fast.parallel import all_reduce, rank_and_world

IGNORE_INDEX = -100
SCHEDULER_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class Rows:
    """Rows to train on, a generation round's or one micro-batch's: each a prompt and a completion."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    truncated: list[bool]  # no EOS within the budget (masked out of the loss with mask_truncated_completions)
    advantages: torch.Tensor  # [B]
    old_logp: torch.Tensor | None = None  # [N] behaviour log-probs of the completion tokens; None: on-policy
    ref_logp: torch.Tensor | None = None  # [N] reference model's, when beta > 0
    # per row: the engine's log-probs of its sampled tokens (None for a golden row), when it reports them
    sampling_logp: list[list[float] | None] | None = None
    sampling_weight: torch.Tensor | None = None  # [N] the sampling-mismatch correction (docs/algorithms.md)
    golden: list[bool] | None = None  # per row: a golden answer (GCPO), not a rollout; None: none are

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, index: torch.Tensor) -> "Rows":
        """The rows at index (a [k] long tensor), in that order, without old/ref log-probs and weights."""
        idx = index.tolist()
        return Rows(
            [self.prompt_ids[i] for i in idx],
            [self.completion_ids[i] for i in idx],
            [self.truncated[i] for i in idx],
            self.advantages[index],
            sampling_logp=None if self.sampling_logp is None else [self.sampling_logp[i] for i in idx],
            golden=None if self.golden is None else [self.golden[i] for i in idx],
        )


# Rollout buffers (lists of Rows) are saved in checkpoints and read back with torch.load(weights_only=True).
torch.serialization.add_safe_globals([Rows])


def autocast(bf16: bool, device: torch.device):
    """bf16 autocast on CUDA when asked (weights and optimizer state stay fp32); nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else nullcontext()


def pack(mb: Rows, mask_truncated: bool, device) -> PackedBatch:
    """The micro-batch's rows as one packed stream; truncated rows' targets ignored if mask_truncated."""
    packed = pack_rows(mb.prompt_ids, mb.completion_ids, device=device)
    if mask_truncated and any(mb.truncated):
        lengths = torch.tensor([len(c) for c in mb.completion_ids])
        drop = torch.repeat_interleave(torch.tensor(mb.truncated), lengths).to(device)
        packed.targets = packed.targets.masked_fill(drop, IGNORE_INDEX)
    return packed


class ModelWithLoss(torch.nn.Module):
    """The model and the fused loss as one module, so that a parallel wrapper's hooks see the whole forward
    (gcpo_fast.packing: call forward_hidden from inside the wrapped module's forward)."""

    def __init__(self, model, loss_config: PolicyLossConfig, temperature: float):
        super().__init__()
        self.model, self.loss_config, self.temperature = model, loss_config, temperature

    def forward(
        self, packed: PackedBatch, advantages, old_logp, ref_logp, normalizer, sampling_weight=None, golden_rows=None
    ):
        hidden, weight, bias = head_inputs(forward_hidden(self.model, packed)[packed.completion_index], self.model)
        return linear_policy_loss(
            hidden,
            weight,
            packed.targets,
            old_logp,
            advantages,
            packed.completion_cu_seqlens,
            bias=bias,
            ref_logp=ref_logp,
            normalizer=normalizer,
            compute_entropy=True,
            temperature=self.temperature,
            sampling_weight=sampling_weight,
            golden_rows=golden_rows,
            config=self.loss_config,
        )


@torch.no_grad()
def completion_logprobs(model, mb: Rows, cfg) -> torch.Tensor:
    """Per-token log-probs [N] of the micro-batch's completions under `model` as it is now: one forward-only
    fused pass (the policy's old log-probs of a reused batch, golden rows included, or the reference model's)."""
    device = next(model.parameters()).device
    packed = pack(mb, cfg.mask_truncated_completions, device)
    with autocast(cfg.bf16, device):
        hidden, weight, bias = head_inputs(forward_hidden(model, packed)[packed.completion_index], model)
        return linear_logprobs(
            hidden, weight, packed.targets, temperature=cfg.temperature, bias=bias, ignore_index=IGNORE_INDEX
        )


def golden_rows(mb: Rows, device) -> torch.Tensor:
    """[B] bool: the micro-batch's golden rows (the fused op gives them the shaped term when asked)."""
    return torch.tensor(mb.golden or [False] * len(mb), dtype=torch.bool, device=device)


def step_normalizer(micro_batches: list[Rows], cfg) -> float:
    """The aggregation denominator of one optimizer step, global over ranks (see the module docstring)."""
    tokens = sum(
        len(c)
        for mb in micro_batches
        for c, cut in zip(mb.completion_ids, mb.truncated)
        if not (cut and cfg.mask_truncated_completions)
    )
    rows = sum(len(mb) for mb in micro_batches)
    world = rank_and_world()[1]
    tokens, rows = all_reduce([tokens, rows])
    if cfg.loss_agg_mode == "token-mean":
        return max(tokens, 1) / world
    if cfg.loss_agg_mode == "seq-mean-token-sum-norm":
        return rows * cfg.max_completion_length / world
    return rows / world


def build_optimizer(model, cfg):
    """AdamW (weight decay on matrices only, not on norms and biases) and the warm-up + decay schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon
    )
    scheduler = get_scheduler(
        SCHEDULER_NAMES[cfg.lr_scheduler_type],
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        num_training_steps=cfg.max_steps,
    )
    return optimizer, scheduler


def optimizer_step(policy, optimizer, scheduler, micro_batches: list[Rows], cfg) -> dict[str, float]:
    """Forward + backward of every micro-batch (DDP syncs gradients once, on the last), clip, AdamW step.
    policy: gcpo_fast.parallel.Policy or FSDPPolicy. Returns this rank's metrics: loss, grad_norm, learning_rate,
    entropy, clip ratios (token means), and step_skipped (1.0 when the loss or the gradient norm was not finite on
    some rank: then neither the optimizer nor the scheduler stepped and the gradients are dropped)."""
    device = policy.device  # not the parameters': FSDP's CPU offload keeps them on the host
    normalizer = step_normalizer(micro_batches, cfg)
    loss_sum, tokens, stat_sums = 0.0, 0.0, {}
    for i, mb in enumerate(micro_batches):
        packed = pack(mb, cfg.mask_truncated_completions, device)
        old, ref, weight = (None if t is None else t.to(device) for t in (mb.old_logp, mb.ref_logp, mb.sampling_weight))
        try:
            with policy.no_sync(last=i == len(micro_batches) - 1):
                with autocast(cfg.bf16, device):
                    loss, stats = policy.module(
                        packed, mb.advantages.to(device), old, ref, normalizer, weight, golden_rows(mb, device)
                    )
                loss.backward()
        except FloatingPointError:
            # The fused op found non-finite logits (weights or activations overflowed): a non-finite step.
            # Under DDP this is safe when every rank fails alike (non-finite weights are the same everywhere);
            # an overflow on one rank's data alone would leave the others waiting in the gradient all-reduce.
            loss_sum = math.nan
            break
        n = stats.pop("num_tokens").item()
        loss_sum, tokens = loss_sum + loss.item(), tokens + n
        for name, value in stats.items():
            stat_sums[name] = stat_sums.get(name, 0.0) + value.item() * n
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    grad_norm = policy.clip_grad_norm(max_norm)
    learning_rate = scheduler.get_last_lr()[0]
    # A non-finite loss or gradient (a reward of inf, an overflow) would poison every weight: skip the
    # step on every rank (the loss differs per rank, so they agree on the worst), and let the caller count it.
    finite = all_reduce([float(math.isfinite(loss_sum) and math.isfinite(grad_norm))], "min")[0] == 1.0
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {
        "loss": loss_sum,
        "grad_norm": grad_norm,
        "learning_rate": learning_rate,
        "step_skipped": float(not finite),
    }
    metrics.update({name: total / max(tokens, 1.0) for name, total in stat_sums.items() if name != "ratio_mean"})
    return metrics


def weights_finite(model) -> bool:
    """Whether every parameter of the model (this rank's, agreed over ranks) is finite: checked before a save."""
    # under FSDP a parameter is a DTensor: check this rank's shard, the reduction covers the rest
    local = all(bool(torch.isfinite(getattr(p, "to_local", lambda: p)()).all()) for p in model.parameters())
    return all_reduce([float(local)], "min")[0] == 1.0


@dataclass
class SkippedSteps:
    """The optimizer steps skipped for a non-finite loss or gradient norm: counted (metric skipped_steps),
    each warned about, and the run stopped after max_in_a_row of them in a row."""

    total: int = 0
    in_a_row: int = 0

    def record(self, step: int, metrics: dict, max_in_a_row: int, warn: bool) -> None:
        """Count step's outcome (metrics["step_skipped"], popped) and add skipped_steps to metrics."""
        skipped = metrics.pop("step_skipped") > 0  # the same on every rank
        self.total, self.in_a_row = self.total + skipped, self.in_a_row + 1 if skipped else 0
        metrics["skipped_steps"] = self.total
        if skipped and warn:
            print(
                f"warning: step {step}: loss {metrics['loss']:.4g}, grad_norm {metrics['grad_norm']:.4g}: not finite, "
                f"the step was skipped (no optimizer or scheduler step; {self.in_a_row} in a row)",
                file=sys.stderr,
            )
        if self.in_a_row >= max_in_a_row:
            raise TrainingError(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient norm "
                "(--max_skipped_steps); stopped with the weights of the last good step. Look for a "
                "reward of inf, a learning rate too large, or fp16 overflow"
            )
