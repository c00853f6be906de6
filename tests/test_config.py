"""TrainConfig: loss_type recipes, explicit options over recipes, --config files, and clear errors before any
work (bad options, bad data, missing golden column), checked through `python -m gcpo_fast.train`'s main."""

import json
import os
from typing import get_type_hints

import pytest
from tiny_model import write_jsonl

from gcpo_fast.config import TrainConfig, build_parser, parse_config
from gcpo_fast.errors import ConfigError
from gcpo_fast.models.loading import DEFAULT_MODEL, TOOL_MODEL
from gcpo_fast.train import main
from gcpo_fast.update import SHIPPED_MODEL_LR, SHIPPED_MODEL_WARMUP


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        (
            "gcpo",
            dict(
                importance_sampling_level="sequence",
                epsilon=3e-4,
                epsilon_high=4e-4,
                golden_answer="append",
                loss_agg_mode="seq-mean-token-mean",
                scale_rewards="group",
                dynamic_sampling=False,
                overlong_buffer_len=0,
            ),
        ),
        ("gspo", dict(importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, golden_answer="off")),
        (
            "grpo",
            dict(
                importance_sampling_level="token",
                epsilon=0.2,
                epsilon_high=0.2,
                golden_answer="off",
                loss_agg_mode="seq-mean-token-mean",
                scale_rewards="group",
            ),
        ),
        (
            "dapo",
            dict(
                importance_sampling_level="token",
                epsilon=0.2,
                epsilon_high=0.28,
                loss_agg_mode="token-mean",
                dynamic_sampling=True,
                overlong_buffer_len=128 // 5,
                golden_answer="off",
            ),
        ),
        ("dr_grpo", dict(scale_rewards="none", loss_agg_mode="seq-mean-token-sum-norm", golden_answer="off")),
        ("gpg", dict(scale_rewards="none", min_inverse_alpha=0.5, loss_agg_mode="token-mean", golden_answer="off")),
    ],
)
def test_recipes(loss_type, expected):
    cfg = parse_config(["--loss_type", loss_type])
    assert {k: cfg.to_dict()[k] for k in expected} == expected


def test_explicit_options_override_the_recipe():
    cfg = parse_config(
        [
            "--loss_type",
            "dapo",
            "--epsilon_high",
            "0.3",
            "--dynamic_sampling",
            "false",
            "--golden_answer",
            "replace",
            "--overlong_buffer_len",
            "0",
        ]
    )
    assert (
        cfg.method.epsilon,
        cfg.method.epsilon_high,
        cfg.method.dynamic_sampling,
        cfg.golden.golden_answer,
        cfg.method.overlong_buffer_len,
    ) == (
        0.2,
        0.3,
        False,
        "replace",
        0,
    )
    # TRL: epsilon alone sets both sides
    cfg = parse_config(["--loss_type", "gcpo", "--epsilon", "0.1"])
    assert (cfg.method.epsilon, cfg.method.epsilon_high, cfg.method.importance_sampling_level) == (0.1, 0.1, "sequence")
    # an option equal to the default but set explicitly still wins over the recipe
    assert parse_config(["--loss_type", "gpg", "--scale_rewards", "group"]).method.scale_rewards == "group"


def test_learning_rate_default_depends_on_the_model(tmp_path):
    assert parse_config([]).optim.learning_rate == SHIPPED_MODEL_LR  # the shipped model, however its path is written
    assert parse_config(["--model", os.path.relpath(DEFAULT_MODEL)]).optim.learning_rate == SHIPPED_MODEL_LR
    assert parse_config(["--model", os.path.relpath(TOOL_MODEL)]).optim.learning_rate == SHIPPED_MODEL_LR
    assert parse_config(["--model", str(tmp_path)]).optim.learning_rate == 1e-6  # any other model: TRL's default
    assert parse_config(["--learning_rate", "2e-5"]).optim.learning_rate == 2e-5


def test_warmup_default_depends_on_the_model(tmp_path):
    assert parse_config([]).optim.warmup_ratio == SHIPPED_MODEL_WARMUP > 0
    assert parse_config(["--model", str(tmp_path)]).optim.warmup_ratio == 0.0  # any other model: TRL's default
    assert parse_config(["--warmup_ratio", "0"]).optim.warmup_ratio == 0.0  # set, even to TRL's value, it wins


