"""The rollout engine's contract and the types it speaks: Sampling in, Rows out.

    from gcpo_fast.engines.base import Rows, Sampling

    out = engine.generate(prompt_ids, 8, Sampling(max_completion_length=256, temperature=1.0))
    out.prompt_ids[k], out.completion_ids[k], out.truncated[k], out.texts[k]   # row k = prompt k // 8
    engine.sync_weights(policy.named_parameters(), version=step)   # after an optimizer step
    engine.sleep(); engine.close()

A rollout engine is any object with `eos_ids`, `generate(prompt_ids, n, sampling) -> Rows`,
`sync_weights(named_tensors, version=0)`, `sleep()` (free its memory while the trainer updates; `asleep` says
whether it did, and a sync wakes it) and `close()`: the trainer, the evaluation, the teacher and the model builder
call nothing else, so another engine is one more class, not branches in the loop: HFEngine (hf.py, Hugging Face
generate on the training model), VLLMEngine (vllm_engine.py, vLLM in this process) and RemoteEngine (remote.py, a
generation server's client); factory.py builds the one a run asks for. An engine that samples elsewhere also
returns the per-token log-probs it sampled with (`Rows.sampling_logp`). The trainer keeps the generated token ids
as they are (never re-tokenised text): a completion is cut after its first EOS (kept, so the model learns to
stop), and a completion with no EOS within the budget is "truncated".
"""

from dataclasses import dataclass

import torch

from gcpo_fast.errors import require
from gcpo_fast.options import at_least, check_options, option


@dataclass(frozen=True)
class Sampling:
    """How an engine samples: greedy decoding, or temperature with optional top-p / top-k (0: off)."""

    max_completion_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    # strings that end a completion like an EOS (kept in the ids, the completion not truncated): the end of a tool
    # call (gcpo_fast/tools/). Matched in the generated text only, never across the prompt
    stop: tuple[str, ...] = ()


