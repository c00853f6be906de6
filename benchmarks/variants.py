"""Inputs and variants of the loss benchmark (`python -m benchmarks.bench_loss`).

`make_inputs` builds one realistic batch (peaked logits, targets sampled from the softmax, packed
rows of mixed lengths) on the device it will run on (`device_inputs`: at Qwen2.5-7B's head, N=16384,
sampling the targets with the CPU's single-threaded multinomial took ~80 s of a GPU stage). Each
`build_<variant>(inp, case, ...)` returns a `Built`: a fwd+bwd callable (loss.backward(), leaving
gradients on its leaves), a forward-only callable (per-token log-probs, as for old log-probs) and a
`grads()` that reads dX (packed [N, d]) and dW back.
A variant that cannot run here raises `Skip(reason)`; one with a fallback (a peer's other
implementation) names it in `Built.fallback`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gcpo_fast.kernels import LossInputs, PolicyLossConfig, linear_logprobs, linear_policy_loss, policy_loss
from gcpo_fast.kernels.linear_policy_loss import plan_chunks
from gcpo_fast.kernels.policy_loss import batch_layout

MODELS = {  # (d, V) of the lm_head
    "qwen0.5b": (896, 151936),
    "qwen1.5b": (1536, 151936),
    "qwen7b": (3584, 152064),
    "llama8b": (4096, 128256),
}
# The two cases: the method, its loss switches (the trainer's recipe for it), whether old log-probs are
# given, and the Liger options that match it.
CASES = {
    "onpolicy-token": dict(
        method="dapo",
        config=dict(importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, loss_agg_mode="token-mean"),
        off_policy=False,
        liger_loss_type="dapo",
    ),
    "offpolicy-seq": dict(
        method="gcpo",
        config=dict(
            importance_sampling_level="sequence",
            epsilon_low=3e-4,
            epsilon_high=4e-4,
            loss_agg_mode="seq-mean-token-mean",
        ),
        off_policy=True,
        liger_loss_type="grpo",
    ),
}


def case_config(case, **run) -> PolicyLossConfig:
    """The case's loss switches, with run options (temperature, backend, workspace_bytes) on top."""
    return PolicyLossConfig(**CASES[case]["config"], **run)


VARIANTS = ("naive", "torch", "triton", "liger", "cce", "trl", "gemm-floor")


class Skip(Exception):
    """The variant cannot run here; the message says why."""


@dataclass
class Built:
    fwd_bwd: Callable[[], torch.Tensor]
    fwd: Callable[[], torch.Tensor]
    grads: Callable[[], tuple]
    leaves: list
    path: str
    notes: list = field(default_factory=list)
    tokens: int = 0  # tokens the variant computes logits for
    fallback: Callable[[str], Built] | None = None


# ---------------------------------------------------------------------------------------- inputs


def _lengths(n: int, rows: int, min_long: int, gen) -> list[int]:
    """Mixed row lengths summing to n (log-normal shares); when min_long < n / 2 the longest row is
    made longer than min_long (the others shrink in proportion)."""
    share = torch.exp(0.6 * torch.randn(rows, generator=gen))
    share = share / share.sum()
    big = int(share.argmax())
    if rows > 1 and share[big] * n <= min_long < n // 2:
        long_share = (min_long + 1) / n
        share = share * (1 - long_share) / (1 - share[big])
        share[big] = long_share
    lengths = [max(1, int(x)) for x in (share * n).tolist()]
    lengths[big] += n - sum(lengths)
    while sum(lengths) > n:  # rounding short rows up to 1 overshot: take from the longest
        lengths[lengths.index(max(lengths))] -= 1
    return lengths


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def _log_scale_for_entropy(base: torch.Tensor, target_entropy: float, steps: int = 40) -> torch.Tensor:
    """log(scale) such that the mean entropy of softmax(base * scale) is target_entropy, by bisection on the
    device (entropy falls as the scale grows; no host round trip per step)."""
    lo = torch.full((), math.log(1e-3), device=base.device)
    hi = torch.full((), math.log(1e4), device=base.device)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        above = _entropy(base * mid.exp()).mean() > target_entropy
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


SAMPLE_ROWS = 1024  # rows of [rows, V] fp32 logits at a time while sampling targets (600 MiB at V=152k)


