"""Pure-PyTorch backend of the fused linear log-prob op: chunked, never [N, V] in memory.

Math (T = temperature, t_n = target of token n, z = tempered logits):
    z[n, v]  = (hidden[n] . weight[v] + bias[v]) / T                 fp32 accumulation
    lse[n]   = logsumexp_v z[n, v]
    logp[n]  = z[n, t_n] - lse[n]                                    0 where t_n == ignore_index
    H[n]     = lse[n] - sum_v p[n, v] z[n, v],  p = exp(z - lse)     0 where t_n == ignore_index
    dZ[n, v] = ( g_lp[n] (1[v == t_n] - p) - g_H[n] p (z - lse + H) ) / T
    dX = dZ W,   dW = dZ^T X (fp32 accumulation),   db = sum_n dZ

Shapes: hidden [N, d], weight [V, d], bias [V] or None, targets [N]; logp, lse, H, g_lp, g_H [N] fp32.

Tiling. The forward walks [tokens x vocabulary] tiles with an online max / sum-exp across the
vocabulary slices (flash-attention style), so the GEMMs stay large (many tokens x a wide slice)
while the only O(V) memory is one fp32 tile of at most `workspace_bytes`. The backward recomputes
each tile's logits and accumulates dX and dW per tile (8NVd FLOPs in all with the forward).

When the caller knows the per-token gradient as soon as a chunk's log-probs are known (on-policy
ratios, token-level ratios, sequence-level rows that lie inside one chunk),
`linear_logprob_forward_backward` computes logits, log-probs and dX / dW in one sweep over token
chunks of the full vocabulary (6NVd FLOPs, as Liger's fused linear cross-entropy does): no
recompute, at the price of thinner GEMMs.

This file is the CPU engine and the reference the Triton kernels (`logprob_triton.py`) match.
"""

from __future__ import annotations

import torch

WORKSPACE_BYTES = 256 * 2**20
TOKEN_TILE = 1024  # tokens per tile: wide enough that the CPU GEMMs run at full speed
ROW_BLOCK = 64  # rows per block when a per-row reduction needs a temporary


