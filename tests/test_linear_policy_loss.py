"""linear_logprobs and linear_policy_loss, both backends, against fp64 references on materialised logits.
Input checks: test_linear_policy_loss_inputs.py.

The triton backend runs under the Triton interpreter on the CPU (conftest sets TRITON_INTERPRET=1)
and compiled on a CUDA GPU; the torch backend runs wherever the tensors are.
"""

import pytest
import torch
from policy_reference import (
    IGNORE,
    METHODS,
    inputs_and_config,
    make_inputs,
    random_sampling_weight,
    reference_logprobs,
    reference_policy_loss,
)
from policy_reference import fused_loss as _fused

from gcpo_fast.kernels import AGG_MODES, IS_LEVELS, linear_logprobs, linear_policy_loss
from gcpo_fast.kernels.linear_policy_loss import plan_chunks

TOL = {
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.float16: dict(rtol=2e-2, atol=5e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=2e-2),
}


def dtypes_for(backend, device):
    # The Triton interpreter's tl.dot on bf16 is broken (triton #11584): bf16 triton runs on a GPU only.
    return [torch.float32, torch.float16] + ([torch.bfloat16] if backend == "torch" or device == "cuda" else [])


def _close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n, d, v", [(37, 24, 203), (1, 40, 130), (0, 16, 64)])
def test_linear_logprobs_values_and_grads(backend, device, n, d, v):
    for dtype in dtypes_for(backend, device):
        h, W, b, t, _, _ = make_inputs(n, d, v, dtype=dtype, device=device)
        h.requires_grad_(), W.requires_grad_(), b.requires_grad_()
        logp, ent = linear_logprobs(
            h, W, t, temperature=0.7, bias=b, return_entropy=True, backend=backend, workspace_bytes=4 * 16 * 50
        )  # several token and vocabulary tiles
        ref_lp, ref_ent = reference_logprobs(h.detach(), W.detach(), b.detach(), t, 0.7)
        _close(logp, ref_lp, dtype)
        _close(ent, ref_ent, dtype)
        g_lp, g_ent = torch.randn(n, device=device), torch.randn(n, device=device)
        (logp * g_lp + ent * g_ent).sum().backward()
        h64, W64, b64 = (x.detach().double().requires_grad_() for x in (h, W, b))
        rl, re = reference_logprobs(h64, W64, b64, t, 0.7)
        (rl * g_lp.double() + re * g_ent.double()).sum().backward()
        for got, want in ((h.grad, h64.grad), (W.grad, W64.grad), (b.grad, b64.grad)):
            _close(got, want, dtype, scale=10)
        assert torch.all(h.grad[t == IGNORE] == 0)


def test_forward_only_under_no_grad_is_one_pass_with_o_n_outputs():
    h, W, b, t, _, _ = make_inputs(29, 16, 97)
    with torch.no_grad():
        lp = linear_logprobs(h, W, t, bias=b)
    assert lp.shape == (29,) and lp.dtype == torch.float32 and not lp.requires_grad


