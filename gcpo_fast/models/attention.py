"""Packed attention: one decoder call over a [1, T] stream of B rows, each row attending only to itself.

    from gcpo_fast.models.attention import resolve_attn_implementation, packed_attention_kwargs

    name = resolve_attn_implementation(None, device, bf16=True)   # or the user's --attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=name)
    hidden = model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False,
                                 **packed_attention_kwargs(name, cu_seqlens, max_seqlen)).last_hidden_state

The stream holds rows b = 0..B-1 at [cu[b], cu[b+1]); a query at position t of row b attends to keys
cu[b] <= s <= t only (causal within the row, nothing across rows), so the packed output equals B separate
forwards of the rows (module gcpo_fast.packing). Projections, norms and MLPs are per token: they run once
over all T tokens; only attention needs the row spans. Three implementations, all fed the spans through
the kwargs transformers' decoders forward to the attention function (cu_seq_lens_q/k, max_length_q/k):
- "flash_attention_2": transformers' own, flash-attn's varlen kernel (CUDA, fp16/bf16, flash-attn installed);
- "packed_varlen": torch.nn.attention.varlen.varlen_attn, PyTorch's bundled FlashAttention (CUDA sm80+,
  fp16/bf16; torch >= 2.9), with the causal window and GQA adapted to the installed torch's signature:
  2.9/2.10 take is_causal=True; 2.11 takes window_size=(-1, 0) (its default (-1, -1) is NOT causal) and no
  enable_gqa: there the key/value heads go as they are when a probe on the device shows the kernel takes
  them (takes_grouped_kv), else they are repeated; 2.12+ take window_size and enable_gqa;
- "packed_sdpa": anything else (the CPU, fp32): scaled_dot_product_attention row by row over the spans,
  is_causal within each row.
Both packed names are registered in transformers' AttentionInterface (model code untouched) with sdpa's
mask function; called without row spans (generation, evaluation) they are plain sdpa. A packed call must
pass an all-ones [1, T] attention_mask (packed_attention_kwargs does): transformers then builds no mask,
where packed position_ids alone would make it build a T x T block-diagonal one.

Choice (resolve_attn_implementation): an explicit name wins (checked against the device and dtype); else on
CUDA under bf16 flash_attention_2 when flash-attn imports, else packed_varlen when torch has it and the GPU
is sm80+, else packed_sdpa. Without bf16 the weights and activations are fp32, which neither flash kernel
takes: packed_sdpa.
"""

import inspect
from functools import cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FLASH = "flash_attention_2"
PACKED_VARLEN = "packed_varlen"
PACKED_SDPA = "packed_sdpa"
CHOICES = (FLASH, PACKED_VARLEN, PACKED_SDPA)
ALIASES = {"sdpa": PACKED_SDPA, "varlen": PACKED_VARLEN}  # TRL's "sdpa" is the packed one here
HALF = (torch.float16, torch.bfloat16)
PACKED_NAMES = set()  # the names register() gave a packed attention function: they take the all-ones mask


class AttentionChoiceError(ValueError):
    """An --attn_implementation this run cannot use."""


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401

        return True
    except ImportError:
        return False


def torch_varlen_attn():
    """torch.nn.attention.varlen.varlen_attn, or None before torch 2.9."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_usable(device: torch.device) -> bool:
    return torch_varlen_attn() is not None and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_attn_implementation(requested: str | None, device, bf16: bool = True) -> str:
    """The attention implementation to load the policy with (one of CHOICES; see the module docstring).
    requested: the user's --attn_implementation or None (automatic); device: where the model runs; bf16:
    whether its activations are bf16 (--bf16 on CUDA). AttentionChoiceError if the request cannot run."""
    device = torch.device(device)
    half = bf16 and device.type == "cuda"
    if requested is None:
        if half and flash_attn_installed():
            return FLASH
        if half and _varlen_usable(device):
            return PACKED_VARLEN
        return PACKED_SDPA
    name = ALIASES.get(requested, requested)
    if name not in CHOICES:
        raise AttentionChoiceError(
            f"--attn_implementation {requested!r}: choose one of {', '.join(CHOICES + tuple(ALIASES))}"
        )
    if name in (FLASH, PACKED_VARLEN) and not half:
        raise AttentionChoiceError(
            f"--attn_implementation {requested}: needs CUDA and --bf16 (its kernel takes fp16/bf16 only); "
            f"use {PACKED_SDPA}"
        )
    if name == FLASH and not flash_attn_installed():
        raise AttentionChoiceError(f"--attn_implementation {requested}: flash-attn is not installed")
    if name == PACKED_VARLEN and not _varlen_usable(device):
        raise AttentionChoiceError(
            f"--attn_implementation {requested}: needs torch >= 2.9 (torch.nn.attention.varlen) and an sm80+ GPU"
        )
    return name


def packed_attention_kwargs(attn_implementation: str, cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """The decoder-call kwargs that carry the row spans to the attention function (and, for the packed
    names, the all-ones mask that keeps transformers from building a T x T one: see the module docstring)."""
    kwargs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen)
    if attn_implementation in PACKED_NAMES:
        total = int(cu_seqlens[-1])
        kwargs["attention_mask"] = torch.ones(1, total, dtype=torch.long, device=cu_seqlens.device)
    return kwargs


# ---- the attention functions (transformers' contract: query/key/value [1, H, T, D] -> [1, T, H, D]) ------------


def _packed_inputs(module, query, attention_mask, kwargs) -> torch.Tensor | None:
    """The row spans cu_seqlens of a packed call, None for an ordinary one; refuses what packing cannot honour."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return None
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("packed attention: expected one [1, T] stream and no attention mask (packed_attention_kwargs)")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError(f"packed attention: {type(module).__name__} uses a sliding window or softcap; not supported")
    return cu


