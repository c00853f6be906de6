"""The methods as units (gcpo_fast/methods.py): GPG's alpha and advantages, DAPO's filter, both sampling rules,
the recipe table. References are hand-computed."""

import pytest
import torch

from gcpo_fast import groups as grp
from gcpo_fast.errors import ConfigError
from gcpo_fast.methods import METHODS, DynamicSampling, MethodConfig, MinInverseAlpha, dapo_filter, gpg_alpha

EPS = 1e-4


def same(x):
    return x  # one rank: the minimum over ranks is the value itself


def test_gpg_alpha_and_advantages():
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    index = grp.grid_group_index(4, 4)
    # B = 16 rows, M = 8 rows in zero-variance groups -> alpha = 16 / 8 = 2
    assert gpg_alpha(rewards.flatten(), index) == 2.0
    adv, metrics = METHODS["gpg"].advantages(rewards.flatten(), index, "none")
    assert metrics == {"gpg/alpha": 2.0}
    assert adv.tolist() == [1.5, -0.5, -0.5, -0.5] + [0.0] * 8 + [1.0, -1.0, 1.0, -1.0]
    adv_std, _ = METHODS["gpg"].advantages(rewards.flatten(), index, "group")
    assert adv_std[0].item() == pytest.approx(2 * 0.75 / (0.5 + EPS), rel=1e-6)  # stdev([1,0,0,0]) = 0.5
    assert gpg_alpha(torch.zeros(6), grp.grid_group_index(2, 3)) == 1.0  # nothing valid: all A are 0 anyway
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
