"""Clipped policy losses of the GRPO family on packed rows: GCPO, GSPO, GRPO, DAPO, Dr. GRPO, BNPO, GPG.

This is the O(N) half of the fused op (the O(NVd) half is `linear_logprobs`). Its math, with the
gradients and normalisers, is docs/algorithms.md; in short, for token t of row i (mask m_t = 1 for
tokens that count):

    lr_t  = lp_t - old_t                                  (old = None: on-policy, lr_t = 0 in value)
    rho_t = exp(clamp(lr_t, -20, 20))                     importance_sampling_level = "token"
    rho_t = exp(clamp(sum_{t' in i} m lr / |o_i|, -20, 20))   importance_sampling_level = "sequence"
    l_t   = -min(min(rho_t, delta) * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i)
    l_t   = min(l_t, -A_i * clip_ratio_c)  where A_i < 0   (dual clip, optional)
    l_t   = -A_i * lp_t                                   loss_type = "gpg" (no ratio, no clip)
    k_t   = exp(ref_t - lp_t) - (ref_t - lp_t) - 1        (k3 KL, only when beta > 0)
    loss  = sum_t w_t m_t (c_t l_t + beta k_t)   w_t from the aggregation mode (below) and `normalizer`

c_t is the optional `sampling_weight` [N] (1 when None): a detached per-token factor, the
sampling-mismatch correction of rows sampled by another engine (TRL's
`vllm_importance_sampling_correction`, Liger's `vllm_is_ratio`; `sampling_correction.py` builds it).
As in TRL 1.16's `_compute_loss`, it multiplies the policy term (shaped or not) only: the KL
term is added after the product, unweighted; and the stats (clip fractions, ratio_mean, kl) do not
see it.

Golden rows under golden_objective = "shaped" (`golden_rows` [B] marks them) take LUFFY's shaped
term as l_t instead (Yan et al., arXiv 2504.14945, ElliottYan/LUFFY): the behaviour probability of a
trace the policy never sampled is taken as 1, and the policy's own token probability p = exp(lp_t)
is shaped, unclipped, per token at either ratio level, on- or off-policy alike (old_t is not read):

    f(p)  = p / (p + gamma) = sigmoid(lp_t - log gamma)     gamma = golden_shaping_gamma (0.1)
    l_t   = -A_i f(exp(lp_t))       d l_t / d lp_t = -A_i gamma p / (p + gamma)^2 = -A_i f (1 - f)

for every loss_type (GPG's -A_i lp_t is replaced the same way); c_t, the KL term, w_t and the
normaliser are those of any row. Followed from LUFFY's `compute_token_on_off_policy_loss`
(off_policy_reshape "p_div_p_0.1", no off_max_clip / off_min_clip): shaped and clipped tokens are
summed into one loss with the same aggregation. Deviations: LUFFY switches per token by a prefix
mask (its runs use whole off-policy traces, prefix ratio 1.0) and offers gamma 0.1 / 0.3 / 0.5;
here whole rows and any gamma > 0. Its paper runs also remove the clip on the on-policy tokens
(loss_remove_clip); here the other rows keep the clipped surrogate of their loss_type. Stats: a
shaped token is never clipped, so it adds 0 to the clip fractions (LUFFY's off-policy clipfrac is
0) and still counts in their token mean; ratio_mean keeps its rho_t against old_t, so the stats do
not depend on golden_objective. golden_objective = "policy_ratio" (the default) treats golden rows
like every other row: golden_rows is then ignored.

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
    gpg:            w_t c_t * (-A_i)
    shaped row:     w_t c_t * (-A_i) * f (1 - f)            (any level, any loss_type)
    + w_t * beta * (1 - exp(ref_t - lp_t))
Where the two branches of the min tie (on-policy rows, ratios inside the clip box) their slopes
are averaged as torch.minimum does; inside the box they are equal anyway.

Shapes: logp, old_logp, ref_logp, sampling_weight, mask [N] (the completion tokens of B rows,
concatenated), advantages [B], golden_rows bool [B], cu_seqlens int32 [B+1] (starts at 0,
non-decreasing, ends at N).
Bad options and non-finite inputs are errors (`PolicyLossConfig`, `checks.py`: which checks sync).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from gcpo_fast.kernels.checks import check_number, check_policy_inputs, settle

LOG_RATIO_CLAMP = 20.0

# Each method's paper defaults: ratio level, clip box, aggregation (docs/algorithms.md, "The methods").
LOSS_RECIPES = {
    "gcpo": dict(
        importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4, loss_agg_mode="seq-mean-token-mean"
    ),
    "gspo": dict(
        importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4, loss_agg_mode="seq-mean-token-mean"
    ),
    "grpo": dict(
        importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, loss_agg_mode="seq-mean-token-mean"
    ),
    "dapo": dict(importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, loss_agg_mode="token-mean"),
    "dr_grpo": dict(
        importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, loss_agg_mode="seq-mean-token-sum-norm"
    ),
    "bnpo": dict(importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, loss_agg_mode="token-mean"),
    "gpg": dict(importance_sampling_level="token", epsilon_low=0.0, epsilon_high=0.0, loss_agg_mode="token-mean"),
}
LOSS_TYPES = tuple(LOSS_RECIPES)
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
GOLDEN_OBJECTIVES = ("policy_ratio", "shaped")
STAT_NAMES = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio_mean", "kl")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The loss options after the loss_type's recipe has filled what the caller left as None.

    Build it with `resolve` (recipe defaults) or directly; either way every option is checked here,
    on the host, once: a trainer builds one and passes it as `config=` to every call.
    """

    loss_type: str = "gcpo"
    importance_sampling_level: str = "sequence"
    epsilon_low: float = 3e-4
    epsilon_high: float = 4e-4
    loss_agg_mode: str = "seq-mean-token-mean"
    delta: float | None = None
    clip_ratio_c: float | None = None
    beta: float = 0.0
    max_completion_length: int | None = None
    golden_objective: str = "policy_ratio"
    golden_shaping_gamma: float = 0.1

    def __post_init__(self):
        if self.loss_type not in LOSS_RECIPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_sampling_level must be 'token' or 'sequence', got {self.importance_sampling_level!r}"
            )
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}")

        # Stored as floats (the Triton kernel takes them as fp32 arguments). The clip box
        # [1 - eps_low, 1 + eps_high] must contain 1 and keep its lower end > 0.
        def number(name, ok, rule):
            object.__setattr__(self, name, check_number(name, getattr(self, name), ok, rule))

        number("epsilon_low", lambda e: 0 <= e < 1, "in [0, 1)")
        number("epsilon_high", lambda e: e >= 0, ">= 0")
        if self.delta is not None:
            number("delta", lambda d: d > 1 + self.epsilon_high, f"> 1 + epsilon_high = {1 + self.epsilon_high}")
        if self.clip_ratio_c is not None:
            number("clip_ratio_c", lambda c: c > 1, "> 1")
        number("beta", lambda b: b >= 0, ">= 0")
        if self.max_completion_length is not None and (
            not isinstance(self.max_completion_length, numbers.Integral) or self.max_completion_length < 1
        ):
            raise ValueError(f"max_completion_length must be an int >= 1, got {self.max_completion_length!r}")
        if self.golden_objective not in GOLDEN_OBJECTIVES:
            raise ValueError(f"golden_objective must be one of {GOLDEN_OBJECTIVES}, got {self.golden_objective!r}")
        number("golden_shaping_gamma", lambda g: g > 0, "> 0")

    @classmethod
    def resolve(
        cls,
        loss_type=None,
        importance_sampling_level=None,
        epsilon_low=None,
        epsilon_high=None,
        loss_agg_mode=None,
        delta=None,
        clip_ratio_c=None,
        beta=None,
        max_completion_length=None,
        golden_objective=None,
        golden_shaping_gamma=None,
    ) -> PolicyLossConfig:
        """The config of `loss_type` (default "gcpo") with its recipe filling the options left as None."""
        loss_type = "gcpo" if loss_type is None else loss_type
        if loss_type not in LOSS_RECIPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        recipe = LOSS_RECIPES[loss_type]
        eps_low = recipe["epsilon_low"] if epsilon_low is None else epsilon_low
        # TRL: epsilon_high defaults to epsilon (the low side) when only that one is given.
        eps_high = (
            (recipe["epsilon_high"] if epsilon_low is None else eps_low) if epsilon_high is None else epsilon_high
        )
        return cls(
            loss_type,
            importance_sampling_level or recipe["importance_sampling_level"],
            eps_low,
            eps_high,
            loss_agg_mode or recipe["loss_agg_mode"],
            delta,
            clip_ratio_c,
            0.0 if beta is None else beta,
            max_completion_length,
            golden_objective or "policy_ratio",
            0.1 if golden_shaping_gamma is None else golden_shaping_gamma,
        )