def packed_sdpa_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA row by row over the packed spans (is_causal within a row); plain sdpa when not packed."""
    cu = _packed_inputs(module, query, attention_mask, kwargs)
    if cu is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split, not slicing: a slice's backward writes a zero-filled gradient of the whole stream per row
    # (O(B * T) per layer), split's backward is one cat
    lengths = cu.diff().tolist()
    rows = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        for q, k, v in zip(*(x.split(lengths, dim=2) for x in (query, key, value)))
    ]
    return torch.cat(rows, dim=2).transpose(1, 2), None


@cache
def _parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def varlen_causal(varlen_attn, query, key, value, cu_seqlens, max_seqlen: int, scale: float | None):
    """Causal attention within each row through `varlen_attn` (torch's signature of any version 2.9+):
    query [T, Hq, D], key/value [T, Hkv, D] -> [T, Hq, D]."""
    params = _parameters(varlen_attn)
    kwargs = {"scale": scale}
    if "window_size" in params:  # 2.11+: the default window (-1, -1) attends both ways
        kwargs["window_size"] = (-1, 0)
    else:  # 2.9, 2.10
        kwargs["is_causal"] = True
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and "enable_gqa" in params:  # 2.12+
        kwargs["enable_gqa"] = True
    elif groups > 1 and not (query.is_cuda and takes_grouped_kv(varlen_attn, query.device)):
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


@cache
def takes_grouped_kv(varlen_attn, device: torch.device) -> bool:
    """Whether `varlen_attn` (a torch without enable_gqa: 2.9-2.11) takes fewer K/V heads than query heads on
    `device` and gives what repeating them gives, forward and backward (FlashAttention-2's own kernel handles
    grouped heads; torch passes K/V to it as they are). Probed once per device on a tiny packed batch: a
    refusal or a different answer means repeat."""
    gen = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(12, h, 64, device=device, generator=gen, dtype=torch.bfloat16) for h in (4, 2, 2))
    causal = {"window_size": (-1, 0)} if "window_size" in _parameters(varlen_attn) else {"is_causal": True}

    def run(kv_groups: int):
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        kk, vv = (x.repeat_interleave(kv_groups, dim=1) for x in leaves[1:])
        out = varlen_attn(leaves[0], kk, vv, cu, cu, 7, 7, **causal)
        out.float().square().sum().backward()
        return [out, *(x.grad for x in leaves)]

    try:  # it may first run inside a no_grad scoring pass or under autocast: its own settings
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            grouped, repeated = run(1), run(2)
    except (RuntimeError, ValueError):  # a kernel that checks the head counts refuses
        return False
    return all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(grouped, repeated))


def repeats_kv(attn_implementation: str, device) -> bool:
    """Whether this attention keeps key and value repeated to every query head for the backward (what the memory
    planner counts): packed_sdpa does (row by row SDPA on repeated heads); packed_varlen does on a torch without
    enable_gqa whose kernel takes no grouped K/V (takes_grouped_kv); flash_attention_2 never does."""
    if attn_implementation == PACKED_SDPA:
        return True
    if attn_implementation != PACKED_VARLEN:
        return False
    varlen_attn = torch_varlen_attn()
    if "enable_gqa" in _parameters(varlen_attn):
        return False
    device = torch.device(device)
    return not (device.type == "cuda" and takes_grouped_kv(varlen_attn, device))


def _half(x: torch.Tensor) -> torch.Tensor:
    """x in fp16/bf16: under autocast fp32 activations (RoPE promotes q and k) go in autocast's dtype."""
    if x.dtype in HALF:
        return x
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return x.to(torch.get_autocast_dtype("cuda"))
    raise ValueError(f"{PACKED_VARLEN}: the kernel takes fp16/bf16, got {x.dtype}; use {PACKED_SDPA} in fp32")


def make_packed_varlen_forward(varlen_attn):
    """The packed_varlen attention function over a given varlen_attn (the real one, or a test's stand-in)."""

    def packed_varlen_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        cu = _packed_inputs(module, query, attention_mask, kwargs)
        if cu is None:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if dropout > 0:
            raise ValueError(f"{PACKED_VARLEN}: attention dropout is not supported; use {PACKED_SDPA}")
        # [1, H, T, D] -> [T, H, D], contiguous: the layout varlen_attn documents (a copy of T x H x D per input)
        q, k, v = (_half(x[0].transpose(0, 1)) if x.is_cuda else x[0].transpose(0, 1) for x in (query, key, value))
        q, k, v = (x.contiguous() for x in (q, k, v))
        out = varlen_causal(varlen_attn, q, k, v, cu, int(kwargs["max_length_q"]), scaling)
        return out.unsqueeze(0), None

    return packed_varlen_forward


def _real_varlen_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return make_packed_varlen_forward(torch_varlen_attn())(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def runs_packed(attn_implementation: str) -> bool:
    """Whether a model with this attention implementation keeps the rows of a packed call apart."""
    return attn_implementation == FLASH or attn_implementation in PACKED_NAMES


def register(name: str, forward) -> None:
    """Register a packed attention function under `name` for every transformers model, with sdpa's mask."""
    PACKED_NAMES.add(name)
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


register(PACKED_SDPA, packed_sdpa_forward)
register(PACKED_VARLEN, _real_varlen_forward)
