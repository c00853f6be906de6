"""Triton backend of the linear log-prob op against an fp64 reference on materialised logits.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the same tests run unchanged on a CUDA GPU. Shapes are tiny and odd on purpose (N, V, d are not
multiples of any block) and the interpreter tiles are small, so every test covers several N, V and
d tiles, vocabulary splits and masked edges.
"""

import math

import pytest
import torch

from gcpo_fast.kernels import logprob_triton as K

IGNORE = -100
# relative error bound on max|err| / max|ref| for the gradients, and abs. bound for logp/entropy
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FWD_ATOL = {torch.float32: 1e-4, torch.float16: 5e-4, torch.bfloat16: 2e-3}

DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(),
            reason="needs CUDA: the Triton interpreter's tl.dot multiplies raw bf16 bit patterns "
            "(triton issue #11584); bf16 is covered by the AOT compile test",
        ),
    ),
]


def make_problem(N, V, d, dtype, device, *, bias=True, temperature=1.0, ignore_frac=0.2, seed=0, sigma=6.0):
    """Peaked logits (std of z = logits / T ~ sigma: entropy ~0.3-2 nats), targets ~ softmax(z)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64) * (sigma * temperature / math.sqrt(d))
    w = torch.randn(V, d, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if bias else None
    if N > 0:
        z = (x.double() @ w.double().T + (b.double() if bias else 0.0)) / temperature
        t = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    else:
        t = torch.zeros(0, dtype=torch.int64)
    if N > 1:
        t[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    g_lp = torch.randn(N, generator=g)
    g_h = torch.randn(N, generator=g)
    to = lambda v: v.to(device) if v is not None else None  # noqa: E731
    return to(x), to(w), to(b), to(t), to(g_lp), to(g_h)


def reference(x, w, b, t, temperature, ignore_index, g_lp=None, g_h=None):
    """fp64 autograd on the materialised logits: logp, lse, entropy, (dx, dw, db)."""
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    z = (xr @ wr.T + (br if br is not None else 0.0)) / temperature
    logsm = z.log_softmax(-1)
    keep = t != ignore_index
    lp = logsm.gather(1, torch.where(keep, t, 0)[:, None])[:, 0] * keep
    ent = -(logsm.exp() * logsm).sum(-1) * keep
    lse = z.logsumexp(-1)
    grads = (None, None, None)
    if g_lp is not None:
        loss = (lp * g_lp.double()).sum()
        if g_h is not None:
            loss = loss + (ent * g_h.double()).sum()
        loss.backward()
        grads = (xr.grad, wr.grad, br.grad if br is not None else None)
    return lp.detach(), lse.detach(), ent.detach(), grads


def assert_close_rel(got, ref, rtol, name):
    assert got is not None and got.shape == ref.shape, name
    assert torch.isfinite(got).all(), name
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"{name}: max err {err:.3g} > {rtol} * {scale:.3g}"


def check_forward(out, ref, dtype, with_entropy=True):
    lp, lse, ent = out
    r_lp, r_lse, r_ent, _ = ref
    assert lp.dtype == lse.dtype == torch.float32
    tol = FWD_ATOL[dtype]
    torch.testing.assert_close(lp.double(), r_lp, atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), r_lse, atol=tol, rtol=1e-6)
    if with_entropy:
        assert ent.dtype == torch.float32
        torch.testing.assert_close(ent.double(), r_ent, atol=tol, rtol=0)
    else:
        assert ent is None


def check_grads(out, ref_grads, x, w, b, dtype):
    dx, dw, db = out
    r_dx, r_dw, r_db = ref_grads
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_close_rel(dx, r_dx, GRAD_RTOL[dtype], "dx")
    assert_close_rel(dw, r_dw, GRAD_RTOL[dtype], "dw")
    if b is not None:
        assert db.dtype == b.dtype
        assert_close_rel(db, r_db, GRAD_RTOL[dtype], "db")
    else:
        assert db is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "N,V,d,temperature,bias",
    [
        (1, 203, 24, 1.0, True),
        (37, 203, 72, 0.7, False),
        (37, 1000, 72, 1.3, True),
    ],
)
def test_matches_fp64_reference(device, dtype, N, V, d, temperature, bias):
    x, w, b, t, g_lp, g_h = make_problem(N, V, d, dtype, device, bias=bias, temperature=temperature, seed=N + V)
    ref = reference(x, w, b, t, temperature, IGNORE, g_lp, g_h)
    if N > 1:
        assert 0.3 <= ref[2][t != IGNORE].mean() <= 2.0, "test data is not realistically peaked"
        assert (t == IGNORE).any() and (t != IGNORE).any()
    out = K.linear_logprob_forward(x, w, b, t, temperature, IGNORE, True)
    check_forward(out, ref, dtype)
    assert (out[0][t == IGNORE] == 0).all() and (out[2][t == IGNORE] == 0).all()
    grads = K.linear_logprob_backward(x, w, b, t, out[1], out[2], g_lp, g_h, temperature, IGNORE, True, True, True)
    check_grads(grads, ref[3], x, w, b, dtype)
    assert (grads[0][t == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_logp_only_and_partial_grads(device, dtype):
    """with_entropy=False / grad_entropy=None, and only some of dx, dw, db requested."""
    N, V, d, T = 29, 300, 40, 0.9
    x, w, b, t, g_lp, _ = make_problem(N, V, d, dtype, device, temperature=T, seed=3)
    ref = reference(x, w, b, t, T, IGNORE, g_lp, None)
    lp, lse, ent = K.linear_logprob_forward(x, w, b, t, T, IGNORE, False)
    check_forward((lp, lse, ent), ref, dtype, with_entropy=False)
    dx, dw, db = K.linear_logprob_backward(x, w, b, t, lse, None, g_lp, None, T, IGNORE, False, True, True)
    assert dx is None
    assert_close_rel(dw, ref[3][1], GRAD_RTOL[dtype], "dw")
    assert_close_rel(db, ref[3][2], GRAD_RTOL[dtype], "db")
    dx, dw, db = K.linear_logprob_backward(x, w, b, t, lse, None, g_lp, None, T, IGNORE, True, False, False)
    assert dw is None and db is None
    assert_close_rel(dx, ref[3][0], GRAD_RTOL[dtype], "dx")


def test_ignore_index_that_is_a_vocab_id_and_all_ignored(device):
    N, V, d = 21, 150, 24
    x, w, b, _, g_lp, g_h = make_problem(N, V, d, torch.float32, device, seed=5)
    t = torch.randint(0, 4, (N,)).to(device)  # many rows hit token 2
    ref = reference(x, w, b, t, 1.0, 2, g_lp, g_h)
    out = K.linear_logprob_forward(x, w, b, t, 1.0, 2, True)
    check_forward(out, ref, torch.float32)
    assert (out[0][t == 2] == 0).all() and (out[0][t != 2] != 0).all()
    grads = K.linear_logprob_backward(x, w, b, t, out[1], out[2], g_lp, g_h, 1.0, 2, True, True, True)
    check_grads(grads, ref[3], x, w, b, torch.float32)

    t_all = torch.full((N,), IGNORE, device=device)
    lp, lse, ent = K.linear_logprob_forward(x, w, b, t_all, 1.0, IGNORE, True)
    assert (lp == 0).all() and (ent == 0).all()
    torch.testing.assert_close(lse.double(), ref[1], atol=1e-4, rtol=1e-6)  # lse still computed
    dx, dw, db = K.linear_logprob_backward(x, w, b, t_all, lse, ent, g_lp, g_h, 1.0, IGNORE, True, True, True)
    assert (dx == 0).all() and (dw == 0).all() and (db == 0).all()


def test_empty_batch(device):
    V, d = 50, 24
    x, w, b, t, g_lp, g_h = make_problem(0, V, d, torch.float32, device)
    lp, lse, ent = K.linear_logprob_forward(x, w, b, t, 1.0, IGNORE, True)
    assert lp.shape == lse.shape == ent.shape == (0,) and lp.dtype == torch.float32
    dx, dw, db = K.linear_logprob_backward(x, w, b, t, lse, ent, g_lp, g_h, 1.0, IGNORE, True, True, True)
    assert dx.shape == (0, d) and dw.shape == (V, d) and db.shape == (V,)
    assert (dw == 0).all() and (db == 0).all()


def test_small_workspace_forces_chunks(device, monkeypatch):
    """A slab of 5 rows: 8 chunks for N = 37; same result as one chunk and as the reference."""
    N, V, d, T = 37, 203, 40, 0.8
    dtype = torch.float16
    x, w, b, t, g_lp, g_h = make_problem(N, V, d, dtype, device, temperature=T, seed=11)
    ref = reference(x, w, b, t, T, IGNORE, g_lp, g_h)
    lp, lse, ent = K.linear_logprob_forward(x, w, b, t, T, IGNORE, True)

    launches = []
    kernel = K._linear_logprob_bwd_dz_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "_linear_logprob_bwd_dz_kernel", Counting())
    ws = 5 * V * x.element_size() + 7
    small = K.linear_logprob_backward(x, w, b, t, lse, ent, g_lp, g_h, T, IGNORE, True, True, True, workspace_bytes=ws)
    assert len(launches) == math.ceil(N / 5)
    assert all(grid[0] == 1 for grid in launches)  # 5 rows < BLOCK_N
    check_grads(small, ref[3], x, w, b, dtype)
    launches.clear()
    big = K.linear_logprob_backward(x, w, b, t, lse, ent, g_lp, g_h, T, IGNORE, True, True, True)
    assert len(launches) == 1
    for s, g in zip(small, big):  # same dZ; only the GEMMs' chunking differs
        torch.testing.assert_close(s.float(), g.float(), atol=2e-3, rtol=2e-3)


def test_deterministic(device):
    N, V, d = 37, 203, 40
    x, w, b, t, g_lp, g_h = make_problem(N, V, d, torch.float16, device, seed=7)
    outs = [K.linear_logprob_forward(x, w, b, t, 0.9, IGNORE, True, split_v=3) for _ in range(2)]
    for a, c in zip(*outs):
        assert torch.equal(a, c)
    grads = [
        K.linear_logprob_backward(
            x, w, b, t, outs[0][1], outs[0][2], g_lp, g_h, 0.9, IGNORE, True, True, True, workspace_bytes=10 * V * 2
        )
        for _ in range(2)
    ]
    for a, c in zip(*grads):
        assert torch.equal(a, c)


def _all_configs():
    cfgs = {f"fwd_{k}": v for k, v in K.FWD_CONFIGS.items()}
    cfgs.update({f"bwd_{k}": v for k, v in K.BWD_CONFIGS.items()})
    cfgs["interpreter"] = K.INTERPRETER_CONFIG
    return list(cfgs.items())


@pytest.mark.parametrize("name,cfg", _all_configs(), ids=[n for n, _ in _all_configs()])
def test_every_config(device, name, cfg):
    """Each table entry, forced, on a tiny odd shape, with one and several vocabulary splits."""
    N, V, d, T = 37, 203, 72, 0.7
    dtype = torch.float16
    x, w, b, t, g_lp, g_h = make_problem(N, V, d, dtype, device, temperature=T, seed=13)
    ref = reference(x, w, b, t, T, IGNORE, g_lp, g_h)
    v_tiles = math.ceil(V / cfg.block_v)
    for split in sorted({1, 2, v_tiles}):
        out = K.linear_logprob_forward(x, w, b, t, T, IGNORE, True, config=cfg, split_v=split)
        check_forward(out, ref, dtype)
    grads = K.linear_logprob_backward(
        x, w, b, t, out[1], out[2], g_lp, g_h, T, IGNORE, True, True, True, workspace_bytes=20 * V * 2, config=cfg
    )
    check_grads(grads, ref[3], x, w, b, dtype)


def test_non_contiguous_inputs_and_expanded_grads(device):
    N, V, d, T = 23, 130, 24, 1.1
    x, w, b, t, _, g_h = make_problem(N, V, d, torch.float32, device, temperature=T, seed=17)
    x_nc = torch.stack([x, x], 2)[:, :, 0]  # strided columns
    w_nc = w.T.contiguous().T  # column-major weight
    t_nc = torch.stack([t, t], 1)[:, 0]  # stride 2
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or t_nc.is_contiguous())
    g_lp = torch.ones(1, device=device).expand(N)  # what autograd hands in for .sum()
    ref = reference(x, w, b, t, T, IGNORE, g_lp, g_h)
    out = K.linear_logprob_forward(x_nc, w_nc, b, t_nc, T, IGNORE, True)
    check_forward(out, ref, torch.float32)
    grads = K.linear_logprob_backward(x_nc, w_nc, b, t_nc, out[1], out[2], g_lp, g_h, T, IGNORE, True, True, True)
    check_grads(grads, ref[3], x, w, b, torch.float32)


def test_launch_policy():
    """Table choice and vocabulary split rule (pure Python, no kernel launch)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert K.pick_config(K.FWD_CONFIGS, 10, torch.float16, cpu) == K.INTERPRETER_CONFIG
    if torch.cuda.is_available():
        sms = K._num_sms(cuda)
        assert K.pick_config(K.FWD_CONFIGS, 64, torch.bfloat16, cuda) == K.FWD_CONFIGS["m64"]
        assert K.pick_config(K.FWD_CONFIGS, 128 * sms, torch.bfloat16, cuda) == K.FWD_CONFIGS["m128"]
        assert K.pick_config(K.FWD_CONFIGS, 64, torch.float32, cuda) == K.FWD_CONFIGS["fp32"]
    sms = K._DEFAULT_NUM_SMS
    assert K._split_v(1, 1187, cpu) == 2 * sms  # few tokens: split V to fill the GPU
    assert K._split_v(4, 1187, cpu) == 2 * sms // 4
    assert K._split_v(2 * sms, 1187, cpu) == 1  # many tokens: no split
    assert K._split_v(1, 3, cpu) == 3  # never more splits than tiles


def test_autograd_op_with_triton_backend(device):
    """Through the public op (`linear_logprobs(..., backend="triton")`) against the torch backend."""
    from gcpo_fast.kernels.linear_logprobs import linear_logprobs

    N, V, d, T = 19, 150, 24, 0.8
    x, w, b, t, g_lp, g_h = make_problem(N, V, d, torch.float32, device, temperature=T, seed=19)
    results = []
    for backend in ("triton", "torch"):
        xs, ws, bs = (v.clone().requires_grad_() for v in (x, w, b))
        lp, ent = linear_logprobs(
            xs,
            ws,
            t,
            temperature=T,
            bias=bs,
            ignore_index=IGNORE,
            return_entropy=True,
            backend=backend,
            workspace_bytes=4 * V * 4,
        )
        ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
        results.append((lp, ent, xs.grad, ws.grad, bs.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
