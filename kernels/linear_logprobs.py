"""`linear_logprobs`: per-token log-probs (and entropy) of hidden @ weight.T, never forming [N, V].

    logp, ent = linear_logprobs(hidden [N, d], weight [V, d], targets [N], temperature=T,
                                bias=None, ignore_index=IGNORE_INDEX, return_entropy=True,
                                backend=Backend.AUTO, workspace_bytes=None)

Differentiable w.r.t. hidden, weight and bias (entropy too). Under torch.no_grad() (old or
reference log-probs) it costs one forward sweep and O(N) memory. Backend.AUTO is Triton on CUDA and
torch elsewhere (Backend.TRITON on CPU tensors runs only under the Triton interpreter,
TRITON_INTERPRET=1, which the tests use). workspace_bytes bounds the only O(V) buffer (the torch
backend's logits tile, the Triton backward's dZ slab of workspace_bytes // (V * itemsize) tokens);
None sizes it for the device: 256 MiB on the CPU, on CUDA an eighth of the free memory clamped to
[256 MiB, 4 GiB] (kernels/options.py: at V = 152064 fp32, 7061 tokens per chunk instead of 441).
"""

from __future__ import annotations

import torch

from gcpo_fast.kernels.checks import check_finite_lse, check_linear_inputs, settle
from gcpo_fast.kernels.options import (
    IGNORE_INDEX,
    Backend,
    check_workspace,
    logprob_engine,
    resolve_backend,
    workspace_for_device,
)


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy, engine, workspace_bytes):
        logp, lse, ent = engine.linear_logprob_forward(
            hidden, weight, bias, targets, temperature, ignore_index, return_entropy, workspace_bytes=workspace_bytes
        )
        check_finite_lse(lse, hidden, weight, bias)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.opts = (temperature, ignore_index, engine, workspace_bytes)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        temperature, ignore_index, engine, workspace_bytes = ctx.opts
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        dx, dw, db = engine.linear_logprob_backward(
            hidden,
            weight,
            bias,
            targets,
            lse,
            ent,
            grad_logp,
            grad_ent,
            temperature,
            ignore_index,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
            workspace_bytes,
        )
        return dx, dw, db, None, None, None, None, None, None


def linear_logprobs(
    hidden,
    weight,
    targets,
    temperature=1.0,
    bias=None,
    ignore_index=IGNORE_INDEX,
    return_entropy=False,
    backend=Backend.AUTO,
    workspace_bytes=None,
):
    """log softmax((hidden @ weight.T + bias) / temperature)[targets] as fp32 [N] (and entropy [N]).

    Ignored targets (== ignore_index) give logp 0, entropy 0 and no gradient.
    `workspace_bytes` bounds the only O(V) memory (one logits tile or chunk); None: sized for the device.
    """
    settle(check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index))
    check_workspace(workspace_bytes)
    engine = logprob_engine(resolve_backend(backend, hidden.device))
    logp, ent = LinearLogprobsFunction.apply(
        hidden,
        weight,
        bias,
        targets,
        float(temperature),
        int(ignore_index),
        bool(return_entropy),
        engine,
        workspace_for_device(workspace_bytes, hidden.device),
    )
    return (logp, ent) if return_entropy else logp
