"""The update: packed micro-batches -> hidden states -> fused policy loss -> backward -> one optimizer step.

    from gcpo_fast.update import ModelWithLoss, OptimizerConfig, build_optimizer, optimizer_step

    policy = parallel.parallelize(ModelWithLoss(model, cfg.loss_config()))   # the fused op's switches
    optimizer, scheduler = build_optimizer(model, cfg.optim, max_steps)
    metrics = optimizer_step(policy, optimizer, scheduler, micro_batches, cfg.optim, loss_config, bf16)

A micro-batch is a gcpo_fast.packing.PackedBatch (packed once by the round, with its advantages and log-probs);
the model runs to its last hidden states only, and `linear_policy_loss` takes the states that predict
completion tokens together with the lm_head weight, so [N, V] logits never exist.

The aggregation's denominator is the whole optimizer step's, summed over micro-batches and ranks
(docs/algorithms.md, "Aggregation and the normaliser"): token-mean divides by the step's unmasked completion
tokens, seq-mean-* by its rows (seq-mean-token-sum-norm, Dr. GRPO, by rows x max_completion_length, as TRL
does), each divided by the world size because DDP and FSDP average gradients. So a step's gradient does not
depend on how it was split.
"""

import math
from dataclasses import dataclass

import torch
from transformers import get_scheduler

from gcpo_fast.distributed.parallel import all_reduce, rank_and_world
from gcpo_fast.errors import require
from gcpo_fast.kernels import IGNORE_INDEX, LossInputs, PolicyLossConfig, linear_logprobs, linear_policy_loss
from gcpo_fast.models.loading import autocast
from gcpo_fast.options import check_options, option
from gcpo_fast.packing import PackedBatch, forward_hidden, head_inputs
from gcpo_fast.scoring import SamplingCorrection

SCHEDULER_NAMES = {
    "constant": "constant_with_warmup",
    "cosine": "cosine",
    "linear": "linear",
    "polynomial": "polynomial",  # (1 - progress) ** lr_scheduler_power, to 0
}
# The shipped model's learning rate and warm-up, searched on validation problems (benchmarks/tune_default.py,
# docs/results.md): without warm-up Adam's first steps move every weight by about the learning rate, and two-digit
# subtraction loses a third of its accuracy in 10 steps
SHIPPED_MODEL_LR = 4e-4
SHIPPED_MODEL_WARMUP = 0.1


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (TRL's names)."""

    _argument_group_name = "optimizer"

    learning_rate: float | None = option(
        None,
        f"AdamW learning rate (default: {SHIPPED_MODEL_LR:g} for the shipped 1M-parameter model, 1e-6 for any other "
        "--model, as TRL)",
    )
    lr_scheduler_type: str = option("linear", "learning-rate schedule after warm-up", choices=tuple(SCHEDULER_NAMES))
    lr_scheduler_power: float = option(
        1.0, "--lr_scheduler_type polynomial: the decay's power (1: linear; 2 falls sooner, to a quarter at half-way)"
    )
    warmup_ratio: float | None = option(
        None,
        f"fraction of max_steps spent warming the learning rate up from 0 (default: {SHIPPED_MODEL_WARMUP:g} for the "
        "shipped model, 0 for any other --model, as TRL)",
    )
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (<= 0: no clipping)")

    def __post_init__(self):
        check_options(self)
        require(
            self.learning_rate is None or self.learning_rate >= 0,
            f"learning_rate must be >= 0, got {self.learning_rate}",
        )
        # torch.optim.AdamW's own checks, here so that they fail before the model loads
        for name in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("adam_epsilon", "weight_decay"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(self.lr_scheduler_power > 0, f"lr_scheduler_power must be > 0, got {self.lr_scheduler_power}")
        require(
            self.warmup_ratio is None or 0 <= self.warmup_ratio <= 1,
            f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}",
        )


class ModelWithLoss(torch.nn.Module):
    """The model and the fused loss as one module, so that a parallel wrapper's hooks see the whole forward
    (gcpo_fast.packing: call forward_hidden from inside the wrapped module's forward).

    correction: the sampling-mismatch correction of rows an engine sampled elsewhere (packed.engine_logp set), the
    one place its weight is computed: from the round's old log-probs when the round is reused, else from this
    forward's own (one no-grad pass of the fused log-prob op over the hidden states at hand, not a second decoder
    forward). Its sampling/* metrics join the stats."""

    def __init__(self, model, loss_config: PolicyLossConfig, correction: SamplingCorrection | None = None):
        super().__init__()
        self.model, self.loss_config, self.correction = model, loss_config, correction

    def forward(self, packed: PackedBatch, normalizer: float):
        hidden, weight, bias = head_inputs(forward_hidden(self.model, packed)[packed.completion_index], self.model)
        sampling_weight, found = None, {}
        if self.correction is not None and packed.engine_logp is not None:
            old = packed.old_logp
            if old is None:
                with torch.no_grad():
                    old = linear_logprobs(
                        hidden.detach(), weight.detach(), packed.targets, self.loss_config.temperature,
                        bias=None if bias is None else bias.detach(), ignore_index=IGNORE_INDEX,
                    )  # fmt: skip
            sampling_weight, found = self.correction.weight(packed, old)
        inputs = LossInputs(
            packed.advantages,
            packed.completion_cu_seqlens,
            old_logp=packed.old_logp,
            ref_logp=packed.ref_logp,
            sampling_weight=sampling_weight,
            golden=packed.golden,
            normalizer=normalizer,
        )
        loss, stats = linear_policy_loss(
            hidden, weight, packed.targets, inputs, self.loss_config, bias=bias, compute_entropy=True
        )
        return loss, {**stats, **found}


def step_normalizer(micro_batches: list[PackedBatch], loss: PolicyLossConfig) -> float:
    """The aggregation denominator of one optimizer step, global over ranks (see the module docstring)."""
    tokens = sum(mb.num_counted_tokens for mb in micro_batches)
    rows = sum(mb.num_rows for mb in micro_batches)
    world = rank_and_world()[1]
    tokens, rows = all_reduce([tokens, rows])
    if loss.loss_agg_mode == "token-mean":
        return max(tokens, 1) / world
    if loss.loss_agg_mode == "seq-mean-token-sum-norm":
        return rows * loss.max_completion_length / world
    return rows / world


def build_optimizer(model, cfg: "OptimizerConfig", max_steps: int):
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
        num_warmup_steps=math.ceil((cfg.warmup_ratio or 0.0) * max_steps),  # None (not resolved by a run): TRL's 0
        num_training_steps=max_steps,
        # transformers' polynomial decays to lr_end (its default 1e-7 would be above a small learning rate)
        scheduler_specific_kwargs=dict(power=cfg.lr_scheduler_power, lr_end=0.0)
        if cfg.lr_scheduler_type == "polynomial"
        else None,
    )
    return optimizer, scheduler