def test_polynomial_schedule_follows_its_power():
    """Warm-up, then (1 - progress) ** power down to 0 (not to transformers' default lr_end of 1e-7)."""
    import torch

    from gcpo_fast.update import build_optimizer

    cfg = parse_config(["--lr_scheduler_type", "polynomial", "--lr_scheduler_power", "2", "--warmup_ratio", "0.1"])
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, max_steps=100)
    lrs = []
    for _ in range(101):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = cfg.optim.learning_rate
    want = [peak * t / 10 if t < 10 else peak * (1 - (t - 10) / 90) ** 2 for t in range(101)]
    assert lrs == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert lrs[55] == pytest.approx(peak / 4)  # half-way through the decay: a quarter, where linear has a half
    with pytest.raises(ConfigError, match="lr_scheduler_power takes effect only with --lr_scheduler_type polynomial"):
        parse_config(["--lr_scheduler_power", "2"])


def test_builtin_levels_are_checked():
    assert parse_config(["--builtin_levels", "3", "5", "5"]).data.builtin_levels == [3, 5, 5]
    with pytest.raises(ConfigError, match="builtin_levels must be levels 1 to 8"):
        parse_config(["--builtin_levels", "0", "9"])


def test_config_file_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "loss_type: dapo\nlearning_rate: 1e-6\nepsilon_high: 0.25\nreward_funcs: accuracy_reward\n"
    )
    cfg = parse_config(["--config", str(tmp_path / "run.yaml"), "--epsilon_high", "0.3"])
    assert (cfg.method.loss_type, cfg.optim.learning_rate, cfg.method.epsilon_high, cfg.rewards.reward_funcs) == (
        "dapo",
        1e-6,
        0.3,
        ["accuracy_reward"],
    )
    (tmp_path / "run.json").write_text(json.dumps({"num_generations": 4, "per_device_train_batch_size": 8}))
    assert parse_config(["--config", str(tmp_path / "run.json")]).rollout.num_generations == 4
    (tmp_path / "bad.yaml").write_text("lerning_rate: 1e-6\n")
    with pytest.raises(ConfigError, match="unknown options lerning_rate"):
        parse_config(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "bad_type.yaml").write_text("loss_type: ppo\n")
    with pytest.raises(ConfigError, match="loss_type must be one of"):
        parse_config(["--config", str(tmp_path / "bad_type.yaml")])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_generations", "1"], "num_generations must be >= 2"),
        (["--num_generations", "3", "--per_device_train_batch_size", "8"], "num_generations=3 must divide"),
        (
            ["--steps_per_generation", "3", "--gradient_accumulation_steps", "2"],
            "must be a multiple of gradient_accumulation_steps",
        ),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--reward_funcs", "a", "b", "--reward_weights", "1"], "reward_weights has 1 values for 2"),
        (["--loss_type", "gspo", "--delta", "1.0001"], "delta must be a finite number > 1 \\+ epsilon_high = 1.0004"),
        (["--top_p", "0"], "top_p must be in"),
        (["--adam_beta2", "1"], r"adam_beta2 must be in \[0, 1\)"),  # AdamW would refuse it after the model loaded
        (["--weight_decay", "-0.1"], "weight_decay must be >= 0"),
        (["--all_right_advantage", "-0.1"], "all_right_advantage must be >= 0"),
        (["--lr_scheduler_type", "polynomial", "--lr_scheduler_power", "0"], "lr_scheduler_power must be > 0"),
    ],
)
def test_bad_options(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_report_to_needs_the_package(monkeypatch):
    monkeypatch.setattr("gcpo_fast.run.logger.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="report_to tensorboard: the tensorboard package is not installed"):
        parse_config(["--report_to", "tensorboard"])


def test_unknown_loss_type_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--loss_type", "ppo"])
    assert e.value.code == 2 and "invalid choice: 'ppo'" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in TrainConfig().to_dict():
        assert f"--{name}" in text
    for group in ("generation", "method and loss", "optimizer", "rollout engine", "golden answers", "checkpoints"):
        assert f"{group}:" in text  # grouped by component
    assert "(default: from --loss_type)" in text


# Errors on bad data come from main() before the model is loaded: the model path does not exist, so an
# error that named the data could only have come first.
MISSING_MODEL = ["--model", "/nonexistent/model", "--num_generations", "2", "--per_device_train_batch_size", "2"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ("malformed", "line 2: malformed JSON"),
        ([{"prompt": "1+1?"}], "no ground-truth answer: column 'solution'"),
        ([{"question": "1+1?", "solution": "\\boxed{2}"}], "missing prompt column 'prompt'"),
        ([], "empty dataset"),
    ],
)
def test_bad_data_fails_before_the_model_loads(tmp_path, capsys, rows, message):
    path = tmp_path / "train.jsonl"
    if rows == "malformed":
        path.write_text('{"prompt": "1+1?", "solution": "\\\\boxed{2}"}\n{"prompt": "2+2?", \n')
    else:
        write_jsonl(path, rows=rows)
    with pytest.raises(SystemExit) as e:
        main(MISSING_MODEL + ["--dataset", str(path), "--output_dir", str(tmp_path / "run")])
    assert message in str(e.value.code) and "/nonexistent/model" not in str(e.value.code)


def test_golden_column_is_optional_without_golden_answers(tmp_path):
    from gcpo_fast.prepare import prepare

    path = write_jsonl(tmp_path / "train.jsonl", rows=[{"prompt": "1+1?", "answer": "2"}] * 2)
    cfg = parse_config(
        [
            "--model",
            DEFAULT_MODEL,
            "--dataset",
            str(path),
            "--answer_column",
            "answer",
            "--loss_type",
            "grpo",
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert prepare(cfg).records[0]["golden"] is None


def test_missing_shipped_model_is_named(tmp_path, monkeypatch):
    from gcpo_fast.prepare import prepare

    monkeypatch.setattr("gcpo_fast.models.loading.DEFAULT_MODEL", str(tmp_path / "absent"))
    cfg = parse_config(["--dataset", str(write_jsonl(tmp_path / "train.jsonl")), "--output_dir", str(tmp_path)])
    cfg.model.model = str(tmp_path / "absent")
    with pytest.raises(ValueError, match="python -m gcpo_fast.make_default_model"):
        prepare(cfg)


def test_too_few_prompts_and_existing_run_fail_early(tmp_path):
    from gcpo_fast.prepare import prepare

    path = write_jsonl(tmp_path / "train.jsonl", n=3)
    cfg = parse_config(
        [
            "--model",
            DEFAULT_MODEL,
            "--dataset",
            str(path),
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    with pytest.raises(ValueError, match="takes 4 prompts x 1 processes, but the dataset has only 3"):
        prepare(cfg)
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-5" / "trainer_state.pt").write_bytes(b"")
    cfg = parse_config(
        [
            "--model",
            DEFAULT_MODEL,
            "--dataset",
            str(path),
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume"):
        prepare(cfg)


FLOAT_OPTIONS = [
    name
    for part in TrainConfig().parts()
    for name, tp in get_type_hints(type(part)).items()
    if tp in (float, float | None)
] + ["reward_weights"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_OPTIONS)
def test_non_finite_float_options_are_config_errors(name, value):
    # NaN passes range checks such as `temperature > 0` unnoticed: --correct_reward nan turned golden
    # answers off, --reward_weights nan zeroed every reward, --learning_rate inf destroyed the weights
    with pytest.raises(ConfigError, match=f"^{name} must be a finite number, got {value}$"):
        parse_config([f"--{name}={value}"])


def test_non_finite_values_from_a_config_file(tmp_path):
    (tmp_path / "run.yaml").write_text("max_grad_norm: .nan\n")
    with pytest.raises(ConfigError, match="max_grad_norm must be a finite number, got nan"):
        parse_config(["--config", str(tmp_path / "run.yaml")])
    (tmp_path / "run.json").write_text('{"reward_weights": [1.0, Infinity], "reward_funcs": ["a", "b"]}')
    with pytest.raises(ConfigError, match="reward_weights must be a finite number, got inf"):
        parse_config(["--config", str(tmp_path / "run.json")])


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--epsilon", "0.2"], "epsilon"),
        (["--epsilon_high", "0.28"], "epsilon_high"),
        (["--delta", "2"], "delta"),
        (["--importance_sampling_level", "sequence"], "importance_sampling_level"),
    ],
)
def test_gpg_refuses_the_clip_options_it_ignores(tmp_path, argv, name):
    # GPG's loss is -A * logp: no ratio, so a clip option would be accepted and do nothing (TRL's config
    # refuses options that cannot take effect); from a --config file too
    with pytest.raises(ConfigError, match=f"^{name}=.* has no effect with loss_type gpg"):
        parse_config(["--loss_type", "gpg"] + argv)
    (tmp_path / "run.yaml").write_text(f"loss_type: gpg\n{argv[0][2:]}: {argv[1]}\n")
    with pytest.raises(ConfigError, match=f"^{name}=.* has no effect with loss_type gpg"):
        parse_config(["--config", str(tmp_path / "run.yaml")])
    parse_config(["--loss_type", "grpo"] + argv)  # the other methods use them


def test_gpg_accepts_what_it_does_anyway():
    cfg = parse_config(["--loss_type", "gpg", "--epsilon", "0", "--importance_sampling_level", "token"])
    assert (cfg.method.epsilon, cfg.method.epsilon_high, cfg.method.delta, cfg.method.importance_sampling_level) == (
        0.0,
        0.0,
        None,
        "token",
    )


def test_vllm_options_are_checked_before_anything_loads():
    import importlib.util

    with pytest.raises(ConfigError, match="vllm_group_port must be a TCP port"):
        parse_config(["--vllm_mode", "server", "--vllm_group_port", "0"])
    cfg = parse_config(["--use_vllm", "--vllm_mode", "server", "--vllm_server_port", "8123"])  # no vLLM needed here
    assert cfg.vllm.server_url == "http://127.0.0.1:8123"  # the server listens there by default
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization must be in"):
        parse_config(["--vllm_gpu_memory_utilization", "1.5"])
    with pytest.raises(ConfigError, match="vllm_importance_sampling_clip_min/_max"):
        parse_config(["--vllm_importance_sampling_clip_min", "4", "--vllm_importance_sampling_clip_max", "3"])
    server = ["--use_vllm", "--vllm_mode", "server"]
    cfg = parse_config(
        [*server, "--vllm_importance_sampling_clip_max", "none", "--vllm_importance_sampling_mode", "token_mask"]
    )
    assert (cfg.vllm.vllm_importance_sampling_clip_max, cfg.vllm.vllm_importance_sampling_mode) == (None, "token_mask")
    if importlib.util.find_spec("vllm") is None:  # the main environment; CI's vLLM one runs it for real
        with pytest.raises(ConfigError, match="--use_vllm: vLLM is not installed"):
            parse_config(["--use_vllm"])
    else:
        assert parse_config(["--use_vllm"]).use_vllm


@pytest.mark.parametrize("text", ["max_steps: 8.9", "num_generations: yes", "eval_steps: '1e3'", "bf16: 2"])
def test_config_file_values_are_read_by_their_flags_type(tmp_path, text):
    # YAML reads 8.9 as a float and yes as a bool: neither may become an integer option silently (8 and 1)
    (tmp_path / "run.yaml").write_text(text + "\n")
    name = text.split(":")[0]
    with pytest.raises(ConfigError, match=f"option {name}: cannot read"):
        parse_config(["--config", str(tmp_path / "run.yaml")])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output_dir", ""], "output_dir must name a folder"),
        (["--seed", "-1"], r"seed must be in \[0, 2\*\*32\)"),
    ],
)
def test_run_options_fail_before_anything_loads(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_a_bool_flag_alone_means_true():
    assert parse_config(["--loss_type", "grpo", "--dynamic_sampling"]).method.dynamic_sampling is True
    assert parse_config(["--no_bf16"]).model.bf16 is False  # HfArgumentParser's complement of a true default
