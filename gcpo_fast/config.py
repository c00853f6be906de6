"""The trainer's options: each component's small dataclass, composed into one command line and one YAML file.

    python -m gcpo_fast.train --help                                    # every option, grouped by component
    python -m gcpo_fast.train --config run.yaml --learning_rate 2e-6    # file values, then flags on top

    from gcpo_fast.config import parse_config
    cfg = parse_config(["--loss_type", "dapo", "--epsilon_high", "0.3"])   # resolved and checked
    cfg.rollout.max_completion_length, cfg.method.loss_agg_mode, cfg.optim.learning_rate

Each component owns its options and checks them itself (gcpo_fast/options.py): the model (models/loading.py), LoRA
(models/lora.py), the data (data/sources.py), the rewards (data/rewards.py), generation (engines/base.py), vLLM and
the generation server (engines/vllm_engine.py), tools (tools/options.py), async rollouts (async_rollouts.py), the
batch (rounds.py), the optimizer (update.py), parallelism (distributed/parallel.py), the method and its loss
(methods/recipes.py), golden answers (golden/options.py), evaluation (eval.py), logging (run/logger.py), checkpoints
(run/checkpoint.py) and the run (run/state.py); each function is handed only the parts it reads. Flag names are
TRL's where TRL has the concept; the command line is transformers' HfArgumentParser, as in TRL, and the other
commands take the same options under the same names (gcpo_fast/cli.py, add_options). `resolve` fills what depends on
several parts (the `--loss_type` recipe, the learning rate for the shipped model) and checks the combinations. A bad
option raises ConfigError naming it, before any data or model is loaded.
"""

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

import yaml
from transformers import HfArgumentParser

from gcpo_fast.async_rollouts import AsyncConfig
from gcpo_fast.cli import HelpFormatter
from gcpo_fast.data.rewards import RewardConfig
from gcpo_fast.data.sources import DataConfig
from gcpo_fast.distributed.parallel import ParallelConfig
from gcpo_fast.engines.base import RolloutConfig
from gcpo_fast.engines.vllm_engine import VLLMConfig
from gcpo_fast.errors import ConfigError, require
from gcpo_fast.eval import EvalConfig
from gcpo_fast.golden.options import GoldenConfig
from gcpo_fast.kernels import PolicyLossConfig
from gcpo_fast.methods.recipes import MethodConfig
from gcpo_fast.models.loading import ModelConfig
from gcpo_fast.models.lora import PeftOptions
from gcpo_fast.rounds import BatchConfig
from gcpo_fast.run.checkpoint import CheckpointConfig
from gcpo_fast.run.logger import LogConfig
from gcpo_fast.run.state import RunConfig
from gcpo_fast.tools.options import ToolsConfig
from gcpo_fast.update import SHIPPED_MODEL_LR, OptimizerConfig


@dataclass
class TrainConfig:
    """Every option of a run, one dataclass per component (the attribute names below)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: PeftOptions = field(default_factory=PeftOptions)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    golden: GoldenConfig = field(default_factory=GoldenConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        """Every option by its flag name (train_config.yaml, the --config format)."""
        return {k: v for part in self.parts() for k, v in dataclasses.asdict(part).items()}

    def parts(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @property
    def prompts_per_round(self) -> int:
        """Prompts each rank samples per generation round: its completions over G."""
        return self.batch.completions_per_round // self.rollout.num_generations

    def loss_config(self) -> PolicyLossConfig:
        """The fused op's switches: the method's and the golden rows' (resolved options only)."""
        method = self.method.loss_switches(self.rollout.max_completion_length, self.rollout.temperature)
        return PolicyLossConfig(**method, **self.golden.loss_switches())


PARTS = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser over the component dataclasses, with one-line errors (gcpo_fast/cli.py's convention)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        list(PARTS.values()),
        prog="python -m gcpo_fast.train",
        description="GCPO / GSPO / GRPO / DAPO / Dr. GRPO / BNPO / GPG training of a causal LM on math prompts.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags given here override it)")
    # (from the annotations: HfArgumentParser rewrites the Field objects' types in place)
    optional_floats = {
        name for part in PARTS.values() for name, tp in get_type_hints(part).items() if tp == float | None
    }
    for action in parser._actions:
        if action.dest == "resume":  # the flag alone: the newest checkpoint of output_dir
            action.nargs, action.const = "?", "latest"
        elif action.dest in optional_floats:
            action.type = float_or_none  # "none" unsets it (vllm_importance_sampling_clip_max: no upper bound)
        elif getattr(action.type, "__name__", "") == "string_to_bool" and action.nargs is None:
            action.nargs, action.const = "?", True  # `--dynamic_sampling` alone means true, as for every bool
    return parser


