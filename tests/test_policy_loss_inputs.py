"""policy_loss's input checks: each bad input, option or Python type gets one line naming it (kernels/checks.py)."""

import pytest
import torch
from policy_reference import LENGTHS, inputs_and_config, make_batch

from gcpo_fast.kernels import Backend, LossInputs, PolicyLossConfig, policy_loss

CU = torch.tensor([0, 4, 9], dtype=torch.int32)


def _call(args, opts):
    """policy_loss on args (lp, old, adv, cu) with opts split between LossInputs and PolicyLossConfig."""
    return policy_loss(args["lp"], *inputs_and_config(args["adv"], args["cu"], old_logp=args["old"], **opts))


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
        (dict(loss_type="ppo"), "unexpected keyword argument 'loss_type'"),  # methods are the trainer's recipes
        (dict(beta=0.1), "needs ref_logp"),
        (dict(loss_agg_mode="seq-mean-token-sum-norm"), "max_completion_length"),
        (dict(importance_sampling_level="row"), "importance_sampling_level"),
    ],
)
def test_bad_input_names_the_problem(bad, match):
    args = dict(lp=torch.zeros(9), old=None, adv=torch.ones(2), cu=torch.tensor([0, 4, 9], dtype=torch.int32))
    opts = {k: bad.pop(k) for k in list(bad) if k not in args}
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        _call(args, opts)


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
        _call(dict(lp=torch.zeros(9), old=None, adv=torch.ones(2), cu=CU), dict(sampling_weight=sw))


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
        (
            dict(loss_agg_mode="seq-mean-token-sum-norm", max_completion_length=0),
            "max_completion_length must be an int >= 1",
        ),
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
        _call(args, opts)


def test_config_is_checked_when_built_and_must_be_a_config():
    lp, old, ref, adv, cu = make_batch(LENGTHS, 8)
    opts = dict(importance_sampling_level="token", epsilon_low=0.05, delta=1.5, beta=0.1)
    config = PolicyLossConfig(**opts)
    with pytest.raises(TypeError, match="config must be a PolicyLossConfig, got dict"):
        policy_loss(lp.float(), LossInputs(adv.float(), cu, old_logp=old.float()), opts)
    with pytest.raises(ValueError, match=r"epsilon_low must be a finite number in \[0, 1\)"):
        PolicyLossConfig(importance_sampling_level="token", epsilon_low=2.0)
    assert PolicyLossConfig(epsilon_low=0).epsilon_low == 0.0 and isinstance(config.beta, float)


@pytest.mark.parametrize(
    "build, err, match",
    [
        (lambda: PolicyLossConfig(importance_sampling_level="row"), ValueError, "importance_sampling_level must be"),
        (lambda: PolicyLossConfig(temperature=0), ValueError, "temperature must be a finite number > 0, got 0"),
        (lambda: PolicyLossConfig(backend="cuda"), ValueError, r"backend must be one of \['auto', 'torch', 'triton'\]"),
        (lambda: PolicyLossConfig(workspace_bytes=0), ValueError, "workspace_bytes must be None or an int >= 1"),
        (lambda: PolicyLossConfig(workspace_bytes=1.5), ValueError, "workspace_bytes must be None or an int >= 1"),
        (lambda: LossInputs([1.0, -1.0], CU), TypeError, "advantages must be a torch.Tensor, got list"),
        (lambda: LossInputs(torch.ones(2), [0, 4, 9]), TypeError, "cu_seqlens must be a torch.Tensor, got list"),
        (lambda: LossInputs(torch.ones(2), CU, old_logp=[0.0] * 9), TypeError, "old_logp must be a torch.Tensor"),
        (lambda: LossInputs(torch.ones(2), CU, mask=(True,) * 9), TypeError, "mask must be a torch.Tensor, got tuple"),
        (
            lambda: policy_loss([0.0] * 9, LossInputs(torch.ones(2), CU), PolicyLossConfig()),
            TypeError,
            "logp must be a",
        ),
        (
            lambda: policy_loss(torch.zeros(9), dict(advantages=torch.ones(2)), PolicyLossConfig()),
            TypeError,
            "inputs must be a LossInputs, got dict",
        ),
    ],
)
def test_bad_options_and_python_lists_name_the_argument(build, err, match):
    with pytest.raises(err, match=match):
        build()


def test_backend_names_convert_to_the_enum():
    assert PolicyLossConfig(backend="torch").backend is Backend.TORCH
    assert PolicyLossConfig(backend=Backend.TRITON).backend is Backend.TRITON
    assert PolicyLossConfig().backend is Backend.AUTO
