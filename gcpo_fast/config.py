"""The trainer's configuration: one dataclass, its command-line flags, YAML/JSON files, loss_type recipes.

    python -m gcpo_fast.train --help                                    # every option, generated from TrainConfig
    python -m gcpo_fast.train --config run.yaml --learning_rate 2e-6    # file values, then flags on top

    from gcpo_fast.config import TrainConfig, parse_config
    cfg = parse_config(["--loss_type", "dapo", "--epsilon_high", "0.3"])   # resolved and checked

Names follow TRL's GRPOConfig where TRL has the concept. Batch sizes count completions, as in TRL:
`per_device_train_batch_size` completions (rollout rows) per device per micro-batch (forward + backward),
`gradient_accumulation_steps` micro-batches per optimizer step, and one generation round samples
`per_device_train_batch_size * steps_per_generation / num_generations` prompts per device (G completions
each). GCPO's golden rows come on top of these counts (they join the micro-batches of their round).

`--loss_type` picks a whole method with its paper's defaults (RECIPES below, and LOSS_RECIPES for the
ratio level, clip box and aggregation); every option the user sets explicitly, on the command line or in
the --config file, wins over the recipe. The loss options are resolved here and checked once, by the
kernel's `PolicyLossConfig`, and `cfg.loss_config()` hands its math switches to the update. A bad option
raises ConfigError here, before any data or model is loaded.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from gcpo_fast.groups import GOLDEN_MODES, SCALE_REWARDS
from gcpo_fast.kernels import AGG_MODES, GOLDEN_OBJECTIVES, SAMPLING_MODES, PolicyLossConfig
from gcpo_fast.parallel import PARALLELISMS

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "assets" / "default_model")
SHIPPED_MODEL_LR = 3e-4  # tuned on the shipped model and task (README, "The shipped default")
SCHEDULERS = ("constant", "cosine", "linear")
REPORTERS = ("none", "tensorboard", "wandb")
GOLDEN_SOURCES = ("dataset", "teacher", "dataset_then_teacher")

# The loss half of each method: its paper's ratio level, clip box and aggregation (docs/algorithms.md, "The
# methods"). GPG has no ratio: its kernel switch is importance_sampling_level "none" (`loss_config`).
LOSS_RECIPES = {
    "gcpo": dict(
        importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4, loss_agg_mode="seq-mean-token-mean"
    ),
    "gspo": dict(
        importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4, loss_agg_mode="seq-mean-token-mean"
    ),
    "grpo": dict(
        importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, loss_agg_mode="seq-mean-token-mean"
    ),
    "dapo": dict(importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, loss_agg_mode="token-mean"),
    "dr_grpo": dict(
        importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, loss_agg_mode="seq-mean-token-sum-norm"
    ),
    "bnpo": dict(importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, loss_agg_mode="token-mean"),
    "gpg": dict(importance_sampling_level="token", epsilon_low=0.0, epsilon_high=0.0, loss_agg_mode="token-mean"),
}

# The trainer's half of each method (the loss half is LOSS_RECIPES above): golden rows, reward
# scaling, DAPO's dynamic sampling and overlong shaping, GPG's resampling threshold (docs/algorithms.md).
RECIPES = {
    "gcpo": dict(
        golden_answer="append", scale_rewards="group", dynamic_sampling=False, overlong=False, min_inverse_alpha=0.0
    ),
    "gspo": dict(
        golden_answer="off", scale_rewards="group", dynamic_sampling=False, overlong=False, min_inverse_alpha=0.0
    ),
    "grpo": dict(
        golden_answer="off", scale_rewards="group", dynamic_sampling=False, overlong=False, min_inverse_alpha=0.0
    ),
    "dapo": dict(
        golden_answer="off", scale_rewards="group", dynamic_sampling=True, overlong=True, min_inverse_alpha=0.0
    ),
    "dr_grpo": dict(
        golden_answer="off", scale_rewards="none", dynamic_sampling=False, overlong=False, min_inverse_alpha=0.0
    ),
    "bnpo": dict(
        golden_answer="off", scale_rewards="group", dynamic_sampling=False, overlong=False, min_inverse_alpha=0.0
    ),
    "gpg": dict(
        golden_answer="off", scale_rewards="none", dynamic_sampling=False, overlong=False, min_inverse_alpha=0.5
    ),
}
RECIPE = "from --loss_type"  # how --help shows a default that the recipe fills in


class ConfigError(ValueError):
    """An option (or a combination of options) that cannot run."""


def opt(default, help: str, group: str, *, choices=None, shown=None):
    """A TrainConfig field with its --help text, flag group, allowed values and the default as --help shows it."""
    meta = dict(help=help, group=group, choices=choices, shown=shown)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# --help sections
DATA, GEN, ENGINE, BATCH, OPTIM, PARALLEL, LOSS, EXTRAS, LOGS = (
    "model and data",
    "generation",
    "rollout engine",
    "batch",
    "optimizer",
    "parallelism",
    "loss",
    "method extras",
    "logging and checkpoints",
)


@dataclass
class TrainConfig:
    # model and data
    model: str = opt(
        DEFAULT_MODEL, "local Hugging Face causal LM folder (or hub id)", DATA, shown="gcpo_fast/assets/default_model"
    )
    dataset: str = opt(
        "builtin",
        "'builtin' (the math task generated by gcpo_fast.tasks) or a .jsonl/.parquet file or folder in TRL's or verl's layout",
        DATA,
    )
    prompt_column: str = opt("prompt", "dataset column with the prompt (text or chat messages)", DATA)
    golden_column: str = opt("solution", "dataset column with the worked golden solution (GCPO's golden answer)", DATA)
    answer_column: str | None = opt(
        None,
        "column with the final answer the reward checks; default: extracted from the golden column, or verl's reward_model.ground_truth",
        DATA,
    )
    builtin_num_problems: int = opt(5000, "number of training problems generated for --dataset builtin", DATA)
    builtin_levels: list[int] = opt(
        [3, 4, 5],
        "difficulty levels (gcpo_fast/tasks.py) of the builtin problems, for training and held-out evaluation; repeat a level to draw it more often",
        DATA,
    )
    eval_dataset: str | None = opt(
        None,
        "held-out problems for evaluation; default: the builtin held-out split (of --builtin_levels) when --dataset builtin, else no evaluation",
        DATA,
    )
    reward_funcs: list[str] = opt(
        ["accuracy_reward"], "reward functions: built-in names or 'package.module:function' (TRL signature)", DATA
    )
    reward_weights: list[float] | None = opt(None, "one weight per reward function (default: all 1)", DATA)
    correct_reward: float = opt(
        1.0,
        "the reward of a correct answer: a prompt is all-wrong when no rollout reaches it, and golden rows get it",
        DATA,
    )
    # generation
    num_generations: int = opt(8, "G: completions sampled per prompt (>= 2)", GEN)
    max_prompt_length: int = opt(256, "prompt token budget; longer prompts keep their last tokens", GEN)
    max_completion_length: int = opt(128, "completion token budget (new tokens per rollout)", GEN)
    temperature: float = opt(1.0, "sampling temperature; the log-probs of the loss use it too", GEN)
    top_p: float = opt(1.0, "nucleus sampling threshold (1: off)", GEN)
    top_k: int = opt(0, "top-k sampling (0: off)", GEN)
    mask_truncated_completions: bool = opt(
        False, "completions cut by the budget (no EOS) take no part in the loss", GEN
    )
    # rollout engine
    use_vllm: bool = opt(
        False,
        "sample rollouts (and the held-out evaluation) with a vLLM engine in each training process instead of Hugging Face generate (pip install -e '.[vllm]')",
        ENGINE,
    )
    vllm_mode: str = opt(
        "colocate",
        "where the vLLM engine runs: colocate (in each training process; the only mode for now)",
        ENGINE,
        choices=("colocate", "server"),
    )
    vllm_gpu_memory_utilization: float = opt(
        0.3,
        "fraction of the accelerator's memory vLLM reserves for weights and KV cache (on the CPU: of host memory)",
        ENGINE,
    )
    vllm_enable_sleep_mode: bool = opt(
        False,
        "free vLLM's memory while the trainer updates (where the platform supports it; ignored on the CPU)",
        ENGINE,
    )
    vllm_max_model_length: int | None = opt(
        None, "vLLM's context length (default: max_prompt_length + max_completion_length)", ENGINE
    )
    vllm_importance_sampling_correction: bool = opt(
        True,
        "weight each sampled token's loss by the detached ratio of the trainer's to vLLM's log-prob (TRL's correction)",
        ENGINE,
    )
    vllm_importance_sampling_mode: str = opt(
        "sequence_mask",
        "per token or per sequence; truncate (cap) or mask (zero) ratios outside the bounds",
        ENGINE,
        choices=SAMPLING_MODES,
    )
    vllm_importance_sampling_clip_min: float | None = opt(
        None, "lower bound of the correction's ratio (none: no lower bound)", ENGINE
    )
    vllm_importance_sampling_clip_max: float | None = opt(
        3.0, "upper bound of the correction's ratio (none: no upper bound)", ENGINE
    )
    # batch
    per_device_train_batch_size: int = opt(
        64, "completions per device per micro-batch, as in TRL (golden rows come on top)", BATCH
    )
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", BATCH)
    steps_per_generation: int | None = opt(
        None,
        "micro-batches per generation round (default: gradient_accumulation_steps; more means several optimizer steps per round)",
        BATCH,
    )
    num_iterations: int = opt(1, "optimizer passes over each generation round (TRL's mu)", BATCH)
    # optimizer
    learning_rate: float | None = opt(
        None,
        "AdamW learning rate (default: 3e-4 for the shipped 1M-parameter model, 1e-6 for any other --model, as TRL)",
        OPTIM,
    )
    lr_scheduler_type: str = opt("linear", "learning-rate schedule after warm-up", OPTIM, choices=SCHEDULERS)
    warmup_ratio: float = opt(0.0, "fraction of max_steps spent warming the learning rate up from 0", OPTIM)
    weight_decay: float = opt(0.0, "AdamW weight decay", OPTIM)
    adam_beta1: float = opt(0.9, "AdamW beta1", OPTIM)
    adam_beta2: float = opt(0.999, "AdamW beta2", OPTIM)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon", OPTIM)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (<= 0: no clipping)", OPTIM)
    max_steps: int = opt(300, "optimizer steps to train", OPTIM)
    seed: int = opt(42, "seed of the data order, sampling and everything random", OPTIM)
    max_skipped_steps: int = opt(
        3,
        "stop the run when this many optimizer steps in a row are skipped for a non-finite loss or gradient norm",
        OPTIM,
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward to save memory", OPTIM)
    bf16: bool = opt(True, "bf16 autocast on CUDA (weights and optimizer stay fp32); ignored on the CPU", OPTIM)
    # parallelism
    parallelism: str = opt(
        "ddp",
        "how the processes of torchrun share the model: ddp (each holds all of it and its optimizer; small models) or fsdp (FSDP2: parameters, gradients and optimizer state sharded over the processes; one process is a world of one)",
        PARALLEL,
        choices=PARALLELISMS,
    )
    fsdp_cpu_offload: bool = opt(
        False,
        "with --parallelism fsdp on CUDA: keep the parameter shards, gradients and optimizer state in host memory",
        PARALLEL,
    )
    # loss
    loss_type: str = opt(
        "gcpo",
        "the method: sets every option below marked 'from --loss_type' to its paper's value",
        LOSS,
        choices=tuple(LOSS_RECIPES),
    )
    importance_sampling_level: str | None = opt(
        None, "ratio per token or per sequence (GSPO/GCPO)", LOSS, choices=("token", "sequence"), shown=RECIPE
    )
    epsilon: float | None = opt(None, "lower clip: ratios below 1 - epsilon are clipped", LOSS, shown=RECIPE)
    epsilon_high: float | None = opt(
        None,
        "upper clip: ratios above 1 + epsilon_high are clipped (default: epsilon when only that is set, else from --loss_type)",
        LOSS,
        shown=RECIPE,
    )
    delta: float | None = opt(None, "two-sided clip: cap the unclipped ratio at delta (> 1 + epsilon_high)", LOSS)
    beta: float = opt(0.0, "k3 KL coefficient against the initial model (0: no reference model is loaded)", LOSS)
    loss_agg_mode: str | None = opt(
        None, "how token terms become one loss (verl's names)", LOSS, choices=AGG_MODES, shown=RECIPE
    )
    scale_rewards: str | None = opt(
        None,
        "divide advantages by the group std, the batch std, or not at all",
        LOSS,
        choices=SCALE_REWARDS,
        shown=RECIPE,
    )
    # method extras
    golden_answer: str | None = opt(
        None,
        "GCPO: give all-wrong groups the golden answer as an extra row, instead of a rollout, or not",
        EXTRAS,
        choices=GOLDEN_MODES,
        shown=RECIPE,
    )
    golden_objective: str = opt(
        "policy_ratio",
        "GCPO: the golden rows' term: the clipped surrogate with the current policy as the old one (the paper's reading), or LUFFY's shaped p / (p + gamma), no clipping (docs/algorithms.md)",
        EXTRAS,
        choices=GOLDEN_OBJECTIVES,
    )
    golden_shaping_gamma: float = opt(0.1, "gamma of the shaped golden objective (LUFFY: 0.1)", EXTRAS)
    dynamic_sampling: bool | None = opt(
        None,
        "DAPO: drop groups whose rewards are all equal and sample more prompts until the batch is full",
        EXTRAS,
        shown=RECIPE,
    )
    max_num_gen_batches: int = opt(
        10,
        "DAPO/GPG: at most this many prompt batches sampled per generation round (<= 0: no limit); DAPO fails beyond it, GPG trains on what it has",
        EXTRAS,
    )
    overlong_buffer_len: int | None = opt(
        None,
        "DAPO: soft overlong penalty over the last this-many tokens of the budget (0: off; dapo: max_completion_length // 5)",
        EXTRAS,
        shown=RECIPE,
    )
    overlong_penalty_factor: float = opt(
        1.0, "DAPO: scale of the overlong penalty (it reaches -factor at the budget)", EXTRAS
    )
    min_inverse_alpha: float | None = opt(
        None, "GPG: sample more prompts until valid rows / rows reaches this (0: off)", EXTRAS, shown=RECIPE
    )
    golden_source: str | None = opt(
        None,
        "GCPO: where golden answers come from: the dataset's golden column, a teacher (--golden_model, --golden_cache), or the dataset and, for records without one, the teacher (default: dataset_then_teacher when a teacher or cache is given, else dataset)",
        EXTRAS,
        choices=GOLDEN_SOURCES,
    )
    golden_model: str | None = opt(
        None,
        "GCPO: a teacher, a local Hugging Face causal LM folder, that writes golden answers for all-wrong prompts (verified by the reward functions, cached in output_dir/golden_cache.jsonl)",
        EXTRAS,
    )
    golden_cache: str | None = opt(
        None,
        "GCPO: a golden-answer cache filled offline (python -m gcpo_fast.golden), read at the start; without --golden_model it is the only teacher",
        EXTRAS,
    )
    golden_num_candidates: int = opt(
        4,
        "GCPO teacher: candidates per all-wrong prompt; the first the reward functions call correct becomes its golden answer",
        EXTRAS,
    )
    golden_temperature: float = opt(0.7, "GCPO teacher: sampling temperature of its candidates", EXTRAS)
    golden_max_completion_length: int | None = opt(
        None,
        "GCPO teacher: token budget per candidate, in the teacher's tokens (default: max_completion_length)",
        EXTRAS,
    )
    # logging and checkpoints
    output_dir: str = opt("runs/gcpo", "run directory: metrics.jsonl, samples.jsonl, checkpoint-<step>/", LOGS)
    logging_steps: int = opt(
        1, "print and report to TensorBoard/W&B every this many steps (metrics.jsonl gets every step)", LOGS
    )
    save_steps: int = opt(100, "checkpoint every this many steps, and at the end (0: only at the end)", LOGS)
    save_total_limit: int | None = opt(None, "keep only the newest this-many checkpoints (default: all)", LOGS)
    eval_steps: int = opt(
        50, "evaluate on the held-out problems every this many steps, at the start and at the end (0: never)", LOGS
    )
    eval_num_problems: int = opt(500, "held-out problems per evaluation", LOGS)
    eval_num_samples: int = opt(1, "completions per held-out problem: mean@k and pass@k (1: greedy)", LOGS)
    sample_steps: int = opt(10, "write a few rollouts to samples.jsonl every this many steps (0: never)", LOGS)
    num_samples_to_log: int = opt(4, "groups written each time (their first rollout, and golden row if any)", LOGS)
    report_to: list[str] = opt([], "also log to these, when installed", LOGS, choices=REPORTERS)
    resume: str | None = opt(
        None, "continue from the latest checkpoint in output_dir (flag alone) or from the given checkpoint folder", LOGS
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def prompts_per_round(self) -> int:
        """Prompts each rank samples per generation round: its completions over G."""
        return self.per_device_train_batch_size * self.steps_per_generation // self.num_generations

    def loss_config(self) -> PolicyLossConfig:
        """The fused loss's math switches, as resolve() settled them (GPG: no ratio, level "none")."""
        return PolicyLossConfig(
            importance_sampling_level="none" if self.loss_type == "gpg" else self.importance_sampling_level,
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            loss_agg_mode=self.loss_agg_mode,
            delta=self.delta,
            beta=self.beta,
            max_completion_length=self.max_completion_length,
            golden_objective=self.golden_objective,
            golden_shaping_gamma=self.golden_shaping_gamma,
            temperature=self.temperature,
        )


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _base_type(tp):
    """(scalar type, is_list) of a field annotation such as `int`, `float | None`, `list[str]`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return _base_type(args[0])
    if typing.get_origin(tp) is list:
        return args[0], True
    return tp, False


def _parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _float_or_none(text: str) -> float | None:
    if text.lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def _convert(name: str, value):
    """A value from a --config file to the field's type (YAML reads 1e-6 as a string, JSON has no tuples)."""
    scalar, is_list = _base_type(FIELDS[name].type)
    if value is None:
        return None
    conv = _parse_bool if scalar is bool else scalar
    try:
        if is_list:
            return [conv(v) for v in (value if isinstance(value, list) else [value])]
        return conv(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"option {name}: cannot read {value!r} as {scalar.__name__}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per TrainConfig field; flags left out are absent from the namespace, so
    the caller knows exactly which options the user set."""
    parser = argparse.ArgumentParser(
        prog="python -m gcpo_fast.train",
        description="GCPO / GSPO / GRPO / DAPO / Dr. GRPO / BNPO / GPG training of a causal LM on math prompts.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags given here override it)")
    groups = {}
    for f in FIELDS.values():
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        scalar, is_list = _base_type(f.type)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = meta["shown"] or (
            "none" if default in (None, []) else " ".join(map(str, default)) if is_list else default
        )
        help = meta["help"] if "default:" in meta["help"] else f"{meta['help']} (default: {shown})"
        kw = dict(help=help, choices=meta["choices"])
        if f.name == "resume":
            kw.update(nargs="?", const="latest", metavar="CHECKPOINT")
        elif scalar is bool:
            kw.update(type=_parse_bool, nargs="?", const=True, metavar="true|false")
        else:
            optional = type(None) in typing.get_args(f.type) and scalar is float  # "none" unsets a bound
            kw.update(type=_float_or_none if optional else scalar, nargs="+" if is_list else None)
            if meta["choices"] is None:
                kw["metavar"] = {str: "TEXT", int: "N", float: "X"}[scalar]
        group.add_argument(f"--{f.name}", **kw)
    return parser


def load_config_file(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"--config {path}: unknown options {', '.join(unknown)} (see --help)")
    return {k: _convert(k, v) for k, v in values.items()}


def resolve(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Fill the options the user did not set from cfg.loss_type's recipe, then check everything."""
    if cfg.loss_type not in LOSS_RECIPES:
        raise ConfigError(f"loss_type must be one of {', '.join(LOSS_RECIPES)}, got {cfg.loss_type!r}")
    check_finite(cfg)  # first, before the kernel sees the loss options: one message for every float option
    method = RECIPES[cfg.loss_type]
    given = lambda name: getattr(cfg, name) if name in explicit else None  # noqa: E731
    values = recipe_loss_options(LOSS_RECIPES[cfg.loss_type], given)

    def default(name, value):
        if name not in explicit or getattr(cfg, name) is None:
            values[name] = value

    for name in ("golden_answer", "scale_rewards", "dynamic_sampling", "min_inverse_alpha"):
        default(name, method[name])
    default("overlong_buffer_len", max(1, cfg.max_completion_length // 5) if method["overlong"] else 0)
    default("steps_per_generation", cfg.gradient_accumulation_steps)
    default("golden_source", "dataset_then_teacher" if cfg.golden_model or cfg.golden_cache else "dataset")
    default("golden_max_completion_length", cfg.max_completion_length)
    # a 1M-parameter model needs a far larger step than the billion-parameter models TRL's 1e-6 is for
    default("learning_rate", SHIPPED_MODEL_LR if Path(cfg.model).resolve() == Path(DEFAULT_MODEL) else 1e-6)
    cfg = dataclasses.replace(cfg, **values)
    check(cfg)
    try:  # the kernel checks the loss options
        cfg.loss_config()
    except ValueError as e:
        raise ConfigError(str(e).replace("epsilon_low", "epsilon")) from None

    # ---- options the chosen loss_type would silently ignore (needs to know what the user set) ----
    check_ignored_options(cfg, explicit)
    return cfg


def recipe_loss_options(recipe: dict, given) -> dict:
    """The loss options of a recipe, with what the user set (given(name), else None) winning; as TRL,
    epsilon_high follows epsilon when only that one is given."""
    epsilon = recipe["epsilon_low"] if given("epsilon") is None else given("epsilon")
    epsilon_high = given("epsilon_high")
    if epsilon_high is None:
        epsilon_high = recipe["epsilon_high"] if given("epsilon") is None else epsilon
    return dict(
        importance_sampling_level=given("importance_sampling_level") or recipe["importance_sampling_level"],
        loss_agg_mode=given("loss_agg_mode") or recipe["loss_agg_mode"],
        epsilon=epsilon,
        epsilon_high=epsilon_high,
    )


def check(cfg: TrainConfig) -> None:
    """Raise ConfigError for options that cannot run (each message names the option); resolve() has already
    required every float option to be finite (check_finite)."""

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    for name, f in FIELDS.items():
        choices, value = f.metadata["choices"], getattr(cfg, name)
        for v in value if isinstance(value, list) else [value]:
            if choices is not None and v is not None and v not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {v!r}")
    G = cfg.num_generations
    need(G >= 2, f"num_generations must be >= 2 (group advantages need at least two completions), got {G}")
    for name in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "steps_per_generation",
        "num_iterations",
        "max_steps",
        "max_prompt_length",
        "max_completion_length",
        "logging_steps",
        "eval_num_problems",
        "max_skipped_steps",
        "eval_num_samples",
        "num_samples_to_log",
    ):
        need(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("save_steps", "eval_steps", "sample_steps", "builtin_num_problems", "overlong_buffer_len", "top_k"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    rows = cfg.per_device_train_batch_size * cfg.steps_per_generation
    need(
        rows % G == 0,
        f"num_generations={G} must divide the completions of a generation round, per_device_train_batch_size x "
        f"steps_per_generation = {cfg.per_device_train_batch_size} x {cfg.steps_per_generation} = {rows}",
    )
    need(
        cfg.steps_per_generation % cfg.gradient_accumulation_steps == 0,
        f"steps_per_generation={cfg.steps_per_generation} must be a multiple of gradient_accumulation_steps="
        f"{cfg.gradient_accumulation_steps} (a generation round holds whole optimizer steps)",
    )
    need(cfg.temperature > 0, f"temperature must be > 0 for training (sampling), got {cfg.temperature}")
    need(0 < cfg.top_p <= 1, f"top_p must be in (0, 1], got {cfg.top_p}")
    need(cfg.learning_rate >= 0, f"learning_rate must be >= 0, got {cfg.learning_rate}")
    # torch.optim.AdamW's own checks, here so that they fail before the model loads
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(cfg, name) < 1, f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("adam_epsilon", "weight_decay", "overlong_penalty_factor"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    need(0 <= cfg.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    need(
        cfg.overlong_buffer_len <= cfg.max_completion_length,
        f"overlong_buffer_len={cfg.overlong_buffer_len} must not exceed max_completion_length={cfg.max_completion_length}",
    )
    need(0 <= cfg.min_inverse_alpha <= 1, f"min_inverse_alpha must be in [0, 1], got {cfg.min_inverse_alpha}")
    need(
        cfg.loss_type != "gpg" or cfg.scale_rewards in ("none", "group"),
        f"loss_type gpg divides advantages by 1 or the group std: scale_rewards must be none or group, got {cfg.scale_rewards!r}",
    )
    need(
        bool(cfg.builtin_levels) and set(cfg.builtin_levels) <= set(range(1, 9)),
        f"builtin_levels must be levels 1 to 8 of gcpo_fast/tasks.py, got {cfg.builtin_levels}",
    )
    check_golden_source(cfg)
    need(bool(cfg.reward_funcs), "reward_funcs must name at least one reward function")
    need(
        cfg.vllm_mode == "colocate",
        f"vllm_mode {cfg.vllm_mode} is not supported yet: use colocate (an engine in each training process)",
    )
    need(
        0 < cfg.vllm_gpu_memory_utilization <= 1,
        f"vllm_gpu_memory_utilization must be in (0, 1], got {cfg.vllm_gpu_memory_utilization}",
    )
    need(
        cfg.vllm_max_model_length is None
        or cfg.vllm_max_model_length >= cfg.max_prompt_length + cfg.max_completion_length,
        f"vllm_max_model_length={cfg.vllm_max_model_length} must hold max_prompt_length + max_completion_length = "
        f"{cfg.max_prompt_length + cfg.max_completion_length}",
    )
    low, high = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
    need(
        (low is None or low >= 0) and (high is None or high > 0) and (low is None or high is None or low <= high),
        f"vllm_importance_sampling_clip_min/_max must satisfy 0 <= min <= max and max > 0, got {low}, {high}",
    )
    need(
        not cfg.use_vllm or importlib.util.find_spec("vllm") is not None,
        '--use_vllm: vLLM is not installed (pip install -e ".[vllm]" on a GPU machine; see the README)',
    )
    need(
        cfg.reward_weights is None or len(cfg.reward_weights) == len(cfg.reward_funcs),
        f"reward_weights has {len(cfg.reward_weights or [])} values for {len(cfg.reward_funcs)} reward_funcs",
    )
    need(
        not cfg.fsdp_cpu_offload or cfg.parallelism == "fsdp",
        f"fsdp_cpu_offload needs --parallelism fsdp, got --parallelism {cfg.parallelism}",
    )
    need(
        not cfg.fsdp_cpu_offload or torch.cuda.is_available(),
        "fsdp_cpu_offload needs CUDA: on the CPU the shards already live in host memory",
    )
    need(
        cfg.save_total_limit is None or cfg.save_total_limit >= 1,
        f"save_total_limit must be >= 1, got {cfg.save_total_limit}",
    )
    for reporter in set(cfg.report_to) - {"none"}:
        need(
            importlib.util.find_spec(reporter) is not None,
            f"report_to {reporter}: the {reporter} package is not installed",
        )


def check_golden_source(cfg: TrainConfig) -> None:
    """A teacher needs golden rows to fill and a golden source that asks it; a teacher source needs a teacher."""
    teacher = [f"--{name}" for name in ("golden_model", "golden_cache") if getattr(cfg, name)]
    if cfg.golden_source != "dataset" and not teacher:
        raise ConfigError(
            f"golden_source {cfg.golden_source} needs a teacher: --golden_model FOLDER or --golden_cache FILE"
        )
    if teacher and cfg.golden_source == "dataset":
        raise ConfigError(
            f"{' and '.join(teacher)} would never be asked with golden_source dataset: use golden_source "
            "teacher or dataset_then_teacher"
        )
    if teacher and cfg.golden_answer == "off":
        raise ConfigError(
            f"{' and '.join(teacher)} would never be asked: golden_answer is off (loss_type "
            f"{cfg.loss_type}); use --loss_type gcpo or --golden_answer append"
        )
    for name in ("golden_num_candidates", "golden_max_completion_length"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.golden_temperature > 0:
        raise ConfigError(f"golden_temperature must be > 0, got {cfg.golden_temperature}")


def check_finite(cfg: TrainConfig) -> None:
    """Every float option (lists included) must be a finite number: argparse, YAML (.nan, .inf) and JSON
    (NaN, Infinity) all read non-finite values, and a NaN passes every `x >= 0`-style range check
    unnoticed (`--correct_reward nan` would turn golden answers off, `--reward_weights nan` zero every reward)."""
    for name, f in FIELDS.items():
        if _base_type(f.type)[0] is not float:
            continue
        value = getattr(cfg, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v}")


# What GPG does instead of the options it has no use for: it has no importance ratio (loss -A * logp), so
# no clip box, no two-sided cap and no sequence-level ratio (kernels/policy_loss.py).
GPG_FIXED = {
    "importance_sampling_level": LOSS_RECIPES["gpg"]["importance_sampling_level"],
    "epsilon": LOSS_RECIPES["gpg"]["epsilon_low"],
    "epsilon_high": LOSS_RECIPES["gpg"]["epsilon_high"],
    "delta": None,
}


def check_ignored_options(cfg: TrainConfig, explicit: set[str]) -> None:
    """Refuse an option the user set (explicit: the names given on the command line or in the --config file)
    that the chosen loss_type would silently ignore, as TRL's GRPOConfig refuses options that cannot take
    effect together. The case: GPG's loss has no ratio, so it ignores the clip options. A value equal to what
    GPG does anyway (`--epsilon 0`, `--importance_sampling_level token`) is accepted."""
    if cfg.loss_type != "gpg":
        return
    for name, fixed in GPG_FIXED.items():
        if name in explicit and getattr(cfg, name) != fixed:
            raise ConfigError(
                f"{name}={getattr(cfg, name)} has no effect with loss_type gpg, which has no importance "
                f"ratio to clip (its loss is -advantage * log-prob): leave {name} out, or choose "
                "another loss_type"
            )


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line (and its --config file), recipe applied and checked.
    Raises ConfigError; argparse itself exits with status 2 on a malformed flag."""
    args = vars(build_parser().parse_args(argv))
    values = load_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    return resolve(TrainConfig(**values), explicit=set(values))
