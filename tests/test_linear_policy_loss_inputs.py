"""linear_policy_loss's and linear_logprobs' input checks: one line naming the argument, and what they cost
(host read-backs)."""

import pytest
import torch
from policy_reference import IGNORE, METHODS, inputs_and_config, make_inputs
from policy_reference import fused_loss as _fused

from gcpo_fast.kernels import linear_logprobs

GOLDEN = torch.tensor([True, False, True, False, True, False])  # a 6-, the ignored 9- and the 13-token row


def _args(**over):
    h, W, b, t, adv, cu = make_inputs(9, 8, 30, [4, 5], seed=1)
    args = dict(hidden=h, weight=W, targets=t, old_logp=None, advantages=adv, cu_seqlens=cu, bias=b)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, err, match",
    [
        (dict(hidden=torch.zeros(9, 7)), ValueError, "disagree on d"),
        (dict(targets=torch.zeros(8, dtype=torch.long)), ValueError, r"targets must be \[N\] = \[9\]"),
        (dict(targets=torch.full((9,), 30)), ValueError, r"targets\[0\] = 30 is outside \[0, V=30\)"),
        (dict(targets=torch.full((9,), -1)), ValueError, "is outside"),
        (dict(targets=torch.zeros(9)), TypeError, "targets must be int64"),
        (dict(hidden=torch.zeros(9, 8, dtype=torch.float64)), TypeError, "fp32/fp16/bf16"),
        (dict(hidden=torch.zeros(9, 8, dtype=torch.float16)), TypeError, "share a dtype"),
        (dict(bias=torch.zeros(29)), ValueError, r"bias must be \[V\] = \[30\]"),
        (dict(weight=torch.zeros(30, 8, device="meta")), ValueError, "one device"),
        (
            dict(cu_seqlens=torch.tensor([0, 5, 4, 9], dtype=torch.int32), advantages=torch.zeros(3)),
            ValueError,
            "non-decreasing",
        ),
        (dict(cu_seqlens=torch.tensor([0, 4, 12], dtype=torch.int32)), ValueError, "end at N=9"),
        (dict(advantages=torch.zeros(3)), ValueError, r"advantages must be \[B\] = \[2\]"),
        (dict(old_logp=torch.zeros(10)), ValueError, "old_logp must match"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0, got nan"),
        # the probes of non-finite and out-of-range inputs: each was a silent NaN / inf / sign flip, or a traceback
        (
            dict(weight=torch.zeros(0, 8), bias=None, targets=torch.full((9,), IGNORE)),
            ValueError,
            r"weight must have at least one row \(V >= 1\)",
        ),
        (
            dict(old_logp=torch.tensor([0.0] * 5 + [float("nan")] * 4)),
            ValueError,
            r"old_logp has 4 non-finite value\(s\), the first at token 5",
        ),
        (dict(advantages=torch.tensor([float("inf"), 0.0])), ValueError, "advantages has 1 non-finite .* token 0"),
        (dict(ref_logp=torch.full((9,), float("nan")), beta=0.1), ValueError, "ref_logp has 9 non-finite"),
        (dict(normalizer=-1.0), ValueError, "normalizer must be a finite number > 0, got -1.0"),
        (dict(normalizer=0), ValueError, "normalizer must be a finite number > 0, got 0"),
        (dict(beta=float("nan")), ValueError, "beta must be a finite number >= 0, got nan"),
        (dict(epsilon_low=float("nan")), ValueError, r"epsilon_low must be a finite number in \[0, 1\), got nan"),
        (dict(epsilon_low=2), ValueError, r"epsilon_low must be a finite number in \[0, 1\), got 2"),
        (dict(sampling_weight=torch.ones(10)), ValueError, r"sampling_weight must match logp's shape \(9,\)"),
        (dict(sampling_weight=torch.ones(9, dtype=torch.bool)), TypeError, "sampling_weight must be a float tensor"),
        (dict(sampling_weight=torch.full((9,), -1.0)), ValueError, "sampling_weight has 9 negative or non-finite"),
        # Python lists where tensors belong: one line naming the argument, not an AttributeError naming nothing
        (dict(targets=[0] * 9), TypeError, "targets must be a torch.Tensor, got list"),
        (dict(hidden=[[0.0] * 8] * 9), TypeError, "hidden must be a torch.Tensor, got list"),
        (dict(bias=[0.0] * 30), TypeError, "bias must be a torch.Tensor, got list"),
        (dict(advantages=[1.0, -1.0]), TypeError, "advantages must be a torch.Tensor, got list"),
        (dict(sampling_weight=[1.0] * 9), TypeError, "sampling_weight must be a torch.Tensor, got list"),
    ],
)
def test_bad_input_gets_a_clear_error(over, err, match):
    args = _args(**over)
    with pytest.raises(err, match=match):
        _fused(**args)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_hidden_is_detected(backend, device):
    h, W, b, t, adv, cu = make_inputs(9, 8, 30, [4, 5], seed=1, device=device)
    h[6, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="hidden has non-finite values .first at token 6"):
        _fused(h, W, t, None, adv, cu, backend=backend)
    h[6, 3] = float("inf")
    with pytest.raises(FloatingPointError, match="hidden"):
        linear_logprobs(h, W, t, backend=backend)
    h[6, 3] = 0.0
    W[2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="weight has non-finite"):
        linear_logprobs(h, W, t, backend=backend)


