"""GCPO's golden rows (gcpo_fast/golden/rows.py): which groups get one, append / replace / off, and the advantage a
golden row gets (hand-computed; the std from Python's `statistics`, an implementation independent of torch)."""

import math
import statistics

import pytest
import torch

from gcpo_fast.golden.rows import add_golden_rows, all_right_groups, all_wrong_groups
from gcpo_fast.methods.advantages import group_advantages

EPS = 1e-4


def reference_advantages(groups_of_rewards, scale="group"):
    """Per-group lists -> flat list of TRL advantages, with statistics.stdev (Bessel) as the std."""
    flat = [r for g in groups_of_rewards for r in g]
    out = []
    for g in groups_of_rewards:
        mean = statistics.fmean(g)
        std = statistics.stdev(g) if len(g) > 1 else 0.0
        std = statistics.stdev(flat) if scale == "batch" else std
        out += [(r - mean) / (std + EPS) if scale != "none" else r - mean for r in g]
    return out


def golden_advantage_append(g):
    # G zeros + one 1: mean 1/(G+1), unbiased std 1/sqrt(G+1); with the eps of the denominator
    return (g / (g + 1)) / (1 / math.sqrt(g + 1) + EPS)


def test_append_one_golden_row_exact_advantage():
    rewards = torch.tensor([[0.0] * 8, [1, 0, 0, 1, 0, 0, 0, 0], [0.0] * 8])
    g = add_golden_rows(rewards, has_golden=[True, True, False], mode="append")
    # prompt 0 gets exactly one golden row (row 8); prompt 1 is not all wrong; prompt 2 has no golden answer
    assert g.rewards.numel() == 25 and g.golden.nonzero().flatten().tolist() == [8]
    assert torch.bincount(g.group_index).tolist() == [9, 8, 8]
    assert g.golden_prompts.tolist() == [True, False, False] and g.all_wrong.tolist() == [True, False, True]
    assert g.rollout_index.tolist() == list(range(8)) + [-1] + list(range(8, 24))
    assert g.rewards[8] == 1.0 and torch.equal(g.rewards[g.rollout_index >= 0], rewards.flatten())

    adv = group_advantages(g.rewards, g.group_index, "group")
    assert adv[8].item() == pytest.approx(golden_advantage_append(8), rel=1e-6)
    assert adv[8].item() == pytest.approx(8 / 3, abs=1e-3)  # G / sqrt(G+1) for G = 8
    assert adv[:8].tolist() == pytest.approx([-(1 / 9) / (1 / 3 + EPS)] * 8, rel=1e-6)  # -1/sqrt(G+1)
    expected = reference_advantages([[0.0] * 8 + [1.0], rewards[1].tolist(), rewards[2].tolist()])
    assert adv.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert adv[17:].abs().max() == 0  # all-wrong prompt without a golden answer: no signal


@pytest.mark.parametrize("num_rollouts", [2, 4, 16])
def test_append_golden_advantage_formula(num_rollouts):
    g = add_golden_rows(torch.zeros(1, num_rollouts), torch.tensor([True]), mode="append")
    adv = group_advantages(g.rewards, g.group_index)
    assert adv[-1].item() == pytest.approx(golden_advantage_append(num_rollouts), rel=1e-6)
    assert adv[-1].item() == pytest.approx(num_rollouts / math.sqrt(num_rollouts + 1), rel=1e-3)


def test_replace_and_off():
    rewards = torch.tensor([[0.0, 0, 0, 0], [0, 1, 0, 0]])
    has = torch.tensor([True, True])
    r = add_golden_rows(rewards, has, mode="replace")
    assert r.rewards.tolist() == [0, 0, 0, 1, 0, 1, 0, 0]  # last rollout of prompt 0 overwritten
    assert r.golden.nonzero().flatten().tolist() == [3] and r.rollout_index.tolist() == [0, 1, 2, -1, 4, 5, 6, 7]
    adv = group_advantages(r.rewards, r.group_index)
    assert adv[3].item() == pytest.approx((3 / 4) / (1 / 2 + EPS), rel=1e-6)  # (G-1)/sqrt(G) for G = 4
    off = add_golden_rows(rewards, has, mode="off")
    assert not off.golden.any() and off.golden_prompts.tolist() == [False, False]
    assert off.all_wrong.tolist() == [True, False] and torch.equal(off.rewards, rewards.flatten())
    assert group_advantages(off.rewards, off.group_index)[:4].abs().max() == 0
    with pytest.raises(ValueError, match="golden_answer mode"):
        add_golden_rows(rewards, has, mode="prepend")


def test_correct_threshold_and_signed_rewards():
    partial = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 0.0]])
    has = torch.tensor([True, True])
    # default threshold = correct_reward = 1: partial credit is still "wrong"
    assert add_golden_rows(partial, has).golden_prompts.tolist() == [True, True]
    assert add_golden_rows(partial, has, correct_threshold=0.5).golden_prompts.tolist() == [False, True]
    # DAPO-style +1/-1 rewards
    signed = add_golden_rows(torch.tensor([[-1.0, -1.0]]), torch.tensor([True]), correct_reward=1.0)
    assert signed.rewards.tolist() == [-1.0, -1.0, 1.0]


def test_all_right_groups_are_those_whose_every_reward_reaches_the_threshold():
    rewards = torch.tensor([[1.0, 1], [1, 0], [2, 1], [0.5, 0.5], [0, 0]])
    for threshold in (1.0, 0.5, 0.0):
        want = [min(r) >= threshold for r in rewards.tolist()]
        assert all_right_groups(rewards, threshold).tolist() == want, threshold
    assert all_right_groups(rewards, 1.0).tolist() == [True, False, True, False, False]
    assert not (all_right_groups(rewards, 1.0) & all_wrong_groups(rewards, 1.0)).any()  # never both
