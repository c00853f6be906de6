"""policy_loss against a row-by-row fp64 autograd reference written here, for every method option."""

import itertools

import pytest
import torch

from gcpo_fast.kernels import LOSS_RECIPES, PolicyLossConfig, policy_loss
from gcpo_fast.kernels.policy_loss import AGG_MODES


def reference_policy_loss(
    lp,
    old,
    ref,
    adv,
    cu,
    *,
    loss_type,
    level,
    eps_low,
    eps_high,
    agg,
    delta=None,
    clip_c=None,
    beta=0.0,
    max_len=None,
    normalizer=None,
    mask=None,
    sampling_weight=None,
    shaped_rows=None,
    gamma=0.1,
):
    """Straight from docs/algorithms.md, one row at a time, differentiated by autograd.

    sampling_weight multiplies the policy term before the KL term is added (TRL 1.16's order). Rows
    with shaped_rows[i] take LUFFY's -A p / (p + gamma), p = exp(lp), per token and unclipped."""
    mask = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask
    old = lp.detach() if old is None else old
    B = cu.numel() - 1
    n_tok = mask.sum().clamp(min=1)
    total = lp.new_zeros(())
    for i in range(B):
        a, b = int(cu[i]), int(cu[i + 1])
        m = mask[a:b].to(lp.dtype)
        L = m.sum().clamp(min=1)
        A = adv[i]
        lr = (lp[a:b] - old[a:b]) * m
        if shaped_rows is not None and shaped_rows[i]:
            p = torch.exp(lp[a:b])
            l = -A * p / (p + gamma)
        elif loss_type == "gpg":
            l = -A * lp[a:b]
        else:
            if level == "sequence":
                rho = torch.exp(torch.clamp(lr.sum() / L, -20, 20)).expand(b - a)
            else:
                rho = torch.exp(torch.clamp(lr, -20, 20))
            coef1 = rho if delta is None else torch.clamp(rho, max=delta)
            coef2 = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
            l = -torch.minimum(coef1 * A, coef2 * A)
            if clip_c is not None and A < 0:
                l = torch.minimum(l, -A * clip_c)
        if sampling_weight is not None:
            l = l * sampling_weight[a:b]
        if beta > 0:
            diff = (ref[a:b] - lp[a:b]) * m
            l = l + beta * (torch.exp(torch.clamp(diff, -20, 20)) - diff - 1)
        s = (l * m).sum()
        if agg == "token-mean":
            total = total + s / (n_tok if normalizer is None else normalizer)
        elif agg == "seq-mean-token-mean":
            total = total + s / L / (B if normalizer is None else normalizer)
        elif agg == "seq-mean-token-sum":
            total = total + s / (B if normalizer is None else normalizer)
        else:
            total = total + s / (max_len if normalizer is None else normalizer)
    return total


def make_batch(lengths, seed, spread=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    n = int(cu[-1])
    lp = -torch.rand(n, generator=g, dtype=dtype) * 3
    # old log-probs off by up to +-spread per token plus a per-row offset: ratios on both sides of the box
    row_shift = (torch.rand(len(lengths), generator=g, dtype=dtype) - 0.5) * spread
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    old = lp - row_shift[rows] - (torch.rand(n, generator=g, dtype=dtype) - 0.5) * spread
    ref = lp + (torch.rand(n, generator=g, dtype=dtype) - 0.5) * 0.4
    adv = torch.randn(len(lengths), generator=g, dtype=dtype)
    return lp, old, ref, adv, cu


LENGTHS = [5, 0, 13, 1, 7, 22]  # an empty row, a one-token row, odd sizes


def random_sampling_weight(n, seed):
    """Ratios around 1 with some exact zeros (masked by a *_mask mode), fp64."""
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.exp((torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 1.5)
    return torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.15, 0.0, w)


def _check(lengths, loss_type, level, agg, on_policy, seed=0, eps=(0.1, 0.15), backend="torch", device="cpu", **kw):
    lp, old, ref, adv, cu = make_batch(lengths, seed)
    mask = kw.pop("mask", None)
    sw = kw.pop("sampling_weight", None)
    golden, gamma = kw.pop("golden_rows", None), kw.pop("gamma", 0.1)
    if golden is not None:
        kw.update(golden_rows=golden.to(device), golden_objective="shaped", golden_shaping_gamma=gamma)
    lp32 = lp.float().to(device).requires_grad_()
    on = dict(device=device)
    loss, stats = policy_loss(
        lp32,
        None if on_policy else old.float().to(**on),
        adv.float().to(**on),
        cu.to(**on),
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        loss_agg_mode=agg,
        ref_logp=ref.float().to(**on),
        max_completion_length=30,
        mask=None if mask is None else mask.to(**on),
        backend=backend,
        sampling_weight=None if sw is None else sw.float().to(**on),
        **kw,
    )
    loss.backward()
    lp64 = lp.clone().requires_grad_()
    expected = reference_policy_loss(
        lp64,
        None if on_policy else old,
        ref,
        adv,
        cu,
        loss_type=loss_type,
        level=level,
        eps_low=eps[0],
        eps_high=eps[1],
        agg=agg,
        delta=kw.get("delta"),
        clip_c=kw.get("clip_ratio_c"),
        beta=kw.get("beta", 0.0),
        max_len=30,
        normalizer=kw.get("normalizer"),
        mask=mask,
        sampling_weight=None if sw is None else sw.float().double(),
        shaped_rows=golden,
        gamma=gamma,
    )
    expected.backward()
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp32.grad.double().cpu(), lp64.grad, rtol=1e-4, atol=1e-6)
    return {k: v.cpu() for k, v in stats.items()}


