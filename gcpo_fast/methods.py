"""The methods, one unit each: GCPO, GSPO, GRPO, DAPO, Dr. GRPO, BNPO, GPG.

    from gcpo_fast.methods import METHODS, MethodConfig

    options = MethodConfig(loss_type="dapo").resolved(max_completion_length=128)   # the recipe filled in
    method = options.method                                  # METHODS["dapo"]
    advantages, metrics = method.advantages(rewards, group_index, options.scale_rewards)
    rule = options.sampling_rule()                           # DAPO's dynamic sampling, GPG's threshold, or None
    loss = options.loss_config(max_completion_length=128, temperature=1.0)   # the fused op's math switches

A method is its paper's option values (the ratio level, the clip box, the aggregation, the reward scaling,
whether all-wrong groups get a golden row, DAPO's dynamic sampling and overlong shaping, GPG's resampling
threshold), its advantage rule, and the options it has no use for. `--loss_type` picks one; every option the
user sets wins over the recipe. The math of each is docs/algorithms.md ("The methods"); the kernels only see
the switches (`loss_config`).
"""

import dataclasses
from dataclasses import dataclass

import torch

from gcpo_fast import groups
from gcpo_fast.errors import ConfigError, TrainingError, require
from gcpo_fast.kernels import AGG_MODES, GOLDEN_OBJECTIVES, PolicyLossConfig
from gcpo_fast.options import RECIPE, check_options, option

# ---- the methods -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One method of the GRPO family: its paper's option values and its advantage rule."""

    name: str
    importance_sampling_level: str  # "token" | "sequence"
    epsilon: float  # the clip box [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float
    loss_agg_mode: str
    scale_rewards: str = "group"
    golden_answer: str = "off"  # GCPO: "append" a golden row to every all-wrong group
    dynamic_sampling: bool = False  # DAPO: train only on groups with varied rewards
    overlong: bool = False  # DAPO: soft overlong penalty over the last fifth of the budget
    min_inverse_alpha: float = 0.0  # GPG: resample until valid rows / rows reaches this
    has_ratio: bool = True  # GPG's loss is -A * logp: no importance ratio (the kernel's level "none")

    def advantages(self, rewards, group_index, scale_rewards: str) -> tuple[torch.Tensor, dict[str, float]]:
        """Advantages [N] of the rows (groups of any size) and the method's metrics."""
        return groups.group_advantages(rewards, group_index, scale_rewards), {}

    def check(self, options: "MethodConfig") -> None:
        """Refuse options this method would silently ignore (none for the clipped-surrogate methods)."""


@dataclass(frozen=True)
class GPG(Method):
    """GPG (arXiv 2504.02546): loss -A * logp (no ratio, no clip), A scaled by alpha = B / (B - M)."""

    # what GPG does instead of the options it has no use for: no ratio, so no clip box, cap or ratio level
    FIXED = {"importance_sampling_level": "token", "epsilon": 0.0, "epsilon_high": 0.0, "delta": None}

    def advantages(self, rewards, group_index, scale_rewards):
        alpha = gpg_alpha(rewards, group_index)
        return alpha * groups.group_advantages(rewards, group_index, scale_rewards), {"gpg/alpha": alpha}

    def check(self, options):
        """A value equal to what GPG does anyway (`--epsilon 0`) is accepted; TRL's GRPOConfig refuses options
        that cannot take effect the same way."""
        for name, fixed in self.FIXED.items():
            value = getattr(options, name)
            require(
                value is None or value == fixed,
                f"{name}={value} has no effect with loss_type gpg, which has no importance ratio to clip (its "
                f"loss is -advantage * log-prob): leave {name} out, or choose another loss_type",
            )
        require(
            options.scale_rewards in (None, "none", "group"),
            f"loss_type gpg divides advantages by 1 or the group std: scale_rewards must be none or group, "
            f"got {options.scale_rewards!r}",
        )


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


def gpg_alpha(rewards: torch.Tensor, group_index: torch.Tensor) -> float:
    """GPG's alpha = B / (B - M): B rows, M rows in zero-variance groups; 1.0 when every group is zero-variance
    (all advantages are 0 then, so any alpha gives the same zero gradient)."""
    zero = groups.zero_std_groups(rewards, group_index)
    num_rows = group_index.numel()
    valid_rows = num_rows - int(zero[group_index].sum())
    return num_rows / valid_rows if valid_rows > 0 else 1.0


# ---- sampling rules: when a generation round has sampled enough --------------------------------------------


