"""Group logic on reward tensors: GCPO's golden rows, group advantages, reward metrics.

    from gcpo_fast import groups

    rewards = torch.tensor(...)                                  # [P, G]: P prompts x G rollouts
    g = groups.add_golden_rows(rewards, has_golden, mode="append", correct_reward=1.0)
    adv = groups.group_advantages(g.rewards, g.group_index, scale_rewards="group")   # [N] per row
    metrics = groups.group_metrics(rewards, g)

Rows are flat: row k belongs to group (prompt) g.group_index[k]; a group's rows are contiguous, its
rollouts in order, then its golden row when there is one. g.rollout_index[k] is the row's index in
rewards.flatten() (-1 for a golden row): the caller takes rollout k's tokens from there and the golden
answer's tokens for rows with g.is_golden.

Golden rows (GCPO): a prompt is "all wrong" when each of its G rewards is < correct_threshold
(default: correct_reward, i.e. nothing reached the correct reward). For such a prompt with a golden
answer, mode "append" adds a row with reward correct_reward (group of G+1), "replace" overwrites the
last rollout with it (group of G), "off" changes nothing.

Advantages follow TRL: A = (R - mean_g R) / (std + 1e-4) with the unbiased (Bessel) std over the
group ("group"), over every row of the batch ("batch"), or no division ("none": Dr. GRPO). A group
of one row has std 0. With 0/1 rewards, "append" turns G zeros into G zeros and one 1: mean 1/(G+1),
unbiased variance (G (1/(G+1))^2 + (G/(G+1))^2) / G = 1/(G+1), so (with the 1e-4 left out) the golden row gets
(G/(G+1)) * sqrt(G+1) = G / sqrt(G+1) (8/3 for G = 8) and each wrong rollout -1/sqrt(G+1); with "replace"
the group is G-1 zeros and one 1 and the golden row gets (G-1)/sqrt(G).

GPG's alpha scaling and DAPO's and GPG's sampling rules belong to those methods (gcpo_fast/methods.py).

Rollout statistics (frac_reward_zero_std, reward, reward_std) are taken on the [P, G] rollout rewards,
before any golden row: golden rows never leak into them.
"""

from dataclasses import dataclass

import torch

SCALE_REWARDS = ("group", "batch", "none")
GOLDEN_MODES = ("append", "replace", "off")
EPS = 1e-4


@dataclass
class Groups:
    """Flat rows after golden-row injection; N = number of rows."""

    rewards: torch.Tensor  # [N] float, one per row
    group_index: torch.Tensor  # [N] long, the prompt (group) of each row; groups contiguous
    rollout_index: torch.Tensor  # [N] long, index into rewards.flatten() of the [P, G] rollouts; -1 for golden rows
    is_golden: torch.Tensor  # [N] bool
    all_wrong: torch.Tensor  # [P] bool, every rollout of the prompt below correct_threshold
    golden_prompts: torch.Tensor  # [P] bool, the prompts that received a golden row


def all_wrong_groups(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """[P] bool from [P, G] rewards: no rollout of the prompt reaches threshold (where GCPO adds a golden row)."""
    return (rewards < threshold).all(dim=1)


def add_golden_rows(
    rewards: torch.Tensor,
    has_golden: torch.Tensor | list[bool],
    mode: str = "append",
    correct_reward: float = 1.0,
    correct_threshold: float | None = None,
) -> Groups:
    """GCPO: give each all-wrong prompt that has a golden answer a golden row (see module docstring)."""
    if mode not in GOLDEN_MODES:
        raise ValueError(f"golden_answer mode must be one of {GOLDEN_MODES}, got {mode!r}")
    has_golden = torch.as_tensor(has_golden, dtype=torch.bool, device=rewards.device)
    if rewards.dim() != 2 or has_golden.shape != rewards.shape[:1]:
        raise ValueError(
            f"rewards must be [P, G] and has_golden [P]; got {tuple(rewards.shape)} and {tuple(has_golden.shape)}"
        )
    P, G = rewards.shape
    device = rewards.device
    rewards = rewards.float()
    threshold = correct_reward if correct_threshold is None else correct_threshold
    all_wrong = all_wrong_groups(rewards, threshold)
    golden = all_wrong & has_golden & (mode != "off")
    flat = rewards.flatten()
    if mode == "append":
        sizes = G + golden.long()
        group_index = torch.repeat_interleave(torch.arange(P, device=device), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        position = torch.arange(group_index.numel(), device=device) - starts[group_index]
        is_golden = position == G
        rollout_index = torch.where(is_golden, -1, group_index * G + position)
    else:  # replace / off: G rows per prompt, the last one golden where golden is set
        group_index = torch.arange(P, device=device).repeat_interleave(G)
        is_golden = (golden.unsqueeze(1) & (torch.arange(G, device=device) == G - 1)).flatten()
        rollout_index = torch.where(is_golden, -1, torch.arange(P * G, device=device))
    row_rewards = torch.where(is_golden, correct_reward, flat[rollout_index.clamp(min=0)])
    return Groups(row_rewards, group_index, rollout_index, is_golden, all_wrong, golden)


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


def group_metrics(rollout_rewards: torch.Tensor, groups: Groups) -> dict[str, float]:
    """TRL's reward metrics on the [P, G] rollouts only, plus GCPO's golden-row counts."""
    P, G = rollout_rewards.shape
    rewards = rollout_rewards.float()
    std = rewards.std(dim=1) if G > 1 else rewards.new_zeros(P)
    return {
        "reward": rewards.mean().item(),
        "reward_std": std.mean().item(),
        "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean().item(),
        "gcpo/golden_rows": int(groups.is_golden.sum()),
        "gcpo/frac_all_wrong": groups.all_wrong.float().mean().item(),
    }
