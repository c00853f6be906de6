"""GCPO's golden rows inside a round: which groups get one, and the round's rows with them in place.

    from gcpo_fast.golden.rows import add_golden, add_golden_rows

    groups, rows, metrics = add_golden(records, rollouts, rewards, options=cfg.golden, teacher=teacher,
                                       tokenizer=tok, max_completion_length=256, correct_reward=1.0)
    groups = add_golden_rows(rewards, has_golden, mode="append", correct_reward=1.0)   # the grouping alone

A prompt is "all wrong" when each of its G rewards is < correct_threshold (default: correct_reward, i.e. nothing
reached the correct reward). For such a prompt with a golden answer, mode "append" adds a row with reward
correct_reward (a group of G+1), "replace" overwrites the last rollout with it (a group of G), "off" changes
nothing. Rows are flat: row k belongs to group (prompt) group_index[k]; a group's rows are contiguous, its
rollouts in order, then its golden row when there is one; rollout_index[k] is the row's index in
rewards.flatten() (-1 for a golden row).

With 0/1 rewards and group-scaled advantages (gcpo_fast/methods/advantages.py), "append" turns G zeros into G
zeros and one 1: mean 1/(G+1), unbiased variance (G (1/(G+1))^2 + (G/(G+1))^2) / G = 1/(G+1), so (with the 1e-4
left out) the golden row gets G / sqrt(G+1) (8/3 for G = 8) and each wrong rollout -1/sqrt(G+1); with "replace"
the group is G-1 zeros and one 1 and the golden row gets (G-1)/sqrt(G).

The golden text (the dataset's or a teacher's: gcpo_fast/golden/sources.py) is encoded with the policy's
tokenizer after the prompt's ids (with --tools a trajectory, its calls re-run: gcpo_fast/golden/trajectories.py);
one longer than max_completion_length is not used (cut, it would lose its final
answer yet still be trained on as correct): gcpo/golden_truncated counts the groups left without one.
"""

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from gcpo_fast.data.prompts import encode_completion
from gcpo_fast.engines.base import Rows
from gcpo_fast.golden.options import GOLDEN_MODES, GoldenConfig
from gcpo_fast.golden.sources import golden_texts
from gcpo_fast.golden.teacher import Teacher
from gcpo_fast.golden.trajectories import Encoded, encode_trajectory


@dataclass
class Groups:
    """Flat rows after golden-row injection; N = number of rows, P = number of prompts."""

    rewards: torch.Tensor  # [N] float, one per row
    group_index: torch.Tensor  # [N] long, the prompt (group) of each row; groups contiguous
    rollout_index: torch.Tensor  # [N] long, index into rewards.flatten() of the [P, G] rollouts; -1 for golden rows
    golden: torch.Tensor  # [N] bool, a golden row (not a rollout)
    all_wrong: torch.Tensor  # [P] bool, every rollout of the prompt below correct_threshold
    golden_prompts: torch.Tensor  # [P] bool, the prompts that received a golden row


