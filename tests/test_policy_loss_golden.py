"""Golden rows under golden_objective="shaped" (LUFFY's p / (p + gamma)) in policy_loss, against the fp64 reference."""

import pytest
import torch
from policy_reference import (
    GOLDEN,
    LENGTHS,
    METHODS,
    check_against_reference,
    inputs_and_config,
    make_batch,
    random_sampling_weight,
)

from gcpo_fast.kernels import AGG_MODES, IS_LEVELS, LossInputs, PolicyLossConfig, policy_loss

NAN = float("nan")


@pytest.mark.parametrize("level", IS_LEVELS)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shaped_golden_rows_match_reference(level, agg, on_policy, backend, device):
    check_against_reference(
        LENGTHS, level, agg, on_policy, eps=(0.05, 0.05), backend=backend, device=device, golden=GOLDEN
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_shaped_with_options_weights_masks_and_long_rows(backend, level, device):
    n = sum(LENGTHS)
    check_against_reference(
        LENGTHS,
        level,
        "token-mean",
        False,
        eps=(0.05, 0.08),
        backend=backend,
        device=device,
        golden=GOLDEN,
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
    check_against_reference(
        LENGTHS,
        level,
        "seq-mean-token-mean",
        False,
        mask=mask,
        backend=backend,
        device=device,
        golden=GOLDEN,
        gamma=1e-3,
        sampling_weight=random_sampling_weight(n, 2),
    )
    # a golden row longer than the Triton kernel's token block, beside a clipped-surrogate row
    check_against_reference(
        [600, 3],
        level,
        "seq-mean-token-mean",
        False,
        backend=backend,
        device=device,
        golden=torch.tensor([True, False]),
        gamma=5.0,
    )


def _run(backend, device, method, level, **kw):
    """policy_loss with METHODS[method]'s switches at `level`, a tight clip box and a KL term: (loss, grad, stats)."""
    lp, old, ref, adv, cu = make_batch(LENGTHS, 0, spread=0.6)  # golden and other rows clip at both levels
    on = dict(device=device)
    x = lp.float().to(**on).requires_grad_()
    switches = dict(METHODS[method], importance_sampling_level=level, epsilon_low=0.02, epsilon_high=0.02)
    loss, stats = policy_loss(
        x,
        *inputs_and_config(
            adv.float().to(**on),
            cu.to(**on),
            old_logp=old.float().to(**on),
            **switches,
            beta=0.1,
            ref_logp=ref.float().to(**on),
            max_completion_length=30,
            backend=backend,
            **kw,
        ),
    )
    loss.backward()
    return loss.detach(), x.grad, stats


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_policy_ratio_objective_is_bit_identical_to_no_golden_rows(backend, device):
    """golden_objective="policy_ratio" (the default) ignores golden: loss, gradient and stats are
    bitwise those of a call without them; "shaped" with no golden row is the same too."""
    golden, none = GOLDEN.to(device), torch.zeros(6, dtype=torch.bool, device=device)
    for method in METHODS:
        for level in ("none",) if method == "gpg" else ("token", "sequence"):
            plain = _run(backend, device, method, level)
            variants = [
                _run(backend, device, method, level, golden=golden),
                _run(backend, device, method, level, golden=golden, golden_objective="policy_ratio"),
                _run(backend, device, method, level, golden=none, golden_objective="shaped"),
            ]
            for loss, grad, stats in variants:
                assert torch.equal(loss, plain[0]) and torch.equal(grad, plain[1]), (method, level)
                assert stats.keys() == plain[2].keys()
                assert all(torch.equal(stats[k], plain[2][k]) for k in stats), (method, level)
            shaped = _run(backend, device, method, level, golden=golden, golden_objective="shaped")
            assert not torch.equal(shaped[0], plain[0]) and not torch.equal(shaped[1], plain[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_shaped_rows_add_nothing_to_the_clip_fractions(backend, level, device):
    """Clip sums of "shaped" = policy_ratio's over the other rows only; ratio_mean and kl are unchanged."""
    n_tok = sum(LENGTHS)
    others = ~torch.repeat_interleave(GOLDEN, torch.tensor(LENGTHS)).to(device)
    _, _, ratio = _run(backend, device, "grpo", level)
    _, _, shaped = _run(backend, device, "grpo", level, golden=GOLDEN.to(device), golden_objective="shaped")
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
        *inputs_and_config(
            torch.tensor([2.0], device=device),
            cu,
            **METHODS["dapo"],
            backend=backend,
            golden=torch.tensor([True], device=device),
            golden_objective="shaped",
        ),
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
        (dict(golden_objective="shaped", golden=None), ValueError, "golden_objective='shaped' needs golden"),
        (
            dict(golden=torch.ones(3, dtype=torch.bool)),
            ValueError,
            r"golden must be \[B\] = \[2\].*got \(3,\)",
        ),
        (dict(golden=torch.ones(2, 1, dtype=torch.bool)), ValueError, r"golden must be \[B\] = \[2\]"),
        (dict(golden=[True, False]), TypeError, r"golden must be a torch.Tensor, got list"),
        (dict(golden=torch.ones(2)), TypeError, "golden must be a bool tensor, got torch.float32"),
        (dict(golden=torch.ones(2, dtype=torch.bool, device="meta")), ValueError, "one device"),
    ],
)
def test_bad_golden_options_name_the_problem(opts, err, match):
    opts = dict(dict(golden=torch.tensor([True, False]), golden_objective="shaped"), **opts)
    with pytest.raises(err, match=match):
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        policy_loss(torch.zeros(9), *inputs_and_config(torch.ones(2), cu, **opts))


def test_shaped_config_and_its_defaults():
    lp, old, ref, adv, cu = make_batch(LENGTHS, 10)
    config = PolicyLossConfig(golden_objective="shaped", golden_shaping_gamma=0.2)
    assert (config.golden_objective, config.golden_shaping_gamma) == ("shaped", 0.2)
    assert (PolicyLossConfig().golden_objective, PolicyLossConfig().golden_shaping_gamma) == ("policy_ratio", 0.1)
    inputs = LossInputs(adv.float(), cu, old_logp=old.float(), golden=GOLDEN)
    shaped, _ = policy_loss(lp.float(), inputs, config)
    plain, _ = policy_loss(lp.float(), inputs, PolicyLossConfig())
    assert not torch.equal(shaped, plain)
