"""Forward-only passes that score packed rows: per-token log-probs of their completions under a model.

    from gcpo_fast.scoring import score_logprobs

    packed.old_logp = score_logprobs(model, packed, temperature=1.0, bf16=True).cpu()   # a reused round's
    packed.ref_logp = score_logprobs(ref_model, packed, temperature=1.0, bf16=True).cpu()   # beta > 0

One decoder call to the last hidden states (gcpo_fast/packing.py), then the fused op's forward over the
lm_head: O(N) memory, no [N, V] logits, no graph, the same one decoder call and head as the update's forward
(gcpo_fast/update.py).
"""

import torch

from gcpo_fast.kernels import linear_logprobs
from gcpo_fast.models import autocast
from gcpo_fast.packing import IGNORE_INDEX, PackedBatch, forward_hidden, head_inputs


@torch.no_grad()
def score_logprobs(model, packed: PackedBatch, temperature: float, bf16: bool) -> torch.Tensor:
    """Per-token log-probs [N] of the packed completions under `model` as it is now (golden rows included)."""
    device = next(model.parameters()).device
    packed = packed.to(device)
    with autocast(bf16, device):
        hidden, weight, bias = head_inputs(forward_hidden(model, packed)[packed.completion_index], model)
        return linear_logprobs(
            hidden, weight, packed.targets, temperature=temperature, bias=bias, ignore_index=IGNORE_INDEX
        )