def _policy_case(
    backend,
    device,
    level,
    agg,
    dtype=torch.float32,
    old="off",
    workspace=4 * 64 * 7,
    lengths=(6, 0, 9, 1, 13, 8),
    seed=0,
    weighted=False,
    golden=None,
    gamma=0.1,
    **kw,
):
    """golden: the rows (bool [B]) that take the shaped term (golden_objective="shaped"); None: no row."""
    n = sum(lengths)
    h, W, b, t, adv, cu = make_inputs(n, 24, 211, list(lengths), seed=seed, dtype=dtype, device=device)
    t[7:16] = IGNORE  # row 2 fully ignored
    h.requires_grad_(), W.requires_grad_(), b.requires_grad_()
    ref_lp, _ = reference_logprobs(h.detach(), W.detach(), b.detach(), t, 0.8)
    g = torch.Generator().manual_seed(seed + 1)
    old_logp = None if old == "on" else (ref_lp + (torch.rand(n, generator=g).to(device) - 0.5) * 0.4).float()
    ref_logp = (ref_lp + 0.1).float() if kw.get("beta") else None
    sw = random_sampling_weight(n, seed).float().to(device) if weighted else None
    opts = dict(
        importance_sampling_level=level,
        loss_agg_mode=agg,
        epsilon_low=0.1,
        epsilon_high=0.12,
        max_completion_length=16,
        **kw,
    )
    if golden is not None:
        opts.update(golden=golden.to(device), golden_objective="shaped", golden_shaping_gamma=gamma)
    loss, stats = linear_policy_loss(
        h,
        W,
        t,
        *inputs_and_config(
            adv,
            cu,
            old_logp=old_logp,
            temperature=0.8,
            ref_logp=ref_logp,
            backend=backend,
            workspace_bytes=workspace,
            sampling_weight=sw,
            **opts,
        ),
        bias=b,
        compute_entropy=True,
    )
    loss.backward()
    h64, W64, b64 = (x.detach().double().requires_grad_() for x in (h, W, b))
    lp64, ent64 = reference_logprobs(h64, W64, b64, t, 0.8)
    expected = reference_policy_loss(
        lp64,
        None if old_logp is None else old_logp.double(),
        None if ref_logp is None else ref_logp.double(),
        adv.double(),
        cu,
        level=level,
        eps_low=0.1,
        eps_high=0.12,
        agg=agg,
        delta=kw.get("delta"),
        clip_c=kw.get("clip_ratio_c"),
        beta=kw.get("beta", 0.0),
        max_len=16,
        normalizer=kw.get("normalizer"),
        mask=t != IGNORE,
        sampling_weight=None if sw is None else sw.double(),
        shaped_rows=golden,
        gamma=gamma,
    )
    expected.backward()
    _close(loss, expected, dtype)
    for got, want in ((h.grad, h64.grad), (W.grad, W64.grad), (b.grad, b64.grad)):
        _close(got, want, dtype, scale=10)
    mask = t != IGNORE
    _close(stats["entropy"], (ent64 * mask).sum() / mask.sum(), dtype)
    return stats


