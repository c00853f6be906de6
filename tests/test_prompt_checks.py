"""The cost items of issue 24: prompts longer than --max_prompt_length are counted before the model loads, a huge
prompt is not written whole to samples.jsonl, and a round whose completions mostly hit --max_completion_length
is warned about with the number (TRL #5697's first-run trap)."""

import json
import warnings

import pytest
from tiny_model import make_tokenizer

from gcpo_fast.data import prompt_checks
from gcpo_fast.data.prompt_checks import check_prompts, warn_if_mostly_truncated
from gcpo_fast.run.logger import SAMPLE_CHARS, RunLogger


def test_prompts_longer_than_the_budget_are_counted():
    tokenizer = make_tokenizer()
    records = [{"prompt": "What is 1 + 2?"}] * 5 + [{"prompt": "What is 1 + 2? " * 40}] * 3
    with pytest.warns(UserWarning, match=r"train: 3 of 8 prompts are longer than max_prompt_length=32 tokens"):
        check_prompts(tokenizer, {"train": records}, max_prompt_length=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompts(tokenizer, {"train": records[:5]}, max_prompt_length=32)  # none: no warning


def test_a_huge_prompt_is_cut_in_samples_jsonl(tmp_path):
    log = RunLogger(tmp_path, report_to=[], config={}, logging_steps=1, resume_step=None)
    huge = "x" * 10**6
    log.samples(1, [{"prompt": huge, "completion": "ok", "reward": 1.0}])
    row = json.loads((tmp_path / "samples.jsonl").read_text())
    assert len(row["prompt"]) < SAMPLE_CHARS + 100 and f"{10**6 - SAMPLE_CHARS} characters cut" in row["prompt"]
    assert row["completion"] == "ok" and row["reward"] == 1.0


def test_mostly_truncated_completions_are_warned_about_once_with_the_number(monkeypatch):
    monkeypatch.setattr(prompt_checks, "_warned_truncation", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_mostly_truncated([True, True, False, False], 128)  # half: fine
    with pytest.warns(UserWarning, match="3 of 4 completions of this round reached max_completion_length=128"):
        warn_if_mostly_truncated([True, True, True, False], 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_mostly_truncated([True, True, True, True], 128)  # once per run


def test_a_long_prompt_is_cut_before_tokenising_to_the_same_last_tokens():
    from gcpo_fast.data.prompts import CHARS_PER_TOKEN, encode_prompts

    tokenizer = make_tokenizer(chat_template=False)
    prompt = " ".join(f"What is {i} + {i % 7}?" for i in range(2000))  # 34k characters
    assert len(prompt) > 32 * CHARS_PER_TOKEN * 10
    whole = tokenizer(prompt).input_ids
    assert encode_prompts(tokenizer, [prompt], 32) == [whole[-32:]]
