"""GPG (arXiv 2504.02546): loss -A * logp (no ratio, no clip), A scaled by alpha = B / (B - M), and its rule of
sampling more prompt batches until enough rows carry a signal."""

from dataclasses import dataclass

import torch

from gcpo_fast.errors import require
from gcpo_fast.methods.advantages import grid_group_index, group_advantages, zero_std_groups
from gcpo_fast.methods.base import Method


@dataclass(frozen=True)
class GPG(Method):
    """GPG (arXiv 2504.02546): loss -A * logp (no ratio, no clip), A scaled by alpha = B / (B - M)."""

    # what GPG does instead of the options it has no use for: no ratio, so no clip box, cap or ratio level
    FIXED = {"importance_sampling_level": "token", "epsilon": 0.0, "epsilon_high": 0.0, "delta": None}

    def advantages(self, rewards, group_index, scale_rewards):
        alpha = gpg_alpha(rewards, group_index)
        return alpha * group_advantages(rewards, group_index, scale_rewards), {"gpg/alpha": alpha}

    def check(self, options):
        """A value equal to what GPG does anyway (`--epsilon 0`) is accepted; TRL's GRPOConfig refuses options
        that cannot take effect the same way."""
        for name, fixed in self.FIXED.items():
            value = getattr(options, name)
            require(
                value is None or value == fixed,
                f"{name}={value} has no effect with loss_type gpg, which has no importance ratio to clip (its "
                f"loss is -advantage * log-prob): leave {name} out, or choose another loss_type",
            )
        require(
            options.scale_rewards in (None, "none", "group"),
            f"loss_type gpg divides advantages by 1 or the group std: scale_rewards must be none or group, "
            f"got {options.scale_rewards!r}",
        )


def gpg_alpha(rewards: torch.Tensor, group_index: torch.Tensor) -> float:
    """GPG's alpha = B / (B - M): B rows, M rows in zero-variance groups; 1.0 when every group is zero-variance
    (all advantages are 0 then, so any alpha gives the same zero gradient)."""
    zero = zero_std_groups(rewards, group_index)
    num_rows = group_index.numel()
    valid_rows = num_rows - int(zero[group_index].sum())
    return num_rows / valid_rows if valid_rows > 0 else 1.0


@dataclass(frozen=True)
class MinInverseAlpha:
    """GPG: sample whole extra prompt batches until valid rows / rows (= 1/alpha) >= threshold (0.5 in GPG's
    scripts, 0.6 in its paper's table), or max_num_gen_batches batches; then train on every group."""

    threshold: float
    max_num_gen_batches: int

    def done(self, rewards: torch.Tensor, num_batches: int, reduce_min) -> bool:
        P, G = rewards.shape
        zero = zero_std_groups(rewards.flatten(), grid_group_index(P, G))
        enough = rewards.numel() > 0 and int((~zero).sum()) * G / rewards.numel() >= self.threshold
        return bool(reduce_min(float(enough))) or 0 < self.max_num_gen_batches <= num_batches

    def keep(self, rewards: torch.Tensor) -> torch.Tensor:
        return torch.arange(rewards.shape[0])