def test_input_checks_read_the_device_once(monkeypatch):
    """All content checks (targets, cu_seqlens, finite inputs, sampling weight, tensor normalizer) cost one
    read-back: policy_loss reads the device once, linear_policy_loss twice (+ the LSE check after the forward),
    and once more where the torch backend keeps sequence-level off-policy rows whole in its chunks."""
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: reads.append(_n) or _f(self, *a, **k)
        )
    from gcpo_fast.kernels import policy_loss

    h, W, b, t, adv, cu = make_inputs(20, 8, 30, [7, 13], seed=5, ignore_frac=0.0)
    old, ref, sw = torch.randn(20), torch.randn(20), torch.rand(20)
    for backend in ("torch", "triton"):
        reads.clear()
        policy_loss(
            torch.randn(20, requires_grad=True),
            *inputs_and_config(
                adv,
                cu,
                old_logp=old,
                **METHODS["grpo"],
                beta=0.1,
                ref_logp=ref,
                sampling_weight=sw,
                normalizer=torch.tensor(3.0),
                backend=backend,
            ),
        )
        assert reads == ["tolist"], (backend, reads)
    for backend, method, expected in (("triton", "gcpo", 2), ("torch", "grpo", 2), ("torch", "gcpo", 3)):
        reads.clear()
        _fused(
            h,
            W.requires_grad_(),
            t,
            old,
            adv,
            cu,
            **METHODS[method],
            beta=0.1,
            ref_logp=ref,
            sampling_weight=sw,
            backend=backend,
        )
        assert len(reads) == expected, (backend, method, reads)


@pytest.mark.parametrize(
    "over, err, match",
    [
        (dict(golden_objective="shaped"), ValueError, "golden_objective='shaped' needs golden"),
        (dict(golden=torch.ones(3, dtype=torch.bool)), ValueError, r"golden must be \[B\] = \[2\]"),
        (dict(golden=torch.ones(2, dtype=torch.int64)), TypeError, "golden must be a bool tensor"),
        (dict(golden_shaping_gamma=0), ValueError, "golden_shaping_gamma must be a finite number > 0, got 0"),
        (dict(golden_objective="p_div_p"), ValueError, "golden_objective must be one of"),
    ],
)
def test_bad_golden_options_get_a_clear_error(over, err, match):
    with pytest.raises(err, match=match):
        _fused(**_args(**over))
