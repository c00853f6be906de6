"""Packing rows into one flat token stream, and the model forward to last hidden states (no lm_head).

    from gcpo_fast.packing import pack, pack_rows, forward_hidden, lm_head_weight

    packed = pack(rows, mask_truncated=False).to("cuda")           # a micro-batch (rollout.Rows), packed once
    packed = pack_rows(prompt_ids, completion_ids, device="cuda")   # or B rows as lists of token ids each
    hidden = forward_hidden(model, packed)                          # [T, d], T = all prompt + completion tokens
    weight, bias = lm_head_weight(model)                            # the output embedding (tied or not)
    h = hidden[packed.completion_index]                             # [N, d]: one per completion token
    logp = linear_logprobs(h, weight, packed.targets, bias=bias)    # gcpo_fast.kernels; rows: completion_cu_seqlens

Layout: row b (prompt p_b then completion c_b) occupies input_ids[0, cu_seqlens[b]:cu_seqlens[b+1]] with
position_ids restarting at 0. The hidden state at flat position t predicts token t+1, so completion
token j of row b (flat position s + |p_b| + j, s = cu_seqlens[b]) is predicted at s + |p_b| + j - 1:
completion_index lists those positions row by row, targets the completion tokens, and
completion_cu_seqlens [B+1] delimits each row's completion tokens (the packed rows the fused op takes).
Every row needs at least one prompt token; completions may be empty.

forward_hidden runs the decoder body (model.get_decoder(): embeddings, layers, final norm), never the
lm_head, with use_cache=False. Two paths, chosen by the model's attention implementation:
- flash attention (config._attn_implementation contains "flash", e.g. "flash_attention_2", on CUDA):
  one forward over the [1, T] stream with position_ids and transformers' varlen kwargs
  (cu_seq_lens_q/k, max_length_q/k), which go straight to flash_attn_varlen_func: no padding, no mask.
- anything else (sdpa, eager; the CPU): each row alone, concatenated. Exact by construction, attention
  memory O(max row length^2). (transformers also reads packed position_ids into a block-diagonal mask
  for sdpa/eager, but that mask is T x T: too big for a training batch.)
- one_call=True without flash attention: one forward over the rows right-padded to [B, max row length]
  with an attention mask, the pad positions dropped from the output. FSDP needs it: its hooks gather a
  decoder layer's weights at each call and reduce its gradients after each call's backward, so every
  rank must call each layer the same number of times, whatever its number of rows.

Under DDP/FSDP call this on the unwrapped model from inside the wrapped module's forward, so that
the wrapper's forward hooks (gradient sync, unsharding) run.
"""

import dataclasses
from dataclasses import dataclass

import torch

from gcpo_fast.kernels import IGNORE_INDEX  # a target the loss does not count

# Config attributes that change logits beyond hidden @ W.T + b; the fused op cannot reproduce them.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,
}


