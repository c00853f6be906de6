"""Group advantages (group / batch / none scaling, groups of unequal size) and the rollout-only reward metrics
(gcpo_fast/methods/advantages.py), against Python's `statistics` (an implementation independent of torch)."""

import statistics

import pytest
import torch
from test_golden_rows import reference_advantages

from gcpo_fast.methods.advantages import group_advantages, reward_metrics


def test_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0.5, 0, 2])
    index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # unequal groups
    groups = [[1.0, 0, 0], [1.0, 1], [1.0, 0.5, 0, 2]]
    for scale in ("group", "batch", "none"):
        got = group_advantages(rewards, index, scale).tolist()
        assert got == pytest.approx(reference_advantages(groups, scale), rel=1e-5, abs=1e-7), scale
    assert group_advantages(torch.tensor([3.0]), torch.tensor([0])).tolist() == [0.0]  # one-row group
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, index, "std")


def test_reward_metrics_use_rollouts_only():
    rewards = torch.tensor([[0.0, 0, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1]])
    m = reward_metrics(rewards)  # before golden rows: prompt 0's group would gain variance from one, not here
    assert m["frac_reward_zero_std"] == pytest.approx(2 / 3)
    assert m["reward"] == pytest.approx(7 / 12)
    assert m["reward_std"] == pytest.approx(statistics.stdev([1, 0, 1, 1]) / 3)
