"""Fused linear log-prob and packed policy-loss ops, imported as `gcpo_fast.kernels`.

    from gcpo_fast.kernels import Backend, LossInputs, PolicyLossConfig, linear_policy_loss
    config = PolicyLossConfig(importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4)
    loss, stats = linear_policy_loss(hidden, weight, targets, LossInputs(advantages, cu_seqlens, old_logp=old), config)

`linear_logprobs` gives per-token log-probs (and entropy) of hidden @ weight.T without an [N, V]
tensor; `policy_loss` is the clipped surrogate of the GRPO family on packed rows (golden rows may take
LUFFY's shaped term instead: golden_objective="shaped", LossInputs(golden=)); and
`linear_policy_loss` composes the two with a backward that never forms [N, V] either;
`sampling_weights` gives their LossInputs.sampling_weight for rows sampled by another engine (vLLM).
`PolicyLossConfig` holds math switches only (which method uses which: the trainer's recipe table),
`LossInputs` the per-call tensors (kernels/options.py). Backends: Backend.TRITON (CUDA) and
Backend.TORCH (CPU default and reference), same semantics; Backend.AUTO picks by device.

Files: options.py (PolicyLossConfig, LossInputs, Backend, the workspace bound), linear_logprobs.py (per-token
log-probs and entropy of hidden @ weight.T, never forming [N, V]), linear_policy_loss.py (the two composed, one
autograd Function), policy_loss.py (the clipped losses on packed rows and their closed-form gradient),
policy_loss_triton.py (its Triton kernel), logprob_torch.py (the tiled PyTorch backend, the CPU engine and the
reference), logprob_triton.py (the Triton backend: fused logit tiles, online max / sum-exp, the dZ kernel),
checks.py (every bad input named), sampling_correction.py (the weight of rows another engine sampled),
aot_report.py (ahead-of-time compile report for sm_80 / sm_90).
"""

import sys

if __name__ != "gcpo_fast.kernels":
    # Imported as a top-level `kernels`: `python -m ...` from the repo root puts the root first on sys.path, where
    # this folder looks like a package of that name. The name is Hugging Face's (transformers imports it whenever it
    # is installed), so the import is handed over to theirs, found on sys.path without the root. Where theirs is not
    # installed, the import gets what Python gives for an empty folder of that name: a namespace package with
    # nothing in it, which transformers reads as "not installed". Any folder named `kernels` on sys.path answers to
    # the name, so only this file can step aside (docs/design.md, "Layout").
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        _spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []
    _theirs = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _theirs  # an import returns what sys.modules holds once this file has run
    _spec.loader.exec_module(_theirs)  # module_from_spec gave an empty spec a namespace loader
else:
    from gcpo_fast.kernels.linear_logprobs import linear_logprobs
    from gcpo_fast.kernels.linear_policy_loss import linear_policy_loss
    from gcpo_fast.kernels.options import (
        AGG_MODES,
        GOLDEN_OBJECTIVES,
        IGNORE_INDEX,
        IS_LEVELS,
        Backend,
        LossInputs,
        PolicyLossConfig,
    )
    from gcpo_fast.kernels.policy_loss import STAT_NAMES, policy_loss
    from gcpo_fast.kernels.sampling_correction import SAMPLING_MODES, sampling_weights

__all__ = [
    "Backend",
    "LossInputs",
    "PolicyLossConfig",
    "IGNORE_INDEX",
    "linear_logprobs",
    "policy_loss",
    "linear_policy_loss",
    "sampling_weights",
    "SAMPLING_MODES",
    "AGG_MODES",
    "GOLDEN_OBJECTIVES",
    "IS_LEVELS",
    "STAT_NAMES",
]
