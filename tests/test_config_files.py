"""What a --config file and the flags around it may not do: expand without bound (YAML aliases, deep nesting),
make an error line of megabytes, turn a null into a traceback or top-k 50, turn `yes` into a folder named true;
and options that would be ignored without their enabling flag, refused naming that flag."""

import json
import subprocess
import sys
import typing

import pytest
from tiny_model import child_env

from gcpo_fast.config import (
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_VALUES,
    SHIPPED_MODEL_LR,
    TrainConfig,
    build_parser,
    parse_config,
)
from gcpo_fast.engines.base import RolloutConfig
from gcpo_fast.errors import ConfigError


def config_error(tmp_path, text: str, name: str = "run.yaml") -> str:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(tmp_path / name)])
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message[:1000]
    return message


def alias_bomb(levels: int, width: int = 9) -> str:
    """A few hundred bytes of YAML whose reward_funcs expands to more than width ** levels names: its first item
    is a list of lists, each of width aliases of the one before."""
    lines = ["reward_funcs:", f"- - &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9])  # 320 bytes (a 3 MB error line before), 500 (gigabytes)
def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, levels):
    assert len(alias_bomb(levels)) < 600
    message = config_error(tmp_path, alias_bomb(levels))
    assert "than a file of options holds (YAML aliases?); " in message
    assert f"at most {MAX_CONFIG_VALUES} values, {MAX_CONFIG_DEPTH} levels deep" in message


def test_a_yaml_alias_bomb_on_the_command_line_is_one_line_at_once(tmp_path):
    (tmp_path / "bomb.yaml").write_text(alias_bomb(6))
    done = subprocess.run(
        [sys.executable, "-m", "gcpo_fast.train", "--config", str(tmp_path / "bomb.yaml")],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[:2000]
    assert len(done.stderr) < 500, f"an error line of {len(done.stderr)} characters"


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_deep_nesting_is_refused_in_one_line(tmp_path, kind):
    deep = "[" * 5000 + "]" * 5000
    text = f"reward_funcs: {deep}\n" if kind == "yaml" else json.dumps({"reward_funcs": 0}).replace("0", deep)
    assert "nested deeper than" in config_error(tmp_path, text, f"run.{kind}")


def test_error_lines_quote_at_most_a_few_dozen_characters_of_a_value(tmp_path):
    long = "x" * 100_000
    assert "unknown options xxxxx" in config_error(tmp_path, json.dumps({long: 1}), "run.json")  # (YAML: 1024 at most)
    assert "a value of 100000 characters (at most 4096)" in config_error(tmp_path, f"output_dir: {long}\n")
    assert "cannot read 'yyyyy" in config_error(tmp_path, f"max_steps: {'y' * 3000}\n")
    assert "is not a single value" in config_error(tmp_path, f"reward_funcs: [[{', '.join(['z'] * 5000)}]]\n")


# the options whose type admits None: a null is None for them (as the command line's `none`), else the default
NULLABLE = {
    name
    for part in TrainConfig().parts()
    for name, tp in typing.get_type_hints(type(part)).items()
    if type(None) in typing.get_args(tp)
}


def option_names() -> list[str]:
    return sorted(
        a.dest
        for a in build_parser()._actions
        if f"--{a.dest}" in a.option_strings and a.dest not in ("config", "help")
    )


@pytest.mark.parametrize("name", option_names())
def test_a_null_is_the_default_or_none_never_a_traceback(tmp_path, name):
    (tmp_path / "run.yaml").write_text(f"{name}: null\n")
    default = parse_config([])
    try:
        cfg = parse_config(["--config", str(tmp_path / "run.yaml")])
    except ConfigError as e:  # allowed: a refusal in one line
        assert "\n" not in str(e)
        return
    got, expected = cfg.to_dict()[name], default.to_dict()[name]
    assert got == expected or (got is None and name in NULLABLE), (name, got, expected)  # (`none` of the flag)


def test_max_steps_null_is_the_default_before_anything_loads(tmp_path):
    (tmp_path / "run.yaml").write_text("max_steps: null\nsave_total_limit: null\n")
    cfg = parse_config(["--config", str(tmp_path / "run.yaml")])
    assert (cfg.run.max_steps, cfg.checkpoint.save_total_limit) == (500, None)


def test_top_k_null_means_no_top_k_never_fifty(tmp_path):
    (tmp_path / "trl.yaml").write_text("top_k: null\ntop_p: 1.0\n")  # a TRL GRPOConfig's defaults
    cfg = parse_config(["--config", str(tmp_path / "trl.yaml")])
    assert cfg.rollout.top_k == 0 and cfg.rollout.sampling.top_k == 0
    assert RolloutConfig(top_k=None).sampling.top_k == 0  # the Python API: TRL's None is off too


def test_a_yaml_boolean_is_no_folder_name(tmp_path):
    message = config_error(tmp_path, "output_dir: yes\n")
    assert "option output_dir takes text, got the YAML boolean true (quote it to mean the word)" in message
    (tmp_path / "quoted.yaml").write_text("output_dir: 'yes'\n")
    assert parse_config(["--config", str(tmp_path / "quoted.yaml")]).run.output_dir == "yes"


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--vllm_mode", "server"], "--vllm_mode takes effect only with --use_vllm, which is not given"),
        (["--max_staleness", "2"], "--max_staleness takes effect only with --async_rollouts"),
        (
            ["--weight_sync_steps", "1", "--max_staleness", "3"],
            "--max_staleness takes effect only with --async_rollouts",
        ),
        (["--lora_r", "8", "--lora_alpha", "16"], "--lora_r, --lora_alpha take effect only with --use_peft"),
        (["--use_rslora"], "--use_rslora takes effect only with --use_peft"),
        (["--vllm_server_port", "9000"], "--vllm_server_port takes effect only with --use_vllm --vllm_mode server"),
        (["--vllm_gpu_memory_utilization", "0.5"], "takes effect only with --use_vllm in colocate mode"),
        (
            ["--use_vllm", "--vllm_mode", "server", "--vllm_max_model_length", "4096"],
            "--vllm_max_model_length takes effect only with --use_vllm in colocate mode",
        ),
        (["--vllm_importance_sampling_mode", "token_mask"], "takes effect only with --use_vllm or --async_rollouts"),
        (["--vllm_server_timeout", "30"], "--vllm_server_timeout takes effect only with --vllm_mode server or --async"),
        (["--golden_temperature", "0.5"], "--golden_temperature takes effect only with --golden_model"),
        (["--golden_shaping_gamma", "0.2"], "--golden_shaping_gamma takes effect only with --golden_objective shaped"),
        (["--max_num_gen_batches", "3"], "--max_num_gen_batches takes effect only with --dynamic_sampling or"),
        (["--overlong_penalty_factor", "2"], "--overlong_penalty_factor takes effect only with --overlong_buffer_len"),
        (["--prompt_column", "question"], "--prompt_column takes effect only with a --dataset or --eval_dataset that"),
        (["--dataset_config", "main"], "--dataset_config takes effect only with a --dataset or --eval_dataset that"),
        (["--eval_steps", "0", "--eval_num_problems", "9"], "--eval_num_problems takes effect only with --eval_steps"),
        (["--tool_timeout", "3"], "--tool_timeout takes effect only with --tools"),
    ],
)
def test_an_option_without_its_enabling_flag_is_refused_naming_it(argv, named):
    with pytest.raises(ConfigError, match="^" + "[^\n]*" + named.replace("-", r"\-")):
        parse_config(argv)


