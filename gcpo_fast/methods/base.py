"""A method of the GRPO family as one unit: its paper's option values and its advantage rule.

    from gcpo_fast.methods.recipes import METHODS
    advantages, metrics = METHODS["grpo"].advantages(rewards, group_index, scale_rewards="group")

Subclasses change what differs (gcpo_fast/methods/gpg.py); the table of every method is recipes.py.
"""

from dataclasses import dataclass

import torch

from gcpo_fast.methods.advantages import group_advantages


@dataclass(frozen=True)
class Method:
    """One method of the GRPO family: its paper's option values and its advantage rule."""

    name: str
    importance_sampling_level: str  # "token" | "sequence"
    epsilon: float  # the clip box [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float
    loss_agg_mode: str
    scale_rewards: str = "group"
    golden_answer: str = "off"  # GCPO: "append" a golden row to every all-wrong group
    dynamic_sampling: bool = False  # DAPO: train only on groups with varied rewards
    overlong: bool = False  # DAPO: soft overlong penalty over the last fifth of the budget
    min_inverse_alpha: float = 0.0  # GPG: resample until valid rows / rows reaches this
    has_ratio: bool = True  # GPG's loss is -A * logp: no importance ratio (the kernel's level "none")

    def advantages(self, rewards, group_index, scale_rewards: str) -> tuple[torch.Tensor, dict[str, float]]:
        """Advantages [N] of the rows (groups of any size) and the method's metrics."""
        return group_advantages(rewards, group_index, scale_rewards), {}

    def check(self, options) -> None:
        """Refuse options (a MethodConfig being resolved) this method would silently ignore (none for the
        clipped-surrogate methods)."""
