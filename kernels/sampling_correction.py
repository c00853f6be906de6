"""The sampling-mismatch weight of rows sampled by another engine (vLLM), as TRL 1.16 computes it.

    from gcpo_fast.kernels import sampling_weights
    weight, metrics = sampling_weights(old_logp [N], sampling_logp [N], cu_seqlens [B+1], mask [N],
                                       mode="sequence_mask", clip_min=None, clip_max=3.0,
                                       golden=golden [B] bool)
    loss, stats = linear_policy_loss(..., LossInputs(..., old_logp=old_logp, sampling_weight=weight), config)

An engine's log-probs v_t of the tokens it sampled differ from the trainer's old_t for the same
weights (other kernels, precision, reduction order). Each token's policy term is then weighted by
a detached ratio (TRL's `vllm_importance_sampling_*`, `GRPOTrainer._generate_and_score_completions`):

    d_t = (old_t - v_t) m_t, NaN -> 0      (a token the engine could not score gets ratio 1)
    token_*:     r_t = exp(d_t)
    sequence_*:  r_i = exp(sum_{t in i} d_t), the same for every token of row i
    *_truncate:  r <- clamp(r, clip_min, clip_max)          (a bound left as None is not applied)
    *_mask:      r <- 0 where r < clip_min or r > clip_max  (None: -inf / +inf)

The sequence ratio is the SUM of the row's log-ratios, the likelihood ratio of the whole sequence,
as in TRL 1.16 (not a per-token mean: TRL's default clip_max = 3.0 is a bound on that product).
Rows flagged in `golden` (golden answers, never sampled by the engine; their sampling_logp
is ignored and may be NaN) get weight 1 and are left out of the metrics. Tokens with m_t = 0
carry their row's ratio (sequence modes) or that of d_t = 0; they do not count in the loss.

Metrics (0-d fp32 tensors, left on the device; TRL's names and definitions, over sampled rows only):
    sampling/sampling_logp_difference/{mean,max}   of |old_t - v_t| over the tokens that count
                                                    (m_t = 1) where it is not NaN
    sampling/importance_sampling_ratio/{min,mean,max}   of r over the tokens that count (token
                                                         modes) or over rows (sequence modes)
Each is 0 when there is nothing to measure, as in TRL.
"""

from __future__ import annotations

import torch

from gcpo_fast.kernels.checks import check_cu_seqlens, check_number, settle
from gcpo_fast.kernels.policy_loss import row_index, row_sums

SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _check(old_logp, sampling_logp, cu_seqlens, mask, golden, mode, clip_min, clip_max):
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
    clip_min = None if clip_min is None else check_number("clip_min", clip_min, lambda c: c >= 0, ">= 0")
    clip_max = None if clip_max is None else check_number("clip_max", clip_max, lambda c: c > 0, "> 0")
    if clip_min is not None and clip_max is not None and clip_min > clip_max:
        raise ValueError(f"clip_min must not exceed clip_max, got {clip_min} > {clip_max}")
    for name, t in (("old_logp", old_logp), ("sampling_logp", sampling_logp)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 1-D float tensor [N]")
    n = old_logp.shape[0]
    for name, t in (("sampling_logp", sampling_logp), ("mask", mask)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (n,)):
            raise ValueError(f"{name} must match old_logp's shape ({n},), got {tuple(t.shape)}")
    num_rows = cu_seqlens.numel() - 1 if isinstance(cu_seqlens, torch.Tensor) else -1
    if golden is not None and (golden.shape != (num_rows,) or golden.dtype != torch.bool):
        raise ValueError(f"golden must be a bool tensor [B] = [{num_rows}], got {tuple(golden.shape)} {golden.dtype}")
    devices = {t.device for t in (old_logp, sampling_logp, cu_seqlens, mask, golden) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    settle(check_cu_seqlens(cu_seqlens, n))
    return clip_min, clip_max


def _stats(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(min, mean, max) of x where keep, each 0 when nothing is kept; no host sync."""
    count = keep.float().sum()
    empty = count == 0
    zero = torch.zeros((), device=x.device)
    low = torch.where(keep, x, torch.full_like(x, float("inf"))).amin() if x.numel() else zero
    high = torch.where(keep, x, torch.full_like(x, float("-inf"))).amax() if x.numel() else zero
    mean = torch.where(keep, x, zero).sum() / count.clamp(min=1.0)
    return torch.where(empty, zero, low), torch.where(empty, zero, mean), torch.where(empty, zero, high)


def sampling_weights(
    old_logp,
    sampling_logp,
    cu_seqlens,
    mask=None,
    *,
    mode="sequence_mask",
    clip_min=None,
    clip_max=3.0,
    golden=None,
):
    """The per-token weight [N] fp32 (detached) for `sampling_weight=` and its metrics (module docstring).

    old_logp [N]: the trainer's log-probs of the sampled tokens (behaviour policy, same temperature);
    sampling_logp [N]: the engine's; cu_seqlens int [B+1]; mask [N] bool or None (all count);
    golden [B] bool or None: rows the engine did not sample (golden answers), weight 1.
    """
    clip_min, clip_max = _check(old_logp, sampling_logp, cu_seqlens, mask, golden, mode, clip_min, clip_max)
    n, num_rows = old_logp.shape[0], cu_seqlens.numel() - 1
    old, sampled = old_logp.detach().float(), sampling_logp.detach().float()
    m = torch.ones(n, dtype=torch.bool, device=old.device) if mask is None else mask.bool()
    rows = row_index(cu_seqlens, n)
    sampled_row = torch.ones(num_rows, dtype=torch.bool, device=old.device) if golden is None else ~golden
    sampled_tok = sampled_row[rows]

    diff = torch.nan_to_num((old - sampled) * m, nan=0.0)
    sequence_level = mode.startswith("sequence")
    log_ratio = row_sums(torch.where(sampled_tok, diff, 0.0), rows, num_rows) if sequence_level else diff
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        if clip_min is not None or clip_max is not None:
            ratio = ratio.clamp(min=clip_min, max=clip_max)
    else:
        low = -float("inf") if clip_min is None else clip_min
        high = float("inf") if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)

    weight = torch.where(sampled_tok, ratio[rows] if sequence_level else ratio, 1.0)
    delta = (old - sampled).abs()
    counted = m & sampled_tok & ~torch.isnan(delta)
    _, delta_mean, delta_max = _stats(delta, counted)
    r_min, r_mean, r_max = _stats(ratio, sampled_row if sequence_level else m & sampled_tok)
    metrics = {
        "sampling/sampling_logp_difference/mean": delta_mean,
        "sampling/sampling_logp_difference/max": delta_max,
        "sampling/importance_sampling_ratio/min": r_min,
        "sampling/importance_sampling_ratio/mean": r_mean,
        "sampling/importance_sampling_ratio/max": r_max,
    }
    return weight, metrics