def options_config(config, options: dict) -> PolicyLossConfig:
    """`config` as given, or one resolved from the loose options; both at once is an error."""
    if config is None:
        return PolicyLossConfig.resolve(**options)
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ValueError(f"pass either config= or the loss options, not both (got config and {', '.join(given)})")
    return config


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


def policy_terms(
    logp,
    old_logp,
    ref_logp,
    advantages,
    weight,
    mask,
    rows,
    row_len,
    row_weight,
    cfg: PolicyLossConfig,
    sampling_weight=None,
    shaped_rows=None,
):
    """Loss, d loss / d logp and summed stats for a range of packed tokens.

    `weight`, `mask`, `rows`, `sampling_weight` (or None) cover the range; `advantages`, `row_len`
    (unmasked tokens per row, >= 1), `row_weight` (W_i = sum_t w_t c_t m_t over each row's tokens)
    and `shaped_rows` (bool: the rows that take the shaped term; None: none does) cover every row of
    the batch. A range may cut a row only where the ratio is per token or on-policy (then a row's
    partial sum of log-ratios is 0 like its whole) or the row is shaped; the fused linear op calls
    this chunk by chunk. Returns (loss: 0-d fp32, grad_logp: [n] fp32, stat_sums: [len(STAT_NAMES)]
    fp32 sums over masked tokens).
    """
    lp, m = logp.float(), mask.float()
    A_tok = advantages.float()[rows]
    lr = torch.zeros_like(lp) if old_logp is None else (lp - old_logp.float()) * m
    # The policy term's weight w_t c_t; the KL term keeps w_t (module docstring).
    policy_weight = weight if sampling_weight is None else weight * sampling_weight.float()
    stats = torch.zeros(len(STAT_NAMES), device=lp.device)

    if cfg.loss_type == "gpg":
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
        grad = (row_weight * g_row * s * slope / row_len)[rows]
    if shaped_rows is not None:
        # Shaped rows replace the term per token (module docstring); they are never clipped.
        shaped = shaped_rows[rows]
        f, df = shaped_term(lp, cfg)
        per_tok = torch.where(shaped, -A_tok * f, per_tok)
        grad = torch.where(shaped, -A_tok * policy_weight * df, grad)
        if cfg.loss_type != "gpg":
            low, high = low & ~shaped, high & ~shaped
    if cfg.loss_type != "gpg":
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


