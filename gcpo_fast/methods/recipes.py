"""The table of methods and the options `--loss_type` fills in from it.

    from gcpo_fast.methods.recipes import METHODS, MethodConfig

    options = MethodConfig(loss_type="dapo").resolved(max_completion_length=128)   # the recipe filled in
    method = options.method                                  # METHODS["dapo"]
    advantages, metrics = method.advantages(rewards, group_index, options.scale_rewards)
    rule = options.sampling_rule(8)                          # DAPO's dynamic sampling, GPG's threshold, or None
    switches = options.loss_switches(max_completion_length=128, temperature=1.0)   # the fused op's math switches

Every option the user sets wins over the recipe; None means "from --loss_type" until `resolved` fills it. GCPO's
golden-row options (its recipe: golden_answer "append") are the golden group's (gcpo_fast/golden/options.py).
"""

import dataclasses
from dataclasses import dataclass

import torch

from gcpo_fast.errors import ConfigError, require
from gcpo_fast.kernels import AGG_MODES, PolicyLossConfig
from gcpo_fast.methods.advantages import SCALE_REWARDS
from gcpo_fast.methods.base import Method
from gcpo_fast.methods.dapo import DynamicSampling, overlong_penalty
from gcpo_fast.methods.gpg import GPG, MinInverseAlpha
from gcpo_fast.options import RECIPE, check_options, option

METHODS = {
    m.name: m
    for m in (
        Method("gcpo", "sequence", 3e-4, 4e-4, "seq-mean-token-mean", golden_answer="append"),
        Method("gspo", "sequence", 3e-4, 4e-4, "seq-mean-token-mean"),
        Method("grpo", "token", 0.2, 0.2, "seq-mean-token-mean"),
        Method("dapo", "token", 0.2, 0.28, "token-mean", dynamic_sampling=True, overlong=True),
        Method("dr_grpo", "token", 0.2, 0.2, "seq-mean-token-sum-norm", scale_rewards="none"),
        Method("bnpo", "token", 0.2, 0.2, "token-mean"),
        GPG("gpg", "token", 0.0, 0.0, "token-mean", scale_rewards="none", min_inverse_alpha=0.5, has_ratio=False),
    )
}