@pytest.mark.parametrize("level", IS_LEVELS)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("old", ["on", "off"])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_policy_loss_torch_every_combination(device, level, agg, old, weighted):
    # workspace 4*64*7 bytes: chunks of 2 tokens for the gradient-in-forward sweep, so sequence-level
    # off-policy rows do not fit and take the recompute path; the rest take the 6NVd sweep.
    _policy_case("torch", device, level, agg, old=old, weighted=weighted)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("old", ["on", "off"])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_policy_loss_triton_each_method(device, method, old, weighted):
    recipe = METHODS[method]
    _policy_case(
        "triton",
        device,
        recipe["importance_sampling_level"],
        recipe["loss_agg_mode"],
        old=old,
        weighted=weighted,
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_linear_policy_loss_triton_sampling_weight_other_level(device, method):
    """The triton backend, weighted, at the ratio level that is not the recipe's."""
    recipe = METHODS[method]
    level = "token" if recipe["importance_sampling_level"] == "sequence" else "sequence"
    _policy_case("triton", device, level, recipe["loss_agg_mode"], weighted=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("option", [dict(beta=0.05), dict(delta=1.5, clip_ratio_c=1.05), dict(normalizer=11.0)])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_policy_loss_options(backend, device, option, weighted):
    for level in ("token", "sequence"):
        _policy_case(backend, device, level, "token-mean", weighted=weighted, **option)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_policy_loss_half_precision_and_tiny_batches(backend, device):
    for dtype in dtypes_for(backend, device)[1:]:
        _policy_case(backend, device, "sequence", "seq-mean-token-mean", dtype=dtype)
    _policy_case(backend, device, "token", "token-mean", lengths=(1,))
    _policy_case(backend, device, "sequence", "seq-mean-token-mean", lengths=(17,))


def test_sequence_rows_within_chunks_take_the_sweep_and_match_recompute(device):
    """Sequence-level off-policy: rows that fit a chunk use the 6NVd sweep; results equal the recompute path."""
    lengths = (3, 5, 2, 4)
    assert plan_chunks(torch.tensor([0, 3, 8, 10, 14]), 14, 6, True) == [(0, 3), (3, 8), (8, 14)]
    assert plan_chunks(torch.tensor([0, 3, 8, 10, 14]), 14, 4, True) is None
    fused = _policy_case("torch", device, "sequence", "seq-mean-token-mean", lengths=lengths, workspace=4 * 211 * 8)
    recompute = _policy_case("torch", device, "sequence", "seq-mean-token-mean", lengths=lengths, workspace=4 * 211 * 2)
    torch.testing.assert_close(fused["clip_ratio/region_mean"], recompute["clip_ratio/region_mean"])
    for workspace in (4 * 211 * 8, 4 * 211 * 2):  # both paths with a sampling weight
        _policy_case(
            "torch",
            device,
            "sequence",
            "seq-mean-token-mean",
            lengths=lengths,
            workspace=workspace,
            weighted=True,
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_identical_calls_are_bitwise_equal(backend, device):
    results = []
    for _ in range(2):
        h, W, b, t, adv, cu = make_inputs(31, 24, 150, [10, 21], seed=4, device=device)
        h.requires_grad_(), W.requires_grad_()
        old = torch.zeros(31, device=device) - 1.0
        loss, stats = _fused(h, W, t, old, adv, cu, bias=b, backend=backend, workspace_bytes=4 * 32 * 40)
        loss.backward()
        results.append((loss.detach(), h.grad, W.grad, stats["ratio_mean"]))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_custom_normalizer_makes_micro_batches_add_up(device):
    """token-mean with the step's global token count: two half-batches sum to the whole batch."""
    h, W, b, t, adv, cu = make_inputs(20, 16, 90, [6, 4, 10], seed=2, device=device, ignore_frac=0.0)
    W.requires_grad_()
    dapo = dict(METHODS["dapo"], normalizer=20.0)
    whole, _ = _fused(h, W, t, None, adv, cu, **dapo)
    whole.backward()
    g_whole = W.grad.clone()
    W.grad = None
    first, _ = _fused(h[:10], W, t[:10], None, adv[:2], cu[:3], **dapo)
    second, _ = _fused(h[10:], W, t[10:], None, adv[2:], cu[2:] - 10, **dapo)
    (first + second).backward()
    torch.testing.assert_close(first + second, whole)
    torch.testing.assert_close(W.grad, g_whole)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("path", ["sweep", "recompute", "no_grad"])
def test_return_logp_gives_the_log_probs_and_changes_nothing_else(backend, device, path):
    """return_logp=True adds stats["logp"] (the reference log-probs, 0 where ignored) on every path."""
    h, W, b, t, adv, cu = make_inputs(23, 16, 97, [9, 14], seed=5, device=device)
    old = None if path == "sweep" else torch.full((23,), -4.0, device=device)
    kwargs = dict(bias=b, backend=backend, temperature=0.7, workspace_bytes=4 * 97 * 4)
    results = []
    for return_logp in (False, True):
        W.grad = None
        W.requires_grad_(path != "no_grad")
        loss, stats = _fused(h, W, t, old, adv, cu, return_logp=return_logp, **kwargs)
        if path != "no_grad":
            loss.backward()
        results.append((loss.detach(), W.grad, stats))
    (loss0, grad0, stats0), (loss1, grad1, stats1) = results
    assert "logp" not in stats0 and torch.equal(loss0, loss1)
    assert grad0 is None if path == "no_grad" else torch.equal(grad0, grad1)
    assert not stats1["logp"].requires_grad
    ref, _ = reference_logprobs(h, W, b, t, 0.7)
    _close(stats1["logp"], ref, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampling_weight_of_ones(backend, device):
    """A weight of ones gives the unweighted result, bitwise."""
    h, W, b, t, adv, cu = make_inputs(23, 16, 70, [9, 8, 6], seed=3, device=device)
    old = torch.zeros(23, device=device) - 1.5
    opts = dict(METHODS["gcpo"], epsilon_low=0.1, epsilon_high=0.2)
    results = []
    ones = torch.ones(23, device=device)
    for kw in (opts, dict(opts, sampling_weight=ones)):
        Wg = W.clone().requires_grad_()
        loss, _ = _fused(h, Wg, t, old, adv, cu, bias=b, backend=backend, workspace_bytes=4 * 70 * 9, **kw)
        loss.backward()
        results.append((loss.detach(), Wg.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


GOLDEN = torch.tensor([True, False, True, False, True, False])  # a 6-, the ignored 9- and the 13-token row


# (ratio level, aggregation) of every method, at both ratio levels where it has one
SHAPED_CASES = sorted(
    {
        (level, m["loss_agg_mode"])
        for m in METHODS.values()
        for level in (("none",) if m["importance_sampling_level"] == "none" else ("token", "sequence"))
    }
)


@pytest.mark.parametrize("level, agg", SHAPED_CASES)
@pytest.mark.parametrize("old", ["on", "off"])
def test_linear_policy_loss_shaped_golden_rows_torch(device, level, agg, old):
    """Shaped golden rows on both torch paths: the default workspace takes the 6NVd sweep except at sequence
    level off-policy (recompute); a workspace whose chunks hold whole rows takes the sweep there too."""
    for workspace in (4 * 64 * 7, 4 * 211 * 16):
        _policy_case("torch", device, level, agg, old=old, golden=GOLDEN, workspace=workspace)


@pytest.mark.parametrize("level, agg", SHAPED_CASES)
@pytest.mark.parametrize("old", ["on", "off"])
def test_linear_policy_loss_shaped_golden_rows_triton(device, level, agg, old):
    _policy_case("triton", device, level, agg, old=old, golden=GOLDEN)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_policy_loss_shaped_with_options(backend, device):
    for level in ("token", "sequence"):
        _policy_case(
            backend,
            device,
            level,
            "seq-mean-token-sum",
            golden=GOLDEN,
            gamma=0.5,
            weighted=True,
            beta=0.05,
            delta=1.5,
            clip_ratio_c=1.05,
            normalizer=11.0,
        )
    _policy_case(backend, device, "sequence", "seq-mean-token-mean", dtype=torch.float16, golden=GOLDEN)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_policy_loss_policy_ratio_ignores_golden_rows_bitwise(backend, device):
    h, W, b, t, adv, cu = make_inputs(37, 24, 211, [6, 0, 9, 1, 13, 8], seed=2, device=device)
    old = torch.zeros(37, device=device) - 2.0
    results = []
    for kw in (
        dict(),
        dict(golden=GOLDEN.to(device)),
        dict(golden=GOLDEN.to(device), golden_objective="shaped"),
    ):
        Wg = W.clone().requires_grad_()
        loss, stats = _fused(h, Wg, t, old, adv, cu, bias=b, backend=backend, **kw)
        loss.backward()
        results.append((loss.detach(), Wg.grad, stats))
    (plain, g_plain, s_plain), (ignored, g_ignored, s_ignored), (shaped, g_shaped, _) = results
    assert torch.equal(plain, ignored) and torch.equal(g_plain, g_ignored)
    assert all(torch.equal(s_plain[k], s_ignored[k]) for k in s_plain)
    assert not torch.equal(plain, shaped) and not torch.equal(g_plain, g_shaped)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inputs_mask_drops_tokens_like_ignored_targets(backend, device):
    """LossInputs.mask in linear_policy_loss: the tokens it drops count as if their target were IGNORE_INDEX."""
    h, W, b, t, adv, cu = make_inputs(23, 16, 70, [9, 8, 6], seed=6, device=device, ignore_frac=0.0)
    old = torch.zeros(23, device=device) - 1.5
    mask = torch.ones(23, dtype=torch.bool, device=device)
    mask[[1, 4, 9, 10, 22]] = False
    results = []
    for targets, kw in ((t, dict(mask=mask)), (torch.where(mask, t, IGNORE), {})):
        Wg, hg = W.clone().requires_grad_(), h.clone().requires_grad_()
        loss, stats = _fused(hg, Wg, targets, old, adv, cu, bias=b, backend=backend, compute_entropy=True, **kw)
        loss.backward()
        results.append((loss.detach(), hg.grad, Wg.grad, stats))
    (loss_m, dh_m, dw_m, s_m), (loss_i, dh_i, dw_i, s_i) = results
    torch.testing.assert_close(loss_m, loss_i)
    torch.testing.assert_close(dh_m, dh_i)
    torch.testing.assert_close(dw_m, dw_i)
    assert torch.all(dh_m[~mask] == 0)
    assert s_m.keys() == s_i.keys() and all(torch.allclose(s_m[k], s_i[k]) for k in s_m)
