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

A --config file is read with yaml's safe loader (or json) within bounds: at most MAX_CONFIG_VALUES values as
aliases expand them, MAX_CONFIG_DEPTH levels deep, MAX_VALUE_CHARS characters a value; an error quotes at most
SHOWN characters of a value. A null is the option's default, or None for an option that takes `none`
(TRL's `top_k: null`: no top-k). An option set away from its default whose enabling flag is missing (it would be
ignored) is refused naming that flag (refuse_ignored_options).
"""

import argparse
import dataclasses
import datetime
import json
import sys
import typing
from dataclasses import dataclass, field
from typing import get_type_hints

import yaml
from transformers import HfArgumentParser

from gcpo_fast.async_rollouts import AsyncConfig
from gcpo_fast.cli import HelpFormatter
from gcpo_fast.data.files import names_hub_dataset
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
from gcpo_fast.update import SHIPPED_MODEL_LR, SHIPPED_MODEL_WARMUP, OptimizerConfig


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


MAX_CONFIG_DEPTH = 8  # an option's value is a scalar or a list of them; a deeper file is a mistake or an attack
MAX_CONFIG_VALUES = 10_000  # values a file may expand to: YAML aliases repeat a list without its bytes
SHOWN = 60  # characters of a value quoted in an error line
MAX_CONFIG_BYTES = 1 << 20
MAX_VALUE_CHARS = 4096  # a path's limit (PATH_MAX): every value, echoed by the checks after, stays a line


class BoundedLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a file nested deeper than MAX_CONFIG_DEPTH while it composes it (its composer
    recurses once per level: a few thousand levels exhaust Python's stack)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_CONFIG_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def shown(value) -> str:
    """A value of a config file as an error line quotes it: its repr, cut to SHOWN characters (never expanded
    further: a YAML alias bomb's repr is gigabytes)."""
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'mapping'}"
    text = repr(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def check_expansion(path: str, values) -> None:
    """ConfigError unless the loaded file holds at most MAX_CONFIG_VALUES values, nested at most MAX_CONFIG_DEPTH
    deep, as aliases expand them (walked without recursion, stopping at the first bound passed)."""
    todo, count = [(values, 1)], 0
    while todo:
        value, depth = todo.pop()
        count += 1
        if count > MAX_CONFIG_VALUES or depth > MAX_CONFIG_DEPTH:
            what = f"more than {MAX_CONFIG_VALUES} values" if count > MAX_CONFIG_VALUES else "deeper nesting"
            raise ConfigError(
                f"--config {path}: expands to {what} than a file of options holds (YAML aliases?); "
                f"at most {MAX_CONFIG_VALUES} values, {MAX_CONFIG_DEPTH} levels deep"
            )
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        todo.extend((child, depth + 1) for child in children)


def nullable_options() -> set[str]:
    """The options whose type admits None (YAML null, the command line's `none`)."""
    return {
        name
        for part in PARTS.values()
        for name, tp in get_type_hints(part).items()
        if type(None) in typing.get_args(tp)
    }


def load_config_file(path: str, parser: ArgumentParser) -> dict:
    """The options of a YAML or JSON file, each read by its flag's own type (so `8.9` or `yes` is no integer).
    A null is None for an option that takes none, else the option's default (as if the line were absent)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path}: larger than {MAX_CONFIG_BYTES // 1024} KiB (a file of options is a few)")
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        values = json.loads(text) if kind == "JSON" else yaml.load(text, Loader=BoundedLoader)  # a SafeLoader
    except RecursionError:  # json's decoder recurses per level
        raise ConfigError(f"--config {path}: not valid {kind}: nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    except (ValueError, yaml.YAMLError) as e:  # ValueError: also an integer of more than 4300 digits
        raise ConfigError(f"--config {path}: not valid {kind}: {' '.join(str(e).split())[:200]}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    check_expansion(path, values)
    # each option's own flag (not its --no_ complement)
    actions = {
        a.dest: a for a in parser._actions if f"--{a.dest}" in a.option_strings and a.dest not in ("config", "help")
    }
    unknown = sorted(map(str, set(values) - set(actions)))
    if unknown:
        names = ", ".join(name[:SHOWN] for name in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise ConfigError(f"--config {path}: unknown options {names} (see --help)")
    nullable = nullable_options()
    return {
        name: _read(path, actions[name], value)
        for name, value in values.items()
        if value is not None or name in nullable
    }


def _read(path: str, action: argparse.Action, value):
    if value is None:
        return None
    many = action.nargs == "+"
    items = value if many and isinstance(value, list) else [value]
    if isinstance(value, list) and not many:
        raise ConfigError(f"--config {path}: option {action.dest} takes one value, got a list")
    out = []
    for item in items:
        if isinstance(item, (dict, list)) or item is None:
            what = "null" if item is None else shown(item)
            raise ConfigError(f"--config {path}: option {action.dest}: {what} is not a single value")
        if not isinstance(item, (str, int, float, datetime.date)):  # YAML's !!binary, !!set, ...: no option's type
            raise ConfigError(
                f"--config {path}: option {action.dest}: a value of YAML type {type(item).__name__} is no option's "
                "value"
            )
        if isinstance(item, bool) and action.type in (None, str):  # YAML reads yes, no, on, off as booleans
            raise ConfigError(
                f"--config {path}: option {action.dest} takes text, got the YAML boolean {str(item).lower()} "
                "(quote it to mean the word)"
            )
        text = str(item).lower() if isinstance(item, bool) else str(item)
        if len(text) > MAX_VALUE_CHARS:
            raise ConfigError(
                f"--config {path}: option {action.dest}: a value of {len(text)} characters (at most {MAX_VALUE_CHARS})"
            )
        try:
            converted = action.type(text) if action.type else text
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            kind = getattr(action.type, "__name__", "value").replace("string_to_bool", "bool")
            raise ConfigError(f"--config {path}: option {action.dest}: cannot read {shown(item)} as {kind}") from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigError(
                f"{action.dest} must be one of {', '.join(map(str, action.choices))}, got {shown(converted)}"
            )
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
    """Fill what depends on several components (the method's recipe, the shipped model's learning rate and
    warm-up, the teacher's budget) and check the combinations; each component has already checked itself."""
    budget = cfg.rollout.max_completion_length
    cfg.method = cfg.method.resolved(max_completion_length=budget)
    if cfg.optim.learning_rate is None:
        # a 1M-parameter model needs a far larger step than the billion-parameter models TRL's 1e-6 is for
        cfg.optim = dataclasses.replace(cfg.optim, learning_rate=SHIPPED_MODEL_LR if cfg.model.is_shipped else 1e-6)
    if cfg.optim.warmup_ratio is None:
        cfg.optim = dataclasses.replace(cfg.optim, warmup_ratio=SHIPPED_MODEL_WARMUP if cfg.model.is_shipped else 0.0)
    refuse_ignored_options(cfg)
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


LORA_OPTIONS = [f.name for f in dataclasses.fields(PeftOptions) if f.name != "use_peft"]
SERVER_OPTIONS = ["vllm_server_host", "vllm_server_port", "vllm_server_base_url", "vllm_group_port"]
CORRECTION_OPTIONS = [f.name for f in dataclasses.fields(VLLMConfig) if f.name.startswith("vllm_importance_sampling")]


def refuse_ignored_options(cfg: TrainConfig) -> None:
    """ConfigError naming the options set away from their defaults whose enabling flag is missing: each would be
    ignored without a word. (A value equal to the default is no sign of intent, and a run's own
    train_config.yaml, given back as --config, holds every option.) `cfg.method` is resolved."""
    v, method, golden, data = cfg.vllm, cfg.method, cfg.golden, cfg.data
    server = v.use_vllm and v.vllm_mode == "server"
    teacher_budget = (
        []
        if golden.golden_max_completion_length in (None, cfg.rollout.max_completion_length)
        else ["golden_max_completion_length"]
    )
    builtin = "builtin" in (data.dataset, cfg.eval.eval_dataset)
    train_hub, eval_hub = (
        name is not None and names_hub_dataset(name) for name in (data.dataset, cfg.eval.eval_dataset)
    )
    files = data.dataset != "builtin" or cfg.eval.eval_dataset not in (None, "builtin")
    rules = [  # (the options, whether what enables them is on, what enables them)
        (_changed(cfg.lora, LORA_OPTIONS), cfg.lora.use_peft, "--use_peft"),
        (_changed(v, ["vllm_mode"]), v.use_vllm, "--use_vllm"),
        (
            _changed(cfg.optim, ["lr_scheduler_power"]),
            cfg.optim.lr_scheduler_type == "polynomial",
            "--lr_scheduler_type polynomial",
        ),
        (
            _changed(v, ["vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "vllm_max_model_length"]),
            v.use_vllm and v.vllm_mode == "colocate",
            "--use_vllm in colocate mode (a generation server has its own)",
        ),
        (_changed(v, SERVER_OPTIONS), server, "--use_vllm --vllm_mode server"),
        (
            _changed(v, ["vllm_server_timeout"]),
            server or cfg.asynchronous.async_rollouts,
            "--vllm_mode server or --async_rollouts",
        ),
        (
            _changed(v, CORRECTION_OPTIONS),
            v.use_vllm or cfg.asynchronous.async_rollouts,
            "--use_vllm or --async_rollouts (an engine that samples elsewhere, with log-probs of its own)",
        ),
        (
            _changed(cfg.asynchronous, ["max_staleness", "weight_sync_steps"]),
            cfg.asynchronous.async_rollouts,
            "--async_rollouts",
        ),
        (
            _changed(golden, ["golden_num_candidates", "golden_temperature"]) + teacher_budget,
            golden.golden_model is not None,
            "--golden_model (a teacher that samples candidates)",
        ),
        (_changed(golden, ["golden_shaping_gamma"]), golden.golden_objective == "shaped", "--golden_objective shaped"),
        (
            _changed(method, ["max_num_gen_batches"]),
            method.dynamic_sampling or method.min_inverse_alpha > 0,
            "--dynamic_sampling or --min_inverse_alpha > 0 (DAPO's or GPG's sampling rule)",
        ),
        (_changed(method, ["overlong_penalty_factor"]), method.overlong_buffer_len > 0, "--overlong_buffer_len > 0"),
        (_changed(data, ["builtin_num_problems"]), data.dataset == "builtin", "--dataset builtin"),
        (_changed(data, ["dataset_split"]), train_hub, "a --dataset that names a hub dataset"),
        (
            _changed(data, ["dataset_config"]),
            train_hub or eval_hub,
            "a --dataset or --eval_dataset that names a hub dataset",
        ),
        (_changed(data, ["builtin_levels"]), builtin, "--dataset builtin or --eval_dataset builtin"),
        (
            _changed(data, ["prompt_column", "golden_column", "answer_column"]),
            files,
            "a --dataset or --eval_dataset that is not builtin",
        ),
        (
            _changed(cfg.tools, ["max_tool_calling_iterations", "tool_timeout", "tool_memory_mb"])
            + _changed(cfg.tools, ["tool_max_output_bytes", "tool_workers"]),
            cfg.tools.enabled,
            "--tools",
        ),
        (
            _changed(cfg.eval, ["eval_dataset", "eval_num_problems", "eval_num_samples"]),
            cfg.eval.eval_steps > 0,
            "--eval_steps > 0",
        ),
    ]
    for names, enabled, flag in rules:
        require(
            enabled or not names,
            f"{', '.join(f'--{n}' for n in names)} take{'s' if len(names) == 1 else ''} effect only with {flag}, "
            "which is not given: add it, or leave the option out",
        )


def _changed(options, names: list[str]) -> list[str]:
    """The named options whose value differs from the component's default."""
    defaults = {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(options)
    }
    return [name for name in names if getattr(options, name) != defaults[name]]