@dataclass(frozen=True)
class DynamicSampling:
    """DAPO: keep only groups whose rewards differ; sample further prompt batches until `batch_size` groups are
    kept (the surplus trimmed, as verl does); fail after max_num_gen_batches batches (<= 0: no limit)."""

    batch_size: int
    max_num_gen_batches: int

    def done(self, rewards: torch.Tensor, num_batches: int, reduce_min) -> bool:
        """rewards: [P, G] of every batch so far; reduce_min: the minimum over ranks (each rank samples alike)."""
        kept = int(reduce_min(int(dapo_filter(rewards).sum())))
        if kept >= self.batch_size:
            return True
        if 0 < self.max_num_gen_batches <= num_batches:
            raise TrainingError(
                f"DAPO dynamic sampling: only {kept} of {self.batch_size} groups with varied rewards after "
                f"{num_batches} generation batches (max_num_gen_batches={self.max_num_gen_batches}); the data is "
                "too easy or too hard for the model (raise --max_num_gen_batches, <= 0 for no limit)"
            )
        return False

    def keep(self, rewards: torch.Tensor) -> torch.Tensor:
        return dapo_filter(rewards).nonzero().flatten()[: self.batch_size]


@dataclass(frozen=True)
class MinInverseAlpha:
    """GPG: sample whole extra prompt batches until valid rows / rows (= 1/alpha) >= threshold (0.5 in GPG's
    scripts, 0.6 in its paper's table), or max_num_gen_batches batches; then train on every group."""

    threshold: float
    max_num_gen_batches: int

    def done(self, rewards: torch.Tensor, num_batches: int, reduce_min) -> bool:
        P, G = rewards.shape
        zero = groups.zero_std_groups(rewards.flatten(), groups.grid_group_index(P, G))
        enough = rewards.numel() > 0 and int((~zero).sum()) * G / rewards.numel() >= self.threshold
        return bool(reduce_min(float(enough))) or 0 < self.max_num_gen_batches <= num_batches

    def keep(self, rewards: torch.Tensor) -> torch.Tensor:
        return torch.arange(rewards.shape[0])


def dapo_filter(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling on [P, G] rollout rewards: [P] bool, True for groups to keep (rewards not all
    equal). A group of one rollout is kept, as verl does."""
    P, G = rewards.shape
    if G == 1:
        return torch.ones(P, dtype=torch.bool, device=rewards.device)
    return ~groups.zero_std_groups(rewards.flatten(), groups.grid_group_index(P, G, rewards.device))


# ---- the options ----------------------------------------------------------------------------------------------


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
        None, f"divide advantages by the group std, the batch std, or not at all {RECIPE}", choices=groups.SCALE_REWARDS
    )
    golden_answer: str | None = option(
        None,
        f"GCPO: give all-wrong groups the golden answer as an extra row, instead of a rollout, or not {RECIPE}",
        choices=groups.GOLDEN_MODES,
    )
    golden_objective: str = option(
        "policy_ratio",
        "GCPO: the golden rows' term: the clipped surrogate with the current policy as the old one (the paper's "
        "reading), or LUFFY's shaped p / (p + gamma), no clipping (docs/algorithms.md)",
        choices=GOLDEN_OBJECTIVES,
    )
    golden_shaping_gamma: float = option(0.1, "gamma of the shaped golden objective (LUFFY: 0.1)")
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
            golden_answer=m.golden_answer,
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
        try:  # the kernel's own checks of the loss options (the clip box, delta, gamma), here before any model loads
            out.loss_config(max_completion_length, temperature=1.0)
        except ValueError as e:
            raise ConfigError(str(e).replace("epsilon_low", "epsilon")) from None
        return out

    def loss_config(self, max_completion_length: int, temperature: float) -> PolicyLossConfig:
        """The fused op's switches (resolved options only)."""
        return PolicyLossConfig(
            importance_sampling_level=self.importance_sampling_level if self.method.has_ratio else "none",
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            loss_agg_mode=self.loss_agg_mode,
            delta=self.delta,
            beta=self.beta,
            max_completion_length=max_completion_length,
            golden_objective=self.golden_objective,
            golden_shaping_gamma=self.golden_shaping_gamma,
            temperature=temperature,
        )

    def sampling_rule(self, batch_size: int) -> DynamicSampling | MinInverseAlpha | None:
        """When a generation round of batch_size prompts has sampled enough (resolved options only)."""
        if self.dynamic_sampling:
            return DynamicSampling(batch_size, self.max_num_gen_batches)
        if self.min_inverse_alpha > 0:
            return MinInverseAlpha(self.min_inverse_alpha, self.max_num_gen_batches)
        return None
