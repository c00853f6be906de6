"""Input validation for the fused ops: every bad input gets an error that names the argument.

What syncs with the host and what does not (a sync stalls the CPU until the GPU catches up):

- Python types: a list or an array where a tensor belongs is a TypeError naming the argument
  (`check_tensor`; LossInputs checks its fields when built).
- Python scalars (temperature, normalizer as a number, and every option of PolicyLossConfig:
  importance_sampling_level, epsilons, delta, clip_ratio_c, beta, max_completion_length, golden_objective,
  golden_shaping_gamma, checked when the config is built) and tensor shapes, dtypes and devices
  (golden: bool [B]; required by golden_objective "shaped"): checked eagerly on the host, no sync.
- Tensor contents (targets inside [0, V), cu_seqlens starting at 0, ending at N and non-decreasing,
  finite old_logp / ref_logp / advantages, a finite non-negative sampling_weight, a finite positive
  normalizer given as a tensor): each check is a 0-d device flag; `settle` stacks them all and
  reads them back with ONE host sync per call, before any kernel launches (a bad cu_seqlens would
  make the kernels read out of bounds). Only when a flag is set does building the message sync again.
  Values must be finite at every position, masked ones included (a NaN times a 0 mask is still
  NaN: put 0 there); ref_logp is checked only when beta > 0, the only case that reads it.
- After the forward, `check_finite_lse` costs one more sync (linear ops only): NaN/inf in hidden,
  weight or bias shows up as a non-finite log-sum-exp.
So `policy_loss` syncs once and `linear_logprobs` / `linear_policy_loss` twice, whatever the batch
(`sampling_weights` once, for its cu_seqlens);
all the checks run on O(N) tensors, never on [N, V] ones. The torch backend reads cu_seqlens once
more where it must keep rows whole in its chunks (sequence level, off-policy: `plan_chunks`).
tests/test_linear_policy_loss.py counts these read-backs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A pending content check: (0-d bool device tensor, True when the input is bad; builds the message).
Pending = tuple[torch.Tensor, Callable[[], str]]


def settle(pending: list[Pending]) -> None:
    """Reads every pending flag with one host sync; raises ValueError for the first bad input."""
    if not pending:
        return
    flags = torch.stack([flag.reshape(()) for flag, _ in pending]).tolist()
    for bad, (_, message) in zip(flags, pending):
        if bad:
            raise ValueError(message())


def check_number(name: str, value, ok: Callable[[float], bool], rule: str) -> float:
    """`value` as a float if it is a finite real number for which ok(value) holds, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be a finite number {rule}, got {value}")
    return value


def check_tensor(name: str, value, optional: bool = False) -> None:
    """A TypeError naming `name` unless value is a tensor (or None when optional): a list or an array
    would otherwise fail deep inside with an AttributeError that names nothing."""
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _first_bad(name: str, bad: torch.Tensor, what: str) -> Pending:
    def message():
        return f"{name} has {int(bad.sum())} {what} value(s), the first at token {int(bad.nonzero()[0, 0])}"

    return bad.any(), message


def check_finite_values(name: str, t: torch.Tensor) -> Pending:
    return _first_bad(name, ~torch.isfinite(t), "non-finite")


def _same_device(named: dict) -> None:
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index) -> list[Pending]:
    """Shapes, dtypes and temperature eagerly; returns the pending target-range check."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        check_tensor(name, value)
    check_tensor("bias", bias, optional=True)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D tensor [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [V, d], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1), got shape (0, d): an empty vocabulary")
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
    check_number("temperature", temperature, lambda t: t > 0, "> 0")
    _same_device({"hidden": hidden, "weight": weight, "targets": targets, "bias": bias})
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))

    def message():
        idx = int(bad.nonzero()[0, 0])
        return (
            f"targets[{idx}] = {int(targets[idx])} is outside [0, V={weight.shape[0]}) "
            f"and is not ignore_index={ignore_index}"
        )

    return [(bad.any(), message)]


def check_finite_lse(lse, hidden, weight, bias) -> None:
    """NaN/inf anywhere in a row's logits makes its logsumexp non-finite: name the culprit."""
    bad = ~torch.isfinite(lse)
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    if not bool(torch.isfinite(hidden[row]).all()):
        raise FloatingPointError(
            f"hidden has non-finite values (first at token {row}); {int(bad.sum())} of {lse.numel()} tokens affected"
        )
    culprit = (
        "weight"
        if not bool(torch.isfinite(weight).all())
        else "bias"
        if bias is not None and not bool(torch.isfinite(bias).all())
        else "the logits (overflow)"
    )
    raise FloatingPointError(f"non-finite log-sum-exp at token {row}: {culprit} has non-finite values")


