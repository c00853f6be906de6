"""A generation round (gcpo_fast/rounds.py) on a tiny random model: golden rows for all-wrong groups (and not for
golden answers that do not fit), solved groups' --all_right_advantage, the builtin data, masked truncated rows,
old log-probs only for a reused round, DAPO's and GPG's sampling rules."""

import pytest
import torch
from trainer_steps import logprobs, one_round, setup, split_steps

from gcpo_fast.config import parse_config
from gcpo_fast.data.prompts import encode_completion
from gcpo_fast.data.sources import load_records
from gcpo_fast.engines.base import Rows
from gcpo_fast.packing import pack


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_golden_rows_for_all_wrong_groups(files, mode):
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--reward_funcs", "tiny_model:zero_reward", "--golden_answer", mode
    )
    sampled, rows, metrics, samples = one_round(cfg, model, tokenizer, sampler, funcs)
    P, G = 2, 4
    size = G + 1 if mode == "append" else G
    assert len(rows.completion_ids) == P * size
    assert metrics["gcpo/golden_rows"] == P and metrics["gcpo/frac_all_wrong"] == 1.0
    assert metrics["reward"] == 0.0  # golden rows stay out of the rollout statistics
    for p, record in enumerate(sampled.records):
        golden = rows.completion_ids[p * size + size - 1]
        ids, _ = encode_completion(tokenizer, record["golden"], cfg.rollout.max_completion_length)
        assert (
            golden == ids == tokenizer(record["golden"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        )
        assert rows.prompt_ids[p * size + size - 1] == sampled.rows.prompt_ids[p * G]  # the rollouts' own prompt ids
        assert rows.completion_ids[p * size] == sampled.rows.completion_ids[p * G]
        adv = rows.advantages[p * size : (p + 1) * size]
        assert adv[-1] > 0 and (adv[:-1] < 0).all()
    assert [s["golden"] for s in samples] == [False, True, False, True]
    assert metrics["gcpo/golden_truncated"] == 0
    short = encode_completion(tokenizer, "\\boxed{2}", 64)
    assert short == (tokenizer("\\boxed{2}", add_special_tokens=False).input_ids + [tokenizer.eos_token_id], False)


def test_all_right_groups_get_the_all_right_advantage(files, one_thread):
    """A group baseline leaves solved groups at 0; --all_right_advantage gives each of their rollouts that much."""
    for value in ("0", "0.3"):
        cfg, model, tokenizer, sampler, funcs = setup(
            files, "--reward_funcs", "tiny_model:one_reward", "--all_right_advantage", value
        )
        sampled, rows, metrics, samples = one_round(cfg, model, tokenizer, sampler, funcs)
        assert len(rows) == 2 * 4 and metrics["gcpo/golden_rows"] == 0 and metrics["frac_reward_all_right"] == 1.0
        assert rows.advantages.tolist() == pytest.approx([float(value)] * 8), value


def test_golden_answers_that_do_not_fit_are_not_used(files, one_thread):
    """A golden answer cut to the budget would lose its \\boxed{} answer yet train as correct: it is dropped,
    counted and warned about, and samples.jsonl never shows a golden row that was not trained on."""
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--reward_funcs", "tiny_model:zero_reward", "--max_completion_length", "8"
    )
    with pytest.warns(UserWarning, match="golden answers longer than max_completion_length=8"):
        sampled, rows, metrics, samples = one_round(cfg, model, tokenizer, sampler, funcs)
    assert len(rows) == 2 * 4 and metrics["gcpo/golden_rows"] == 0 and metrics["gcpo/golden_truncated"] == 2
    assert not any(s["golden"] for s in samples) and rows.advantages.abs().max() == 0


def test_builtin_dataset():
    train = load_records("builtin", split="train", num_problems=50, seed=1)
    test = load_records("builtin", split="test", num_problems=50)
    assert len(train) == len(test) == 50
    assert len({r["prompt"] for r in test}) == 50  # evaluation never counts a problem twice
    assert all(r["golden"] == r["solution"] and r["golden"].endswith(f"\\boxed{{{r['answer']}}}") for r in train)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_masked_truncated_rows_have_no_targets():
    mb = Rows([[1, 2], [3]], [[4, 5, 6], [7, 8]], [True, False], ["", ""], advantages=torch.zeros(2))
    assert pack(mb, True).targets.tolist() == [-100, -100, -100, 7, 8]
    assert pack(mb, False).targets.tolist() == [4, 5, 6, 7, 8]
    assert pack(mb, True).num_counted_tokens == 2


def test_old_logprobs_only_when_a_round_is_reused(files, one_thread):
    cfg, model, tokenizer, sampler, funcs = setup(files)
    _, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    assert all(mb.old_logp is None for step in split_steps(cfg, rows, model) for mb in step)
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--per_device_train_batch_size", "4", "--steps_per_generation", "2"
    )
    _, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    steps = split_steps(cfg, rows, model)
    assert len(steps) == 2 and all(len(s) == 1 for s in steps)
    for (mb,) in steps:  # teacher-forced log-probs of the behaviour policy, golden rows included
        assert mb.old_logp.shape == (mb.targets.numel(),)
        torch.testing.assert_close(mb.old_logp, logprobs(model, mb, cfg))
    assert len(split_steps(parse_config(["--num_iterations", "3"]), rows, model)) == 3


def test_dapo_dynamic_sampling_keeps_groups_with_varied_rewards(files, one_thread):
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--loss_type", "dapo", "--reward_funcs", "tiny_model:even_answer_reward", "--overlong_buffer_len", "0"
    )
    sampled, rows, metrics, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    even = [int(r["answer"]) % 2 == 0 for r in sampled.records]
    assert sampled.keep == [p for p, e in enumerate(even) if e][:2]  # the first two with a signal
    assert sum(even[:-2]) < 2 <= sum(even)  # no more batches than needed (2 prompts per batch)
    assert metrics["num_gen_batches"] == len(even) // 2
    assert len(rows.completion_ids) == 8 and rows.advantages.abs().min() > 0
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--loss_type", "dapo", "--reward_funcs", "tiny_model:zero_reward", "--max_num_gen_batches", "3"
    )
    with pytest.raises(RuntimeError, match="after 3 generation batches"):
        one_round(cfg, model, tokenizer, sampler, funcs)


def test_gpg_samples_more_until_enough_rows_are_valid(files, one_thread):
    cfg, model, tokenizer, sampler, funcs = setup(
        files,
        "--loss_type",
        "gpg",
        "--reward_funcs",
        "tiny_model:even_answer_reward",
        "--min_inverse_alpha",
        "0.99",
        "--max_num_gen_batches",
        "2",
    )
    sampled, rows, metrics, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    even = [int(r["answer"]) % 2 == 0 for r in sampled.records]
    # stops when every group is valid or after 2 batches; keeps every group (2 prompts x 4 rows per batch)
    assert metrics["num_gen_batches"] == (1 if all(even[:2]) else 2) == len(even) // 2
    assert len(rows.completion_ids) == 4 * len(even)
    assert metrics["gpg/alpha"] == pytest.approx(len(even) / sum(even))  # B / (B - M) in rows
