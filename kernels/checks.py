"""Input validation for the fused ops: every bad input gets an error that names the argument.

Checks that need the data (target range, cu_seqlens monotonicity) cost one small host sync each;
they run on O(N) tensors, never on [N, V] ones.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _same_device(named: dict) -> None:
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D tensor [N, d], got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [V, d], got shape {tuple(getattr(weight, 'shape', ()))}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, d] and weight [V, d] disagree on d: {hidden.shape[1]} vs {weight.shape[1]}")
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden and weight must be fp32/fp16/bf16, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got shape {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be fp32/fp16/bf16, got {bias.dtype}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _same_device({"hidden": hidden, "weight": weight, "targets": targets, "bias": bias})
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{idx}] = {int(targets[idx])} is outside [0, V={weight.shape[0]}) "
                         f"and is not ignore_index={ignore_index}")


def check_finite_lse(lse, hidden, weight, bias) -> None:
    """NaN/inf anywhere in a row's logits makes its logsumexp non-finite: name the culprit."""
    bad = ~torch.isfinite(lse)
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    if not bool(torch.isfinite(hidden[row]).all()):
        raise FloatingPointError(f"hidden has non-finite values (first at token {row}); "
                                 f"{int(bad.sum())} of {lse.numel()} tokens affected")
    culprit = "weight" if not bool(torch.isfinite(weight).all()) else \
        "bias" if bias is not None and not bool(torch.isfinite(bias).all()) else "the logits (overflow)"
    raise FloatingPointError(f"non-finite log-sum-exp at token {row}: {culprit} has non-finite values")


def check_cu_seqlens(cu_seqlens, n_tokens: int) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [B+1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != n_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at N={n_tokens}, got {first} ... {last}")
    if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def check_policy_inputs(logp, old_logp, ref_logp, advantages, cu_seqlens, mask, beta) -> torch.Tensor:
    """Validates the O(N) inputs of policy_loss; returns the mask (all True when None)."""
    if logp.dim() != 1:
        raise ValueError(f"logp must be [N], got shape {tuple(logp.shape)}")
    n = logp.shape[0]
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must match logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if mask is not None and mask.shape != logp.shape:
        raise ValueError(f"mask must match logp's shape {tuple(logp.shape)}, got {tuple(mask.shape)}")
    check_cu_seqlens(cu_seqlens, n)
    if advantages.dim() != 1 or advantages.shape[0] != cu_seqlens.numel() - 1:
        raise ValueError(f"advantages must be [B] = [{cu_seqlens.numel() - 1}] (one per row of cu_seqlens), "
                         f"got shape {tuple(advantages.shape)}")
    if not advantages.is_floating_point():
        raise TypeError(f"advantages must be a float tensor, got {advantages.dtype}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs)")
    _same_device({"logp": logp, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": advantages,
                  "cu_seqlens": cu_seqlens, "mask": mask})
    return torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