def check_cu_seqlens(cu_seqlens, n_tokens: int) -> list[Pending]:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [B+1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")

    def ends():
        return f"cu_seqlens must start at 0 and end at N={n_tokens}, got {int(cu_seqlens[0])} ... {int(cu_seqlens[-1])}"

    return [
        ((cu_seqlens[0] != 0) | (cu_seqlens[-1] != n_tokens), ends),
        ((cu_seqlens[1:] < cu_seqlens[:-1]).any(), lambda: "cu_seqlens must be non-decreasing"),
    ]


def check_normalizer(normalizer, device) -> list[Pending]:
    """A number is checked now; a tensor (a count reduced on the device) joins the pending checks."""
    if normalizer is None:
        return []
    if not isinstance(normalizer, torch.Tensor):
        check_number("normalizer", normalizer, lambda x: x > 0, "> 0")
        return []
    if normalizer.numel() != 1 or not normalizer.is_floating_point() or normalizer.device != device:
        raise ValueError(
            f"normalizer must be a number or a one-element float tensor on {device}, got "
            f"shape {tuple(normalizer.shape)} {normalizer.dtype} on {normalizer.device}"
        )
    bad = ~(torch.isfinite(normalizer) & (normalizer > 0)).reshape(())
    return [(bad, lambda: f"normalizer must be a finite number > 0, got {normalizer.item()}")]


def check_golden(golden, num_rows: int, golden_objective: str) -> None:
    """golden: None or a bool [B] tensor; golden_objective "shaped" needs it (else no row would be)."""
    if golden is None:
        if golden_objective == "shaped":
            raise ValueError(
                "golden_objective='shaped' needs golden (a bool [B] tensor: True for the "
                "golden rows, which take the shaped term)"
            )
        return
    if golden.shape != (num_rows,):
        raise ValueError(f"golden must be [B] = [{num_rows}] (one per row of cu_seqlens), got {tuple(golden.shape)}")
    if golden.dtype != torch.bool:
        raise TypeError(f"golden must be a bool tensor, got {golden.dtype}")


def check_policy_inputs(logp, inputs, config) -> tuple[torch.Tensor, list[Pending]]:
    """Validates the O(N) inputs of policy_loss (a LossInputs and a PolicyLossConfig): shapes eagerly,
    contents as pending checks (see the module docstring). Returns (the mask, all True when None; the
    pending checks)."""
    old_logp, ref_logp, sampling_weight, mask = inputs.old_logp, inputs.ref_logp, inputs.sampling_weight, inputs.mask
    advantages, cu_seqlens, golden, beta = inputs.advantages, inputs.cu_seqlens, inputs.golden, config.beta
    check_tensor("logp", logp)
    if logp.dim() != 1:
        raise ValueError(f"logp must be [N], got shape {tuple(logp.shape)}")
    n = logp.shape[0]
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("sampling_weight", sampling_weight)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must match logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if mask is not None and mask.shape != logp.shape:
        raise ValueError(f"mask must match logp's shape {tuple(logp.shape)}, got {tuple(mask.shape)}")
    pending = check_cu_seqlens(cu_seqlens, n)
    if advantages.dim() != 1 or advantages.shape[0] != cu_seqlens.numel() - 1:
        raise ValueError(
            f"advantages must be [B] = [{cu_seqlens.numel() - 1}] (one per row of cu_seqlens), "
            f"got shape {tuple(advantages.shape)}"
        )
    if not advantages.is_floating_point():
        raise TypeError(f"advantages must be a float tensor, got {advantages.dtype}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs)")
    check_golden(golden, advantages.shape[0], config.golden_objective)
    _same_device(
        {
            "logp": logp,
            "old_logp": old_logp,
            "ref_logp": ref_logp,
            "advantages": advantages,
            "cu_seqlens": cu_seqlens,
            "mask": mask,
            "sampling_weight": sampling_weight,
            "golden": golden,
        }
    )
    # Values must be finite everywhere, masked tokens included (a NaN times a 0 mask is still NaN).
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp if beta > 0 else None)):
        if t is not None:
            pending.append(check_finite_values(name, t))
    if sampling_weight is not None:
        pending.append(
            _first_bad(
                "sampling_weight", ~(torch.isfinite(sampling_weight) & (sampling_weight >= 0)), "negative or non-finite"
            )
        )
    pending += check_normalizer(inputs.normalizer, logp.device)
    return (torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()), pending
