"""Forward-only passes that score packed rows: per-token log-probs of their completions under a model, and the
sampling-mismatch weight of rows an engine sampled elsewhere.

    from gcpo_fast.scoring import SamplingCorrection, score_logprobs

    old_logp = score_logprobs(model, packed, temperature=1.0, bf16=True).cpu()       # a reused round's
    ref_logp = score_logprobs(ref_model, packed, temperature=1.0, bf16=True).cpu()   # beta > 0
    weight, metrics = SamplingCorrection("sequence_mask", None, 3.0).weight(packed, old_logp)   # in the update

One decoder call to the last hidden states (gcpo_fast/packing.py), then the fused op's forward over the
lm_head: O(N) memory, no [N, V] logits, no graph, the same one decoder call and head as the update's forward
(gcpo_fast/update.py).
"""

from dataclasses import dataclass

import torch

from gcpo_fast.kernels import linear_logprobs, sampling_weights
from gcpo_fast.models.loading import autocast
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


@dataclass(frozen=True)
class SamplingCorrection:
    """TRL's vLLM importance-sampling correction (--vllm_importance_sampling_*) of rows an engine sampled elsewhere:
    each sampled token's loss term weighted by the detached ratio of the trainer's old log-prob to the engine's,
    in one of kernels.SAMPLING_MODES; golden rows, never sampled, weight 1."""

    mode: str = "sequence_mask"
    clip_min: float | None = None
    clip_max: float | None = 3.0

    @classmethod
    def of(cls, vllm) -> "SamplingCorrection | None":
        """The correction a run's --vllm_importance_sampling_* options ask for (vllm: engines.vllm_engine.VLLMConfig);
        None when it is switched off."""
        if not vllm.vllm_importance_sampling_correction:
            return None
        return cls(
            vllm.vllm_importance_sampling_mode,
            vllm.vllm_importance_sampling_clip_min,
            vllm.vllm_importance_sampling_clip_max,
        )

    def weight(self, packed: PackedBatch, old_logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The weight [N] of a micro-batch and its sampling/* metrics (0-d tensors), from the trainer's log-probs."""
        return sampling_weights(
            old_logp,
            packed.engine_logp.to(old_logp.device),
            packed.completion_cu_seqlens.to(old_logp.device),
            (packed.targets != IGNORE_INDEX).to(old_logp.device),
            mode=self.mode,
            clip_min=self.clip_min,
            clip_max=self.clip_max,
            golden=packed.golden.to(old_logp.device),
        )
