"""The methods as units (gcpo_fast/methods.py): GPG's alpha and advantages, DAPO's filter, both sampling rules,
the recipe table. References are hand-computed."""

import math

import pytest
import torch

from gcpo_fast.errors import ConfigError
from gcpo_fast.methods.advantages import grid_group_index
from gcpo_fast.methods.dapo import DynamicSampling, dapo_filter, overlong_penalty
from gcpo_fast.methods.gpg import MinInverseAlpha, gpg_alpha
from gcpo_fast.methods.recipes import METHODS, MethodConfig

EPS = 1e-4


def same(x):
    return x  # one rank: the minimum over ranks is the value itself


def test_gpg_alpha_and_advantages():
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    index = grid_group_index(4, 4)
    # B = 16 rows, M = 8 rows in zero-variance groups -> alpha = 16 / 8 = 2
    assert gpg_alpha(rewards.flatten(), index) == 2.0
    adv, metrics = METHODS["gpg"].advantages(rewards.flatten(), index, "none")
    assert metrics == {"gpg/alpha": 2.0}
    assert adv.tolist() == [1.5, -0.5, -0.5, -0.5] + [0.0] * 8 + [1.0, -1.0, 1.0, -1.0]
    adv_std, _ = METHODS["gpg"].advantages(rewards.flatten(), index, "group")
    assert adv_std[0].item() == pytest.approx(2 * 0.75 / (0.5 + EPS), rel=1e-6)  # stdev([1,0,0,0]) = 0.5
    assert gpg_alpha(torch.zeros(6), grid_group_index(2, 3)) == 1.0  # nothing valid: all A are 0 anyway
    # 8 of 16 rows valid: 1/alpha = 0.5 reaches a threshold of 0.5, not one of 0.51
    assert MinInverseAlpha(0.5, 0).done(rewards, 1, same) and not MinInverseAlpha(0.51, 0).done(rewards, 1, same)
    assert MinInverseAlpha(0.51, 2).done(rewards, 2, same)  # the batch cap ends the round all the same
    with pytest.raises(ConfigError, match="scale_rewards must be none or group"):
        MethodConfig(loss_type="gpg", scale_rewards="batch").resolved(max_completion_length=16)


def test_dapo_filter_and_sampling_done():
    rewards = torch.tensor([[1.0, 1, 1], [1, -1, 1], [-1, -1, -1], [-1, 1, -1]])
    assert dapo_filter(rewards).tolist() == [False, True, False, True]
    assert dapo_filter(torch.tensor([[1.0], [0.0]])).tolist() == [True, True]
    assert DynamicSampling(2, 0).done(rewards, 1, same) and not DynamicSampling(3, 3).done(rewards, 2, same)
    assert DynamicSampling(1, 0).keep(rewards).tolist() == [1]  # the surplus trimmed, as verl does
    with pytest.raises(RuntimeError, match="only 2 of 3 groups"):
        DynamicSampling(3, 3).done(rewards, 3, same)


def test_sampling_rule_follows_the_options():
    assert MethodConfig(loss_type="dapo").resolved(16).sampling_rule(4) == DynamicSampling(4, 10)
    assert MethodConfig(loss_type="gpg").resolved(16).sampling_rule(4) == MinInverseAlpha(0.5, 10)
    assert MethodConfig(loss_type="gcpo").resolved(16).sampling_rule(4) is None
    assert MethodConfig(loss_type="grpo", dynamic_sampling=True).resolved(16).sampling_rule(4) is not None


def test_overlong_penalty():
    # Lmax = 10, Lc = 4: no penalty up to 6, linear to -1 at 10, -1 beyond
    assert overlong_penalty([0, 3, 6, 7, 8, 9, 10, 12], 10, 4) == [0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0]
    doubled = overlong_penalty([7, 12], 10, 4, penalty_factor=2.0)
    assert doubled == [-0.5, -2.0]
    assert all(math.isfinite(x) for x in overlong_penalty(range(20), 16, 16))
    with pytest.raises(ValueError, match="overlong_buffer_len must be in"):
        overlong_penalty([1], 10, 0)
