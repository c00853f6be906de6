"""sampling_weights (the sampling-mismatch correction) against a hand-computed case and a padded
[B, T] reference written the way TRL 1.16's GRPOTrainer computes it."""

import math

import pytest
import torch

from gcpo_fast.kernels import SAMPLING_MODES, sampling_weights

LN2 = math.log(2.0)
NAN = float("nan")


def hand_case():
    """Rows: [2 tokens], [3 tokens, the last masked], a golden row [1 token] the engine never sampled.
    old - sampling: row 0 (ln 2, ln 2): token ratios 2, 2, sequence ratio 4;
                    row 1 (ln 4, -ln 2, masked): token ratios 4, 0.5, sequence ratio 2."""
    sampling = torch.tensor([-1.0, -2.0, -1.0, -1.0, -5.0, NAN])
    old = sampling + torch.tensor([LN2, LN2, 2 * LN2, -LN2, 3 * LN2, 0.0])
    old[-1] = -0.3
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    mask = torch.tensor([True, True, True, True, False, True])
    golden = torch.tensor([False, False, True])
    return old, sampling, cu, mask, golden


# mode, clip_min -> expected weight per token, ratio (min, mean, max) over what TRL measures
HAND = [
    ("token_truncate", None, [2, 2, 3, 0.5, 1, 1], (0.5, 7.5 / 4, 3)),
    ("token_truncate", 0.6, [2, 2, 3, 0.6, 1, 1], (0.6, 7.6 / 4, 3)),
    ("token_mask", None, [2, 2, 0, 0.5, 1, 1], (0, 4.5 / 4, 2)),
    ("token_mask", 0.6, [2, 2, 0, 0, 1, 1], (0, 1, 2)),
    ("sequence_truncate", None, [3, 3, 2, 2, 2, 1], (2, 2.5, 3)),
    ("sequence_truncate", 2.5, [3, 3, 2.5, 2.5, 2.5, 1], (2.5, 2.75, 3)),
    ("sequence_mask", None, [0, 0, 2, 2, 2, 1], (0, 1, 2)),
    ("sequence_mask", 2.5, [0, 0, 0, 0, 0, 1], (0, 0, 0)),
]


@pytest.mark.parametrize("mode, clip_min, expected, ratio", HAND)
def test_hand_computed_weights_and_metrics(mode, clip_min, expected, ratio):
    old, sampling, cu, mask, golden = hand_case()
    weight, metrics = sampling_weights(
        old, sampling, cu, mask, mode=mode, clip_min=clip_min, clip_max=3.0, golden=golden
    )
    assert weight.dtype == torch.float32 and not weight.requires_grad
    torch.testing.assert_close(weight, torch.tensor(expected, dtype=torch.float32))
    got = [float(metrics[f"sampling/importance_sampling_ratio/{k}"]) for k in ("min", "mean", "max")]
    assert got == pytest.approx(ratio, rel=1e-6, abs=1e-6)
    # |old - sampling| over the masked tokens of sampled rows: ln2, ln2, ln4, ln2
    assert float(metrics["sampling/sampling_logp_difference/mean"]) == pytest.approx(5 * LN2 / 4, rel=1e-6)
    assert float(metrics["sampling/sampling_logp_difference/max"]) == pytest.approx(2 * LN2, rel=1e-6)


