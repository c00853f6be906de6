"""Finding 4 of issue 24: what --resume does with options that differ from the checkpoint's.
Options that may change (the learning rate, logging, evaluation, save cadence, max_steps...) take effect and are
recorded; options that define the run (the model, the loss, the dataset's content, G, ...) are refused in one
line naming each difference."""

import json

import pytest
import yaml
from tiny_model import make_tiny_model, write_jsonl

from gcpo_fast.config import TrainConfig, parse_config
from gcpo_fast.data.rewards import extract_answer
from gcpo_fast.prepare import prepare
from gcpo_fast.run.resume_policy import MAY_CHANGE, RUN_DEFINING
from gcpo_fast.train import train


def config(tmp_path, *extra):
    return parse_config(
        [
            "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "train.jsonl"),
            "--output_dir", str(tmp_path / "run"), "--num_generations", "2", "--per_device_train_batch_size", "4",
            "--max_completion_length", "8", "--max_steps", "2", "--save_steps", "2", "--eval_steps", "0",
            "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--loss_type", "dapo",
            "--dynamic_sampling", "false", *extra,
        ]
    )  # fmt: skip


def test_resume_applies_what_may_change_and_refuses_what_defines_the_run(tmp_path):
    make_tiny_model(tmp_path / "model")
    make_tiny_model(tmp_path / "other_model", seed=1)
    write_jsonl(tmp_path / "train.jsonl", n=8)
    train(config(tmp_path))

    # a new learning rate and max_steps on resume: step 3 runs at the new rate, and the record says so
    train(config(tmp_path, "--resume", "--learning_rate", "5e-3", "--max_steps", "3", "--save_steps", "1"))
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["learning_rate"]) for m in steps] == [(1, 1e-2), (2, 1e-2), (3, 5e-3)]
    recorded = yaml.safe_load((tmp_path / "run" / "checkpoint-3" / "train_config.yaml").read_text())
    assert recorded["learning_rate"] == 5e-3 and recorded["max_steps"] == 3

    # another model, loss and dataset of the same size: refused, each named
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    rows[0]["solution"] = rows[0]["solution"].replace("The answer", "So the answer")
    write_jsonl(tmp_path / "changed.jsonl", rows=rows)
    changed = config(
        tmp_path, "--resume", "--max_steps", "4", "--model", str(tmp_path / "other_model"), "--loss_type", "gcpo",
        "--dataset", str(tmp_path / "changed.jsonl"),
    )  # fmt: skip
    with pytest.raises(ValueError) as e:
        prepare(changed)
    message = str(e.value)
    assert "\n" not in message and "--model" in message and "--loss_type gcpo (the checkpoint's: dapo)" in message
    assert "the dataset's content" in message
    assert "--max_steps" not in message  # may change


def test_every_option_has_a_resume_rule():
    assert not MAY_CHANGE & RUN_DEFINING and MAY_CHANGE | RUN_DEFINING == set(TrainConfig().to_dict())


def test_an_edit_of_the_datasets_own_answer_column_is_seen_on_resume(tmp_path):
    """The reward checks the answer extracted from the solution; the dataset's own answer column, which that
    replaces, still belongs to the data a run trained on."""
    make_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", n=8)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "train.jsonl", rows=[{**r, "answer": extract_answer(r["solution"])} for r in rows])
    train(config(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    rows[0]["answer"] = "1000"
    write_jsonl(tmp_path / "train.jsonl", rows=rows)
    with pytest.warns(UserWarning, match="1 of 8 rows have an answer column that disagrees"):
        with pytest.raises(ValueError, match="the dataset's content"):
            prepare(config(tmp_path, "--resume", "--max_steps", "4"))
