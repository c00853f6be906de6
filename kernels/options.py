"""What the fused ops take besides hidden / weight / targets: the math switches, the per-call tensors, the backend.

    from gcpo_fast.kernels import Backend, LossInputs, PolicyLossConfig
    config = PolicyLossConfig(importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28,
                              loss_agg_mode="token-mean")            # built once, checked once (host only)
    inputs = LossInputs(advantages [B], cu_seqlens [B+1], old_logp=old [N])   # built per call

`PolicyLossConfig` holds math switches only (what each switch does: kernels/policy_loss.py and
docs/algorithms.md); which method sets which switches is the trainer's business (its recipe table).
`LossInputs` holds every per-call tensor of the loss: a new one is a field here, read by the op, set
by the caller, and nothing in between changes. `Backend` picks the engine: AUTO is Triton on CUDA and
torch elsewhere. `workspace_bytes` bounds the only O(V) buffer of the linear ops (`workspace_for_device`).
"""

from __future__ import annotations

import enum
import importlib
import numbers
import os
from dataclasses import dataclass

import torch

from gcpo_fast.kernels.checks import check_number, check_tensor
from gcpo_fast.kernels.logprob_torch import WORKSPACE_BYTES as CPU_WORKSPACE_BYTES

IGNORE_INDEX = -100  # targets equal to it do not count (the convention of torch's cross-entropy)
IS_LEVELS = ("token", "sequence", "none")  # "none": no ratio, no clip (GPG's -A * logp)
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
GOLDEN_OBJECTIVES = ("policy_ratio", "shaped")

# On CUDA: an eighth of the free device memory, clamped to [256 MiB, 4 GiB] and rounded down to a power
# of two (so that the chunking, hence the bits of dW, does not move with small changes in free memory).
# At V = 152064 (Qwen) an fp32 dZ row is 594 KiB: 4 GiB holds 7061 rows, so N = 16384 tokens take 3
# chunks and N = 65536 take 10 (256 MiB: 441 rows, 38 and 149 chunks). Fewer, fatter chunks keep the
# GEMMs wide; past a few thousand rows they are wide enough, and the other 7/8 stay for activations.
WORKSPACE_FRACTION = 8
WORKSPACE_MIN_BYTES = 256 * 2**20
WORKSPACE_MAX_BYTES = 4 * 2**30


class Backend(enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


def as_backend(backend) -> Backend:
    """A Backend from itself or its name ("auto", "torch", "triton")."""
    try:
        return Backend(backend)
    except ValueError:
        raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {backend!r}") from None


def resolve_backend(backend, device: torch.device) -> Backend:
    """AUTO -> TRITON on CUDA, TORCH elsewhere; TRITON on CPU tensors only under the Triton interpreter."""
    backend = as_backend(backend)
    if backend is Backend.AUTO:
        return Backend.TRITON if device.type == "cuda" else Backend.TORCH
    if backend is Backend.TRITON and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on the CPU use backend='torch' "
            "or set TRITON_INTERPRET=1 before importing triton"
        )
    return backend


def logprob_engine(backend: Backend):
    """The launcher module of a resolved backend (Triton is imported only when used)."""
    return importlib.import_module(f"gcpo_fast.kernels.logprob_{backend.value}")