def float_or_none(text: str) -> float | None:
    if text.lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def load_config_file(path: str, parser: ArgumentParser) -> dict:
    """The options of a YAML or JSON file, each read by its flag's own type (so `8.9` or `yes` is no integer)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: {getattr(e, 'strerror', None) or e}") from None
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        values = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: not valid {kind}: {e}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    # each option's own flag (not its --no_ complement)
    actions = {a.dest: a for a in parser._actions if f"--{a.dest}" in a.option_strings and a.dest != "config"}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigError(f"--config {path}: unknown options {', '.join(unknown)} (see --help)")
    return {name: _read(path, actions[name], value) for name, value in values.items()}


def _read(path: str, action: argparse.Action, value):
    if value is None:
        return None
    many = action.nargs == "+"
    items = value if many and isinstance(value, list) else [value]
    if isinstance(value, list) and not many:
        raise ConfigError(f"--config {path}: option {action.dest} takes one value, got a list")
    out = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise ConfigError(f"--config {path}: option {action.dest}: {item!r} is not a single value")
        text = str(item).lower() if isinstance(item, bool) else str(item)
        try:
            converted = action.type(text) if action.type else text
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            kind = getattr(action.type, "__name__", "value").replace("string_to_bool", "bool")
            raise ConfigError(f"--config {path}: option {action.dest}: cannot read {item!r} as {kind}") from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigError(f"{action.dest} must be one of {', '.join(map(str, action.choices))}, got {converted!r}")
        out.append(converted)
    return out if many else out[0]


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line (and its --config file), recipe applied and checked.
    Raises ConfigError; a malformed flag exits with status 2 and one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    config_file = argparse.ArgumentParser(add_help=False)
    config_file.add_argument("--config")
    known, _ = config_file.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_file(known.config, parser))
    try:
        *parts, _extra = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ConfigError:
        raise
    except ValueError as e:  # HfArgumentParser: arguments it does not know
        parser.error(str(e))
    return resolve(TrainConfig(*parts))


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill what depends on several components (the method's recipe, the shipped model's learning rate, the
    teacher's budget) and check the combinations; each component has already checked itself."""
    budget = cfg.rollout.max_completion_length
    cfg.method = cfg.method.resolved(max_completion_length=budget)
    if cfg.optim.learning_rate is None:
        # a 1M-parameter model needs a far larger step than the billion-parameter models TRL's 1e-6 is for
        cfg.optim = dataclasses.replace(cfg.optim, learning_rate=SHIPPED_MODEL_LR if cfg.model.is_shipped else 1e-6)
    cfg.golden = cfg.golden.resolved(cfg.method.method.golden_answer, cfg.method.loss_type, budget)
    G, rows = cfg.rollout.num_generations, cfg.batch.completions_per_round
    require(
        rows % G == 0,
        f"num_generations={G} must divide the completions of a generation round, per_device_train_batch_size x "
        f"steps_per_generation = {cfg.batch.per_device_train_batch_size} x {cfg.batch.steps_per_generation} = {rows}",
    )
    require(
        cfg.vllm.vllm_max_model_length is None
        or cfg.vllm.vllm_max_model_length >= cfg.rollout.max_prompt_length + budget,
        f"vllm_max_model_length={cfg.vllm.vllm_max_model_length} must hold max_prompt_length + max_completion_length "
        f"= {cfg.rollout.max_prompt_length + budget}",
    )
    require(
        not (cfg.lora.use_peft and cfg.vllm.use_vllm and cfg.parallel.parallelism == "fsdp"),
        "--use_peft with --use_vllm needs --parallelism ddp: the merged weights are built from whole layers",
    )
    require(
        not (cfg.asynchronous.async_rollouts and cfg.vllm.use_vllm and cfg.vllm.vllm_mode == "colocate"),
        "--async_rollouts samples in another process while the trainer trains: use the HF engine (no --use_vllm) "
        "or --vllm_mode server, not the colocated vLLM engine",
    )
    return cfg