def device_inputs(n, d, v, rows, dtype, device, temperature, target_entropy, old_noise, chunk_tokens, seed=0):
    """make_inputs' tensors, every one of size N, V or d drawn and computed on `device` (seeded there: CUDA's
    random stream differs from the CPU's, so a seed gives other numbers on another device), with no host
    round trip; the row layout (B lengths) is drawn on the CPU. Returns them on `device`, and the per-token
    entropy of 256 sampled rows (`entropy_sample`)."""
    device = torch.device(device)
    layout = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        w = 0.02 * torch.randn(v, d, device=device)
        h0 = torch.randn(n, d, device=device) * torch.exp(0.5 * torch.randn(n, 1, device=device))  # confidence varies
        sample = torch.randperm(n, device=device)[: min(n, 128)]
        base = h0[sample] @ w.T / temperature  # logits scale linearly with the hidden states
        hidden, weight = (h0 * _log_scale_for_entropy(base, target_entropy).exp()).to(dtype), w.to(dtype)
        del w, h0, base
        weight32 = weight.float()
        targets = torch.empty(n, dtype=torch.long, device=device)
        true_logp = torch.empty(n, device=device)
        for n0 in range(0, n, SAMPLE_ROWS):  # targets sampled from the softmax, SAMPLE_ROWS rows at a time
            logp = torch.log_softmax((hidden[n0 : n0 + SAMPLE_ROWS].float() @ weight32.T) / temperature, -1)
            targets[n0 : n0 + SAMPLE_ROWS] = torch.multinomial(logp.exp(), 1).squeeze(1)
            true_logp[n0 : n0 + SAMPLE_ROWS] = logp.gather(1, targets[n0 : n0 + SAMPLE_ROWS, None]).squeeze(1)
        check = torch.randperm(n, device=device)[: min(n, 256)]  # entropy of the final inputs
        entropy_sample = _entropy((hidden[check].float() @ weight32.T) / temperature)
        del weight32, logp
        old_logp = true_logp + old_noise * torch.randn(n, device=device)
        advantages = torch.randn(rows, device=device)
    lengths = _lengths(n, rows, chunk_tokens, layout)
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    return dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        cu_seqlens=cu,
        advantages=advantages,
        old_logp=old_logp,
        temperature=temperature,
        lengths=lengths,
        entropy_sample=entropy_sample,
    )


def make_inputs(n, d, v, rows, dtype, device, temperature, target_entropy, old_noise, chunk_tokens, seed=0):
    """One batch on `device`: hidden [N, d] and weight [V, d] (dtype) scaled so the mean per-token entropy of
    softmax(hidden @ weight.T / T) is target_entropy nats; targets sampled from that softmax; old log-probs =
    true log-probs + N(0, old_noise); advantages ~ N(0, 1) per row; `entropy`: the measured entropy of the
    final inputs (mean, p10, p50, p90 over 256 rows). Built where it runs (device_inputs)."""
    inp = device_inputs(n, d, v, rows, dtype, device, temperature, target_entropy, old_noise, chunk_tokens, seed)
    ent = inp.pop("entropy_sample").cpu()
    inp["entropy"] = dict(
        mean=ent.mean().item(),
        p10=ent.quantile(0.1).item(),
        p50=ent.median().item(),
        p90=ent.quantile(0.9).item(),
        rows_sampled=len(ent),
    )
    return inp