@dataclass
class RolloutConfig:
    """How rollouts are sampled and how long they may be."""

    _argument_group_name = "generation"

    num_generations: int = option(8, "G: completions sampled per prompt (>= 2)")
    max_prompt_length: int = option(256, "prompt token budget; longer prompts keep their last tokens")
    max_completion_length: int = option(128, "completion token budget (new tokens per rollout)")
    temperature: float = option(1.0, "sampling temperature; the log-probs of the loss use it too")
    top_p: float = option(1.0, "nucleus sampling threshold (1: off)")
    top_k: int = option(0, "top-k sampling (0: off)")
    mask_truncated_completions: bool = option(False, "completions cut by the budget (no EOS) take no part in the loss")

    def __post_init__(self):
        check_options(self)
        if self.top_k is None:  # TRL's GRPOConfig default: no top-k (transformers' generate would read None as 50)
            self.top_k = 0
        require(
            self.num_generations >= 2,
            "num_generations must be >= 2 (group advantages need at least two completions), "
            f"got {self.num_generations}",
        )
        at_least(self, 1, "max_prompt_length", "max_completion_length")
        at_least(self, 0, "top_k")
        require(self.temperature > 0, f"temperature must be > 0 for sampling, got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.max_completion_length, self.temperature, self.top_p, self.top_k)


@dataclass(frozen=True)
class ToolUse:
    """One row's tool calls: how many ran, how many failed (an error, a malformed call) or hit the time limit,
    and the model's turns (1 + the calls whose output it went on from)."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    turns: int = 1


@dataclass
class Rows:
    """Rows, each a prompt and a completion: an engine's output, then a generation round's training rows.

    An engine fills the first five fields (row k of generate(prompts, n) is prompt k // n); the round
    (gcpo_fast/rounds.py) adds golden rows and sets `golden` and `advantages`; its micro-batches are
    selections of these rows, each packed once (gcpo_fast/packing.py)."""

    prompt_ids: list[list[int]]  # per row; the rows of one prompt share the same list
    completion_ids: list[list[int]]  # per row, up to and including the first EOS
    truncated: list[bool]  # per row: no EOS within max_completion_length
    texts: list[str]  # per row: the completion decoded without special tokens
    # per row and completion token: the log-prob the engine sampled with, when it reports them (vLLM);
    # None for a golden row, never sampled
    sampling_logp: list[list[float] | None] | None = None
    golden: list[bool] | None = None  # per row: a golden answer (GCPO), not a rollout; None: none are
    advantages: torch.Tensor | None = None  # [B]
    # per row: the policy version (the trainer's optimizer step) whose weights sampled it, when the engine
    # samples elsewhere (a server, ahead of the trainer); None for a golden row
    policy_version: list[int | None] | None = None
    # per row and completion token: 1 where the model wrote it, 0 for a tool's output appended between its turns
    # (attended as context, never trained: gcpo_fast/packing.py masks it); None: every token is the model's
    tool_mask: list[list[int]] | None = None
    tool_use: "list[ToolUse] | None" = None  # per row: its tool calls (gcpo_fast/tools/loop.py); None: no tools

    def __len__(self) -> int:
        return len(self.completion_ids)

    def __add__(self, other: "Rows") -> "Rows":
        def join(a, b):
            return None if a is None or b is None else a + b

        return Rows(
            self.prompt_ids + other.prompt_ids,
            self.completion_ids + other.completion_ids,
            self.truncated + other.truncated,
            self.texts + other.texts,
            join(self.sampling_logp, other.sampling_logp),
            join(self.golden, other.golden),
            None
            if self.advantages is None or other.advantages is None
            else torch.cat([self.advantages, other.advantages]),
            join(self.policy_version, other.policy_version),
            join(self.tool_mask, other.tool_mask),
            join(self.tool_use, other.tool_use),
        )

    def select(self, rows: list[int]) -> "Rows":
        """The rows at these indices, in that order."""

        def pick(values):
            return None if values is None else [values[i] for i in rows]

        return Rows(
            pick(self.prompt_ids),
            pick(self.completion_ids),
            pick(self.truncated),
            pick(self.texts),
            pick(self.sampling_logp),
            pick(self.golden),
            None if self.advantages is None else self.advantages[rows],
            pick(self.policy_version),
            pick(self.tool_mask),
            pick(self.tool_use),
        )


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation_config EOS ids
    (chat models often stop at an end-of-turn token that differs from the tokenizer's EOS)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise ValueError(
            "the tokenizer has no eos_token and the model's generation_config no eos_token_id: "
            "completions could never end"
        )
    return ids


def cut_at_eos(ids: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """(ids up to and including the first EOS, whether there was none)."""
    for j, t in enumerate(ids):
        if t in eos:
            return ids[: j + 1], False
    return ids, True


def cut_at_stop(ids: list[int], eos: set[int], stop: tuple[str, ...], tokenizer) -> tuple[list[int], bool]:
    """(ids up to and including the first EOS or the token that completes the first stop string, whether neither
    came): the cut an engine makes when Sampling.stop is set. The stop strings are looked for in the text of these
    ids alone (an engine that stops on them matches the generated text only)."""
    ids, truncated = cut_at_eos(ids, eos)
    if not stop or not any(s in tokenizer.decode(ids) for s in stop):
        return ids, truncated

    def holds_stop(n: int) -> bool:
        text = tokenizer.decode(ids[:n])
        return any(s in text for s in stop)

    # the shortest prefix whose text holds a stop string (a longer prefix holds it too): a binary search
    low, high = 1, len(ids)
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if holds_stop(mid) else (mid + 1, high)
    return ids[:low], False


def adopt_model_eos(tokenizer, model) -> None:
    """A tokenizer without an EOS token (eos_token: null) takes the model's generation_config EOS: golden rows
    end with tokenizer.eos_token_id (encode_completion), and checkpoints save the tokenizer with it."""
    if tokenizer.eos_token_id is not None:
        return
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    first = config_eos[0] if isinstance(config_eos, list) and config_eos else config_eos
    if first is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(first))
