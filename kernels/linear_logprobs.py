"""`linear_logprobs`: per-token log-probs (and entropy) of hidden @ weight.T, never forming [N, V].

    logp, ent = linear_logprobs(hidden [N, d], weight [V, d], targets [N], temperature=T,
                                bias=None, ignore_index=-100, return_entropy=True)

Differentiable w.r.t. hidden, weight and bias (entropy too). Under torch.no_grad() (old or
reference log-probs) it costs one forward sweep and O(N) memory. The backend is chosen by device:
`triton` on CUDA, `torch` elsewhere; `backend=` overrides (`triton` on CPU tensors runs only under
the Triton interpreter, TRITON_INTERPRET=1, which the tests use).
"""

from __future__ import annotations

import importlib
import os

import torch

from gcpo_fast.kernels.checks import check_finite_lse, check_linear_inputs, settle
from gcpo_fast.kernels.logprob_torch import WORKSPACE_BYTES

BACKENDS = ("triton", "torch")


def select_backend(backend, device: torch.device):
    """The engine module for `backend` (None: by device). Triton is imported only when used."""
    if backend is None:
        backend = "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on the CPU use backend='torch' "
            "or set TRITON_INTERPRET=1 before importing triton"
        )
    return importlib.import_module(f"gcpo_fast.kernels.logprob_{backend}")


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
    ignore_index=-100,
    return_entropy=False,
    backend=None,
    workspace_bytes=WORKSPACE_BYTES,
):
    """log softmax((hidden @ weight.T + bias) / temperature)[targets] as fp32 [N] (and entropy [N]).

    Ignored targets (== ignore_index) give logp 0, entropy 0 and no gradient.
    `workspace_bytes` bounds the only O(V) memory (one logits tile or chunk).
    """
    settle(check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index))
    engine = select_backend(backend, hidden.device)
    logp, ent = LinearLogprobsFunction.apply(
        hidden,
        weight,
        bias,
        targets,
        float(temperature),
        int(ignore_index),
        bool(return_entropy),
        engine,
        int(workspace_bytes),
    )
    return (logp, ent) if return_entropy else logp