def _tile_shape(n: int, v: int, workspace_bytes: int) -> tuple[int, int]:
    tn = max(1, min(n, TOKEN_TILE))
    tv = max(1, min(v, workspace_bytes // (4 * tn)))
    return tn, tv


def _logits(x, w, b, inv_t, out):
    """out[:] = (x @ w.T + b) * inv_t in fp32; `out` is a contiguous fp32 view of the workspace."""
    if x.dtype == torch.float32:
        torch.mm(x, w.t(), out=out)
    else:
        out.copy_(torch.mm(x, w.t()))
    if b is not None:
        out.add_(b.float())
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out


def _view(buf, rows, cols):
    return buf[: rows * cols].view(rows, cols)


def _pick(z, t, v0):
    """z[n, t_n - v0] where the target falls inside this tile, else 0; and the in-tile flags."""
    inside = (t >= v0) & (t < v0 + z.shape[1])
    idx = (t - v0).clamp(0, z.shape[1] - 1).unsqueeze(1)
    return torch.where(inside, z.gather(1, idx).squeeze(1), torch.zeros((), device=z.device)), inside


def _exp_and_weighted_sum(zc):
    """In place zc -> exp(zc); returns (sum exp(zc), sum exp(zc) * zc) per row, temporaries bounded."""
    wsum = torch.empty(zc.shape[0], device=zc.device)
    for r in range(0, zc.shape[0], ROW_BLOCK):
        blk = zc[r : r + ROW_BLOCK]
        wsum[r : r + ROW_BLOCK] = (blk.exp() * blk).sum(1)
    zc.exp_()
    return zc.sum(1), wsum


def _forward_setup(hidden, weight, targets, ignore_index, with_entropy):
    """Contiguous inputs, int64 targets, the valid-token mask and the [N] fp32 outputs."""
    n, dev = hidden.shape[0], hidden.device
    t = targets.long()
    ent = torch.zeros(n, device=dev) if with_entropy else None
    return (
        hidden.contiguous(),
        weight.contiguous(),
        t,
        t != ignore_index,
        torch.zeros(n, device=dev),
        torch.empty(n, device=dev),
        ent,
    )


def linear_logprob_forward(
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy, workspace_bytes=WORKSPACE_BYTES
):
    n, v, dev, inv_t = hidden.shape[0], weight.shape[0], hidden.device, 1.0 / temperature
    x, w, t, valid, logp, lse, ent = _forward_setup(hidden, weight, targets, ignore_index, with_entropy)
    tn, tv = _tile_shape(n, v, workspace_bytes)
    buf = torch.empty(tn * tv, device=dev)
    for n0 in range(0, n, tn):
        n1 = min(n0 + tn, n)
        m = torch.full((n1 - n0,), float("-inf"), device=dev)
        s, a, zt = (torch.zeros(n1 - n0, device=dev) for _ in range(3))
        for v0 in range(0, v, tv):
            v1 = min(v0 + tv, v)
            z = _logits(x[n0:n1], w[v0:v1], None if bias is None else bias[v0:v1], inv_t, _view(buf, n1 - n0, v1 - v0))
            picked, inside = _pick(z, t[n0:n1], v0)
            zt = torch.where(inside, picked, zt)
            m_new = torch.maximum(m, z.amax(1))
            scale = torch.exp(m - m_new)
            z.sub_(m_new.unsqueeze(1))
            if with_entropy:
                # a tracks sum exp(z - m) (z - m); moving m to m_new shifts every (z - m) by m - m_new
                # (nothing to shift before the first tile, where m = -inf and s = 0).
                tile_s, tile_a = _exp_and_weighted_sum(z)
                shift = torch.where(s > 0, m - m_new, torch.zeros((), device=dev))
                a = scale * (a + shift * s) + tile_a
            else:
                tile_s = z.exp_().sum(1)
            s = s * scale + tile_s
            m = m_new
        lse[n0:n1] = m + torch.log(s)
        logp[n0:n1] = torch.where(valid[n0:n1], zt - lse[n0:n1], torch.zeros((), device=dev))
        if with_entropy:
            ent[n0:n1] = torch.where(valid[n0:n1], torch.log(s) - a / s, torch.zeros((), device=dev))
    return logp, lse, ent


def _grad_logits_(z, lse, ent, g_lp, g_ent, t, v0, inv_t):
    """In place: tempered logits z of one tile -> dZ of the tempered-logit chain (times 1/T)."""
    z.sub_(lse.unsqueeze(1))  # log p
    if g_ent is not None:
        # -g_H p (log p + H) - g_lp p  =  -p (g_lp + g_H (log p + H))
        for r in range(0, z.shape[0], ROW_BLOCK):
            blk = z[r : r + ROW_BLOCK]
            coef = (blk + ent[r : r + ROW_BLOCK].unsqueeze(1)).mul_(g_ent[r : r + ROW_BLOCK].unsqueeze(1))
            blk.exp_().mul_(coef.add_(g_lp[r : r + ROW_BLOCK].unsqueeze(1))).neg_()
    else:
        z.exp_().mul_(-g_lp.unsqueeze(1))
    inside = (t >= v0) & (t < v0 + z.shape[1])
    rows = inside.nonzero().squeeze(1)
    z[rows, t[rows] - v0] += g_lp[rows]
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z


def _accumulate(dz, x, w, dx32, dw32, db32):
    """dx32 += dz @ w, dw32 += dz^T @ x, db32 += sum(dz): fp32 accumulation whatever the input dtype."""
    g = dz if x.dtype == torch.float32 else dz.to(x.dtype)
    if dx32 is not None:
        dx32.addmm_(g, w) if x.dtype == torch.float32 else dx32.add_(torch.mm(g, w))
    if dw32 is not None:
        dw32.addmm_(g.t(), x) if x.dtype == torch.float32 else dw32.add_(torch.mm(g.t(), x))
    if db32 is not None:
        db32.add_(dz.sum(0))


def _grad_buffers(hidden, weight, needs_dx, needs_dw, needs_db):
    dev = hidden.device
    dx32 = torch.zeros(hidden.shape, device=dev) if needs_dx else None
    dw32 = torch.zeros(weight.shape, device=dev) if needs_dw else None
    db32 = torch.zeros(weight.shape[0], device=dev) if needs_db else None
    return dx32, dw32, db32


def _cast_grads(dx32, dw32, db32, hidden, weight, bias):
    return (
        None if dx32 is None else dx32.to(hidden.dtype),
        None if dw32 is None else dw32.to(weight.dtype),
        None if db32 is None else db32.to(bias.dtype),
    )


def linear_logprob_backward(
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    grad_logp,
    grad_entropy,
    temperature,
    ignore_index,
    needs_dx,
    needs_dw,
    needs_db,
    workspace_bytes=WORKSPACE_BYTES,
):
    n, v = hidden.shape[0], weight.shape[0]
    x, w = hidden.contiguous(), weight.contiguous()
    t = targets.long()
    valid = (t != ignore_index).float()
    g_lp = grad_logp.float() * valid
    g_ent = None if grad_entropy is None else grad_entropy.float() * valid
    dx32, dw32, db32 = _grad_buffers(hidden, weight, needs_dx, needs_dw, needs_db)
    tn, tv = _tile_shape(n, v, workspace_bytes)
    buf = torch.empty(tn * tv, device=hidden.device)
    for n0 in range(0, n, tn):
        n1 = min(n0 + tn, n)
        for v0 in range(0, v, tv):
            v1 = min(v0 + tv, v)
            z = _logits(
                x[n0:n1],
                w[v0:v1],
                None if bias is None else bias[v0:v1],
                1.0 / temperature,
                _view(buf, n1 - n0, v1 - v0),
            )
            dz = _grad_logits_(
                z,
                lse[n0:n1],
                None if g_ent is None else entropy[n0:n1],
                g_lp[n0:n1],
                None if g_ent is None else g_ent[n0:n1],
                t[n0:n1],
                v0,
                1.0 / temperature,
            )
            _accumulate(
                dz,
                x[n0:n1],
                w[v0:v1],
                None if dx32 is None else dx32[n0:n1],
                None if dw32 is None else dw32[v0:v1],
                None if db32 is None else db32[v0:v1],
            )
    return _cast_grads(dx32, dw32, db32, hidden, weight, bias)


def linear_logprob_forward_backward(
    hidden,
    weight,
    bias,
    targets,
    temperature,
    ignore_index,
    with_entropy,
    chunks,
    grad_fn,
    needs_dx,
    needs_dw,
    needs_db,
):
    """One sweep, 6NVd: per token chunk (n0, n1) of `chunks`, full-vocabulary logits -> lse, logp
    (and entropy) -> g = grad_fn(n0, n1, logp_chunk) -> dZ -> dX, dW, db. The chunks cover [0, N) in
    order; their size bounds the workspace (chunk x V fp32). Returns (logp, lse, entropy, dX, dW, db).
    """
    v, dev, inv_t = weight.shape[0], hidden.device, 1.0 / temperature
    x, w, t, valid, logp, lse, ent = _forward_setup(hidden, weight, targets, ignore_index, with_entropy)
    dx32, dw32, db32 = _grad_buffers(hidden, weight, needs_dx, needs_dw, needs_db)
    buf = torch.empty(max((n1 - n0 for n0, n1 in chunks), default=0) * v, device=dev)
    for n0, n1 in chunks:
        z = _logits(x[n0:n1], w, bias, inv_t, _view(buf, n1 - n0, v))
        zt, _ = _pick(z, t[n0:n1], 0)
        m = z.amax(1)
        z.sub_(m.unsqueeze(1))
        if with_entropy:
            s, a = _exp_and_weighted_sum(z)
            ent[n0:n1] = torch.where(valid[n0:n1], torch.log(s) - a / s, torch.zeros((), device=dev))
        else:
            s = z.exp_().sum(1)
        lse[n0:n1] = m + torch.log(s)
        logp[n0:n1] = torch.where(valid[n0:n1], zt - lse[n0:n1], torch.zeros((), device=dev))
        g = grad_fn(n0, n1, logp[n0:n1]).float() * valid[n0:n1]
        # z holds exp(z - m) = p * s: dZ = (g onehot - g p) / T
        z.mul_((-g / s).unsqueeze(1))
        rows = valid[n0:n1].nonzero().squeeze(1)
        z[rows, t[n0:n1][rows]] += g[rows]
        if inv_t != 1.0:
            z.mul_(inv_t)
        _accumulate(z, x[n0:n1], w, None if dx32 is None else dx32[n0:n1], dw32, db32)
    return (logp, lse, ent) + _cast_grads(dx32, dw32, db32, hidden, weight, bias)
