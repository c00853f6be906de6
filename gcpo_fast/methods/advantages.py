"""Group statistics on reward tensors: advantages, zero-variance groups, the reward metrics.

    from gcpo_fast.methods.advantages import group_advantages, reward_metrics
    adv = group_advantages(rewards, group_index, scale_rewards="group")   # [N] per row, groups of any size
    metrics = reward_metrics(rewards)                                      # [P, G] rollouts only

Rows are flat: row k belongs to group (prompt) group_index[k], groups contiguous (GCPO's golden rows make
groups of unequal size: gcpo_fast/golden/rows.py). Advantages follow TRL: A = (R - mean_g R) / (std + 1e-4)
with the unbiased (Bessel) std over the group ("group"), over every row of the batch ("batch"), or no division
("none": Dr. GRPO). A group of one row has std 0. Rollout statistics (frac_reward_zero_std, reward,
reward_std) are taken on the [P, G] rollout rewards, before any golden row: golden rows never leak into them.
"""

import torch

SCALE_REWARDS = ("group", "batch", "none")
EPS = 1e-4


def _group_stats(rewards: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and unbiased std for groups of any size (a one-row group has std 0)."""
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    zeros = rewards.new_zeros(num_groups)
    count = torch.bincount(group_index, minlength=num_groups).to(rewards.dtype)
    mean = zeros.index_add(0, group_index, rewards) / count.clamp(min=1)
    sq_dev = (rewards - mean[group_index]) ** 2
    std = (zeros.index_add(0, group_index, sq_dev) / (count - 1).clamp(min=1)).sqrt()
    return mean, std


def group_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, scale_rewards: str = "group", eps: float = EPS
) -> torch.Tensor:
    """GRPO-family advantages [N] over (possibly unequal) groups; scale_rewards group | batch | none."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    rewards = rewards.float()
    mean, std = _group_stats(rewards, group_index)
    advantages = rewards - mean[group_index]
    if scale_rewards == "group":
        advantages = advantages / (std[group_index] + eps)
    elif scale_rewards == "batch":
        batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = advantages / (batch_std + eps)
    return advantages


def zero_std_groups(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """[num_groups] bool: groups whose rewards are all equal (TRL's isclose(std, 0)); they carry no signal."""
    _, std = _group_stats(rewards.float(), group_index)
    return torch.isclose(std, torch.zeros_like(std))


def grid_group_index(num_prompts: int, group_size: int, device=None) -> torch.Tensor:
    """group_index of a [P, G] reward grid flattened row-major: [0]*G + [1]*G + ..."""
    return torch.arange(num_prompts, device=device).repeat_interleave(group_size)


def reward_metrics(rollout_rewards: torch.Tensor) -> dict[str, float]:
    """TRL's reward metrics on the [P, G] rollouts only (no golden row)."""
    P, G = rollout_rewards.shape
    rewards = rollout_rewards.float()
    std = rewards.std(dim=1) if G > 1 else rewards.new_zeros(P)
    return {
        "reward": rewards.mean().item(),
        "reward_std": std.mean().item(),
        "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean().item(),
    }