@dataclass
class MethodConfig:
    """The method and its loss options; None means "from --loss_type" until `resolved` fills it."""

    _argument_group_name = "method and loss"

    loss_type: str = option(
        "gcpo", "the method: sets every option marked 'from --loss_type' to its paper's value", choices=tuple(METHODS)
    )
    importance_sampling_level: str | None = option(
        None, f"ratio per token or per sequence (GSPO/GCPO) {RECIPE}", choices=("token", "sequence")
    )
    epsilon: float | None = option(None, f"lower clip: ratios below 1 - epsilon are clipped {RECIPE}")
    epsilon_high: float | None = option(
        None,
        "upper clip: ratios above 1 + epsilon_high are clipped (default: epsilon when only that is set, "
        "else from --loss_type)",
    )
    delta: float | None = option(None, "two-sided clip: cap the unclipped ratio at delta (> 1 + epsilon_high)")
    beta: float = option(0.0, "k3 KL coefficient against the initial model (0: no reference model is loaded)")
    loss_agg_mode: str | None = option(
        None, f"how token terms become one loss (verl's names) {RECIPE}", choices=AGG_MODES
    )
    scale_rewards: str | None = option(
        None, f"divide advantages by the group std, the batch std, or not at all {RECIPE}", choices=SCALE_REWARDS
    )
    all_right_advantage: float = option(
        0.0,
        "advantage added to every rollout of a group whose rollouts are all right (each reward >= correct_reward): "
        "group baselines give such groups none, so what a model already solves gets no signal to keep it "
        "(RL-ZVP's positive side, without its entropy weight; 0: off, as GRPO)",
    )
    dynamic_sampling: bool | None = option(
        None, f"DAPO: drop groups whose rewards are all equal and sample more prompts until the batch is full {RECIPE}"
    )
    max_num_gen_batches: int = option(
        10,
        "DAPO/GPG: at most this many prompt batches sampled per generation round (<= 0: no limit); DAPO fails "
        "beyond it, GPG trains on what it has",
    )
    overlong_buffer_len: int | None = option(
        None,
        "DAPO: soft overlong penalty over the last this-many tokens of the budget (0: off; "
        "default: max_completion_length // 5 for dapo, else 0)",
    )
    overlong_penalty_factor: float = option(
        1.0, "DAPO: scale of the overlong penalty (it reaches -factor at the budget)"
    )
    min_inverse_alpha: float | None = option(
        None, f"GPG: sample more prompts until valid rows / rows reaches this (0: off) {RECIPE}"
    )

    def __post_init__(self):
        check_options(self)
        require(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        require(self.all_right_advantage >= 0, f"all_right_advantage must be >= 0, got {self.all_right_advantage}")
        require(
            self.overlong_penalty_factor >= 0,
            f"overlong_penalty_factor must be >= 0, got {self.overlong_penalty_factor}",
        )
        require(
            self.overlong_buffer_len is None or self.overlong_buffer_len >= 0,
            f"overlong_buffer_len must be >= 0, got {self.overlong_buffer_len}",
        )
        require(
            self.min_inverse_alpha is None or 0 <= self.min_inverse_alpha <= 1,
            f"min_inverse_alpha must be in [0, 1], got {self.min_inverse_alpha}",
        )

    @property
    def method(self) -> Method:
        return METHODS[self.loss_type]

    def resolved(self, max_completion_length: int) -> "MethodConfig":
        """The options with the method's recipe filling those left as None, checked (the kernel's checks too)."""
        m = self.method
        m.check(self)
        recipe = dict(
            importance_sampling_level=m.importance_sampling_level,
            epsilon=m.epsilon,
            # TRL: epsilon_high defaults to epsilon (the low side) when only that one is given
            epsilon_high=m.epsilon_high if self.epsilon is None else self.epsilon,
            loss_agg_mode=m.loss_agg_mode,
            scale_rewards=m.scale_rewards,
            dynamic_sampling=m.dynamic_sampling,
            overlong_buffer_len=max(1, max_completion_length // 5) if m.overlong else 0,
            min_inverse_alpha=m.min_inverse_alpha,
        )
        out = dataclasses.replace(self, **{k: v for k, v in recipe.items() if getattr(self, k) is None})
        require(
            out.overlong_buffer_len <= max_completion_length,
            f"overlong_buffer_len={out.overlong_buffer_len} must not exceed "
            f"max_completion_length={max_completion_length}",
        )
        try:  # the kernel's own checks of the loss options (the clip box, delta), here before any model loads
            PolicyLossConfig(**out.loss_switches(max_completion_length, temperature=1.0))
        except ValueError as e:
            raise ConfigError(str(e).replace("epsilon_low", "epsilon")) from None
        return out

    def loss_switches(self, max_completion_length: int, temperature: float) -> dict:
        """The method's switches of the fused op (gcpo_fast.kernels.PolicyLossConfig; resolved options only)."""
        return dict(
            importance_sampling_level=self.importance_sampling_level if self.method.has_ratio else "none",
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            loss_agg_mode=self.loss_agg_mode,
            delta=self.delta,
            beta=self.beta,
            max_completion_length=max_completion_length,
            temperature=temperature,
        )

    def shape_rewards(self, rewards: torch.Tensor, lengths: list[int], max_completion_length: int) -> torch.Tensor:
        """The rollouts' rewards [N] after DAPO's overlong penalty (when overlong_buffer_len > 0; resolved options)."""
        if not self.overlong_buffer_len:
            return rewards
        penalty = overlong_penalty(
            lengths, max_completion_length, self.overlong_buffer_len, self.overlong_penalty_factor
        )
        return rewards + torch.tensor(penalty)

    def sampling_rule(self, batch_size: int) -> DynamicSampling | MinInverseAlpha | None:
        """When a generation round of batch_size prompts has sampled enough (resolved options only)."""
        if self.dynamic_sampling:
            return DynamicSampling(batch_size, self.max_num_gen_batches)
        if self.min_inverse_alpha > 0:
            return MinInverseAlpha(self.min_inverse_alpha, self.max_num_gen_batches)
        return None
