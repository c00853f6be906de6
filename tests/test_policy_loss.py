"""policy_loss against the row-by-row fp64 autograd reference (tests/policy_reference.py), for every switch.

Input validation: test_policy_loss_inputs.py; golden rows' shaped objective: test_policy_loss_golden.py.
"""

import pytest
import torch
from policy_reference import (
    LENGTHS,
    METHODS,
    check_against_reference,
    inputs_and_config,
    make_batch,
    random_sampling_weight,
)

from gcpo_fast.kernels import AGG_MODES, IS_LEVELS, policy_loss


@pytest.mark.parametrize("level", IS_LEVELS)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference_every_combination(level, agg, on_policy, backend, weighted, device):
    sw = random_sampling_weight(sum(LENGTHS), 0) if weighted else None
    check_against_reference(LENGTHS, level, agg, on_policy, backend=backend, device=device, sampling_weight=sw)


def test_triton_row_kernel_stats_match_torch(device):
    """The Triton row kernel's stats (not only loss and gradient) equal the torch path's."""
    for level in ("token", "sequence"):
        clipped = 0.0
        for seed in range(3):
            kw = dict(eps=(0.05, 0.05), beta=0.1, seed=seed)
            torch_stats = check_against_reference(LENGTHS, level, "seq-mean-token-mean", False, **kw)
            triton_stats = check_against_reference(
                LENGTHS, level, "seq-mean-token-mean", False, backend="triton", device=device, **kw
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
        check_against_reference(
            LENGTHS,
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
        check_against_reference(
            LENGTHS,
            level,
            "seq-mean-token-mean",
            False,
            mask=mask,
            eps=(0.05, 0.05),
            backend=backend,
            device=device,
        )
        check_against_reference(long_row, level, "seq-mean-token-mean", False, backend=backend, device=device)
    check_against_reference([1], "token", "token-mean", False, backend=backend, device=device)


def test_sequence_gradient_formula_and_clipped_rows():
    """d loss / d lp_t = -W_i A_i s_i / |o_i| on unclipped rows, exactly 0 on clipped ones."""
    lengths = [4, 6, 3, 5]
    cu = torch.tensor([0, 4, 10, 13, 18], dtype=torch.int32)
    lp = torch.zeros(18, requires_grad=True)
    log_s = torch.tensor([0.05, 0.05, -0.05, -0.05])  # row log-ratios
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    rows = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    old = -log_s[rows]
    loss, stats = policy_loss(lp, *inputs_and_config(adv, cu, old_logp=old, epsilon_low=0.02, epsilon_high=0.02))
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
    loss, stats = policy_loss(lp, *inputs_and_config(torch.tensor([2.0, -1.0]), cu, **METHODS["grpo"]))
    loss.backward()
    assert float(stats["ratio_mean"]) == 1.0
    expected = torch.cat([torch.full((4,), -2.0 / (2 * 4)), torch.full((5,), 1.0 / (2 * 5))])
    torch.testing.assert_close(lp.grad, expected)


def test_deterministic():
    lp, old, ref, adv, cu = make_batch(LENGTHS, 3)
    outs = []
    for _ in range(2):
        x = lp.float().requires_grad_()
        options = dict(old_logp=old.float(), beta=0.1, ref_logp=ref.float(), **METHODS["dapo"])
        loss, _ = policy_loss(x, *inputs_and_config(adv.float(), cu, **options))
        loss.backward()
        outs.append((loss.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sampling_weight_with_options_masks_and_long_rows(backend, level, device):
    n = sum(LENGTHS)
    for seed in range(2):
        check_against_reference(
            LENGTHS,
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
    check_against_reference(
        LENGTHS,
        level,
        "seq-mean-token-mean",
        False,
        mask=mask,
        eps=(0.05, 0.05),
        backend=backend,
        device=device,
        sampling_weight=random_sampling_weight(n, 3),
    )
    check_against_reference(
        [600, 3],
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
    for method, switches in METHODS.items():
        for level in ("none",) if method == "gpg" else ("token", "sequence"):
            outs = []
            for sw in weights:
                x = lp.float().to(**on).requires_grad_()
                loss, stats = policy_loss(
                    x,
                    *inputs_and_config(
                        adv.float().to(**on),
                        cu.to(**on),
                        old_logp=old.float().to(**on),
                        **dict(switches, importance_sampling_level=level),
                        beta=0.1,
                        ref_logp=ref.float().to(**on),
                        max_completion_length=30,
                        backend=backend,
                        sampling_weight=None if sw is None else sw.to(**on),
                    ),
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
        *inputs_and_config(
            adv.float().to(**on),
            cu.to(**on),
            old_logp=old.float().to(**on),
            **METHODS["dapo"],
            beta=0.3,
            ref_logp=ref.float().to(**on),
            sampling_weight=torch.zeros(n, **on),
            backend=backend,
        ),
    )
    loss.backward()
    torch.testing.assert_close(loss, 0.3 * stats["kl"])
    diff = (ref - lp).float().to(**on)
    torch.testing.assert_close(x.grad, 0.3 * (1 - torch.exp(diff)) / n)


def test_sampling_weight_gets_no_gradient():
    sw = torch.rand(9, requires_grad=True)
    lp = torch.zeros(9, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    loss, _ = policy_loss(lp, *inputs_and_config(torch.ones(2), cu, sampling_weight=sw))
    loss.backward()
    assert sw.grad is None and lp.grad is not None


def test_valid_tensor_normalizer_equals_the_number():
    lp, old, ref, adv, cu = make_batch(LENGTHS, 7)
    options = dict(old_logp=old.float(), **METHODS["dapo"])
    a, _ = policy_loss(lp.float(), *inputs_and_config(adv.float(), cu, normalizer=17.0, **options))
    b, _ = policy_loss(lp.float(), *inputs_and_config(adv.float(), cu, normalizer=torch.tensor([17.0]), **options))
    assert torch.equal(a, b)