def trl_reference(old, sampling, cu, mask, golden, mode, clip_min, clip_max):
    """TRL 1.16 `_generate_and_score_completions` on right-padded [B, T] fp64 tensors, golden rows set to 1."""
    B, T = cu.numel() - 1, max(int(cu[i + 1] - cu[i]) for i in range(cu.numel() - 1))

    def pad(x, fill):
        return torch.stack(
            [torch.cat([x[cu[i] : cu[i + 1]], x.new_full((T - int(cu[i + 1] - cu[i]),), fill)]) for i in range(B)]
        )

    old2, samp2, mask2 = pad(old.double(), 0.0), pad(sampling.double(), 0.0), pad(mask.double(), 0.0)
    diff = torch.nan_to_num((old2 - samp2) * mask2, nan=0.0)
    sequence_level = mode in ("sequence_mask", "sequence_truncate")
    ratio = torch.exp(diff.sum(-1, keepdim=True) if sequence_level else diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    ratio = torch.where(golden[:, None], 1.0, ratio.expand(B, T))
    weight = torch.cat([ratio[i, : int(cu[i + 1] - cu[i])] for i in range(B)])
    sampled = ~golden
    delta = torch.abs(old2 - samp2)[sampled]
    keep = mask2.bool()[sampled]
    delta = delta[keep & ~torch.isnan(delta)]
    flat = ratio[sampled][:, 0] if sequence_level else ratio[sampled][keep]

    def stats(x, f):
        return f(x) if x.numel() else torch.tensor(0.0, dtype=torch.float64)

    return weight, {
        "sampling/sampling_logp_difference/mean": stats(delta, torch.mean),
        "sampling/sampling_logp_difference/max": stats(delta, torch.max),
        "sampling/importance_sampling_ratio/min": stats(flat, torch.min),
        "sampling/importance_sampling_ratio/mean": stats(flat, torch.mean),
        "sampling/importance_sampling_ratio/max": stats(flat, torch.max),
    }


@pytest.mark.parametrize("mode", SAMPLING_MODES)
@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (0.5, 2.0), (0.8, None)])
def test_random_batches_match_the_trl_reference(mode, clip_min, clip_max):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 0, 12, 1, 7, 9]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    n = int(cu[-1])
    sampling = -torch.rand(n, generator=g) * 4
    old = sampling + torch.randn(n, generator=g) * 0.3
    sampling[[3, 20]] = NAN  # tokens the engine could not score: ratio 1, left out of the difference metric
    mask = torch.rand(n, generator=g) > 0.2
    golden = torch.tensor([False, False, False, True, False, True])
    weight, metrics = sampling_weights(
        old, sampling, cu, mask, mode=mode, clip_min=clip_min, clip_max=clip_max, golden=golden
    )
    ref_weight, ref_metrics = trl_reference(old, sampling, cu, mask, golden, mode, clip_min, clip_max)
    # Masked tokens do not count in the loss; the reference and TRL give them the row's or a neutral value.
    torch.testing.assert_close(weight[mask].double(), ref_weight[mask], rtol=1e-5, atol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k].double(), ref_metrics[k], rtol=1e-5, atol=1e-6, msg=k)
    assert torch.isfinite(weight).all() and (weight >= 0).all()


def test_every_row_golden_gives_ones_and_zero_metrics():
    old, sampling, cu, mask, _ = hand_case()
    weight, metrics = sampling_weights(
        old, sampling, cu, mask, mode="token_mask", golden=torch.ones(3, dtype=torch.bool)
    )
    assert torch.equal(weight, torch.ones(6))
    assert all(float(v) == 0.0 for v in metrics.values())


def test_defaults_are_trls_sequence_mask_with_clip_max_3():
    old, sampling, cu, mask, golden = hand_case()
    weight, _ = sampling_weights(old, sampling, cu, mask, golden=golden)
    torch.testing.assert_close(weight, torch.tensor([0, 0, 2, 2, 2, 1.0]))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="sequence"), "mode must be one of"),
        (dict(clip_max=NAN), "clip_max must be a finite number > 0, got nan"),
        (dict(clip_min=-1.0), "clip_min must be a finite number >= 0"),
        (dict(clip_min=2.0, clip_max=1.0), "clip_min must not exceed clip_max"),
        (dict(sampling=torch.zeros(5)), r"sampling_logp must match old_logp's shape \(6,\)"),
        (dict(mask=torch.ones(7, dtype=torch.bool)), r"mask must match old_logp's shape \(6,\)"),
        (dict(golden=torch.zeros(3)), r"golden must be a bool tensor \[B\] = \[3\]"),
        (dict(golden=torch.zeros(2, dtype=torch.bool)), r"golden must be a bool tensor \[B\] = \[3\]"),
        (dict(cu=torch.tensor([0, 2, 7], dtype=torch.int32)), "end at N=6"),
        (dict(sampling=torch.zeros(6, device="meta")), "one device"),
    ],
)
def test_bad_input_names_the_problem(kw, match):
    old, sampling, cu, mask, golden = hand_case()
    args = dict(sampling=sampling, cu=cu, mask=mask, golden=golden)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    if args["cu"].numel() != 4:  # a cu_seqlens with another B: no per-row flags
        args["golden"] = None
    with pytest.raises(ValueError, match=match):
        sampling_weights(old, args["sampling"], args["cu"], args["mask"], golden=args["golden"], **kw)
