"""`linear_policy_loss`: linear_logprobs and policy_loss composed, the op the trainer calls.

    loss, stats = linear_policy_loss(hidden [N, d], weight [V, d], targets [N], old_logp [N] | None,
                                     advantages [B], cu_seqlens [B+1], loss_type="gcpo", ...)

`old_logp=None` means on-policy: ratios are 1 in value and carry the gradient. Every option of
`policy_loss` is accepted, `sampling_weight=`, `golden_rows=` (with golden_objective="shaped",
LUFFY's shaped term on those rows) and `config=` included. The backward never forms
[N, V]; two ways to get there:

- gradient in the forward (torch backend, 6NVd): when d loss / d logp_t is known as soon as the
  log-probs of the chunk holding token t are (on-policy, token-level ratios, GPG, shaped rows, or
  sequence-level rows that each fit in one chunk), dX and dW are computed in the forward chunk by chunk and the
  backward only scales them by the incoming gradient, as Liger's fused linear cross-entropy does.
- recompute (8NVd): otherwise (sequence-level off-policy with a row longer than a chunk, and always
  on the triton backend), the forward keeps O(N) state and the backward recomputes the logits.
`stats` holds TRL's clip metrics, `ratio_mean`, `kl` (beta > 0), `entropy` (compute_entropy=True)
and `num_tokens`, as 0-d tensors computed in the same pass; with return_logp=True also `logp`, the
per-token log-probs [N] (detached fp32), for metrics that need more than token means (per-row ones).
"""

from __future__ import annotations

import torch

from gcpo_fast.kernels.checks import check_finite_lse, check_linear_inputs, check_policy_inputs, settle
from gcpo_fast.kernels.linear_logprobs import select_backend
from gcpo_fast.kernels.logprob_torch import WORKSPACE_BYTES
from gcpo_fast.kernels.policy_loss import (
    STAT_NAMES,
    batch_layout,
    batch_policy_terms,
    detached,
    finalize_stats,
    options_config,
    policy_terms,
    shaped_rows_of,
)


def plan_chunks(cu_seqlens, n_tokens: int, chunk_tokens: int, rows_must_stay_whole: bool):
    """Token chunks for the gradient-in-forward sweep, or None when some row cannot fit in one.

    Where a row's gradient needs the whole row (sequence-level, off-policy), chunks end on row
    boundaries, packing rows greedily up to `chunk_tokens`.
    """
    if not rows_must_stay_whole:
        return [(n0, min(n0 + chunk_tokens, n_tokens)) for n0 in range(0, n_tokens, chunk_tokens)]
    bounds = cu_seqlens.tolist()
    if any(b - a > chunk_tokens for a, b in zip(bounds[:-1], bounds[1:])):
        return None
    chunks, start, prev = [], 0, 0
    for end in bounds[1:]:
        if end - start > chunk_tokens:
            chunks.append((start, prev))
            start = prev
        prev = end
    if n_tokens > start:
        chunks.append((start, n_tokens))
    return chunks


class LinearPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        old_logp,
        ref_logp,
        advantages,
        sampling_weight,
        shaped_rows,
        cu_seqlens,
        cfg,
        opts,
    ):
        temperature, ignore_index, normalizer, compute_entropy, engine, workspace_bytes, return_logp = opts
        needs = ctx.needs_input_grad[:3]
        needs_dx, needs_dw, needs_db = needs[0], needs[1], bias is not None and needs[2]
        mask = targets != ignore_index
        n, v = hidden.shape[0], weight.shape[0]
        on_triton = engine.__name__.endswith("logprob_triton")
        chunks = None
        if any(needs) and not on_triton:
            whole_rows = cfg.loss_type != "gpg" and cfg.importance_sampling_level == "sequence" and old_logp is not None
            chunks = plan_chunks(cu_seqlens, n, max(1, workspace_bytes // (4 * v)), whole_rows)

        if chunks is not None:
            rows, weight_tok, row_len, row_weight = batch_layout(mask, cu_seqlens, cfg, normalizer, sampling_weight)
            acc = {
                "loss": torch.zeros((), device=hidden.device),
                "stats": torch.zeros(len(STAT_NAMES), device=hidden.device),
            }

            def grad_fn(n0, n1, logp):
                def cut(t):
                    return None if t is None else t[n0:n1]

                loss, grad, stat_sums = policy_terms(
                    logp,
                    cut(old_logp),
                    cut(ref_logp),
                    advantages,
                    weight_tok[n0:n1],
                    mask[n0:n1],
                    rows[n0:n1],
                    row_len,
                    row_weight,
                    cfg,
                    cut(sampling_weight),
                    shaped_rows,
                )
                acc["loss"] += loss
                acc["stats"] = acc["stats"] + stat_sums
                return grad

            logp, lse, ent, dx, dw, db = engine.linear_logprob_forward_backward(
                hidden,
                weight,
                bias,
                targets,
                temperature,
                ignore_index,
                compute_entropy,
                chunks,
                grad_fn,
                needs_dx,
                needs_dw,
                needs_db,
            )
            check_finite_lse(lse, hidden, weight, bias)
            loss, stat_sums = acc["loss"], acc["stats"]
            # Kept on ctx (not save_for_backward) so the backward can scale them in place: one copy
            # of dW at the peak, as in Liger. The price: one backward per forward.
            ctx.grads = (dx, dw, db)
        else:
            logp, lse, ent = engine.linear_logprob_forward(
                hidden,
                weight,
                bias,
                targets,
                temperature,
                ignore_index,
                compute_entropy,
                workspace_bytes=workspace_bytes,
            )
            check_finite_lse(lse, hidden, weight, bias)
            loss, grad, stat_sums = batch_policy_terms(
                logp,
                old_logp,
                ref_logp,
                advantages,
                cu_seqlens,
                mask,
                cfg,
                normalizer,
                on_triton,
                sampling_weight,
                shaped_rows,
            )
            ctx.save_for_backward(hidden, weight, bias, targets, lse, grad)
            ctx.recompute = (temperature, ignore_index, engine, workspace_bytes, needs_dx, needs_dw, needs_db)
        ctx.fused = chunks is not None
        n_tok = mask.float().sum()
        stats = finalize_stats(stat_sums, n_tok, cfg)
        if compute_entropy:
            stats["entropy"] = (ent * mask).sum() / n_tok.clamp(min=1.0)
        if return_logp:
            stats["logp"] = logp.detach()
        ctx.mark_non_differentiable(*stats.values())
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.fused:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_policy_loss: the gradient-in-forward path supports one backward per "
                    "forward (retain_graph is not supported there)"
                )
            dx, dw, db = (None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads)
            ctx.grads = None
        else:
            hidden, weight, bias, targets, lse, grad = ctx.saved_tensors
            temperature, ignore_index, engine, workspace_bytes, needs_dx, needs_dw, needs_db = ctx.recompute
            dx, dw, db = engine.linear_logprob_backward(
                hidden,
                weight,
                bias,
                targets,
                lse,
                None,
                grad * grad_loss,
                None,
                temperature,
                ignore_index,
                needs_dx,
                needs_dw,
                needs_db,
                workspace_bytes,
            )
        return dx, dw, db, None, None, None, None, None, None, None, None, None


def linear_policy_loss(
    hidden,
    weight,
    targets,
    old_logp,
    advantages,
    cu_seqlens,
    *,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
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
    sampling_weight=None,
    golden_rows=None,
    golden_objective=None,
    golden_shaping_gamma=None,
    config=None,
    compute_entropy=False,
    return_logp=False,
    backend=None,
    workspace_bytes=WORKSPACE_BYTES,
):
    """Fused clipped policy loss of packed completions from hidden states; returns (loss, stats).

    hidden [N, d] are the states that predict targets [N] (the completion tokens of B rows packed by
    cu_seqlens [B+1]); weight [V, d] is the lm_head (tied embeddings: the embedding matrix).
    Tokens whose target is ignore_index do not count. Options as in `policy_loss`.
    """
    pending = check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index)
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
    fake_logp = torch.empty(hidden.shape[0], device=hidden.device)
    pending += check_policy_inputs(
        fake_logp,
        old_logp,
        ref_logp,
        advantages,
        cu_seqlens,
        None,
        cfg.beta,
        sampling_weight,
        normalizer,
        golden_rows,
        cfg.golden_objective,
    )[1]
    settle(pending)
    engine = select_backend(backend, hidden.device)
    opts = (
        float(temperature),
        int(ignore_index),
        normalizer,
        bool(compute_entropy),
        engine,
        int(workspace_bytes),
        bool(return_logp),
    )
    return LinearPolicyLossFunction.apply(
        hidden,
        weight,
        bias,
        targets,
        detached(old_logp),
        detached(ref_logp),
        advantages.detach(),
        detached(sampling_weight),
        shaped_rows_of(golden_rows, cfg),
        cu_seqlens,
        cfg,
        opts,
    )
