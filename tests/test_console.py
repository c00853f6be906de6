"""A quiet terminal: one console line per evaluation (none per step), the progress bar's reward and held-out
figures, logging_steps at TRL's default, the closing summary naming curves.png, no bar per checkpoint."""

import dataclasses
import json

import pytest
from tiny_model import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from gcpo_fast.config import TrainConfig
from gcpo_fast.run.checkpoint import save_checkpoint
from gcpo_fast.run.logger import RunLogger
from gcpo_fast.run.progress import ProgressBar


def evaluation(mean, level_3, level_4):
    return {
        "eval/mean@1": mean,
        "eval/pass@1": mean,
        "eval/num_problems": 4,
        "eval/level_3/mean@1": level_3,
        "eval/level_3/num_problems": 2,
        "eval/level_4/mean@1": level_4,
        "eval/level_4/num_problems": 2,
    }


def step_metrics(step):
    return {"reward": 0.1 * step, "loss": 0.0, "completions/mean_length": 20.0 + step, "gcpo/golden_rows": step % 3}


def test_logging_steps_default_is_trls():
    trl = pytest.importorskip("trl")
    trls = next(f.default for f in dataclasses.fields(trl.GRPOConfig) if f.name == "logging_steps")
    assert TrainConfig().log.logging_steps == trls == 10


def test_one_line_per_evaluation_and_none_per_step(tmp_path, capsys):
    log = RunLogger(tmp_path, report_to=[], config={"loss_type": "gcpo"}, logging_steps=1, resume_step=None)
    log.metrics(0, evaluation(0.5, 1.0, 0.0))
    for step in range(1, 5):
        log.metrics(step, {**step_metrics(step), **(evaluation(0.75, 1.0, 0.5) if step == 4 else {})})
    log.close()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "step 0: held-out mean@1 0.500 (level 3 1.000, level 4 0.000)",
        "step 4: held-out mean@1 0.750 (level 3 1.000, level 4 0.500)",
    ]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_curves_drawn_at_each_evaluation_and_at_the_end(tmp_path):
    pytest.importorskip("matplotlib")
    log = RunLogger(tmp_path, report_to=[], config={}, logging_steps=10, resume_step=None)
    curves = tmp_path / "curves.png"
    log.metrics(0, evaluation(0.5, 1.0, 0.0))
    assert curves.exists()  # the first evaluation draws it
    drawn = curves.stat().st_mtime_ns
    log.metrics(1, step_metrics(1))
    assert curves.stat().st_mtime_ns == drawn  # a step without an evaluation does not
    log.metrics(2, step_metrics(2))
    log.close()  # the last step had no evaluation: the end draws the whole run
    assert curves.stat().st_mtime_ns > drawn
    assert f"curves: {curves}" in log.summary().splitlines()


def test_without_matplotlib_one_line_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` fails as if absent
    log = RunLogger(tmp_path, report_to=[], config={}, logging_steps=1, resume_step=None)
    log.metrics(0, evaluation(0.5, 1.0, 0.0))
    log.metrics(1, step_metrics(1))
    log.close()
    assert not (tmp_path / "curves.png").exists()
    summary = log.summary().splitlines()
    missing = [line for line in summary if "curves.png" in line]
    assert missing == [
        "curves.png: not drawn, matplotlib is not installed (pip install matplotlib, or pip install -e '.[plot]')"
    ]


def test_the_bar_carries_the_mean_reward_of_the_window_and_the_latest_held_out(tmp_path):
    bar = ProgressBar(10, 0, disable=False, logging_steps=2, start_metrics=evaluation(0.5, 1.0, 0.0))
    assert bar.bar.postfix == "reward=-, held_out=0.500"
    bar.step(1, {"reward": 0.2})
    assert bar.bar.postfix == "reward=-, held_out=0.500"  # no new figures between logging steps
    bar.step(2, {"reward": 0.4})
    assert bar.bar.postfix == "reward=0.300, held_out=0.500"  # the mean of steps 1-2
    bar.step(3, {"reward": 1.0, **evaluation(0.75, 1.0, 0.5)})  # an evaluation shows at once
    assert bar.bar.postfix == "reward=1.000, held_out=0.750"
    assert bar.bar.n == 3
    bar.close()


def test_a_checkpoint_draws_no_progress_bar(tmp_path, capfd):
    path = make_tiny_model(tmp_path / "model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    save_checkpoint(tmp_path / "run", 1, model, tokenizer, {"step": 1}, {"buffer": []}, config={})
    printed = capfd.readouterr()
    assert "Writing model shards" not in printed.err + printed.out
    assert hf_logging.is_progress_bar_enabled()  # only while saving
    assert (tmp_path / "run" / "checkpoint-1" / "model.safetensors").exists()