def batch_layout(mask, cu_seqlens, cfg: PolicyLossConfig, normalizer=None, sampling_weight=None):
    """Per-batch quantities policy_terms needs: (rows [N], weight [N], row_len [B], row_weight [B])."""
    n, num_rows = mask.shape[0], cu_seqlens.numel() - 1
    rows = row_index(cu_seqlens, n)
    row_len = row_sums(mask.float(), rows, num_rows).clamp(min=1.0)
    weight = token_weights(mask, rows, row_len, cfg, normalizer)
    policy_weight = weight if sampling_weight is None else weight * sampling_weight.float()
    return rows, weight, row_len, row_sums(policy_weight, rows, num_rows)


def finalize_stats(stat_sums: torch.Tensor, n_tokens: torch.Tensor, cfg: PolicyLossConfig) -> dict:
    """Token means of the summed stats (0-d fp32 tensors: no host sync), TRL's metric names."""
    means = stat_sums / n_tokens.clamp(min=1.0)
    out = {name: means[k] for k, name in enumerate(STAT_NAMES) if name != "kl" or cfg.beta > 0}
    out["num_tokens"] = n_tokens
    return out


def batch_policy_terms(
    logp,
    old_logp,
    ref_logp,
    advantages,
    cu_seqlens,
    mask,
    cfg: PolicyLossConfig,
    normalizer=None,
    use_triton=False,
    sampling_weight=None,
    shaped_rows=None,
):
    """policy_terms over a whole batch: (loss, grad_logp, stat_sums), by the Triton row kernel or in torch."""
    if use_triton:
        from gcpo_fast.kernels.policy_loss_triton import policy_loss_triton

        return policy_loss_triton(
            logp, old_logp, ref_logp, advantages, cu_seqlens, mask, cfg, normalizer, sampling_weight, shaped_rows
        )
    rows, weight, row_len, row_weight = batch_layout(mask, cu_seqlens, cfg, normalizer, sampling_weight)
    return policy_terms(
        logp, old_logp, ref_logp, advantages, weight, mask, rows, row_len, row_weight, cfg, sampling_weight, shaped_rows
    )


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logp,
        old_logp,
        ref_logp,
        advantages,
        sampling_weight,
        shaped_rows,
        cu_seqlens,
        mask,
        cfg,
        normalizer,
        use_triton,
    ):
        loss, grad, stat_sums = batch_policy_terms(
            logp,
            old_logp,
            ref_logp,
            advantages,
            cu_seqlens,
            mask,
            cfg,
            normalizer,
            use_triton,
            sampling_weight,
            shaped_rows,
        )
        ctx.save_for_backward(grad)
        stats = finalize_stats(stat_sums, mask.float().sum(), cfg)
        ctx.mark_non_differentiable(*stats.values())
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None, None, None, None, None


