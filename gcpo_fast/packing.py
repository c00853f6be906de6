"""Packing rows into one flat token stream, and the model forward to last hidden states (no lm_head).

    from gcpo_fast.packing import pack, pack_rows, forward_hidden, head_inputs

    packed = pack(rows, mask_truncated=False).to("cuda")           # a micro-batch (engines.base.Rows), packed once
    packed = pack_rows(prompt_ids, completion_ids, device="cuda")   # or B rows as lists of token ids each
    hidden = forward_hidden(model, packed)                          # [T, d], T = all prompt + completion tokens
    h, weight, bias = head_inputs(hidden[packed.completion_index], model)  # [N, d]; one dtype (autocast's)
    logp = linear_logprobs(h, weight, packed.targets, bias=bias)    # gcpo_fast.kernels; rows: completion_cu_seqlens

Layout: row b (prompt p_b then completion c_b) occupies input_ids[0, cu_seqlens[b]:cu_seqlens[b+1]] with
position_ids restarting at 0. The hidden state at flat position t predicts token t+1, so completion
token j of row b (flat position s + |p_b| + j, s = cu_seqlens[b]) is predicted at s + |p_b| + j - 1:
completion_index lists those positions row by row, targets the completion tokens, and
completion_cu_seqlens [B+1] delimits each row's completion tokens (the packed rows the fused op takes).
Every row needs at least one prompt token; completions may be empty.

forward_hidden runs the decoder body (model.get_decoder(): embeddings, layers, final norm), never the
lm_head, with use_cache=False, in ONE call over the [1, T] stream with position_ids and the row spans
(cu_seq_lens_q/k, max_length_q/k), which reach the attention function of the model's implementation:
flash_attention_2, packed_varlen or packed_sdpa (gcpo_fast.models.attention), each keeping rows apart inside
every layer. One call per micro-batch also meets FSDP's requirement: its hooks gather a decoder layer's
weights at each call and reduce its gradients after each call's backward, so every rank must call each
layer the same number of times, whatever its number of rows.

Under DDP/FSDP call this on the unwrapped model from inside the wrapped module's forward, so that
the wrapper's forward hooks (gradient sync, unsharding) run.
"""

import dataclasses
from dataclasses import dataclass

import torch

from gcpo_fast.kernels import IGNORE_INDEX  # a target the loss does not count
from gcpo_fast.models.attention import CHOICES, PACKED_SDPA, packed_attention_kwargs, runs_packed

# Config attributes that change logits beyond hidden @ W.T + b; the fused op cannot reproduce them.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,
}


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch as the model and the fused loss take it: the packed stream (module docstring), the
    rows' advantages and golden flags, and the per-token log-probs the round scored it with. Built whole once
    (pack, pack_rows); a later stage that adds log-probs makes a new one (dataclasses.replace)."""

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, restarting at 0 per row
    cu_seqlens: torch.Tensor  # [B+1] int32, row spans in the stream
    max_seqlen: int  # longest row (prompt + completion)
    completion_index: torch.Tensor  # [N] long, stream positions whose next-token prediction is a completion token
    targets: torch.Tensor  # [N] long, the completion tokens, row by row (IGNORE_INDEX: not counted: truncated, tool)
    completion_cu_seqlens: torch.Tensor  # [B+1] int32, row spans in completion_index / targets
    advantages: torch.Tensor | None = None  # [B]
    golden: torch.Tensor | None = None  # [B] bool: a golden answer, not a rollout
    old_logp: torch.Tensor | None = None  # [N] behaviour log-probs; None: on-policy
    ref_logp: torch.Tensor | None = None  # [N] the reference model's, when beta > 0
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
    """A micro-batch (gcpo_fast.engines.base.Rows with advantages) as one packed batch on the CPU, once; the targets
    of truncated rows are IGNORE_INDEX when mask_truncated, and those of tool-output tokens (Rows.tool_mask 0)
    always: the fused op then leaves them out of every ratio, length, normaliser, entropy and KL term, and the
    sampling correction leaves out their engine log-probs."""
    layout = _layout(rows.prompt_ids, rows.completion_ids)
    if mask_truncated and any(rows.truncated):
        lengths = torch.tensor([len(c) for c in rows.completion_ids])
        drop = torch.repeat_interleave(torch.tensor(rows.truncated), lengths)
        layout["targets"] = layout["targets"].masked_fill(drop, IGNORE_INDEX)
    if rows.tool_mask is not None:  # a tool's output is context: attended, never a target
        model = torch.tensor([m for row in rows.tool_mask for m in row], dtype=torch.bool)
        layout["targets"] = layout["targets"].masked_fill(~model, IGNORE_INDEX)
    engine_logp = None
    if rows.sampling_logp is not None:  # a golden row was never sampled: it has none
        engine_logp = torch.tensor(
            [x for v, c in zip(rows.sampling_logp, rows.completion_ids) for x in (v or [0.0] * len(c))]
        )
    return PackedBatch(
        **layout,
        advantages=rows.advantages,
        golden=torch.tensor(rows.golden or [False] * len(rows), dtype=torch.bool),
        engine_logp=engine_logp,
    )


def pack_rows(prompt_ids: list[list[int]], completion_ids: list[list[int]], device=None, **fields) -> PackedBatch:
    """Pack B rows (prompt ids + completion ids, lists of ints) into one stream (see the module docstring);
    fields: the rest of the batch (advantages=..., golden=..., old_logp=...)."""
    return PackedBatch(**_layout(prompt_ids, completion_ids, device), **fields)


def _layout(prompt_ids: list[list[int]], completion_ids: list[list[int]], device=None) -> dict:
    """The packed stream's tensors of B rows (PackedBatch's first seven fields)."""
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

    return dict(
        input_ids=long(input_ids).unsqueeze(0),
        position_ids=long(position_ids).unsqueeze(0),
        cu_seqlens=int32(cu_seqlens),
        max_seqlen=max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])),
        completion_index=long(completion_index),
        targets=long(targets),
        completion_cu_seqlens=int32(completion_cu_seqlens),
    )


def forward_hidden(model, packed: PackedBatch) -> torch.Tensor:
    """Last hidden states [T, d] of the whole packed stream, rows independent: one decoder call (see the
    module docstring). A model loaded with plain sdpa is switched to packed_sdpa (the same for any other call)."""
    name = model.config._attn_implementation
    if name == "sdpa":
        model.set_attn_implementation(PACKED_SDPA)
        name = PACKED_SDPA
    if not runs_packed(name):
        raise ValueError(
            f"forward_hidden: the model's attention {name!r} cannot run packed rows; load it with one of "
            f"{', '.join(CHOICES)} (gcpo_fast.models.attention.resolve_attn_implementation)"
        )
    out = model.get_decoder()(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        use_cache=False,
        **packed_attention_kwargs(name, packed.cu_seqlens, packed.max_seqlen),
    )
    return out.last_hidden_state[0]


def head_inputs(hidden: torch.Tensor, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, weight, bias) for the fused op, in one dtype: autocast's when autocast is on for hidden's
    device (bf16 under --bf16 on CUDA), else hidden's. Qwen2/Llama keep the residual stream in the weights'
    dtype under autocast, so an fp32 model hands over fp32 hidden states; cast here, the op runs its bf16
    path (tensor cores; fp32 accumulation inside). The casts are differentiable: the fp32 master weight
    (tied or not) still gets its gradient, in fp32."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    weight, bias = lm_head_weight(model)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


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
