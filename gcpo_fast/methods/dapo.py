"""DAPO (arXiv 2503.14476): dynamic sampling (train only on groups whose rewards differ, sampling further prompt
batches until the round is full) and the soft overlong penalty on the rewards of long completions.

    from gcpo_fast.methods.dapo import DynamicSampling, overlong_penalty
    rewards += torch.tensor(overlong_penalty(lengths, max_completion_length=1024, overlong_buffer_len=256))
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gcpo_fast.errors import TrainingError
from gcpo_fast.methods.advantages import grid_group_index, zero_std_groups


@dataclass(frozen=True)
class DynamicSampling:
    """DAPO: keep only groups whose rewards differ; sample further prompt batches until `batch_size` groups are
    kept (the surplus trimmed, as verl does); fail after max_num_gen_batches batches (<= 0: no limit)."""

    batch_size: int
    max_num_gen_batches: int

    def done(self, rewards: torch.Tensor, num_batches: int, reduce_min) -> bool:
        """rewards: [P, G] of every batch so far; reduce_min: the minimum over ranks (each rank samples alike)."""
        kept = int(reduce_min(int(dapo_filter(rewards).sum())))
        if kept >= self.batch_size:
            return True
        if 0 < self.max_num_gen_batches <= num_batches:
            raise TrainingError(
                f"DAPO dynamic sampling: only {kept} of {self.batch_size} groups with varied rewards after "
                f"{num_batches} generation batches (max_num_gen_batches={self.max_num_gen_batches}); the data is "
                "too easy or too hard for the model (raise --max_num_gen_batches, <= 0 for no limit)"
            )
        return False

    def keep(self, rewards: torch.Tensor) -> torch.Tensor:
        return dapo_filter(rewards).nonzero().flatten()[: self.batch_size]


def dapo_filter(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling on [P, G] rollout rewards: [P] bool, True for groups to keep (rewards not all
    equal). A group of one rollout is kept, as verl does."""
    P, G = rewards.shape
    if G == 1:
        return torch.ones(P, dtype=torch.bool, device=rewards.device)
    return ~zero_std_groups(rewards.flatten(), grid_group_index(P, G, rewards.device))


def overlong_penalty(
    lengths: Sequence[int],
    max_completion_length: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> list[float]:
    """DAPO's soft overlong punishment, added to the reward of each completion of length |o|.

    With Lmax = max_completion_length and Lc = overlong_buffer_len: 0 if |o| <= Lmax - Lc,
    ((Lmax - Lc) - |o|) / Lc inside the buffer (linear from 0 down to -1 at |o| = Lmax), -1 beyond;
    all times penalty_factor.
    """
    if not 0 < overlong_buffer_len <= max_completion_length:
        raise ValueError(
            f"overlong_buffer_len must be in (0, max_completion_length={max_completion_length}], "
            f"got {overlong_buffer_len}"
        )
    expected = max_completion_length - overlong_buffer_len
    return [penalty_factor * max(min(0.0, (expected - int(n)) / overlong_buffer_len), -1.0) for n in lengths]
