"""Triton backend of the fused linear log-prob op: no [N, V] tensor is ever materialised.

Math (all accumulation in fp32), for hidden X [N, d], lm-head weight W [V, d], bias b [V] (optional),
targets t [N] (int64), temperature T:

    z[n, v]  = (X[n] . W[v] + b[v]) / T                       logits, never stored whole
    lse[n]   = log sum_v exp(z[n, v])
    logp[n]  = z[n, t_n] - lse[n]                              (0 where t_n == ignore_index)
    H[n]     = lse[n] - sum_v p[n, v] z[n, v],  p = exp(z - lse)   (entropy, 0 where ignored)

Backward, with upstream grads g_lp [N] and g_H [N] (ignored rows contribute nothing):

    dZ[n, v] = ( g_lp[n] (1[v == t_n] - p[n, v]) - g_H[n] p[n, v] (z[n, v] - lse[n] + H[n]) ) / T
    dX = dZ @ W,   dW = dZ^T @ X,   db = dZ.sum(0)

Forward: one kernel `_linear_logprob_fwd_kernel`, grid (cdiv(N, BLOCK_N), SPLIT_V). A program owns
BLOCK_N tokens and a contiguous slice of the vocabulary. It loops over BLOCK_V tiles of its slice,
builds each [BLOCK_N, BLOCK_V] logit tile with `tl.dot` over BLOCK_D steps of d, and keeps per row
an online max m, sum s = sum exp(z - m), shifted moment a = sum exp(z - m) (z - m) (for the entropy,
free of the cancellation in lse - E[z]) and the target logit. Partials go to a [4, SPLIT_V, N] fp32
workspace that a deterministic torch finalize merges (no atomics: identical calls are bitwise equal):

    M = max_i m_i, S = sum_i s_i e^(m_i - M), lse = M + log S,
    A = sum_i e^(m_i - M) (a_i + s_i (m_i - M)),  H = log S - A / S.

Backward: token chunks whose dZ slab [chunk, V] (hidden.dtype) fits `workspace_bytes`. Per chunk,
`_linear_logprob_bwd_dz_kernel` (grid (cdiv(chunk, BLOCK_N), cdiv(V, BLOCK_V))) recomputes the
logit tile and writes dZ; cuBLAS (torch.matmul / addmm) then does dX_chunk = dZ @ W and
dW_fp32 += dZ^T @ X_chunk, and db_fp32 += dZ.sum(0). The slab is the only O(V) buffer.

Block sizes come from the explicit tables FWD_CONFIGS / BWD_CONFIGS (no autotuning) so tests and
`aot_report` can enumerate every configuration; INTERPRETER_CONFIG is used for CPU tensors (Triton
interpreter, TRITON_INTERPRET=1). fp32 inputs use IEEE fp32 dots unless
torch.backends.cuda.matmul.allow_tf32 is set (then TF32), matching torch.matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "Config",
    "FWD_CONFIGS",
    "BWD_CONFIGS",
    "INTERPRETER_CONFIG",
    "linear_logprob_forward",
    "linear_logprob_backward",
]


@dataclass(frozen=True)
class Config:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# GPU tables. BLOCK_N >= 64 and num_warps >= 4 keep Hopper's wgmma eligible for 16-bit inputs;
# every entry is compiled for sm_80 / sm_90 by `gcpo_fast.kernels.aot_report` (no spills, smem fits).
FWD_CONFIGS: dict[str, Config] = {
    "m64": Config(block_n=64, block_v=128, block_d=64, num_warps=4, num_stages=3),
    "m128": Config(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3),
    "fp32": Config(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=2),
}
BWD_CONFIGS: dict[str, Config] = {
    "m64": Config(block_n=64, block_v=128, block_d=64, num_warps=4, num_stages=3),
    "m128": Config(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3),
    "fp32": Config(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=2),
}
# CPU tensors run under the Triton interpreter: small tiles so tiny test shapes still cover
# several N, V and d tiles.
INTERPRETER_CONFIG = Config(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1)

_DEFAULT_NUM_SMS = 132  # H100 SXM; used when the device cannot be queried (CPU / interpreter)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(
    X,
    W,
    BIAS,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    stride_x,
    stride_w,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z[BLOCK_N, BLOCK_V] = (X[rows] @ W[cols]^T + b[cols]) / T in fp32; -1e30 outside col_mask."""
    offs_d = tl.arange(0, BLOCK_D)
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_x + offs_d[None, :]
    w_ptrs = W + cols.to(tl.int64)[:, None] * stride_w + offs_d[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        d_mask = (k + offs_d) < D
        x = tl.load(x_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    z = acc * inv_temp
    # a finite sentinel: exp(z - m) is exactly 0 on masked columns and 0 * (z - m) is not NaN
    return tl.where(col_mask[None, :], z, -1.0e30)


@triton.jit
def _linear_logprob_fwd_kernel(
    X,
    W,
    BIAS,
    TGT,
    WS_M,
    WS_S,
    WS_A,
    WS_ZT,
    N,
    V,
    D,
    stride_x,
    stride_w,
    v_per_split,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(TGT + rows, mask=row_mask, other=-1).to(tl.int32)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    a = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        z = _logits_tile(
            X,
            W,
            BIAS,
            rows,
            row_mask,
            cols,
            col_mask,
            D,
            stride_x,
            stride_w,
            inv_temp,
            HAS_BIAS,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a valid column
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        p = tl.exp(z - m_new[:, None])  # 0 on masked columns
        if WITH_ENTROPY:
            zc = z - m_new[:, None]  # p * zc == 0 on masked columns
            shift = s * tl.where(s > 0, m - m_new, 0.0)  # no 0 * -inf on the first tile
            a = alpha * (a + shift) + tl.sum(p * zc, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

    out = pid_s * N + rows
    tl.store(WS_M + out, m, mask=row_mask)
    tl.store(WS_S + out, s, mask=row_mask)
    tl.store(WS_ZT + out, zt, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(WS_A + out, a, mask=row_mask)


@triton.jit
def _linear_logprob_bwd_dz_kernel(
    X,
    W,
    BIAS,
    TGT,
    LSE,
    ENT,
    GLP,
    GENT,
    DZ,
    N,
    V,
    D,
    stride_x,
    stride_w,
    stride_dz,
    inv_temp,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)  # token blocks vary fastest: concurrent programs share the W tile
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    tgt = tl.load(TGT + rows, mask=row_mask, other=ignore_index).to(tl.int32)
    valid = row_mask & (tgt != ignore_index)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(GLP + rows, mask=valid, other=0.0)

    z = _logits_tile(
        X,
        W,
        BIAS,
        rows,
        row_mask,
        cols,
        col_mask,
        D,
        stride_x,
        stride_w,
        inv_temp,
        HAS_BIAS,
        DOT_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    logp = z - lse[:, None]  # ~ -1e30 on masked columns: p = 0
    p = tl.exp(logp)
    dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
    if HAS_ENT_GRAD:
        ent = tl.load(ENT + rows, mask=valid, other=0.0)
        gh = tl.load(GENT + rows, mask=valid, other=0.0)
        dz -= gh[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_temp
    dz_ptrs = DZ + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(dz_ptrs, dz.to(DZ.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16 / bf16 operands


def pick_config(table: dict[str, Config], n_tokens: int, dtype: torch.dtype, device: torch.device) -> Config:
    """The table entry a launcher uses: interpreter tiles on CPU, "fp32" for fp32 inputs, and for
    16-bit inputs BLOCK_N = 128 once that still gives >= one token block per SM, else 64."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return table["fp32"]
    big = table["m128"]
    return big if triton.cdiv(n_tokens, big.block_n) >= _num_sms(device) else table["m64"]


def _split_v(n_blocks: int, v_tiles: int, device: torch.device) -> int:
    """Vocabulary splits so that the grid has >= ~2 programs per SM; 1 when N alone fills it."""
    return max(1, min(v_tiles, triton.cdiv(2 * _num_sms(device), n_blocks)))


def _check_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"hidden and weight must share one dtype in fp32/fp16/bf16, got {hidden.dtype} and {weight.dtype}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def _prepare(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor):
    """Checked, contiguous kernel inputs with int64 targets."""
    _check_inputs(hidden, weight, bias, targets)
    return (
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        targets.contiguous().to(torch.int64),
    )


def linear_logprob_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    workspace_bytes: int = 256 * 2**20,
    *,
    config: Config | None = None,
    split_v: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """hidden [N,d], weight [V,d] (same dtype: fp32/fp16/bf16), bias [V] or None, targets [N] int64.
    Returns logp [N] fp32, lse [N] fp32 (logsumexp of z), entropy [N] fp32 or None,
    where z = (hidden @ weight.T + bias) / temperature computed with fp32 accumulation.
    logp = z[target] - lse; entropy = lse - sum_v softmax(z)_v z_v.
    Rows whose target == ignore_index get logp 0 and entropy 0 (lse still computed).
    The only extra memory is a [4, SPLIT_V, N] fp32 workspace (`workspace_bytes` is accepted for
    signature parity with the torch backend; nothing here is O(V)).
    `config` / `split_v` override the table entry and the vocabulary split (tests use them)."""
    hidden, weight, bias, targets = _prepare(hidden, weight, bias, targets)
    (N, D), V, dev = hidden.shape, weight.shape[0], hidden.device
    if N == 0:
        empty = hidden.new_empty(0, dtype=torch.float32)
        return empty, empty.clone(), (empty.clone() if with_entropy else None)

    cfg = config or pick_config(FWD_CONFIGS, N, hidden.dtype, dev)
    n_blocks = triton.cdiv(N, cfg.block_n)
    v_tiles = triton.cdiv(V, cfg.block_v)
    split = min(split_v, v_tiles) if split_v is not None else _split_v(n_blocks, v_tiles, dev)
    tiles_per_split = triton.cdiv(v_tiles, split)
    split = triton.cdiv(v_tiles, tiles_per_split)  # no empty slice
    ws = torch.empty(4, split, N, device=dev, dtype=torch.float32)
    ws_m, ws_s, ws_a, ws_zt = ws.unbind(0)

    _linear_logprob_fwd_kernel[(n_blocks, split)](
        hidden,
        weight,
        bias if bias is not None else hidden,
        targets,
        ws_m,
        ws_s,
        ws_a,
        ws_zt,
        N,
        V,
        D,
        hidden.stride(0),
        weight.stride(0),
        tiles_per_split * cfg.block_v,
        1.0 / float(temperature),
        HAS_BIAS=bias is not None,
        WITH_ENTROPY=bool(with_entropy),
        DOT_PRECISION=_dot_precision(hidden.dtype),
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )

    # deterministic merge of the SPLIT_V partials (fixed-order torch reductions)
    big_m = ws_m.amax(dim=0)
    scale = torch.exp(ws_m - big_m)
    big_s = (ws_s * scale).sum(dim=0)
    log_s = torch.log(big_s)
    lse = big_m + log_s
    keep = targets != ignore_index
    logp = torch.where(keep, ws_zt.sum(dim=0) - lse, 0.0)
    entropy = None
    if with_entropy:
        big_a = (scale * (ws_a + ws_s * (ws_m - big_m))).sum(dim=0)
        entropy = torch.where(keep, log_s - big_a / big_s, 0.0)
    return logp, lse, entropy


def _accumulate_dw(dw32: Tensor, dz: Tensor, x: Tensor) -> None:
    """dw32 += dz^T @ x with fp32 accumulation across chunks."""
    if dz.dtype == torch.float32:
        dw32.addmm_(dz.t(), x)
        return
    if dz.is_cuda:
        try:  # 16-bit GEMM straight into the fp32 accumulator (torch >= 2.8 on CUDA)
            torch.addmm(dw32, dz.t(), x, out_dtype=torch.float32, out=dw32)
            return
        except (RuntimeError, TypeError):
            pass
    dw32 += torch.matmul(dz.t(), x).float()  # one rounding per chunk, then fp32 accumulation


def linear_logprob_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
    needs_dx: bool,
    needs_dw: bool,
    needs_db: bool,
    workspace_bytes: int = 256 * 2**20,
    *,
    config: Config | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """grad_logp [N] fp32, grad_entropy [N] fp32 or None (then entropy may be None).
    dZ[n,v] = ( g_lp[n] * (1[v == t_n] - p[n,v]) - g_H[n] * p[n,v] * (z[n,v] - lse[n] + H[n]) ) / T,
    p = exp(z - lse); rows with target == ignore_index contribute nothing.
    dX = dZ @ W  (hidden.dtype), dW = dZ^T @ X accumulated in fp32 then cast to weight.dtype,
    db = dZ.sum(0) (fp32 accumulation, bias.dtype). Returns None for what is not needed.
    The dZ slab holds max(1, workspace_bytes // (V * itemsize)) rows (at least one row)."""
    needs_db = needs_db and bias is not None
    hidden, weight, bias, targets = _prepare(hidden, weight, bias, targets)
    (N, D), V, dev = hidden.shape, weight.shape[0], hidden.device
    dx = torch.empty_like(hidden) if needs_dx else None
    dw32 = torch.zeros(V, D, device=dev, dtype=torch.float32) if needs_dw else None
    db32 = torch.zeros(V, device=dev, dtype=torch.float32) if needs_db else None

    if N > 0 and (needs_dx or needs_dw or needs_db):
        has_ent = grad_entropy is not None
        if has_ent and entropy is None:
            raise ValueError("grad_entropy given without the forward entropy")
        lse = lse.contiguous().float()
        glp = grad_logp.float().contiguous()  # autograd may hand in expanded grads
        ent = entropy.contiguous().float() if has_ent else lse
        gent = grad_entropy.float().contiguous() if has_ent else glp
        cfg = config or pick_config(BWD_CONFIGS, N, hidden.dtype, dev)

        itemsize = hidden.element_size()
        chunk = max(1, workspace_bytes // (V * itemsize))
        if chunk >= cfg.block_n:
            chunk -= chunk % cfg.block_n
        chunk = min(chunk, N)
        slab = torch.empty(chunk, V, device=dev, dtype=hidden.dtype)
        inv_temp = 1.0 / float(temperature)
        for n0 in range(0, N, chunk):
            n1 = min(N, n0 + chunk)
            dz = slab[: n1 - n0]
            x = hidden[n0:n1]
            grid = (triton.cdiv(n1 - n0, cfg.block_n), triton.cdiv(V, cfg.block_v))
            _linear_logprob_bwd_dz_kernel[grid](
                x,
                weight,
                bias if bias is not None else hidden,
                targets[n0:n1],
                lse[n0:n1],
                ent[n0:n1],
                glp[n0:n1],
                gent[n0:n1],
                dz,
                n1 - n0,
                V,
                D,
                x.stride(0),
                weight.stride(0),
                dz.stride(0),
                inv_temp,
                int(ignore_index),
                HAS_BIAS=bias is not None,
                HAS_ENT_GRAD=has_ent,
                DOT_PRECISION=_dot_precision(hidden.dtype),
                BLOCK_N=cfg.block_n,
                BLOCK_V=cfg.block_v,
                BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
            if needs_dx:
                torch.matmul(dz, weight, out=dx[n0:n1])
            if needs_dw:
                _accumulate_dw(dw32, dz, x)
            if needs_db:
                db32 += dz.sum(dim=0, dtype=torch.float32)

    dw = dw32.to(weight.dtype) if needs_dw else None
    db = db32.to(bias.dtype) if needs_db else None
    return dx, dw, db
