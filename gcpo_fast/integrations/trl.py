"""TRL's GRPOTrainer with our fused loss: a drop-in subclass, checked against TRL's own loss as it trains.

    from gcpo_fast.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)
    trainer.train()                       # generation, rewards, vLLM, logging: TRL's; the loss: linear_policy_loss

Only the loss changes. `compute_loss` runs the model to its last hidden states (the lm_head sees one
position per row: `logits_to_keep=1`), takes the states of TRL's padded [B, P+C] batch that predict
completion tokens as packed rows (cu_seqlens from the completion mask), and hands them with the lm_head
weight to `linear_policy_loss`, with TRL's options mapped onto the kernel's math switches (`loss_config`:
TRL's loss_type grpo | dapo | dr_grpo | bnpo picks only the aggregation, which `trl_divisor` gives with
TRL's divisor; importance_sampling_level, epsilon / epsilon_high, delta and temperature carry over).
The metrics TRL logs from its loss (entropy, clip_ratio/{low,high,region}_mean, low_min, high_max) are
computed from the fused op's per-token log-probs with TRL's definitions: token means at the token level,
means over rows at the sequence level, reduced over ranks as TRL does.

Self-check: on the first micro-batch (of training, and of evaluation) and, with `self_check_every=K`,
on the first micro-batch of every K-th optimizer step, TRL's own `compute_loss` runs on the same inputs
(no grad) and a `SelfCheckError` is raised if the two losses differ by more than `self_check_tolerance`
(default 1e-5 in fp32, 1e-2 under bf16/fp16) of the loss scale. The loss of group-normalised advantages
can be ~0 whatever the divisor, so the check also compares both losses with every advantage set to 1
(the "probe"), whose size is the divisor's footprint; the probe's magnitude is the scale. A check costs
two forwards of TRL's loss and one of ours, without gradients. Under DDP every rank raises, or none.

Not supported (a ValueError naming the option at construction; use trl.GRPOTrainer for these): beta != 0,
top_entropy_quantile < 1, entropy_coef / use_adaptive_entropy, off_policy_mask_threshold, vLLM's
importance-sampling correction (use_vllm with vllm_importance_sampling_correction), loss types cispo,
sapo, vespo, luspo, MoE router aux loss, lm_heads that are not a plain Linear (a PEFT adapter on it) and
models that transform their logits (softcapping, logit scale). Vision inputs and token types raise on
the first batch.
The fused op does take the per-token weight the vLLM correction needs (LossInputs.sampling_weight, as the
trainer's own vLLM path uses it); this subclass does not pass TRL's importance_sampling_ratio to it yet.
The model must accept `output_hidden_states` and `logits_to_keep` (every causal LM in transformers does).
Tested also with two CPU ranks under DDP (the forward goes through the wrapper, so its gradient hooks
run) and with gradient checkpointing.

TRL internals this relies on, identical in TRL 1.10.0 to 1.16.0 (SUPPORTED_TRL; checked by diffing
`_compute_loss` across those releases; tested on 1.10.0 and 1.16.0): the loss lives in `compute_loss`;
the batch keys prompt_ids / prompt_mask (left-padded), completion_ids / completion_mask (right-padded),
tool_mask (optional), advantages [B], old_per_token_logps [B, C] (absent: on-policy), num_items_in_batch;
the divisors of `trl_divisor` (before 1.10.0 dapo divided by num_items_in_batch / world alone);
`self._metrics[mode]`, the lists TRL logs from; `current_gradient_accumulation_steps` (transformers' Trainer).
Other versions are refused at import: a divisor copied from one version silently mis-scales another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import trl
    from trl import GRPOTrainer
except ImportError as err:
    raise ImportError("gcpo_fast.integrations.trl needs TRL: pip install 'trl>=1.10,<1.17'") from err

from gcpo_fast.kernels import Backend, LossInputs, PolicyLossConfig, linear_policy_loss
from gcpo_fast.kernels.policy_loss import row_index, row_sums
from gcpo_fast.packing import lm_head_weight

SUPPORTED_TRL = ((1, 10), (1, 16))  # first and last (major, minor) whose loss layout this module reproduces
SUPPORTED_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
# Batch keys of multimodal models (and token types) that TRL passes to the model; only token ids are passed here.
UNSUPPORTED_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_sizes",
    "spatial_shapes",
    "num_tiles",
    "image_position_ids",
    "token_type_ids",
    "mm_token_type_ids",
)


def check_trl_version(version: str) -> None:
    """Raise ImportError unless `version` is in SUPPORTED_TRL (inclusive)."""
    from packaging.version import Version

    release = Version(version).release[:2]
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_TRL
    if not SUPPORTED_TRL[0] <= release <= SUPPORTED_TRL[1]:
        raise ImportError(
            f"gcpo_fast.integrations.trl supports trl {lo_major}.{lo_minor}.x to {hi_major}.{hi_minor}.x, "
            f"installed: trl {version} (pip install 'trl>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}')"
        )


check_trl_version(trl.__version__)


class SelfCheckError(RuntimeError):
    """The fused loss and TRL's own loss disagree on the same inputs."""


