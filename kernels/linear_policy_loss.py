"""`linear_policy_loss`: linear_logprobs and policy_loss composed, the op the trainer calls.

    config = PolicyLossConfig(importance_sampling_level="sequence", ...)     # once: math switches
    inputs = LossInputs(advantages [B], cu_seqlens [B+1], old_logp=old [N], sampling_weight=..., ...)
    loss, stats = linear_policy_loss(hidden [N, d], weight [V, d], targets [N], inputs, config,
                                     bias=None, compute_entropy=False, return_logp=False)

The log-probs are those of `linear_logprobs` at config.temperature (targets == IGNORE_INDEX do not
count; inputs.mask, if given, drops more tokens); the loss is `policy_loss`'s on them, with every
input of LossInputs (old_logp=None: on-policy, ratios 1 in value that carry the gradient;
golden with golden_objective="shaped": LUFFY's shaped term on those rows). The backward never
forms [N, V]; two ways to get there:

- gradient in the forward (torch backend, 6NVd): when d loss / d logp_t is known as soon as the
  log-probs of the chunk holding token t are (on-policy, token-level ratios, no ratio, shaped rows,
  or sequence-level rows that each fit in one chunk; chunks of workspace_bytes // (4 V) tokens), dX
  and dW are computed in the forward chunk by chunk and the backward only scales them by the
  incoming gradient, as Liger's fused linear cross-entropy does.
- recompute (8NVd): otherwise (sequence-level off-policy with a row longer than a chunk, and always
  on the triton backend), the forward keeps O(N) state and the backward recomputes the logits.
`stats` holds TRL's clip metrics, `ratio_mean`, `kl` (beta > 0), `entropy` (compute_entropy=True)
and `num_tokens`, as 0-d tensors computed in the same pass; with return_logp=True also `logp`, the
per-token log-probs [N] (detached fp32), for metrics that need more than token means (per-row ones).

config.workspace_bytes = None sizes the O(V) buffer for the device (kernels/options.py): 256 MiB on
the CPU; on CUDA an eighth of the free memory, clamped to [256 MiB, 4 GiB], which at V = 152064 gives
fp32 chunks of 7061 tokens (N = 16384: 3 chunks, N = 65536: 10) where 256 MiB gave 441 (38 and 149).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from gcpo_fast.kernels.checks import check_finite_lse, check_linear_inputs, check_policy_inputs, settle
from gcpo_fast.kernels.options import (
    IGNORE_INDEX,
    Backend,
    LossInputs,
    PolicyLossConfig,
    logprob_engine,
    resolve_backend,
    workspace_for_device,
)
from gcpo_fast.kernels.policy_loss import (
    STAT_NAMES,
    batch_layout,
    batch_policy_terms,
    check_config,
    check_loss_inputs,
    finalize_stats,
    policy_terms,
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
    """forward(hidden, weight, bias, targets, inputs, config, compute_entropy, return_logp); config is resolved
    (a concrete backend and workspace_bytes). Only hidden, weight and bias get gradients."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, inputs: LossInputs, cfg: PolicyLossConfig, compute_entropy, return_logp
    ):
        needs = ctx.needs_input_grad[:3]
        needs_dx, needs_dw, needs_db = needs[0], needs[1], bias is not None and needs[2]
        mask = targets != IGNORE_INDEX
        if inputs.mask is not None:
            mask = mask & inputs.mask.bool()
        n, v = hidden.shape[0], weight.shape[0]
        engine = logprob_engine(cfg.backend)
        chunks = None
        if any(needs) and cfg.backend is Backend.TORCH:
            whole_rows = cfg.importance_sampling_level == "sequence" and inputs.old_logp is not None
            chunks = plan_chunks(inputs.cu_seqlens, n, max(1, cfg.workspace_bytes // (4 * v)), whole_rows)

        if chunks is not None:
            layout = batch_layout(mask, inputs, cfg)
            acc = {
                "loss": torch.zeros((), device=hidden.device),
                "stats": torch.zeros(len(STAT_NAMES), device=hidden.device),
            }

            def grad_fn(n0, n1, logp):
                loss, grad, stat_sums = policy_terms(logp, (n0, n1), mask, layout, inputs, cfg)
                acc["loss"] += loss
                acc["stats"] = acc["stats"] + stat_sums
                return grad

            logp, lse, ent, dx, dw, db = engine.linear_logprob_forward_backward(
                hidden,
                weight,
                bias,
                targets,
                cfg.temperature,
                IGNORE_INDEX,
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
                cfg.temperature,
                IGNORE_INDEX,
                compute_entropy,
                workspace_bytes=cfg.workspace_bytes,
            )
            check_finite_lse(lse, hidden, weight, bias)
            loss, grad, stat_sums = batch_policy_terms(logp, mask, inputs, cfg)
            ctx.save_for_backward(hidden, weight, bias, targets, lse, grad)
            ctx.cfg, ctx.needs = cfg, (needs_dx, needs_dw, needs_db)
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
            cfg = ctx.cfg
            dx, dw, db = logprob_engine(cfg.backend).linear_logprob_backward(
                hidden,
                weight,
                bias,
                targets,
                lse,
                None,
                grad * grad_loss,
                None,
                cfg.temperature,
                IGNORE_INDEX,
                *ctx.needs,
                cfg.workspace_bytes,
            )
        # targets, inputs, config, compute_entropy, return_logp take no gradient
        return dx, dw, db, None, None, None, None, None


def linear_policy_loss(
    hidden,
    weight,
    targets,
    inputs: LossInputs,
    config: PolicyLossConfig,
    *,
    bias=None,
    compute_entropy=False,
    return_logp=False,
):
    """Fused clipped policy loss of packed completions from hidden states; returns (loss, stats).

    hidden [N, d] are the states that predict targets [N] (the completion tokens of B rows packed by
    inputs.cu_seqlens [B+1]); weight [V, d] is the lm_head (tied embeddings: the embedding matrix),
    bias [V] or None. Tokens whose target is IGNORE_INDEX (or inputs.mask False) do not count.
    inputs: the per-call tensors (`LossInputs`); config: the math switches, temperature, backend and
    workspace bound (`PolicyLossConfig`). compute_entropy adds stats["entropy"] (token mean);
    return_logp adds stats["logp"] [N].
    """
    check_loss_inputs(inputs)
    check_config(config)
    pending = check_linear_inputs(hidden, weight, targets, bias, config.temperature, IGNORE_INDEX)
    fake_logp = torch.empty(hidden.shape[0], device=hidden.device)
    pending += check_policy_inputs(fake_logp, inputs, config)[1]
    settle(pending)
    config = replace(
        config,
        backend=resolve_backend(config.backend, hidden.device),
        workspace_bytes=workspace_for_device(config.workspace_bytes, hidden.device),
    )
    return LinearPolicyLossFunction.apply(
        hidden, weight, bias, targets, inputs, config, bool(compute_entropy), bool(return_logp)
    )