@pytest.mark.parametrize("loss_type", list(LOSS_RECIPES))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference_every_combination(loss_type, level, agg, on_policy, backend, weighted, device):
    sw = random_sampling_weight(sum(LENGTHS), 0) if weighted else None
    _check(LENGTHS, loss_type, level, agg, on_policy, backend=backend, device=device, sampling_weight=sw)


def test_triton_row_kernel_stats_match_torch(device):
    """The Triton row kernel's stats (not only loss and gradient) equal the torch path's."""
    for level in ("token", "sequence"):
        clipped = 0.0
        for seed in range(3):
            kw = dict(eps=(0.05, 0.05), beta=0.1, seed=seed)
            torch_stats = _check(LENGTHS, "grpo", level, "seq-mean-token-mean", False, **kw)
            triton_stats = _check(
                LENGTHS, "grpo", level, "seq-mean-token-mean", False, backend="triton", device=device, **kw
            )
            assert torch_stats.keys() == triton_stats.keys()
            for k in torch_stats:
                torch.testing.assert_close(triton_stats[k], torch_stats[k], rtol=1e-5, atol=1e-6)
            clipped += float(torch_stats["clip_ratio/region_mean"])
        assert clipped > 0  # the cases do clip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    "option",
    [
        dict(delta=1.3),
        dict(clip_ratio_c=1.1),
        dict(beta=0.04),
        dict(normalizer=17.0),
        dict(delta=1.3, clip_ratio_c=1.2, beta=0.1),
    ],
)
def test_options(backend, device, level, option):
    for seed in range(3):
        _check(
            LENGTHS,
            "grpo",
            level,
            "token-mean",
            False,
            seed=seed,
            eps=(0.05, 0.08),
            backend=backend,
            device=device,
            **option,
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mask_fully_ignored_row_and_single_token_batch(backend, device):
    mask = torch.ones(sum(LENGTHS), dtype=torch.bool)
    mask[5:18] = False  # the whole third row
    mask[-3:] = False
    long_row = [600, 3]  # longer than the Triton kernel's token block
    for level in ("token", "sequence"):
        _check(
            LENGTHS,
            "gcpo",
            level,
            "seq-mean-token-mean",
            False,
            mask=mask,
            eps=(0.05, 0.05),
            backend=backend,
            device=device,
        )
        _check(long_row, "gcpo", level, "seq-mean-token-mean", False, backend=backend, device=device)
    _check([1], "dapo", "token", "token-mean", False, backend=backend, device=device)


def test_paper_defaults_per_loss_type():
    lp = torch.zeros(4, requires_grad=True)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    # GSPO/GCPO default box is 3e-4 / 4e-4: a sequence ratio of exp(1e-3) is clipped for A > 0.
    _, stats = policy_loss(lp, torch.full((4,), -1e-3), torch.ones(1), cu, loss_type="gcpo")
    assert float(stats["clip_ratio/high_mean"]) == 1.0
    _, stats = policy_loss(lp, torch.full((4,), -1e-3), torch.ones(1), cu, loss_type="grpo")
    assert float(stats["clip_ratio/high_mean"]) == 0.0
    # DAPO's clip-higher: 1.25 lies inside (0.8, 1.28) but outside GRPO's (0.8, 1.2).
    old = torch.full((4,), -torch.log(torch.tensor(1.25)).item())
    _, s_dapo = policy_loss(lp, old, torch.ones(1), cu, loss_type="dapo")
    _, s_grpo = policy_loss(lp, old, torch.ones(1), cu, loss_type="grpo")
    assert float(s_dapo["clip_ratio/high_mean"]) == 0.0 and float(s_grpo["clip_ratio/high_mean"]) == 1.0


def test_sequence_gradient_formula_and_clipped_rows():
    """d loss / d lp_t = -W_i A_i s_i / |o_i| on unclipped rows, exactly 0 on clipped ones."""
    lengths = [4, 6, 3, 5]
    cu = torch.tensor([0, 4, 10, 13, 18], dtype=torch.int32)
    lp = torch.zeros(18, requires_grad=True)
    log_s = torch.tensor([0.05, 0.05, -0.05, -0.05])  # row log-ratios
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    rows = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    old = -log_s[rows]
    loss, stats = policy_loss(lp, old, adv, cu, loss_type="gcpo", epsilon_low=0.02, epsilon_high=0.02)
    loss.backward()
    W = 1.0 / 4  # seq-mean-token-mean: each row's weights sum to 1/B
    s = torch.exp(log_s)
    clipped = torch.tensor([True, False, False, True])  # A>0 above the box; A<0 below it
    expected = torch.where(clipped, torch.zeros(4), -W * adv * s / torch.tensor(lengths, dtype=torch.float))[rows]
    torch.testing.assert_close(lp.grad, expected)
    assert abs(float(stats["clip_ratio/region_mean"]) - (4 + 5) / 18) < 1e-6


def test_on_policy_ratio_is_one_and_carries_gradient():
    lp = (-torch.rand(9)).requires_grad_()
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    loss, stats = policy_loss(lp, None, torch.tensor([2.0, -1.0]), cu, loss_type="grpo")
    loss.backward()
    assert float(stats["ratio_mean"]) == 1.0
    expected = torch.cat([torch.full((4,), -2.0 / (2 * 4)), torch.full((5,), 1.0 / (2 * 5))])
    torch.testing.assert_close(lp.grad, expected)


def test_deterministic():
    lp, old, ref, adv, cu = make_batch(LENGTHS, 3)
    outs = []
    for _ in range(2):
        x = lp.float().requires_grad_()
        loss, _ = policy_loss(x, old.float(), adv.float(), cu, loss_type="dapo", beta=0.1, ref_logp=ref.float())
        loss.backward()
        outs.append((loss.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(cu=torch.tensor([0, 5, 3, 9], dtype=torch.int32), adv=torch.ones(3)), "non-decreasing"),
        (dict(cu=torch.tensor([0, 4, 8], dtype=torch.int32)), "end at N=9"),
        (dict(cu=torch.tensor([1, 4, 9], dtype=torch.int32)), "start at 0"),
        (dict(adv=torch.ones(3)), "advantages must be"),
        (dict(old=torch.zeros(8)), "old_logp must match"),
        (dict(adv=torch.ones(2, dtype=torch.int64)), "advantages must be a float"),
        (dict(cu=torch.tensor([0, 4, 9], dtype=torch.float32)), "cu_seqlens must be int32"),
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(beta=0.1), "needs ref_logp"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(importance_sampling_level="row"), "importance_sampling_level"),
    ],
)
def test_bad_input_names_the_problem(bad, match):
    args = dict(lp=torch.zeros(9), old=None, adv=torch.ones(2), cu=torch.tensor([0, 4, 9], dtype=torch.int32))
    opts = {k: bad.pop(k) for k in list(bad) if k not in args}
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        policy_loss(args["lp"], args["old"], args["adv"], args["cu"], **opts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sampling_weight_with_options_masks_and_long_rows(backend, level, device):
    n = sum(LENGTHS)
    for seed in range(2):
        _check(
            LENGTHS,
            "grpo",
            level,
            "token-mean",
            False,
            seed=seed,
            eps=(0.05, 0.08),
            backend=backend,
            device=device,
            sampling_weight=random_sampling_weight(n, seed),
            delta=1.3,
            clip_ratio_c=1.2,
            beta=0.1,
            normalizer=17.0,
        )
    mask = torch.ones(n, dtype=torch.bool)
    mask[5:18] = False
    mask[-3:] = False
    _check(
        LENGTHS,
        "gcpo",
        level,
        "seq-mean-token-mean",
        False,
        mask=mask,
        eps=(0.05, 0.05),
        backend=backend,
        device=device,
        sampling_weight=random_sampling_weight(n, 3),
    )
    _check(
        [600, 3],
        "gcpo",
        level,
        "seq-mean-token-mean",
        False,
        backend=backend,
        device=device,
        sampling_weight=random_sampling_weight(603, 4),
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampling_weight_of_ones_equals_none_and_leaves_the_stats(backend, device):
    lp, old, ref, adv, cu = make_batch(LENGTHS, 5)
    n, on = sum(LENGTHS), dict(device=device)
    weights = (None, torch.ones(n), random_sampling_weight(n, 5).float())
    for loss_type in LOSS_RECIPES:
        for level in ("token", "sequence"):
            outs = []
            for sw in weights:
                x = lp.float().to(**on).requires_grad_()
                loss, stats = policy_loss(
                    x,
                    old.float().to(**on),
                    adv.float().to(**on),
                    cu.to(**on),
                    loss_type=loss_type,
                    importance_sampling_level=level,
                    beta=0.1,
                    ref_logp=ref.float().to(**on),
                    max_completion_length=30,
                    backend=backend,
                    sampling_weight=None if sw is None else sw.to(**on),
                )
                loss.backward()
                outs.append((loss.detach(), x.grad, stats))
            (plain, g_plain, s_plain), (ones, g_ones, _), (weighted, g_weighted, s_weighted) = outs
            assert torch.equal(plain, ones) and torch.equal(g_plain, g_ones)
            assert not torch.equal(plain, weighted) and not torch.equal(g_plain, g_weighted)
            # TRL: the weight does not enter the clip statistics, the ratio mean or the KL.
            assert s_plain.keys() == s_weighted.keys()
            for k in s_plain:
                assert torch.equal(s_plain[k], s_weighted[k]), k


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampling_weight_leaves_the_kl_term_unweighted(backend, device):
    """A zero weight removes the policy term only: token-mean loss = beta * mean k3, gradient = the KL's."""
    lp, old, ref, adv, cu = make_batch(LENGTHS, 6)
    n, on = sum(LENGTHS), dict(device=device)
    x = lp.float().to(**on).requires_grad_()
    loss, stats = policy_loss(
        x,
        old.float().to(**on),
        adv.float().to(**on),
        cu.to(**on),
        loss_type="dapo",
        beta=0.3,
        ref_logp=ref.float().to(**on),
        sampling_weight=torch.zeros(n, **on),
        backend=backend,
    )
    loss.backward()
    torch.testing.assert_close(loss, 0.3 * stats["kl"])
    diff = (ref - lp).float().to(**on)
    torch.testing.assert_close(x.grad, 0.3 * (1 - torch.exp(diff)) / n)


@pytest.mark.parametrize(
    "sw, err, match",
    [
        (torch.ones(8), ValueError, r"sampling_weight must match logp's shape \(9,\)"),
        (torch.ones(9, dtype=torch.int64), TypeError, "sampling_weight must be a float tensor"),
        (torch.ones(9, device="meta"), ValueError, "one device"),
        (torch.tensor([1.0] * 8 + [-0.5]), ValueError, "sampling_weight has 1 negative or non-finite value.*token 8"),
        (
            torch.tensor([1.0] * 3 + [float("nan")] * 6),
            ValueError,
            "sampling_weight has 6 negative or non-finite .*token 3",
        ),
        (
            torch.tensor([float("inf")] + [1.0] * 8),
            ValueError,
            "sampling_weight has 1 negative or non-finite .*token 0",
        ),
    ],
)
def test_bad_sampling_weight_names_the_problem(sw, err, match):
    with pytest.raises(err, match=match):
        policy_loss(torch.zeros(9), None, torch.ones(2), torch.tensor([0, 4, 9], dtype=torch.int32), sampling_weight=sw)


def test_sampling_weight_gets_no_gradient():
    sw = torch.rand(9, requires_grad=True)
    lp = torch.zeros(9, requires_grad=True)
    loss, _ = policy_loss(lp, None, torch.ones(2), torch.tensor([0, 4, 9], dtype=torch.int32), sampling_weight=sw)
    loss.backward()
    assert sw.grad is None and lp.grad is not None


NAN = float("nan")


@pytest.mark.parametrize(
    "probe, match",
    [
        (
            dict(old=torch.tensor([0.0, 0, 0, NAN, 0, 0, 0, 0, 0])),
            r"old_logp has 1 non-finite value\(s\), the first at token 3",
        ),
        (dict(old=torch.tensor([0.0] * 8 + [float("-inf")])), "old_logp has 1 non-finite .* token 8"),
        (dict(adv=torch.tensor([1.0, NAN])), "advantages has 1 non-finite .* token 1"),
        (dict(ref_logp=torch.tensor([NAN] * 9), beta=0.1), "ref_logp has 9 non-finite .* token 0"),
        (dict(normalizer=-1), "normalizer must be a finite number > 0, got -1"),
        (dict(normalizer=0), "normalizer must be a finite number > 0, got 0"),
        (dict(normalizer=NAN), "normalizer must be a finite number > 0, got nan"),
        (dict(normalizer=torch.tensor(0.0)), "normalizer must be a finite number > 0, got 0"),
        (dict(normalizer=torch.tensor([NAN])), "normalizer must be a finite number > 0, got nan"),
        (dict(normalizer=torch.ones(2)), "normalizer must be a number or a one-element float tensor"),
        (dict(normalizer="9"), "normalizer must be a number"),
        (dict(beta=NAN), "beta must be a finite number >= 0, got nan"),
        (dict(beta=-0.1), "beta must be a finite number >= 0"),
        (dict(epsilon_low=NAN), r"epsilon_low must be a finite number in \[0, 1\), got nan"),
        (dict(epsilon_low=2), r"epsilon_low must be a finite number in \[0, 1\), got 2"),
        (dict(epsilon_low=1.0), r"epsilon_low must be a finite number in \[0, 1\)"),
        (dict(epsilon_high=float("inf")), "epsilon_high must be a finite number >= 0, got inf"),
        (dict(delta=NAN), "delta must be a finite number > 1 \\+ epsilon_high"),
        (dict(clip_ratio_c=NAN), "clip_ratio_c must be a finite number > 1"),
        (dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length must be an int >= 1"),
    ],
)
def test_non_finite_and_out_of_range_inputs_are_errors(probe, match):
    """Each probe gave a NaN, inf or sign-flipped loss without a word before these checks."""
    args = dict(
        lp=torch.zeros(9),
        old=torch.zeros(9),
        adv=torch.tensor([1.0, -1.0]),
        cu=torch.tensor([0, 4, 9], dtype=torch.int32),
    )
    opts = {k: probe.pop(k) for k in list(probe) if k not in args}
    args.update(probe)
    with pytest.raises(ValueError, match=match):
        policy_loss(args["lp"], args["old"], args["adv"], args["cu"], **opts)


def test_valid_tensor_normalizer_equals_the_number():
    lp, old, ref, adv, cu = make_batch(LENGTHS, 7)
    a, _ = policy_loss(lp.float(), old.float(), adv.float(), cu, loss_type="dapo", normalizer=17.0)
    b, _ = policy_loss(lp.float(), old.float(), adv.float(), cu, loss_type="dapo", normalizer=torch.tensor([17.0]))
    assert torch.equal(a, b)


def test_ready_config_equals_loose_options_and_both_is_an_error():
    lp, old, ref, adv, cu = make_batch(LENGTHS, 8)
    opts = dict(loss_type="grpo", epsilon_low=0.05, delta=1.5, beta=0.1)
    config = PolicyLossConfig.resolve(**opts)
    loose, _ = policy_loss(lp.float(), old.float(), adv.float(), cu, ref_logp=ref.float(), **opts)
    ready, _ = policy_loss(lp.float(), old.float(), adv.float(), cu, ref_logp=ref.float(), config=config)
    assert torch.equal(loose, ready)
    with pytest.raises(ValueError, match="either config= or the loss options, not both .got config and beta"):
        policy_loss(lp.float(), old.float(), adv.float(), cu, ref_logp=ref.float(), config=config, beta=0.1)
    with pytest.raises(TypeError, match="config must be a PolicyLossConfig, got dict"):
        policy_loss(lp.float(), old.float(), adv.float(), cu, config=opts)
    # A config built directly, without resolve, is checked as well.
    with pytest.raises(ValueError, match=r"epsilon_low must be a finite number in \[0, 1\)"):
        PolicyLossConfig(loss_type="grpo", epsilon_low=2.0)
    assert PolicyLossConfig(epsilon_low=0).epsilon_low == 0.0 and isinstance(config.beta, float)


# The golden rows' shaped objective (LUFFY's p / (p + gamma)): the empty row, a 13-token and a 7-token row.
GOLDEN = torch.tensor([False, True, True, False, True, False])


@pytest.mark.parametrize("loss_type", list(LOSS_RECIPES))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shaped_golden_rows_match_reference(loss_type, level, agg, on_policy, backend, device):
    _check(
        LENGTHS, loss_type, level, agg, on_policy, eps=(0.05, 0.05), backend=backend, device=device, golden_rows=GOLDEN
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_shaped_with_options_weights_masks_and_long_rows(backend, level, device):
    n = sum(LENGTHS)
    _check(
        LENGTHS,
        "grpo",
        level,
        "token-mean",
        False,
        eps=(0.05, 0.08),
        backend=backend,
        device=device,
        golden_rows=GOLDEN,
        gamma=0.3,
        sampling_weight=random_sampling_weight(n, 1),
        delta=1.3,
        clip_ratio_c=1.2,
        beta=0.1,
        normalizer=17.0,
    )
    mask = torch.ones(n, dtype=torch.bool)
    mask[8:14] = False  # part of a golden row
    mask[-3:] = False
    _check(
        LENGTHS,
        "gcpo",
        level,
        "seq-mean-token-mean",
        False,
        mask=mask,
        backend=backend,
        device=device,
        golden_rows=GOLDEN,
        gamma=1e-3,
        sampling_weight=random_sampling_weight(n, 2),
    )
    # a golden row longer than the Triton kernel's token block, beside a clipped-surrogate row
    _check(
        [600, 3],
        "gcpo",
        level,
        "seq-mean-token-mean",
        False,
        backend=backend,
        device=device,
        golden_rows=torch.tensor([True, False]),
        gamma=5.0,
    )


def _run(backend, device, loss_type, level, **kw):
    lp, old, ref, adv, cu = make_batch(LENGTHS, 0, spread=0.6)  # golden and other rows clip at both levels
    on = dict(device=device)
    x = lp.float().to(**on).requires_grad_()
    loss, stats = policy_loss(
        x,
        old.float().to(**on),
        adv.float().to(**on),
        cu.to(**on),
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=0.02,
        epsilon_high=0.02,
        beta=0.1,
        ref_logp=ref.float().to(**on),
        max_completion_length=30,
        backend=backend,
        **kw,
    )
    loss.backward()
    return loss.detach(), x.grad, stats


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_policy_ratio_objective_is_bit_identical_to_no_golden_rows(backend, device):
    """golden_objective="policy_ratio" (the default) ignores golden_rows: loss, gradient and stats are
    bitwise those of a call without them; "shaped" with no golden row is the same too."""
    golden, none = GOLDEN.to(device), torch.zeros(6, dtype=torch.bool, device=device)
    for loss_type in LOSS_RECIPES:
        for level in ("token", "sequence"):
            plain = _run(backend, device, loss_type, level)
            variants = [
                _run(backend, device, loss_type, level, golden_rows=golden),
                _run(backend, device, loss_type, level, golden_rows=golden, golden_objective="policy_ratio"),
                _run(backend, device, loss_type, level, golden_rows=none, golden_objective="shaped"),
            ]
            for loss, grad, stats in variants:
                assert torch.equal(loss, plain[0]) and torch.equal(grad, plain[1]), (loss_type, level)
                assert stats.keys() == plain[2].keys()
                assert all(torch.equal(stats[k], plain[2][k]) for k in stats), (loss_type, level)
            shaped = _run(backend, device, loss_type, level, golden_rows=golden, golden_objective="shaped")
            assert not torch.equal(shaped[0], plain[0]) and not torch.equal(shaped[1], plain[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_shaped_rows_add_nothing_to_the_clip_fractions(backend, level, device):
    """Clip sums of "shaped" = policy_ratio's over the other rows only; ratio_mean and kl are unchanged."""
    n_tok = sum(LENGTHS)
    others = ~torch.repeat_interleave(GOLDEN, torch.tensor(LENGTHS)).to(device)
    _, _, ratio = _run(backend, device, "grpo", level)
    _, _, shaped = _run(backend, device, "grpo", level, golden_rows=GOLDEN.to(device), golden_objective="shaped")
    _, _, masked = _run(backend, device, "grpo", level, mask=others)
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        torch.testing.assert_close(shaped[k] * n_tok, masked[k] * masked["num_tokens"])
    assert float(ratio["clip_ratio/region_mean"]) > float(shaped["clip_ratio/region_mean"]) > 0  # both rows clip
    assert torch.equal(shaped["ratio_mean"], ratio["ratio_mean"]) and torch.equal(shaped["kl"], ratio["kl"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shaped_gradient_closed_form_and_extreme_logprobs(backend, device):
    """d loss / d lp = -w A gamma p / (p + gamma)^2; finite where p underflows (lp = -200) or p = 1."""
    lp = torch.tensor([0.0, -0.1, -2.0, -200.0], device=device, requires_grad=True)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    loss, _ = policy_loss(
        lp,
        None,
        torch.tensor([2.0], device=device),
        cu,
        loss_type="dapo",
        backend=backend,
        golden_rows=torch.tensor([True], device=device),
        golden_objective="shaped",
    )
    loss.backward()
    p = torch.exp(lp.detach().double())
    torch.testing.assert_close(loss.double(), (-2.0 * p / (p + 0.1)).sum() / 4)
    torch.testing.assert_close(lp.grad.double(), -2.0 / 4 * 0.1 * p / (p + 0.1) ** 2)
    assert lp.grad[3] == 0 and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize(
    "opts, err, match",
    [
        (dict(golden_shaping_gamma=0.0), ValueError, "golden_shaping_gamma must be a finite number > 0, got 0.0"),
        (dict(golden_shaping_gamma=-0.1), ValueError, "golden_shaping_gamma must be a finite number > 0"),
        (dict(golden_shaping_gamma=NAN), ValueError, "golden_shaping_gamma must be a finite number > 0, got nan"),
        (dict(golden_shaping_gamma=float("inf")), ValueError, "golden_shaping_gamma must be a finite number > 0"),
        (dict(golden_shaping_gamma="0.1"), ValueError, "golden_shaping_gamma must be a number"),
        (dict(golden_objective="luffy"), ValueError, r"golden_objective must be one of \('policy_ratio', 'shaped'\)"),
        (dict(golden_objective="shaped", golden_rows=None), ValueError, "golden_objective='shaped' needs golden_rows"),
        (
            dict(golden_rows=torch.ones(3, dtype=torch.bool)),
            ValueError,
            r"golden_rows must be \[B\] = \[2\].*got \(3,\)",
        ),
        (dict(golden_rows=torch.ones(2, 1, dtype=torch.bool)), ValueError, r"golden_rows must be \[B\] = \[2\]"),
        (dict(golden_rows=[True, False]), ValueError, r"golden_rows must be \[B\] = \[2\].*got list"),
        (dict(golden_rows=torch.ones(2)), TypeError, "golden_rows must be a bool tensor, got torch.float32"),
        (dict(golden_rows=torch.ones(2, dtype=torch.bool, device="meta")), ValueError, "one device"),
    ],
)
def test_bad_golden_options_name_the_problem(opts, err, match):
    opts = dict(dict(golden_rows=torch.tensor([True, False]), golden_objective="shaped"), **opts)
    with pytest.raises(err, match=match):
        policy_loss(torch.zeros(9), None, torch.ones(2), torch.tensor([0, 4, 9], dtype=torch.int32), **opts)


def test_shaped_config_equals_loose_options():
    lp, old, ref, adv, cu = make_batch(LENGTHS, 10)
    opts = dict(loss_type="gcpo", golden_objective="shaped", golden_shaping_gamma=0.2)
    config = PolicyLossConfig.resolve(**opts)
    assert (config.golden_objective, config.golden_shaping_gamma) == ("shaped", 0.2)
    assert (PolicyLossConfig.resolve().golden_objective, PolicyLossConfig.resolve().golden_shaping_gamma) == (
        "policy_ratio",
        0.1,
    )
    loose, _ = policy_loss(lp.float(), old.float(), adv.float(), cu, golden_rows=GOLDEN, **opts)
    ready, _ = policy_loss(lp.float(), old.float(), adv.float(), cu, golden_rows=GOLDEN, config=config)
    assert torch.equal(loose, ready)
    with pytest.raises(ValueError, match="not both .got config and golden_shaping_gamma"):
        policy_loss(
            lp.float(), old.float(), adv.float(), cu, golden_rows=GOLDEN, config=config, golden_shaping_gamma=0.2
        )