def torch_path(inp, case, workspace_bytes) -> str:
    """Which path our torch backend takes for this case (the plan linear_policy_loss makes)."""
    n, v = inp["hidden"].shape[0], inp["weight"].shape[0]
    chunk = max(1, workspace_bytes // (4 * v))
    whole_rows = case_config(case).importance_sampling_level == "sequence" and CASES[case]["off_policy"]
    if plan_chunks(inp["cu_seqlens"], n, chunk, whole_rows) is None:
        return f"recompute 8NVd (a row > chunk of {chunk} tokens)"
    return f"grad-in-forward 6NVd (chunks of {chunk} tokens)"


def to_device(inp, device):
    return {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in inp.items()}


def _leaves(inp):
    return inp["hidden"].requires_grad_(True), inp["weight"].requires_grad_(True)


def _inputs(inp, case) -> LossInputs:
    return LossInputs(
        inp["advantages"], inp["cu_seqlens"], old_logp=inp["old_logp"] if CASES[case]["off_policy"] else None
    )


def ce_coefficients(inp, case):
    """c_t = w_t * A_row: sum_t c_t * CE_t is the policy gradient without ratios (importance_sampling_level
    'none') with the case's aggregation weights w_t; on-policy its gradient equals the token-level loss's."""
    mask = torch.ones_like(inp["targets"], dtype=torch.bool)
    rows, weight, _, _ = batch_layout(mask, LossInputs(inp["advantages"], inp["cu_seqlens"]), case_config(case))
    return weight * inp["advantages"][rows]


# -------------------------------------------------------------------------------------- variants


def naive_logp(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


def build_naive(inp, case, objective="policy", **_):
    """Materialised [N, V] logits; `objective='ce'` is the advantage-weighted CE (CCE's reference)."""
    x, w = _leaves(inp)
    t, temp = inp["targets"], inp["temperature"]
    coef = ce_coefficients(inp, case) if objective == "ce" else None

    def fwd_bwd():
        logp = naive_logp(x, w, t, temp)
        if coef is not None:
            loss = -(coef * logp).sum()
        else:
            loss = policy_loss(logp, _inputs(inp, case), case_config(case))[0]
        loss.backward()
        return loss

    return Built(
        fwd_bwd,
        lambda: naive_logp(x, w, t, temp),
        lambda: (x.grad, w.grad),
        [x, w],
        "materialised logits",
        tokens=x.shape[0],
    )


def _build_ours(inp, case, backend, workspace_bytes):
    x, w = _leaves(inp)
    kw = dict(temperature=inp["temperature"], backend=backend, workspace_bytes=workspace_bytes)
    config = case_config(case, **kw)

    def fwd_bwd():
        loss = linear_policy_loss(x, w, inp["targets"], _inputs(inp, case), config)[0]
        loss.backward()
        return loss

    path = torch_path(inp, case, workspace_bytes) if backend == "torch" else "recompute 8NVd (triton backend)"
    return Built(
        fwd_bwd,
        lambda: linear_logprobs(x, w, inp["targets"], **kw),
        lambda: (x.grad, w.grad),
        [x, w],
        path,
        tokens=x.shape[0],
    )


def build_torch(inp, case, workspace_bytes, **_):
    return _build_ours(inp, case, "torch", workspace_bytes)


def build_triton(inp, case, workspace_bytes, **_):
    if not torch.cuda.is_available() or inp["hidden"].device.type != "cuda":
        raise Skip("backend='triton' needs a CUDA device (none here)")
    return _build_ours(inp, case, "triton", workspace_bytes)


def build_liger(inp, case, compiled=True, **_):
    """Liger's LigerFusedLinearGRPOLoss on the padded [B, T_max, d] layout it takes."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase
    except ImportError as e:
        raise Skip(f"liger_kernel not importable: {e}") from None
    cu, dev = inp["cu_seqlens"].long(), inp["hidden"].device
    lengths = cu[1:] - cu[:-1]
    b, t_max, d = lengths.numel(), int(lengths.max()), inp["hidden"].shape[1]
    row = torch.repeat_interleave(torch.arange(b, device=dev), lengths)
    pos = torch.arange(cu[-1].item(), device=dev) - cu[:-1][row]
    xp = torch.zeros(b, t_max, d, dtype=inp["hidden"].dtype, device=dev)
    xp[row, pos] = inp["hidden"]
    xp.requires_grad_(True)
    w = inp["weight"].requires_grad_(True)
    inp["hidden"] = None  # the padded copy is the input now
    ids = torch.zeros(b, t_max, dtype=torch.long, device=dev)
    ids[row, pos] = inp["targets"]
    mask = torch.zeros(b, t_max, device=dev)
    mask[row, pos] = 1.0
    old = None
    if CASES[case]["off_policy"]:
        old = torch.zeros(b, t_max, device=dev)
        old[row, pos] = inp["old_logp"]
    ours = case_config(case)
    opts = dict(
        beta=0.0,
        use_ref_model=False,
        chunk_size=1,
        temperature=inp["temperature"],
        loss_type=CASES[case]["liger_loss_type"],
        importance_sampling_level=ours.importance_sampling_level,
        epsilon_low=ours.epsilon_low,
        epsilon_high=ours.epsilon_high,
    )
    loss_fn = LigerFusedLinearGRPOLoss(compiled=compiled, **opts)

    def fwd_bwd():
        loss = loss_fn(xp, w, ids, mask, inp["advantages"], old_per_token_logps=old)[0]
        loss.backward()
        return loss

    notes = [
        f"Liger options: {opts}, compiled={compiled} (ours: {CASES[case]['method']}, "
        f"{ours.importance_sampling_level}-level, eps {ours.epsilon_low}/{ours.epsilon_high}, "
        f"{ours.loss_agg_mode}, no KL)",
        f"padded layout [B={b}, T_max={t_max}]: logits for {b * t_max} token slots vs N={len(row)} packed; "
        "forward-only = LigerFusedLinearPPOBase.chunk_forward (its selective log-prob)",
    ]
    built = Built(
        fwd_bwd,
        lambda: LigerFusedLinearPPOBase.chunk_forward(xp, w, ids, temperature=inp["temperature"])[row, pos],
        lambda: (None if xp.grad is None else xp.grad[row, pos], w.grad),
        [xp, w],
        "per row chunk: fwd + autograd.grad in the forward (8NVd, recompute)",
        notes,
        b * t_max,
    )
    if compiled:

        def fallback(reason):
            inp["hidden"] = xp.detach()[row, pos]
            again = build_liger(inp, case, compiled=False)
            again.notes.insert(0, f"compiled=True failed ({reason}); ran with compiled=False")
            return again

        built.fallback = fallback
    return built


def build_cce(inp, case, impl=None, **_):
    """Cut Cross-Entropy as the linear cross-entropy floor: sum_t c_t CE_t with c_t = w_t A_row."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Skip(f"cut_cross_entropy not importable: {e}") from None
    impl = impl or "cce"
    x, w = _leaves(inp)
    coef, t, temp = ce_coefficients(inp, case), inp["targets"], inp["temperature"]

    def nll():
        return linear_cross_entropy(x if temp == 1.0 else x / temp, w, t, reduction="none", impl=impl)

    def fwd_bwd():
        loss = (coef * nll()).sum()
        loss.backward()
        return loss

    notes = [
        f"CCE impl={impl!r}"
        + (", filter_eps='high' (its default gradient filter)" if impl == "cce" else "")
        + ": it computes a cross-entropy, not a policy loss; objective sum_t w_t A_row "
        "CE_t (= importance_sampling_level 'none' with this case's aggregation), checked against naive on that "
        "objective"
    ]
    if impl == "torch_compile":
        notes.append("impl='torch_compile' is torch.compile of (e @ c.T -> cross_entropy): it materialises [N, V]")
    built = Built(fwd_bwd, lambda: -nll(), lambda: (x.grad, w.grad), [x, w], f"linear CE ({impl})", notes, x.shape[0])
    if impl == "cce":

        def fallback(reason):
            again = build_cce(inp, case, impl="torch_compile")
            again.notes.insert(0, f"impl='cce' failed ({reason}); fell back to impl='torch_compile'")
            return again

        built.fallback = fallback
    return built


TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE: the vocabulary width of GRPOTrainer's tiles


def _trl_backward_helper() -> list[str]:
    """ChunkedLogProbFunction's backward imports maybe_gather_lm_head_ctx from trl.trainer.utils, a module that
    needs pandas, accelerate and datasets (pyarrow: ~60 MB, more than the GPU machine may be carried). Where it
    does not import, a module of that name holding only that function, as TRL's returns it without DeepSpeed
    ZeRO-3 (a null context), lets the kernel's backward run as it is; the note says so."""
    try:
        import trl.trainer.utils  # noqa: F401
    except ImportError as e:
        module = types.ModuleType("trl.trainer.utils")
        module.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = module
        return [f"trl.trainer.utils not importable ({e}): its maybe_gather_lm_head_ctx is a null context here, "
                "as TRL's is without DeepSpeed ZeRO-3"]  # fmt: skip
    return []


def build_trl(inp, case, **_):
    """TRL's fused LM head, what its GRPOTrainer calls for the log-probs (trl >= 1.15:
    trl.kernels.chunked_logprob.ChunkedLogProbFunction, [4096, 32768] tiles through cuBLAS, a Triton kernel
    folding each into log-sum-exp statistics on CUDA, torch ops elsewhere; the backward recomputes the tiles),
    then the case's loss on those log-probs (gcpo_fast.kernels.policy_loss, as naive)."""
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError as e:
        raise Skip(f"trl not importable: {e}") from None
    notes = [f"trl ChunkedLogProbFunction, chunk_size={TRL_CHUNK} (GRPOTrainer's), log-probs only (no entropy)"]
    notes += _trl_backward_helper()
    x, w = _leaves(inp)
    t, temp = inp["targets"], inp["temperature"]

    def logp():
        return ChunkedLogProbFunction.apply(x, w, None, t, temp, TRL_CHUNK, None, 1.0, ("log_probs",))[0]

    def fwd_bwd():
        loss = policy_loss(logp(), _inputs(inp, case), case_config(case))[0]
        loss.backward()
        return loss

    return Built(fwd_bwd, logp, lambda: (x.grad, w.grad), [x, w], "vocab tiles, recompute in the backward (8NVd)",
                 notes, x.shape[0])  # fmt: skip


def build_gemm_floor(inp, case, **_):
    """The bare GEMM triplet X W^T, dZ W, dZ^T X (torch.matmul): 6NVd, the floor of any fused loss."""
    x, w = inp["hidden"], inp["weight"]
    dz = torch.randn(x.shape[0], w.shape[0], device=x.device).to(x.dtype) * 1e-3

    def fwd_bwd():
        z = x @ w.T
        del z
        return (dz @ w, dz.T @ x)

    return Built(
        fwd_bwd,
        lambda: x @ w.T,
        lambda: (None, None),
        [],
        "3 GEMMs, no softmax",
        tokens=x.shape[0],
        notes=["gemm-floor: its dZ [N, V] is one of its inputs; its memory includes the [N, V] product"],
    )


BUILDERS = {
    "naive": build_naive,
    "torch": build_torch,
    "triton": build_triton,
    "liger": build_liger,
    "cce": build_cce,
    "trl": build_trl,
    "gemm-floor": build_gemm_floor,
}