def test_an_enabled_option_or_a_default_value_is_accepted(tmp_path):
    assert parse_config(["--async_rollouts", "--max_staleness", "2"]).asynchronous.max_staleness == 2
    assert parse_config(["--use_peft", "--lora_alpha", "16"]).lora.lora_alpha == 16
    assert parse_config(["--loss_type", "dapo", "--max_num_gen_batches", "3"]).method.max_num_gen_batches == 3
    assert parse_config(["--lora_r", "16", "--max_staleness", "1"]).lora.lora_r == 16  # the defaults: no intent
    written = parse_config(["--output_dir", str(tmp_path)])  # a run's own train_config.yaml, given back
    (tmp_path / "train_config.yaml").write_text(json.dumps(written.to_dict()))
    assert parse_config(["--config", str(tmp_path / "train_config.yaml")]).to_dict() == written.to_dict()


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000", "http://", "http://host:99999", "ftp://h:1"])
def test_a_server_url_without_a_scheme_or_host_is_refused_at_once(url):
    with pytest.raises(ConfigError, match="vllm_server_base_url must be a URL with its scheme and host"):
        parse_config(["--use_vllm", "--vllm_mode", "server", "--vllm_server_base_url", url])


def test_the_learning_rates_help_names_the_shipped_models_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"AdamW learning rate (default: {SHIPPED_MODEL_LR:g} for the shipped" in text
    assert parse_config([]).optim.learning_rate == SHIPPED_MODEL_LR


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("run.json", '{"max_steps": ' + "9" * 5000 + "}", "not valid JSON: Exceeds the limit (4300 digits)"),
        ("run.yaml", "max_steps: " + "9" * 5000, "not valid YAML: Exceeds the limit (4300 digits)"),
        ("run.yaml", "output_dir: !!binary aGVsbG8=", "option output_dir: a value of YAML type bytes is no option's"),
        ("run.yaml", "help: true", "unknown options help"),
        ("run.yaml", "reward_funcs: [accuracy_reward, null]", "option reward_funcs: null is not a single value"),
        ("run.yaml", "# " + "x" * (1 << 20), "larger than 1024 KiB (a file of options is a few)"),
    ],
)
def test_what_else_a_config_file_may_hold_is_one_line(tmp_path, name, text, message):
    assert message in config_error(tmp_path, text, name)
