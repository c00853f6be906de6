"""Fused linear log-prob and packed policy-loss ops, imported as `gcpo_fast.kernels`.

    from gcpo_fast.kernels import linear_logprobs, policy_loss, linear_policy_loss

`linear_logprobs` gives per-token log-probs (and entropy) of hidden @ weight.T without an [N, V]
tensor; `policy_loss` is the clipped surrogate of the GRPO family on packed rows (golden rows may take
LUFFY's shaped term instead: `golden_objective="shaped"`, `golden_rows=`); and
`linear_policy_loss` composes the two with a backward that never forms [N, V] either;
`sampling_weights` gives their `sampling_weight` for rows sampled by another engine (vLLM).
Backends: `triton` (CUDA) and `torch` (CPU default and reference), same semantics.
"""

from gcpo_fast.kernels.linear_logprobs import linear_logprobs
from gcpo_fast.kernels.linear_policy_loss import linear_policy_loss
from gcpo_fast.kernels.policy_loss import LOSS_RECIPES, LOSS_TYPES, PolicyLossConfig, policy_loss
from gcpo_fast.kernels.sampling_correction import SAMPLING_MODES, sampling_weights

__all__ = [
    "linear_logprobs",
    "policy_loss",
    "linear_policy_loss",
    "LOSS_RECIPES",
    "LOSS_TYPES",
    "PolicyLossConfig",
    "sampling_weights",
    "SAMPLING_MODES",
]