def detached(t):
    return None if t is None else t.detach()


def shaped_rows_of(golden_rows, cfg: PolicyLossConfig):
    """The rows that take the shaped term: the golden rows under golden_objective "shaped", else none."""
    return golden_rows if cfg.golden_objective == "shaped" else None


def policy_loss(
    logp,
    old_logp,
    advantages,
    cu_seqlens,
    *,
    loss_type=None,
    importance_sampling_level=None,
    epsilon_low=None,
    epsilon_high=None,
    loss_agg_mode=None,
    delta=None,
    clip_ratio_c=None,
    beta=None,
    ref_logp=None,
    normalizer=None,
    max_completion_length=None,
    mask=None,
    sampling_weight=None,
    golden_rows=None,
    golden_objective=None,
    golden_shaping_gamma=None,
    config=None,
    backend=None,
):
    """The clipped surrogate on packed rows; returns (loss 0-d fp32, stats dict of 0-d tensors).

    logp [N] (differentiable), old_logp [N] or None (on-policy), advantages [B], cu_seqlens int32 [B+1],
    mask [N] bool or None (all tokens count), sampling_weight [N] float >= 0 or None (the factor c_t
    of the module docstring), golden_rows [B] bool or None (the golden rows: with golden_objective
    "shaped" they take the shaped term, and golden_rows is required; with "policy_ratio" it is
    ignored). Options left as None take loss_type's recipe (`LOSS_RECIPES`; loss_type defaults to
    "gcpo", beta to 0, golden_objective to "policy_ratio", golden_shaping_gamma to 0.1); or pass
    `config=` a ready PolicyLossConfig instead of them. Only logp receives a gradient. backend:
    "triton" (the CUDA default: one row-parallel kernel) or "torch".
    """
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    use_triton = backend == "triton" or (backend is None and logp.is_cuda)
    cfg = options_config(
        config,
        dict(
            loss_type=loss_type,
            importance_sampling_level=importance_sampling_level,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            loss_agg_mode=loss_agg_mode,
            delta=delta,
            clip_ratio_c=clip_ratio_c,
            beta=beta,
            max_completion_length=max_completion_length,
            golden_objective=golden_objective,
            golden_shaping_gamma=golden_shaping_gamma,
        ),
    )
    mask, pending = check_policy_inputs(
        logp,
        old_logp,
        ref_logp,
        advantages,
        cu_seqlens,
        mask,
        cfg.beta,
        sampling_weight,
        normalizer,
        golden_rows,
        cfg.golden_objective,
    )
    settle(pending)
    return _PolicyLoss.apply(
        logp,
        detached(old_logp),
        detached(ref_logp),
        advantages.detach(),
        detached(sampling_weight),
        shaped_rows_of(golden_rows, cfg),
        cu_seqlens,
        mask,
        cfg,
        normalizer,
        use_triton,
    )