@dataclass
class PackedBatch:
    """One micro-batch as the model and the fused loss take it: the packed stream (module docstring), the
    rows' advantages and golden flags, and the per-token log-probs and weight the round scored it with."""

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, restarting at 0 per row
    cu_seqlens: torch.Tensor  # [B+1] int32, row spans in the stream
    max_seqlen: int  # longest row (prompt + completion)
    completion_index: torch.Tensor  # [N] long, stream positions whose next-token prediction is a completion token
    targets: torch.Tensor  # [N] long, the completion tokens, row by row (IGNORE_INDEX: not counted)
    completion_cu_seqlens: torch.Tensor  # [B+1] int32, row spans in completion_index / targets
    advantages: torch.Tensor | None = None  # [B]
    golden: torch.Tensor | None = None  # [B] bool: a golden answer, not a rollout
    old_logp: torch.Tensor | None = None  # [N] behaviour log-probs; None: on-policy
    ref_logp: torch.Tensor | None = None  # [N] the reference model's, when beta > 0
    sampling_weight: torch.Tensor | None = None  # [N] the sampling-mismatch correction (docs/algorithms.md)
    engine_logp: torch.Tensor | None = None  # [N] the log-probs an engine sampled with (0 on golden rows), if any

    @property
    def num_rows(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_counted_tokens(self) -> int:
        """Completion tokens the loss counts (not masked as truncated)."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device) -> "PackedBatch":
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if torch.is_tensor(getattr(self, f.name))
            },
        )


# prepared steps (lists of PackedBatch) are saved in checkpoints and read back with torch.load(weights_only=True)
torch.serialization.add_safe_globals([PackedBatch])


def pack(rows, mask_truncated: bool) -> PackedBatch:
    """A micro-batch (gcpo_fast.rollout.Rows with advantages) as one packed batch on the CPU, once; the targets of
    truncated rows are IGNORE_INDEX when mask_truncated."""
    packed = pack_rows(rows.prompt_ids, rows.completion_ids)
    if mask_truncated and any(rows.truncated):
        lengths = torch.tensor([len(c) for c in rows.completion_ids])
        drop = torch.repeat_interleave(torch.tensor(rows.truncated), lengths)
        packed.targets = packed.targets.masked_fill(drop, IGNORE_INDEX)
    packed.advantages = rows.advantages
    packed.golden = torch.tensor(rows.golden or [False] * len(rows), dtype=torch.bool)
    if rows.sampling_logp is not None:  # a golden row was never sampled: it has none
        packed.engine_logp = torch.tensor(
            [x for v, c in zip(rows.sampling_logp, rows.completion_ids) for x in (v or [0.0] * len(c))]
        )
    return packed


def pack_rows(prompt_ids: list[list[int]], completion_ids: list[list[int]], device=None) -> PackedBatch:
    """Pack B rows (prompt ids + completion ids, lists of ints) into one stream; see the module docstring."""
    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise ValueError(
            f"pack_rows: need B >= 1 rows, got {len(prompt_ids)} prompts and {len(completion_ids)} completions"
        )
    input_ids, position_ids, completion_index, targets = [], [], [], []
    cu_seqlens, completion_cu_seqlens = [0], [0]
    for b, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        if len(prompt) == 0:
            raise ValueError(
                f"pack_rows: row {b} has an empty prompt; its first completion token would have no predictor"
            )
        start, length = cu_seqlens[-1], len(prompt) + len(completion)
        input_ids += prompt
        input_ids += completion
        position_ids += range(length)
        completion_index += range(start + len(prompt) - 1, start + length - 1)
        targets += completion
        cu_seqlens.append(start + length)
        completion_cu_seqlens.append(completion_cu_seqlens[-1] + len(completion))

    def long(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    def int32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return PackedBatch(
        input_ids=long(input_ids).unsqueeze(0),
        position_ids=long(position_ids).unsqueeze(0),
        cu_seqlens=int32(cu_seqlens),
        max_seqlen=max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])),
        completion_index=long(completion_index),
        targets=long(targets),
        completion_cu_seqlens=int32(completion_cu_seqlens),
    )


def uses_flash_attention(model) -> bool:
    """Whether the model was loaded with a flash-attention implementation (varlen-capable)."""
    return "flash" in str(getattr(model.config, "_attn_implementation", "") or "")


def default_attn_implementation() -> str:
    """What to pass as attn_implementation= when loading: flash_attention_2 on CUDA with flash-attn, else sdpa."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def forward_hidden(model, packed: PackedBatch, one_call: bool = False) -> torch.Tensor:
    """Last hidden states [T, d] of the whole packed stream, rows independent (see the module docstring);
    one_call: a single decoder call whatever the attention implementation."""
    decoder = model.get_decoder()
    if uses_flash_attention(model) and packed.input_ids.is_cuda:
        out = decoder(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            use_cache=False,
            cu_seq_lens_q=packed.cu_seqlens,
            cu_seq_lens_k=packed.cu_seqlens,
            max_length_q=packed.max_seqlen,
            max_length_k=packed.max_seqlen,
        )
        return out.last_hidden_state[0]
    if one_call:
        return _padded_forward(decoder, packed)
    bounds = packed.cu_seqlens.tolist()
    hidden = [
        decoder(
            input_ids=packed.input_ids[:, a:b], position_ids=packed.position_ids[:, a:b], use_cache=False
        ).last_hidden_state[0]
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(hidden, dim=0)


def _padded_forward(decoder, packed: PackedBatch) -> torch.Tensor:
    """The rows right-padded into one [B, L] batch: each token attends to its own row's earlier tokens, as
    alone; the valid positions, read row by row, are the packed stream's order."""
    bounds = packed.cu_seqlens.tolist()
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], device=packed.input_ids.device)
    positions = torch.arange(packed.max_seqlen, device=lengths.device)
    valid = positions[None, :] < lengths[:, None]  # [B, L]
    input_ids = packed.input_ids.new_zeros(valid.shape).masked_scatter(valid, packed.input_ids[0])
    out = decoder(
        input_ids=input_ids, attention_mask=valid.long(), position_ids=positions.expand_as(valid), use_cache=False
    )
    return out.last_hidden_state[valid]


def lm_head_weight(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, d], bias [V] or None) of the output embedding; with tied embeddings this is the input
    embedding's weight itself. Raises for models whose logits are not hidden @ W.T + b."""
    config = model.config.get_text_config()
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, neutral)
        if value != neutral:
            raise ValueError(
                f"lm_head_weight: {type(model).__name__} applies {name}={value} to its logits; the fused "
                "op computes plain hidden @ W.T + b, so this model is not supported"
            )
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"lm_head_weight: {type(model).__name__} has no output embedding (not a causal LM?)")
    return head.weight, getattr(head, "bias", None)
