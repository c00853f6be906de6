"""Clipped policy losses of the GRPO family on packed rows (GCPO, GSPO, GRPO, DAPO, Dr. GRPO, BNPO, GPG's math).

    loss, stats = policy_loss(logp [N], LossInputs(advantages [B], cu_seqlens [B+1], old_logp=...), config)

This is the O(N) half of the fused op (the O(NVd) half is `linear_logprobs`). Its math, with the
gradients and normalisers, is docs/algorithms.md; in short, for token t of row i (mask m_t = 1 for
tokens that count):

    lr_t  = lp_t - old_t                                  (old = None: on-policy, lr_t = 0 in value)
    rho_t = exp(clamp(lr_t, -20, 20))                     importance_sampling_level = "token"
    rho_t = exp(clamp(sum_{t' in i} m lr / |o_i|, -20, 20))   importance_sampling_level = "sequence"
    l_t   = -min(min(rho_t, delta) * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i)
    l_t   = min(l_t, -A_i * clip_ratio_c)  where A_i < 0   (dual clip, optional)
    l_t   = -A_i * lp_t                                   importance_sampling_level = "none" (GPG)
    k_t   = exp(ref_t - lp_t) - (ref_t - lp_t) - 1        (k3 KL, only when beta > 0)
    loss  = sum_t w_t m_t (c_t l_t + beta k_t)   w_t from the aggregation mode (below) and `normalizer`

c_t is the optional `sampling_weight` [N] (1 when None): a detached per-token factor, the
sampling-mismatch correction of rows sampled by another engine (TRL's
`vllm_importance_sampling_correction`, Liger's `vllm_is_ratio`; `sampling_correction.py` builds it).
As in TRL 1.16's `_compute_loss`, it multiplies the policy term (shaped or not) only: the KL
term is added after the product, unweighted; and the stats (clip fractions, ratio_mean, kl) do not
see it.

Golden rows under golden_objective = "shaped" (`golden` [B] marks them) take LUFFY's shaped
term as l_t instead (Yan et al., arXiv 2504.14945, ElliottYan/LUFFY): the behaviour probability of a
trace the policy never sampled is taken as 1, and the policy's own token probability p = exp(lp_t)
is shaped, unclipped, per token at either ratio level, on- or off-policy alike (old_t is not read):

    f(p)  = p / (p + gamma) = sigmoid(lp_t - log gamma)     gamma = golden_shaping_gamma (0.1)
    l_t   = -A_i f(exp(lp_t))       d l_t / d lp_t = -A_i gamma p / (p + gamma)^2 = -A_i f (1 - f)

at every level (GPG's -A_i lp_t is replaced the same way); c_t, the KL term, w_t and the
normaliser are those of any row. Followed from LUFFY's `compute_token_on_off_policy_loss`
(off_policy_reshape "p_div_p_0.1", no off_max_clip / off_min_clip): shaped and clipped tokens are
summed into one loss with the same aggregation. Deviations: LUFFY switches per token by a prefix
mask (its runs use whole off-policy traces, prefix ratio 1.0) and offers gamma 0.1 / 0.3 / 0.5;
here whole rows and any gamma > 0. Its paper runs also remove the clip on the on-policy tokens
(loss_remove_clip); here the other rows keep their clipped surrogate. Stats: a
shaped token is never clipped, so it adds 0 to the clip fractions (LUFFY's off-policy clipfrac is
0) and still counts in their token mean; ratio_mean keeps its rho_t against old_t, so the stats do
not depend on golden_objective. golden_objective = "policy_ratio" (the default) treats golden rows
like every other row: golden is then ignored.

Aggregation modes (verl's `loss_agg_mode` names) and what `normalizer` replaces:
    token-mean               w = 1 / normalizer      default: number of unmasked tokens here
    seq-mean-token-mean      w = 1 / (normalizer |o_i|)   default normalizer: rows B
    seq-mean-token-sum       w = 1 / normalizer      default: rows B
    seq-mean-token-sum-norm  w = 1 / normalizer      default: max_completion_length (Dr. GRPO's L, as
                                                     verl; TRL and the trainer divide by B * L: pass that)
A trainer that splits one optimizer step over micro-batches and ranks passes the step's global
count (divided by the world size under DDP, which averages gradients) so the weighting does not
depend on the split.

The gradient is closed-form (no autograd graph over N; c_t has none): d loss / d lp_t =
    token level:    w_t c_t * (-A_i) * rho_t        if token t is not clipped, else 0
    sequence level: W_i * (-A_i) * rho_i / |o_i|    if row i is not clipped, else 0
                    (W_i = sum_t w_t c_t m_t: row i's loss is l_i times W_i, and d rho_i / d lp_t = rho_i / |o_i|)
    level "none":   w_t c_t * (-A_i)
    shaped row:     w_t c_t * (-A_i) * f (1 - f)            (any level)
    + w_t * beta * (1 - exp(ref_t - lp_t))
Where the two branches of the min tie (on-policy rows, ratios inside the clip box) their slopes
are averaged as torch.minimum does; inside the box they are equal anyway.

Shapes: logp, old_logp, ref_logp, sampling_weight, mask [N] (the completion tokens of B rows,
concatenated), advantages [B], golden bool [B], cu_seqlens int32 [B+1] (starts at 0,
non-decreasing, ends at N).
Which method sets which switches is the trainer's recipe table, not this module's: the switches are
the fields of `PolicyLossConfig` (kernels/options.py), the tensors those of `LossInputs`.
Bad options and non-finite inputs are errors (`PolicyLossConfig`, `checks.py`: which checks sync).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch

from gcpo_fast.kernels.checks import check_policy_inputs, settle
from gcpo_fast.kernels.options import Backend, LossInputs, PolicyLossConfig, resolve_backend

LOG_RATIO_CLAMP = 20.0
STAT_NAMES = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio_mean", "kl")


def row_index(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[N] int64: the row each packed token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    rows = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(rows, lengths, output_size=n_tokens)


def aggregation_denominator(mask, num_rows: int, cfg: PolicyLossConfig, normalizer=None):
    """The aggregation's denominator: the caller's normalizer, else N_tok, max_completion_length or B."""
    if normalizer is not None:
        return torch.as_tensor(normalizer, dtype=torch.float32, device=mask.device)
    if cfg.loss_agg_mode == "token-mean":
        return mask.float().sum().clamp(min=1.0)
    if cfg.loss_agg_mode == "seq-mean-token-sum-norm":
        if cfg.max_completion_length is None:
            raise ValueError(
                "loss_agg_mode 'seq-mean-token-sum-norm' (dr_grpo) needs max_completion_length "
                "or an explicit normalizer"
            )
        return torch.tensor(float(cfg.max_completion_length), device=mask.device)
    return torch.tensor(float(max(num_rows, 1)), device=mask.device)


def token_weights(mask, rows, row_len, cfg: PolicyLossConfig, normalizer=None) -> torch.Tensor:
    """[N] fp32 aggregation weight w_t * m_t of every token (see the module docstring)."""
    w = mask.float() / aggregation_denominator(mask, row_len.numel(), cfg, normalizer)
    return w / row_len[rows] if cfg.loss_agg_mode == "seq-mean-token-mean" else w


def _clamped_exp(x):
    """exp(clamp(x)) and the clamp's slope (1 inside, 0 outside), as torch.clamp's autograd has it."""
    inside = (x >= -LOG_RATIO_CLAMP) & (x <= LOG_RATIO_CLAMP)
    return torch.exp(x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), inside.float()


def _surrogate(rho, A, cfg: PolicyLossConfig):
    """Elementwise clipped surrogate: (l, d l / d rho, clipped-low flag, clipped-high flag)."""
    unclipped = rho if cfg.delta is None else rho.clamp(max=cfg.delta)
    d_unclipped = torch.ones_like(rho) if cfg.delta is None else (rho <= cfg.delta).float()
    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    d_clipped = ((rho >= lo) & (rho <= hi)).float()
    u, c = unclipped * A, rho.clamp(lo, hi) * A
    slope = torch.where(u < c, d_unclipped, torch.where(u > c, d_clipped, 0.5 * (d_unclipped + d_clipped)))
    loss, g_rho = -torch.minimum(u, c), -A * slope
    if cfg.clip_ratio_c is not None:
        cap = -A * cfg.clip_ratio_c
        capped = (A < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        g_rho = torch.where(capped, torch.zeros_like(g_rho), g_rho)
    return loss, g_rho, (rho < lo) & (A < 0), (rho > hi) & (A > 0)


def shaped_term(lp, cfg: PolicyLossConfig):
    """LUFFY's f(exp(lp)) = p / (p + gamma) and its slope d f / d lp = f (1 - f), written as sigmoids
    of lp - log(gamma) so that they stay finite for any lp (exp(lp) alone could overflow)."""
    x = lp - math.log(cfg.golden_shaping_gamma)
    f = torch.sigmoid(x)
    return f, f * torch.sigmoid(-x)


def row_sums(values, rows, num_rows):
    return torch.zeros(num_rows, device=values.device, dtype=values.dtype).index_add_(0, rows, values)


class Layout(NamedTuple):
    """Per-batch quantities `policy_terms` needs, each over the whole batch."""

    rows: torch.Tensor  # [N] int64: the row of each token
    weight: torch.Tensor  # [N] fp32: the aggregation weight w_t m_t
    row_len: torch.Tensor  # [B] fp32: unmasked tokens per row, >= 1
    row_weight: torch.Tensor  # [B] fp32: W_i = sum_t w_t c_t m_t over each row's tokens


def batch_layout(mask, inputs: LossInputs, cfg: PolicyLossConfig) -> Layout:
    n, num_rows = mask.shape[0], inputs.cu_seqlens.numel() - 1
    rows = row_index(inputs.cu_seqlens, n)
    row_len = row_sums(mask.float(), rows, num_rows).clamp(min=1.0)
    weight = token_weights(mask, rows, row_len, cfg, inputs.normalizer)
    sw = inputs.sampling_weight
    policy_weight = weight if sw is None else weight * sw.float()
    return Layout(rows, weight, row_len, row_sums(policy_weight, rows, num_rows))


def shaped_rows_of(inputs: LossInputs, cfg: PolicyLossConfig):
    """The rows that take the shaped term: the golden rows under golden_objective "shaped", else none."""
    return inputs.golden if cfg.golden_objective == "shaped" else None


def policy_terms(logp, span: tuple[int, int], mask, layout: Layout, inputs: LossInputs, cfg: PolicyLossConfig):
    """Loss, d loss / d logp and summed stats for the packed tokens span = (n0, n1) of the batch.

    logp [n1 - n0] covers the span; mask, layout and inputs cover the whole batch (their per-token
    tensors are cut to the span here). A span may cut a row only where the ratio is per token, absent
    or on-policy (then a row's partial sum of log-ratios is 0 like its whole) or the row is shaped;
    the fused linear op calls this chunk by chunk. Returns (loss: 0-d fp32, grad_logp: [n] fp32,
    stat_sums: [len(STAT_NAMES)] fp32 sums over masked tokens).
    """
    n0, n1 = span

    def cut(t):
        return None if t is None else t[n0:n1]

    old_logp, ref_logp, sampling_weight = cut(inputs.old_logp), cut(inputs.ref_logp), cut(inputs.sampling_weight)
    rows, weight, mask = layout.rows[n0:n1], layout.weight[n0:n1], mask[n0:n1]
    row_len, advantages, shaped_rows = layout.row_len, inputs.advantages, shaped_rows_of(inputs, cfg)
    lp, m = logp.float(), mask.float()
    A_tok = advantages.float()[rows]
    lr = torch.zeros_like(lp) if old_logp is None else (lp - old_logp.float()) * m
    # The policy term's weight w_t c_t; the KL term keeps w_t (module docstring).
    policy_weight = weight if sampling_weight is None else weight * sampling_weight.float()
    stats = torch.zeros(len(STAT_NAMES), device=lp.device)
    has_ratio = cfg.importance_sampling_level != "none"

    if not has_ratio:
        per_tok, grad = -A_tok * lp, -A_tok * policy_weight
        stats[3] = (torch.exp(lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) * m).sum()
    elif cfg.importance_sampling_level == "token":
        rho, slope = _clamped_exp(lr)
        per_tok, g_rho, low, high = _surrogate(rho, A_tok, cfg)
        grad = policy_weight * g_rho * rho * slope
    else:
        # Every token of row i carries the same l_i(s_i): d loss / d lp_t = W_i * dl_i/ds_i * ds_i/dlp_t,
        # with ds_i/dlp_t = s_i / |o_i| for every token of the row.
        s, slope = _clamped_exp(row_sums(lr, rows, row_len.numel()) / row_len)
        loss_row, g_row, low_row, high_row = _surrogate(s, advantages.float(), cfg)
        rho, per_tok, low, high = s[rows], loss_row[rows], low_row[rows], high_row[rows]
        grad = (layout.row_weight * g_row * s * slope / row_len)[rows]
    if shaped_rows is not None:
        # Shaped rows replace the term per token (module docstring); they are never clipped.
        shaped = shaped_rows[rows]
        f, df = shaped_term(lp, cfg)
        per_tok = torch.where(shaped, -A_tok * f, per_tok)
        grad = torch.where(shaped, -A_tok * policy_weight * df, grad)
        if has_ratio:
            low, high = low & ~shaped, high & ~shaped
    if has_ratio:
        stats[0] = (low.float() * m).sum()
        stats[1] = (high.float() * m).sum()
        stats[2] = ((low | high).float() * m).sum()
        stats[3] = (rho * m).sum()
    if sampling_weight is not None:
        per_tok = per_tok * sampling_weight.float()

    if cfg.beta > 0:
        diff = (ref_logp.float() - lp) * m
        e, slope = _clamped_exp(diff)
        k3 = e - diff - 1.0
        per_tok = per_tok + cfg.beta * k3
        grad = grad + weight * cfg.beta * (1.0 - e * slope)
        stats[4] = (k3 * m).sum()
    loss = (per_tok * weight).sum()
    return loss, grad * m, stats


def finalize_stats(stat_sums: torch.Tensor, n_tokens: torch.Tensor, cfg: PolicyLossConfig) -> dict:
    """Token means of the summed stats (0-d fp32 tensors: no host sync), TRL's metric names."""
    means = stat_sums / n_tokens.clamp(min=1.0)
    out = {name: means[k] for k, name in enumerate(STAT_NAMES) if name != "kl" or cfg.beta > 0}
    out["num_tokens"] = n_tokens
    return out


def batch_policy_terms(logp, mask, inputs: LossInputs, cfg: PolicyLossConfig):
    """policy_terms over a whole batch: (loss, grad_logp, stat_sums), by the Triton row kernel or in torch.
    cfg.backend is resolved (TORCH or TRITON)."""
    if cfg.backend is Backend.TRITON:
        from gcpo_fast.kernels.policy_loss_triton import policy_loss_triton

        return policy_loss_triton(logp, mask, inputs, cfg)
    return policy_terms(logp, (0, logp.shape[0]), mask, batch_layout(mask, inputs, cfg), inputs, cfg)


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, mask, inputs: LossInputs, cfg: PolicyLossConfig):
        loss, grad, stat_sums = batch_policy_terms(logp, mask, inputs, cfg)
        ctx.save_for_backward(grad)
        stats = finalize_stats(stat_sums, mask.float().sum(), cfg)
        ctx.mark_non_differentiable(*stats.values())
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


def check_config(config) -> None:
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")


def check_loss_inputs(inputs) -> None:
    if not isinstance(inputs, LossInputs):
        raise TypeError(f"inputs must be a LossInputs, got {type(inputs).__name__}")


def policy_loss(logp, inputs: LossInputs, config: PolicyLossConfig):
    """The clipped surrogate on packed rows; returns (loss 0-d fp32, stats dict of 0-d tensors).

    logp [N] (the only input that receives a gradient); inputs: the per-call tensors (`LossInputs`:
    advantages, cu_seqlens, old_logp, ref_logp, sampling_weight, golden, mask, normalizer);
    config: the math switches (`PolicyLossConfig`; temperature and workspace_bytes are not read here).
    config.backend AUTO runs the Triton row kernel on CUDA tensors, torch elsewhere.
    stats: TRL's clip fractions, ratio_mean, kl (beta > 0) and num_tokens.
    """
    check_loss_inputs(inputs)
    check_config(config)
    mask, pending = check_policy_inputs(logp, inputs, config)
    settle(pending)
    config = replace(config, backend=resolve_backend(config.backend, logp.device))
    return _PolicyLoss.apply(logp, mask, inputs, config)
