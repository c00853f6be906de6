"""Forward-only passes that score packed rows: per-token log-probs of their completions under a model.

    from gcpo_fast.scoring import score_logprobs, head

    packed.old_logp = score_logprobs(model, packed, temperature=1.0, bf16=True).cpu()   # a reused round's
    packed.ref_logp = score_logprobs(ref_model, packed, temperature=1.0, bf16=True).cpu()   # beta > 0

One decoder call to the last hidden states (gcpo_fast/packing.py), then the fused op's forward over the
lm_head: O(N) memory, no [N, V] logits, no graph. The update's forward (gcpo_fast/update.py) takes the same
hidden states and head through `head`.
"""

import torch

from gcpo_fast.kernels import linear_logprobs
from gcpo_fast.models import autocast
from gcpo_fast.packing import IGNORE_INDEX, PackedBatch, forward_hidden, lm_head_weight


def head(model, dtype):
    """The lm_head weight and bias in the hidden states' dtype. Under autocast the hidden states are bf16 while
    the lm_head weight is fp32; the fused op wants one dtype, and the cast is differentiable, so the fp32
    master weight still gets its gradient."""
    weight, bias = lm_head_weight(model)
    return weight.to(dtype), None if bias is None else bias.to(dtype)


@torch.no_grad()
def score_logprobs(model, packed: PackedBatch, temperature: float, bf16: bool) -> torch.Tensor:
    """Per-token log-probs [N] of the packed completions under `model` as it is now (golden rows included)."""
    device = next(model.parameters()).device
    packed = packed.to(device)
    with autocast(bf16, device):
        hidden = forward_hidden(model, packed)[packed.completion_index]
        weight, bias = head(model, hidden.dtype)
        return linear_logprobs(
            hidden, weight, packed.targets, temperature=temperature, bias=bias, ignore_index=IGNORE_INDEX
        )
