"""The update: packed micro-batches -> hidden states -> fused policy loss -> backward -> one optimizer step.

    from gcpo_fast.update import PolicyLoss, behaviour_logprobs, build_optimizer, optimizer_step

    module = PolicyLoss(model, cfg)                  # wrap this one in DDP under torchrun
    optimizer, scheduler = build_optimizer(model, cfg)
    mb["old_logp"] = behaviour_logprobs(model, mb, cfg)   # only when a rollout batch is reused
    metrics = optimizer_step(module, optimizer, scheduler, micro_batches, cfg)

A micro-batch is a dict of rows: prompt_ids and completion_ids (lists of token-id lists), truncated
(list of bool), advantages ([B] tensor), old_logp and ref_logp ([N] tensors over its completion
tokens, or None). Rows are packed into one stream without padding (gcpo_fast.packing); the model
runs to its last hidden states only, and `linear_policy_loss` takes the states that predict
completion tokens together with the lm_head weight, so [N, V] logits never exist.

The aggregation's denominator is the whole optimizer step's, summed over micro-batches and ranks
(ALGORITHMS.md): token-mean divides by the step's unmasked completion tokens, seq-mean-* by its rows
(seq-mean-token-sum-norm, Dr. GRPO, by rows x max_completion_length, as TRL does), each divided by the
world size because DDP averages gradients. So a step's gradient does not depend on how it was split.
"""
import math
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from gcpo_fast.kernels import linear_logprobs, linear_policy_loss
from gcpo_fast.packing import PackedBatch, forward_hidden, lm_head_weight, pack_rows

IGNORE_INDEX = -100
SCHEDULER_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def autocast(cfg, device: torch.device):
    """bf16 autocast on CUDA when cfg.bf16 (weights and optimizer state stay fp32); nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()


def pack(mb: dict, mask_truncated: bool, device) -> PackedBatch:
    """The micro-batch's rows as one packed stream; truncated rows' targets ignored if mask_truncated."""
    packed = pack_rows(mb["prompt_ids"], mb["completion_ids"], device=device)
    if mask_truncated and any(mb["truncated"]):
        lengths = torch.tensor([len(c) for c in mb["completion_ids"]])
        drop = torch.repeat_interleave(torch.tensor(mb["truncated"]), lengths).to(device)
        packed.targets = packed.targets.masked_fill(drop, IGNORE_INDEX)
    return packed


def _head(model, dtype):
    # Under autocast the hidden states are bf16 while the lm_head weight is fp32; the fused op wants one
    # dtype, and the cast is differentiable, so the fp32 master weight still gets its gradient.
    weight, bias = lm_head_weight(model)
    return weight.to(dtype), None if bias is None else bias.to(dtype)


class PolicyLoss(torch.nn.Module):
    """The model and the fused loss as one module, so that DDP's hooks see the whole forward
    (gcpo_fast.packing: call forward_hidden from inside the wrapped module's forward)."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model = model
        self.options = dict(loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
                            epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta, beta=cfg.beta,
                            loss_agg_mode=cfg.loss_agg_mode, temperature=cfg.temperature,
                            max_completion_length=cfg.max_completion_length)

    def forward(self, packed: PackedBatch, advantages, old_logp, ref_logp, normalizer):
        hidden = forward_hidden(self.model, packed)[packed.completion_index]
        weight, bias = _head(self.model, hidden.dtype)
        return linear_policy_loss(hidden, weight, packed.targets, old_logp, advantages, packed.completion_cu_seqlens,
                                  bias=bias, ref_logp=ref_logp, normalizer=normalizer, compute_entropy=True,
                                  **self.options)


@torch.no_grad()
def behaviour_logprobs(model, mb: dict, cfg) -> torch.Tensor:
    """Per-token log-probs [N] of the micro-batch's completions under `model` as it is now: one forward-only
    fused pass (old log-probs of a reused batch, golden rows included, or the reference model's)."""
    device = next(model.parameters()).device
    packed = pack(mb, cfg.mask_truncated_completions, device)
    with autocast(cfg, device):
        hidden = forward_hidden(model, packed)[packed.completion_index]
        weight, bias = _head(model, hidden.dtype)
        return linear_logprobs(hidden, weight, packed.targets, temperature=cfg.temperature, bias=bias,
                               ignore_index=IGNORE_INDEX)


def step_normalizer(micro_batches: list[dict], cfg) -> float:
    """The aggregation denominator of one optimizer step, global over ranks (see the module docstring)."""
    tokens = sum(len(c) for mb in micro_batches for c, cut in zip(mb["completion_ids"], mb["truncated"])
                 if not (cut and cfg.mask_truncated_completions))
    rows = sum(len(mb["completion_ids"]) for mb in micro_batches)
    world = 1
    if torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        counts = torch.tensor([tokens, rows], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts)
        tokens, rows = counts.tolist()
    if cfg.loss_agg_mode == "token-mean":
        return max(tokens, 1) / world
    if cfg.loss_agg_mode == "seq-mean-token-sum-norm":
        return rows * cfg.max_completion_length / world
    return rows / world


def build_optimizer(model, cfg):
    """AdamW (weight decay on matrices only, not on norms and biases) and the warm-up + decay schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon)
    scheduler = get_scheduler(SCHEDULER_NAMES[cfg.lr_scheduler_type], optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
                              num_training_steps=cfg.max_steps)
    return optimizer, scheduler


def optimizer_step(module, optimizer, scheduler, micro_batches: list[dict], cfg) -> dict[str, float]:
    """Forward + backward of every micro-batch (gradients synced once, on the last), clip, AdamW step.
    Returns this rank's metrics: loss, grad_norm, learning_rate, entropy, clip ratios (token means)."""
    model = module.module.model if isinstance(module, DistributedDataParallel) else module.model
    device = next(model.parameters()).device
    normalizer = step_normalizer(micro_batches, cfg)
    loss_sum, tokens, stat_sums = 0.0, 0.0, {}
    for i, mb in enumerate(micro_batches):
        packed = pack(mb, cfg.mask_truncated_completions, device)
        last = i == len(micro_batches) - 1
        no_sync = module.no_sync() if isinstance(module, DistributedDataParallel) and not last else nullcontext()
        old, ref = (None if mb[k] is None else mb[k].to(device) for k in ("old_logp", "ref_logp"))
        with no_sync:
            with autocast(cfg, device):
                loss, stats = module(packed, mb["advantages"].to(device), old, ref, normalizer)
            loss.backward()
        n = stats.pop("num_tokens").item()
        loss_sum, tokens = loss_sum + loss.item(), tokens + n
        for name, value in stats.items():
            stat_sums[name] = stat_sums.get(name, 0.0) + value.item() * n
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {"loss": loss_sum, "grad_norm": grad_norm, "learning_rate": learning_rate}
    metrics.update({name: total / max(tokens, 1.0) for name, total in stat_sums.items() if name != "ratio_mean"})
    return metrics