def workspace_from_free_memory(free_bytes: int) -> int:
    """The CUDA workspace bound for `free_bytes` of free device memory (see WORKSPACE_FRACTION)."""
    share = min(WORKSPACE_MAX_BYTES, max(WORKSPACE_MIN_BYTES, free_bytes // WORKSPACE_FRACTION))
    return 1 << (share.bit_length() - 1)


def workspace_for_device(workspace_bytes, device: torch.device) -> int:
    """`workspace_bytes` as given, else sized for the device: CPU_WORKSPACE_BYTES off CUDA."""
    if workspace_bytes is not None:
        return int(workspace_bytes)
    if device.type != "cuda":
        return CPU_WORKSPACE_BYTES
    return workspace_from_free_memory(torch.cuda.mem_get_info(device)[0])


def check_workspace(workspace_bytes) -> None:
    if workspace_bytes is not None and (
        isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, numbers.Integral) or workspace_bytes < 1
    ):
        raise ValueError(f"workspace_bytes must be None or an int >= 1, got {workspace_bytes!r}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The loss's math switches (kernels/policy_loss.py), checked on the host when built; plus how to run it.

    temperature divides the logits (linear_policy_loss only); backend: Backend or its name; workspace_bytes:
    the linear op's O(V) buffer bound, None: sized for the device (`workspace_for_device`).
    """

    importance_sampling_level: str = "sequence"
    epsilon_low: float = 3e-4
    epsilon_high: float = 4e-4
    loss_agg_mode: str = "seq-mean-token-mean"
    delta: float | None = None
    clip_ratio_c: float | None = None
    beta: float = 0.0
    max_completion_length: int | None = None
    golden_objective: str = "policy_ratio"
    golden_shaping_gamma: float = 0.1
    temperature: float = 1.0
    backend: Backend = Backend.AUTO
    workspace_bytes: int | None = None

    def __post_init__(self):
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}"
            )
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}")

        # Stored as floats (the Triton kernel takes them as fp32 arguments). The clip box
        # [1 - eps_low, 1 + eps_high] must contain 1 and keep its lower end > 0.
        def number(name, ok, rule):
            object.__setattr__(self, name, check_number(name, getattr(self, name), ok, rule))

        number("epsilon_low", lambda e: 0 <= e < 1, "in [0, 1)")
        number("epsilon_high", lambda e: e >= 0, ">= 0")
        if self.delta is not None:
            number("delta", lambda d: d > 1 + self.epsilon_high, f"> 1 + epsilon_high = {1 + self.epsilon_high}")
        if self.clip_ratio_c is not None:
            number("clip_ratio_c", lambda c: c > 1, "> 1")
        number("beta", lambda b: b >= 0, ">= 0")
        if self.max_completion_length is not None and (
            not isinstance(self.max_completion_length, numbers.Integral) or self.max_completion_length < 1
        ):
            raise ValueError(f"max_completion_length must be an int >= 1, got {self.max_completion_length!r}")
        if self.golden_objective not in GOLDEN_OBJECTIVES:
            raise ValueError(f"golden_objective must be one of {GOLDEN_OBJECTIVES}, got {self.golden_objective!r}")
        number("golden_shaping_gamma", lambda g: g > 0, "> 0")
        number("temperature", lambda t: t > 0, "> 0")
        object.__setattr__(self, "backend", as_backend(self.backend))
        check_workspace(self.workspace_bytes)


@dataclass(frozen=True, eq=False)  # eq=False: no elementwise tensor == behind a dataclass comparison
class LossInputs:
    """The per-call tensors of the loss over B packed rows of N tokens in all; only logp / hidden get gradients.

    advantages [B] float; cu_seqlens int32 [B+1] (starts at 0, non-decreasing, ends at N);
    old_logp [N] or None (on-policy: ratios 1 that carry the gradient); ref_logp [N] (read when beta > 0);
    sampling_weight [N] float >= 0 or None (the factor c_t: sampling-mismatch correction, `sampling_weights`);
    golden [B] bool or None (golden_objective "shaped" gives them LUFFY's term; required then);
    mask [N] bool or None (the tokens that count; linear_policy_loss also drops targets == IGNORE_INDEX);
    normalizer: a number or a one-element tensor replacing the aggregation's denominator (a step's global count).
    Types are checked here; shapes and contents when the op runs (kernels/checks.py).
    """

    advantages: torch.Tensor
    cu_seqlens: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    sampling_weight: torch.Tensor | None = None
    golden: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    normalizer: float | torch.Tensor | None = None

    def __post_init__(self):
        check_tensor("advantages", self.advantages)
        check_tensor("cu_seqlens", self.cu_seqlens)
        for name in ("old_logp", "ref_logp", "sampling_weight", "golden", "mask"):
            check_tensor(name, getattr(self, name), optional=True)