def optimizer_step(
    policy,
    optimizer,
    scheduler,
    micro_batches: list[PackedBatch],
    cfg: "OptimizerConfig",
    loss: PolicyLossConfig,
    bf16: bool,
) -> dict[str, float]:
    """Forward + backward of every micro-batch (DDP syncs gradients once, on the last), clip, AdamW step.
    policy: gcpo_fast.distributed.parallel.Policy or FSDPPolicy. Returns this rank's metrics: loss, grad_norm,
    learning_rate, entropy, clip ratios (token means), and step_skipped (1.0 when the loss or the gradient norm was not
    finite on some rank: then neither the optimizer nor the scheduler stepped and the gradients are dropped)."""
    device = policy.device  # not the parameters': FSDP's CPU offload keeps them on the host
    normalizer = step_normalizer(micro_batches, loss)
    loss_sum, tokens, stat_sums = 0.0, 0.0, {}
    for i, mb in enumerate(micro_batches):
        try:
            with policy.no_sync(last=i == len(micro_batches) - 1):
                with autocast(bf16, device):
                    mb_loss, stats = policy.module(mb.to(device), normalizer)
                mb_loss.backward()
        except FloatingPointError:
            # The fused op found non-finite logits (weights or activations overflowed): a non-finite step.
            # Under DDP this is safe when every rank fails alike (non-finite weights are the same everywhere);
            # an overflow on one rank's data alone would leave the others waiting in the gradient all-reduce.
            loss_sum = math.nan
            break
        n = stats.pop("num_tokens").item()
        loss_sum, tokens = loss_sum + mb_loss.item(), tokens + n
        for name, value in stats.items():
            stat_sums[name] = accumulate(name, stat_sums.get(name), value.item(), n)
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
    extreme = ("/min", "/max")
    metrics.update(
        {
            name: total if name.endswith(extreme) else total / max(tokens, 1.0)
            for name, total in stat_sums.items()
            if name != "ratio_mean"
        }
    )
    return metrics


def accumulate(name: str, total: float | None, value: float, tokens: float) -> float:
    """A statistic over the step's micro-batches: the extremes of /min and /max ones, else the token-weighted sum
    (divided by the step's tokens at the end)."""
    if name.endswith("/min"):
        return value if total is None else min(total, value)
    if name.endswith("/max"):
        return value if total is None else max(total, value)
    return (total or 0.0) + value * tokens


def weights_finite(model) -> bool:
    """Whether every parameter of the model (this rank's, agreed over ranks) is finite: checked before a save."""
    # under FSDP a parameter is a DTensor: check this rank's shard, the reduction covers the rest
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    return all_reduce([float(local)], "min")[0] == 1.0