def unsupported_option(args, model=None) -> str | None:
    """The first option (as `name=value: why`) this trainer cannot reproduce, or None. Without a model
    (before it is loaded) only the GRPOConfig is checked."""
    config = None if model is None else model.config.get_text_config()
    checks = (
        ("loss_type", args.loss_type, args.loss_type not in SUPPORTED_LOSS_TYPES, f"supported: {SUPPORTED_LOSS_TYPES}"),
        ("beta", args.beta, args.beta != 0.0, "no KL term to a reference model"),
        ("top_entropy_quantile", args.top_entropy_quantile, args.top_entropy_quantile < 1.0, "no entropy mask"),
        ("entropy_coef", args.entropy_coef, args.entropy_coef != 0.0, "no entropy bonus"),
        ("use_adaptive_entropy", args.use_adaptive_entropy, args.use_adaptive_entropy, "no entropy bonus"),
        (
            "off_policy_mask_threshold",
            args.off_policy_mask_threshold,
            args.off_policy_mask_threshold is not None,
            "no off-policy sequence mask",
        ),
        (
            "vllm_importance_sampling_correction",
            args.vllm_importance_sampling_correction,
            args.use_vllm and args.vllm_importance_sampling_correction,
            "TRL's importance_sampling_ratio is not passed to the fused op's sampling_weight yet; "
            "set it False or use trl.GRPOTrainer",
        ),
        (
            "router_aux_loss_coef",
            args.router_aux_loss_coef,
            hasattr(config, "output_router_logits") and args.router_aux_loss_coef != 0.0,
            "no MoE load-balancing loss",
        ),
    )
    for name, value, bad, why in checks:
        if bad:
            return f"{name}={value!r}: {why}"
    if model is None:
        return None
    try:
        lm_head_weight(model)
    except ValueError as err:
        return str(err)
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"lm_head={type(head).__name__}: the fused op needs a plain Linear lm_head (no adapter on it)"
    return None


def _raise_if_unsupported(args, model=None) -> None:
    problem = unsupported_option(args, model)
    if problem is not None:
        raise ValueError(f"FusedGRPOTrainer: {problem}")


def trl_divisor(
    loss_type: str,
    mask,
    inputs: dict,
    accumulation_steps: int,
    num_processes: int,
    steps_per_generation: int,
    max_completion_length: int,
    train: bool,
):
    """(loss_agg_mode, normalizer) so that linear_policy_loss divides exactly as TRL 1.10-1.16 does.

    GA = accumulation_steps in training, 1 in evaluation; B = rows of this micro-batch.
    grpo: mean over rows of each row's token mean, / GA      -> seq-mean-token-mean over B x GA
    bnpo: token sum / (masked tokens of this micro-batch x GA)  -> token-mean over that
    dr_grpo: token sum / (B x max_completion_length x GA)     -> token sum over that
    dapo: token sum / (num_items_in_batch / world x GA / steps_per_generation); in evaluation the
          generation batch is neither split nor accumulated: / (num_items_in_batch / world)
    """
    ga = accumulation_steps if train else 1
    rows = mask.shape[0]
    if loss_type == "grpo":
        return "seq-mean-token-mean", rows * ga
    if loss_type == "bnpo":
        return "token-mean", mask.sum().float().clamp(min=1.0) * ga
    if loss_type == "dr_grpo":
        return "seq-mean-token-sum-norm", rows * max_completion_length * ga
    if loss_type == "dapo":
        items = inputs["num_items_in_batch"].clamp(min=1.0).float() / num_processes
        return "token-mean", items * ga / steps_per_generation if train else items
    raise ValueError(f"loss_type={loss_type!r}: supported: {SUPPORTED_LOSS_TYPES}")


class FusedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is `linear_policy_loss`; see the module docstring.

    Extra arguments: self_check_every (int or None: check the first micro-batch only), self_check_tolerance
    (None: 1e-5 in fp32, 1e-2 under bf16/fp16), backend (a Backend or "triton" | "torch" | "auto": by device).
    """

    def __init__(
        self,
        *args,
        self_check_every: int | None = None,
        self_check_tolerance: float | None = None,
        backend: Backend | str = Backend.AUTO,
        **kwargs,
    ):
        if self_check_every is not None and self_check_every < 1:
            raise ValueError(f"FusedGRPOTrainer: self_check_every must be >= 1 or None, got {self_check_every}")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # the options first: GRPOTrainer would load a reference model or vLLM for some
            _raise_if_unsupported(config)
        super().__init__(*args, **kwargs)
        _raise_if_unsupported(self.args, self.accelerator.unwrap_model(self.model))
        low_precision = self.args.bf16 or self.args.fp16
        self.self_check_every = self_check_every
        self.self_check_tolerance = (
            (1e-2 if low_precision else 1e-5) if self_check_tolerance is None else self_check_tolerance
        )
        self.backend = backend
        # GRPOConfig leaves epsilon_high None when it equals epsilon.
        self.clip_box = (
            self.args.epsilon,
            self.args.epsilon if self.args.epsilon_high is None else self.args.epsilon_high,
        )
        self._checked_at = {}  # mode -> global step of the last self-check

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("FusedGRPOTrainer does not return outputs (as GRPOTrainer)")
        mode = "train" if self.model.training else "eval"
        loss, stats, packed = self.fused_loss(model, inputs, mode)
        self.log_metrics(mode, stats, packed)
        if self._self_check_due(mode):
            self.self_check(model, inputs, loss.detach(), mode)
        return loss

    def completion_hidden(self, model, inputs: dict):
        """Last hidden states [B, C, d] of the positions that predict the C completion slots, through the
        (possibly DDP-wrapped) model's own forward so its hooks run; the lm_head sees one position per row."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with self.accelerator.autocast():
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=True,
                logits_to_keep=1,
                use_cache=False,
            )
        # The state at position p predicts token p + 1: completion slot j is predicted at P - 1 + j.
        return out.hidden_states[-1][:, prompt_ids.shape[1] - 1 : -1]

    def fused_loss(self, model, inputs: dict, mode: str):
        """(loss, stats, packed) of one micro-batch: TRL's loss, divided as TRL divides it."""
        present = [k for k in UNSUPPORTED_INPUTS if inputs.get(k) is not None]
        if present:
            raise ValueError(
                f"FusedGRPOTrainer: model inputs beyond token ids ({', '.join(present)}) are not supported"
            )
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError(
                f"FusedGRPOTrainer: advantages must be one per row [B], got shape {tuple(advantages.shape)}"
            )
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        mask = mask.bool()
        hidden = self.completion_hidden(model, inputs)[mask]  # [N, d], rows concatenated in order
        targets = inputs["completion_ids"][mask]
        cu_seqlens = F.pad(mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        old = inputs.get("old_per_token_logps")
        old = None if old is None else old[mask]  # None: on-policy, ratios are 1 and carry the gradient
        weight, bias = lm_head_weight(self.accelerator.unwrap_model(model))
        # TRL's head runs in fp32 with cast_lm_head_to_fp32, else in the hidden states' (autocast) dtype.
        dtype = torch.float32 if self.args.cast_lm_head_to_fp32 else hidden.dtype
        hidden, weight, bias = hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        agg, normalizer = self.divisor(mask, inputs, mode)
        loss, stats = linear_policy_loss(
            hidden,
            weight,
            targets,
            LossInputs(advantages, cu_seqlens, old_logp=old, normalizer=normalizer),
            self.loss_config(agg),
            bias=bias,
            compute_entropy=True,
            return_logp=True,
        )
        return loss, stats, (old, advantages, cu_seqlens)

    def loss_config(self, loss_agg_mode: str) -> PolicyLossConfig:
        """The kernel's switches for TRL's options: TRL's loss types differ only in the aggregation (given)."""
        return PolicyLossConfig(
            importance_sampling_level=self.args.importance_sampling_level,
            epsilon_low=self.clip_box[0],
            epsilon_high=self.clip_box[1],
            loss_agg_mode=loss_agg_mode,
            delta=self.args.delta,
            temperature=self.args.temperature,
            backend=self.backend,
        )

    def divisor(self, mask, inputs: dict, mode: str):
        """(loss_agg_mode, normalizer) of this micro-batch: `trl_divisor` with this trainer's state."""
        return trl_divisor(
            self.args.loss_type,
            mask,
            inputs,
            self.current_gradient_accumulation_steps,
            self.accelerator.num_processes,
            self.args.steps_per_generation,
            self.args.max_completion_length,
            mode == "train",
        )

    def log_metrics(self, mode: str, stats: dict, packed) -> None:
        """TRL's loss metrics from the fused op's stats, with TRL 1.10-1.16's definitions."""
        old, advantages, cu_seqlens = packed
        n_tok = stats["num_tokens"]
        metrics = self._metrics[mode]
        metrics["entropy"].append(self._global_mean(stats["entropy"] * n_tok, n_tok))
        logp = stats["logp"]
        num_rows = advantages.shape[0]
        rows = row_index(cu_seqlens, logp.shape[0])
        row_len = row_sums(torch.ones_like(logp), rows, num_rows)
        log_ratio = torch.zeros_like(logp) if old is None else logp - old.float()
        lo, hi = 1.0 - self.clip_box[0], 1.0 + self.clip_box[1]
        if self.args.importance_sampling_level == "token":
            ratio, adv = torch.exp(log_ratio), advantages[rows]
        else:  # one ratio per row; TRL's means are then over rows, empty rows included
            ratio, adv = torch.exp(row_sums(log_ratio, rows, num_rows) / row_len.clamp(min=1.0)), advantages
        low, high = ((ratio < lo) & (adv < 0)).float(), ((ratio > hi) & (adv > 0)).float()
        count = n_tok if self.args.importance_sampling_level == "token" else torch.tensor(float(num_rows))
        for name, flags in (("low", low), ("high", high), ("region", torch.maximum(low, high))):
            metrics[f"clip_ratio/{name}_mean"].append(self._global_mean(flags.sum(), count))
        if self.args.importance_sampling_level == "token":  # per-row token means (NaN for empty rows, as TRL)
            low, high = row_sums(low, rows, num_rows) / row_len, row_sums(high, rows, num_rows) / row_len
        low, high = self.accelerator.gather(low), self.accelerator.gather(high)
        metrics["clip_ratio/low_min"].append(_nan_reduce(low, torch.min))
        metrics["clip_ratio/high_max"].append(_nan_reduce(high, torch.max))

    def _global_mean(self, total, count) -> float:
        device = self.accelerator.device
        totals = self.accelerator.reduce(
            torch.stack([total.float().to(device), count.float().to(device)]), reduction="sum"
        )
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _self_check_due(self, mode: str) -> bool:
        step = self.state.global_step
        if mode not in self._checked_at:
            return True
        every = self.self_check_every
        return mode == "train" and every is not None and step % every == 0 and self._checked_at[mode] != step

    def self_check(self, model, inputs: dict, loss, mode: str) -> None:
        """Raise SelfCheckError if TRL's compute_loss on these inputs differs from ours (module docstring)."""
        self._checked_at[mode] = self.state.global_step
        saved = {name: list(values) for name, values in self._metrics[mode].items()}
        probe = {**inputs, "advantages": torch.ones_like(inputs["advantages"])}
        with torch.no_grad():
            trl_loss = super().compute_loss(model, inputs)
            trl_probe = super().compute_loss(model, probe)
            our_probe = self.fused_loss(model, probe, mode)[0]
        self._metrics[mode].clear()  # TRL's compute_loss logged its metrics: keep ours only
        self._metrics[mode].update(saved)
        scale = trl_probe.abs().clamp(min=1e-12)
        error = torch.maximum((loss - trl_loss).abs(), (our_probe - trl_probe).abs()) / scale
        worst = self.accelerator.gather(error.reshape(1).float()).max().item()  # every rank raises, or none
        if not worst <= self.self_check_tolerance:
            raise SelfCheckError(
                f"FusedGRPOTrainer self-check ({mode}, step {self.state.global_step}, loss_type="
                f"{self.args.loss_type}, trl {trl.__version__}): fused loss {loss.item():.8g} vs TRL's "
                f"{trl_loss.item():.8g}, unit-advantage probe {our_probe.item():.8g} vs {trl_probe.item():.8g}: "
                f"relative error {worst:.3g} > tolerance {self.self_check_tolerance:g}"
            )


def _nan_reduce(values, reduce) -> float:
    """min / max ignoring NaNs (NaN if all are), as TRL's nanmin / nanmax."""
    kept = values[~torch.isnan(values)]
    return reduce(kept).item() if kept.numel() else float("nan")