def all_wrong_groups(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """[P] bool from [P, G] rewards: no rollout of the prompt reaches threshold (where GCPO adds a golden row)."""
    return (rewards < threshold).all(dim=1)


def all_right_groups(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """[P] bool from [P, G] rewards: every rollout of the prompt reaches threshold (a solved group, which a group
    baseline gives no advantage; --all_right_advantage gives it one)."""
    return (rewards >= threshold).all(dim=1)


def add_golden_rows(
    rewards: torch.Tensor,
    has_golden: torch.Tensor | list[bool],
    mode: str = "append",
    correct_reward: float = 1.0,
    correct_threshold: float | None = None,
) -> Groups:
    """GCPO: give each all-wrong prompt that has a golden answer a golden row (see the module docstring)."""
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
    golden_prompts = all_wrong & has_golden & (mode != "off")
    flat = rewards.flatten()
    if mode == "append":
        sizes = G + golden_prompts.long()
        group_index = torch.repeat_interleave(torch.arange(P, device=device), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        position = torch.arange(group_index.numel(), device=device) - starts[group_index]
        golden = position == G
        rollout_index = torch.where(golden, -1, group_index * G + position)
    else:  # replace / off: G rows per prompt, the last one golden where the prompt gets one
        group_index = torch.arange(P, device=device).repeat_interleave(G)
        golden = (golden_prompts.unsqueeze(1) & (torch.arange(G, device=device) == G - 1)).flatten()
        rollout_index = torch.where(golden, -1, torch.arange(P * G, device=device))
    row_rewards = torch.where(golden, correct_reward, flat[rollout_index.clamp(min=0)])
    return Groups(row_rewards, group_index, rollout_index, golden, all_wrong, golden_prompts)


def add_golden(
    records: list[dict],
    rollouts: Rows,
    rewards: torch.Tensor,
    *,
    options: GoldenConfig,
    teacher: Teacher | None,
    tokenizer,
    max_completion_length: int,
    correct_reward: float,
    timer=None,
    tools=None,
) -> tuple[Groups, Rows, dict[str, float]]:
    """The round's golden step, whole: golden texts for the all-wrong groups (options.golden_source), encoded and
    checked against the budget, golden rows added (options.golden_answer). Returns (the groups, the round's rows
    in group order with `golden` set, the gcpo/* metrics). records, rollouts [P * G, prompt-major], rewards [P, G].
    tools (gcpo_fast.tools.formats.ToolSet, with --tools): golden texts are trajectories in the tools' layout, their
    calls re-run (gcpo_fast/golden/trajectories.py)."""
    texts, from_teacher, metrics = [None] * len(records), set(), {}
    if options.golden_answer != "off":
        all_wrong = all_wrong_groups(rewards, correct_reward).tolist()
        texts, from_teacher, metrics = golden_texts(options.golden_source, records, all_wrong, teacher, timer)
    encoded = encode_golden(texts, all_wrong_groups(rewards, correct_reward).tolist(), tokenizer, tools,
                            max_completion_length)  # fmt: skip
    fits = [p in encoded and not encoded[p].truncated and not encoded[p].mismatch for p in range(len(records))]
    g = add_golden_rows(rewards, fits, mode=options.golden_answer, correct_reward=correct_reward)
    too_long = sum(1 for p, e in encoded.items() if e.truncated and g.all_wrong[p])
    metrics.update(
        {
            "gcpo/golden_rows": int(g.golden.sum()),
            "gcpo/frac_all_wrong": g.all_wrong.float().mean().item(),
            "gcpo/golden_truncated": too_long,
        }
    )
    if tools is not None:
        metrics["gcpo/golden_tool_mismatch"] = sum(1 for e in encoded.values() if e.mismatch)
    if teacher is not None:
        metrics["gcpo/golden_from_teacher"] = sum(bool(g.golden_prompts[p]) for p in from_teacher)
    if too_long:  # the same text from the same line: Python's default filter shows it once
        warnings.warn(
            f"golden answers longer than max_completion_length={max_completion_length} tokens are not used (cut, "
            "they would lose their final answer); gcpo/golden_truncated counts the groups left without one: raise "
            "--max_completion_length to use them",
            stacklevel=2,
        )
    golden = {p: (encoded[p], texts[p]) for p in g.golden_prompts.nonzero().flatten().tolist()}
    return g, in_group_order(rollouts, g, golden, rewards.shape[1]), metrics


def encode_golden(texts: list[str | None], all_wrong: list[bool], tokenizer, tools, budget: int) -> dict[int, Encoded]:
    """{prompt: its golden text encoded}: plain text, or with tools a trajectory whose calls are re-run (only for
    the all-wrong prompts, the only ones that can get a golden row: each re-run is a sandboxed process)."""
    if tools is None:
        plain = {p: encode_completion(tokenizer, t, budget) for p, t in enumerate(texts) if t is not None}
        return {p: Encoded(ids, [1] * len(ids), cut) for p, (ids, cut) in plain.items()}
    return {p: encode_trajectory(tools, t, budget) for p, t in enumerate(texts) if t is not None and all_wrong[p]}


def in_group_order(rollouts: Rows, g: Groups, golden: dict[int, tuple[Encoded, str]], G: int) -> Rows:
    """The rows of g (rollouts and golden rows, in group order): the rollouts and one row per golden answer
    ({prompt: (encoded, text)}) joined, then selected. A golden row was never sampled: no engine log-probs, no
    policy version, no tool use of its own, never truncated; its tool mask is its trajectory's."""
    prompts = sorted(golden)
    n = len(prompts)
    extra = Rows(
        [rollouts.prompt_ids[p * G] for p in prompts],
        [golden[p][0].ids for p in prompts],
        [False] * n,
        [golden[p][1] for p in prompts],
        sampling_logp=None if rollouts.sampling_logp is None else [None] * n,
        policy_version=None if rollouts.policy_version is None else [None] * n,
        tool_mask=None if rollouts.tool_mask is None else [golden[p][0].tool_mask for p in prompts],
        tool_use=None if rollouts.tool_use is None else [None] * n,
    )
    slot = {p: len(rollouts) + i for i, p in enumerate(prompts)}
    order = [
        slot[p] if is_golden else r
        for p, r, is_golden in zip(g.group_index.tolist(), g.rollout_index.tolist(), g.golden.tolist())
    ]
    return dataclasses.replace((rollouts + extra).select(order), golden=g.golden.tolist())
