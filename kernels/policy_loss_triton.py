"""Triton kernel for the O(N) half of the fused op: per-row ratios, clipped loss and d loss / d logp.

Same math as `policy_loss.policy_terms` (see the docstring of `policy_loss.py`); one program per
row of the packed batch (cu_seqlens [B+1]):

    pass 1: |o_i| = sum_t m_t; at sequence level also sum_t m_t (lp_t - old_t) and sum_t m_t c_t
    row   : s_i = exp(clamp(sum / |o_i|)), the row's clipped surrogate l_i and dl_i/ds_i
    pass 2: per token the weight w_t (from loss_agg_mode, the normalizer and |o_i|), the token's
            surrogate (token level) or l_i (sequence level) times c_t, the k3 KL term, and the gradient
                token level:    w_t c_t * dl_t/drho_t * rho_t
                sequence level: W_i * dl_i/ds_i * s_i / |o_i|,   W_i = sum_t w_t c_t m_t
            written to grad [N]; the row's loss and stat sums go to out [B, 6] fp32.
            A shaped row (SHAPED and shaped[i]) takes instead, per token at either level,
                l_t = -A_i f,  grad = w_t c_t * (-A_i) * f (1 - f),   f = sigmoid(lp_t - log gamma)
            and adds nothing to the clip sums.
c_t is the sampling weight (1 without one).

The row partials are summed by torch afterwards in a fixed order: no atomics, bitwise repeatable.
Inputs: logp, old_logp, ref_logp, sampling weight [N] fp32, mask [N] int8, advantages [B] fp32, shaped [B] int8,
cu_seqlens [B+1] int32, norm [1] fp32 (the aggregation's denominator). Output: grad [N] fp32, out [B, 6] fp32
(loss, clipped-low, clipped-high, clipped-region, ratio sum, k3 sum).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gcpo_fast.kernels.options import LossInputs, PolicyLossConfig
from gcpo_fast.kernels.policy_loss import LOG_RATIO_CLAMP, STAT_NAMES, aggregation_denominator, shaped_rows_of

BLOCK_TOKENS = 256
NUM_WARPS = 4


@triton.jit
def _clamped_exp(x, CLAMP: tl.constexpr):
    inside = (x >= -CLAMP) & (x <= CLAMP)
    return tl.exp(tl.minimum(tl.maximum(x, -CLAMP), CLAMP)), inside.to(tl.float32)


@triton.jit
def _surrogate(rho, A, eps_low, eps_high, delta, clip_c, HAS_DELTA: tl.constexpr, HAS_CLIP_C: tl.constexpr):
    """(loss, d loss / d rho, clipped-low flag, clipped-high flag); ties of the min average both slopes.

    Flags are fp32 0/1 (the interpreter cannot `&` a scalar comparison with a block one)."""
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    if HAS_DELTA:
        unclipped = tl.minimum(rho, delta)
        d_unclipped = (rho <= delta).to(tl.float32)
    else:
        unclipped = rho
        d_unclipped = rho * 0.0 + 1.0
    d_clipped = ((rho >= lo) & (rho <= hi)).to(tl.float32)
    u = unclipped * A
    c = tl.minimum(tl.maximum(rho, lo), hi) * A
    slope = tl.where(u < c, d_unclipped, tl.where(u > c, d_clipped, 0.5 * (d_unclipped + d_clipped)))
    loss = -tl.minimum(u, c)
    g_rho = -A * slope
    if HAS_CLIP_C:
        cap = -A * clip_c
        capped = (loss > cap).to(tl.float32) * (A < 0).to(tl.float32)
        loss = tl.where(capped > 0, cap, loss)
        g_rho = g_rho * (1.0 - capped)
    low = (rho < lo).to(tl.float32) * (A < 0).to(tl.float32)
    high = (rho > hi).to(tl.float32) * (A > 0).to(tl.float32)
    return loss, g_rho, low, high


@triton.jit
def _policy_loss_row_kernel(
    LP,
    OLD,
    REF,
    SW,
    MASK,
    ADV,
    SHP,
    CU,
    NORM,
    GRAD,
    OUT,
    eps_low,
    eps_high,
    delta,
    clip_c,
    beta,
    log_gamma,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_SW: tl.constexpr,
    SEQ_LEVEL: tl.constexpr,
    NO_RATIO: tl.constexpr,
    SHAPED: tl.constexpr,
    PER_ROW_MEAN: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_CLIP_C: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    start = tl.load(CU + row)
    end = tl.load(CU + row + 1)
    A = tl.load(ADV + row)
    norm = tl.load(NORM)
    offs = tl.arange(0, BLOCK)

    # pass 1: the row's unmasked length, summed log-ratio and summed sampling weight
    length = 0.0
    lr_sum = 0.0
    c_sum = 0.0
    for off in range(start, end, BLOCK):
        idx = off + offs
        inb = idx < end
        m = tl.load(MASK + idx, mask=inb, other=0).to(tl.float32)
        length += tl.sum(m, axis=0)
        if SEQ_LEVEL and HAS_OLD:
            lp = tl.load(LP + idx, mask=inb, other=0.0)
            old = tl.load(OLD + idx, mask=inb, other=0.0)
            lr_sum += tl.sum((lp - old) * m, axis=0)
        if SEQ_LEVEL and HAS_SW:
            c_sum += tl.sum(tl.load(SW + idx, mask=inb, other=0.0) * m, axis=0)
    length_c = tl.maximum(length, 1.0)
    w = 1.0 / (norm * length_c) if PER_ROW_MEAN else 1.0 / norm
    if not HAS_SW:
        c_sum = length

    s, s_slope = _clamped_exp(lr_sum / length_c, CLAMP)
    row_loss, row_g, row_low, row_high = _surrogate(s, A, eps_low, eps_high, delta, clip_c, HAS_DELTA, HAS_CLIP_C)
    row_coef = (w * c_sum) * row_g * s * s_slope / length_c  # W_i dl_i/ds_i ds_i/dlp_t
    if SHAPED:  # a shaped row has no ratio term, so it is never clipped
        shaped = tl.load(SHP + row).to(tl.float32)
        row_low = row_low * (1.0 - shaped)
        row_high = row_high * (1.0 - shaped)

    # pass 2: per-token loss, gradient and stats
    acc_loss = 0.0
    acc_low = 0.0
    acc_high = 0.0
    acc_region = 0.0
    acc_ratio = 0.0
    acc_kl = 0.0
    for off in range(start, end, BLOCK):
        idx = off + offs
        inb = idx < end
        m = tl.load(MASK + idx, mask=inb, other=0).to(tl.float32)
        lp = tl.load(LP + idx, mask=inb, other=0.0)
        if HAS_OLD:
            lr = (lp - tl.load(OLD + idx, mask=inb, other=0.0)) * m
        else:
            lr = tl.zeros([BLOCK], tl.float32)
        if NO_RATIO:  # importance_sampling_level "none" (GPG)
            rho, _ = _clamped_exp(lr, CLAMP)
            loss = -A * lp
            grad = -A * w + tl.zeros([BLOCK], tl.float32)
        elif SEQ_LEVEL:
            rho = s + tl.zeros([BLOCK], tl.float32)
            loss = row_loss + tl.zeros([BLOCK], tl.float32)
            grad = row_coef + tl.zeros([BLOCK], tl.float32)
            m_sum = tl.sum(m, axis=0)
            acc_low += row_low * m_sum
            acc_high += row_high * m_sum
            acc_region += tl.maximum(row_low, row_high) * m_sum
        else:
            rho, slope = _clamped_exp(lr, CLAMP)
            loss, g_rho, low, high = _surrogate(rho, A, eps_low, eps_high, delta, clip_c, HAS_DELTA, HAS_CLIP_C)
            grad = w * g_rho * rho * slope
            if SHAPED:
                low = low * (1.0 - shaped)
                high = high * (1.0 - shaped)
            acc_low += tl.sum(low * m, axis=0)
            acc_high += tl.sum(high * m, axis=0)
            acc_region += tl.sum(tl.maximum(low, high) * m, axis=0)
        acc_ratio += tl.sum(rho * m, axis=0)
        if HAS_SW:
            c = tl.load(SW + idx, mask=inb, other=0.0)
            loss = loss * c
            if NO_RATIO or not SEQ_LEVEL:  # at sequence level c is already inside W_i (row_coef)
                grad = grad * c
        if SHAPED:
            # f = sigmoid(x) and 1 - f = sigmoid(-x) from e = exp(-|x|) <= 1: no overflow for any lp
            x = lp - log_gamma
            e_abs = tl.exp(-tl.abs(x))
            f = tl.where(x >= 0, 1.0, e_abs) / (1.0 + e_abs)
            shaped_loss = -A * f
            shaped_grad = -A * w * f * (tl.where(x >= 0, e_abs, 1.0) / (1.0 + e_abs))
            if HAS_SW:
                shaped_loss = shaped_loss * c
                shaped_grad = shaped_grad * c
            is_shaped = (tl.zeros([BLOCK], tl.float32) + shaped) > 0
            loss = tl.where(is_shaped, shaped_loss, loss)
            grad = tl.where(is_shaped, shaped_grad, grad)
        if HAS_KL:
            diff = (tl.load(REF + idx, mask=inb, other=0.0) - lp) * m
            e, e_slope = _clamped_exp(diff, CLAMP)
            k3 = e - diff - 1.0
            loss += beta * k3
            grad += w * beta * (1.0 - e * e_slope)
            acc_kl += tl.sum(k3 * m, axis=0)
        acc_loss += tl.sum(loss * w * m, axis=0)
        tl.store(GRAD + idx, grad * m, mask=inb)
    out = OUT + row * 6
    tl.store(out + 0, acc_loss)
    tl.store(out + 1, acc_low)
    tl.store(out + 2, acc_high)
    tl.store(out + 3, acc_region)
    tl.store(out + 4, acc_ratio)
    tl.store(out + 5, acc_kl)


def policy_loss_triton(logp, mask, inputs: LossInputs, cfg: PolicyLossConfig):
    """(loss 0-d fp32, grad_logp [N] fp32, stat_sums [len(STAT_NAMES)] fp32), like policy_terms on a batch."""
    old_logp, ref_logp, sampling_weight = inputs.old_logp, inputs.ref_logp, inputs.sampling_weight
    shaped_rows, cu_seqlens = shaped_rows_of(inputs, cfg), inputs.cu_seqlens
    n, num_rows = logp.shape[0], cu_seqlens.numel() - 1
    lp = logp.float().contiguous()
    old = lp if old_logp is None else old_logp.float().contiguous()
    ref = lp if ref_logp is None else ref_logp.float().contiguous()
    sw = lp if sampling_weight is None else sampling_weight.float().contiguous()
    mask_i8 = mask.to(torch.int8).contiguous()
    shaped = mask_i8 if shaped_rows is None else shaped_rows.to(torch.int8).contiguous()  # unread without shaped rows
    grad = torch.empty(n, device=lp.device)
    out = torch.zeros(num_rows, 6, device=lp.device)
    if num_rows > 0:
        _policy_loss_row_kernel[(num_rows,)](
            lp,
            old,
            ref,
            sw,
            mask_i8,
            inputs.advantages.float().contiguous(),
            shaped,
            cu_seqlens.to(torch.int32).contiguous(),
            aggregation_denominator(mask, num_rows, cfg, inputs.normalizer).float().reshape(1),
            grad,
            out,
            cfg.epsilon_low,
            cfg.epsilon_high,
            cfg.delta or 0.0,
            cfg.clip_ratio_c or 0.0,
            cfg.beta,
            math.log(cfg.golden_shaping_gamma),
            HAS_OLD=old_logp is not None,
            HAS_KL=cfg.beta > 0,
            HAS_SW=sampling_weight is not None,
            SHAPED=shaped_rows is not None,
            SEQ_LEVEL=cfg.importance_sampling_level == "sequence",
            NO_RATIO=cfg.importance_sampling_level == "none",
            PER_ROW_MEAN=cfg.loss_agg_mode == "seq-mean-token-mean",
            HAS_DELTA=cfg.delta is not None,
            HAS_CLIP_C=cfg.clip_ratio_c is not None,
            CLAMP=LOG_RATIO_CLAMP,
            BLOCK=BLOCK_TOKENS,
            num_warps=NUM_WARPS,
        )
    sums = out.sum(0)  # columns 1..5 are the stats in STAT_NAMES order
    return sums[0], grad, sums[1 : 1 + len(STAT_NAMES)]
