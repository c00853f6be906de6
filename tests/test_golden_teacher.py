"""Golden answers from a teacher, one round at a time: the teacher (another tokenizer and chat template, see
tests/golden_setup.py) answers every all-wrong group of the random policy. Verified answers only, re-encoded with
the policy's template, the right advantage, candidates that fail or a teacher that errors on one prompt, and the
teacher's options checked."""

import pytest
from golden_setup import N, answers_only, boxed_answer, cache_lines, one_round, setup
from tiny_model import problem, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from gcpo_fast.config import parse_config
from gcpo_fast.data.prompts import encode_prompts
from gcpo_fast.data.rewards import extract_answer, math_reward
from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.errors import ConfigError
from gcpo_fast.golden.teacher import prompt_key
from gcpo_fast.prepare import prepare
from gcpo_fast.rounds import build_rows


def test_the_teacher_is_a_different_tokenizer_that_solves_the_problems(golden_models, one_thread):
    """The premise of the tests below: another vocabulary and template, and every problem solved greedily."""
    policy, teacher = golden_models
    p_tok, t_tok = AutoTokenizer.from_pretrained(policy), AutoTokenizer.from_pretrained(teacher)
    text = problem(3)["solution"]
    assert p_tok(text, add_special_tokens=False).input_ids != t_tok(text, add_special_tokens=False).input_ids
    assert p_tok.eos_token_id != t_tok.eos_token_id
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(teacher), t_tok)
    out = engine.generate(
        encode_prompts(t_tok, [problem(i)["prompt"] for i in range(N)], 256), 1, Sampling(40, greedy=True)
    )
    assert math_reward(out.texts, [extract_answer(problem(i)["solution"]) for i in range(N)]) == [1.0] * N


def test_a_correct_answer_is_reencoded_for_the_policy_appended_and_cached(golden_models, tmp_path, one_thread):
    cfg, model, tokenizer, gold, sampler, funcs = setup(golden_models, tmp_path)
    assert cfg.golden.golden_source == "dataset_then_teacher"  # the default once a teacher is given
    ctx, sampled, rows, metrics = one_round(cfg, model, tokenizer, gold, sampler, funcs)
    P, G = 2, 4
    assert metrics["gcpo/frac_all_wrong"] == 1.0  # a random policy: every group all wrong, the teacher is asked
    assert metrics["gcpo/golden_rows"] == metrics["gcpo/golden_from_teacher"] == P
    assert (
        metrics["gcpo/golden_cache_hits"] == metrics["gcpo/teacher_no_correct"] == metrics["gcpo/teacher_errors"] == 0
    )
    entries = cache_lines(tmp_path / "run")
    assert [e["prompt_key"] for e in entries] == [prompt_key(r["prompt"]) for r in sampled.records]
    t_tok = AutoTokenizer.from_pretrained(golden_models[1])
    for p, (record, entry) in enumerate(zip(sampled.records, entries)):
        text = entry["golden"]
        assert boxed_answer(None, [text], [record["answer"]]) == [1.0]  # verified by the run's reward
        golden = rows.completion_ids[p * (G + 1) + G]
        # the policy's tokens, not the teacher's, after the policy's own prompt ids (its template)
        assert golden == tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert golden[:-1] != t_tok(text, add_special_tokens=False).input_ids
        prompt = rows.prompt_ids[p * (G + 1) + G]
        assert prompt == sampled.rows.prompt_ids[p * G] and tokenizer.decode(prompt).endswith("<|assistant|>")
        # G wrong rollouts and a correct golden row: A = G / sqrt(G + 1) for it, -1 / sqrt(G + 1) for each rollout
        adv = rows.advantages[p * (G + 1) : (p + 1) * (G + 1)]
        assert adv[-1].item() == pytest.approx(G / (G + 1) ** 0.5, rel=1e-3)
        assert adv[:-1].tolist() == pytest.approx([-1 / (G + 1) ** 0.5] * G, rel=1e-3)
    # the teacher generated from its own template
    assert "[INST]" in t_tok.decode(encode_prompts(t_tok, [sampled.records[0]["prompt"]], 256)[0])

    # the second encounter: from the cache, the teacher not run again (no new line)
    rows2, _, metrics2 = build_rows(ctx, sampled)
    assert metrics2["gcpo/golden_cache_hits"] == metrics2["gcpo/golden_from_teacher"] == P
    assert cache_lines(tmp_path / "run") == entries
    assert rows2.completion_ids == rows.completion_ids


@pytest.mark.parametrize("case", ["reward", "budget"])
def test_a_teacher_answer_that_fails_is_never_used(golden_models, tmp_path, case):
    """Candidates the reward calls wrong, or cut by the teacher's budget (no EOS), give no golden row."""
    argv = (
        ["--reward_funcs", "golden_setup:never_correct"]
        if case == "reward"
        else ["--golden_max_completion_length", "4"]
    )  # the solutions are longer: every candidate is cut
    cfg, model, tokenizer, gold, sampler, funcs = setup(golden_models, tmp_path, *argv)
    ctx, sampled, rows, metrics = one_round(cfg, model, tokenizer, gold, sampler, funcs)
    assert metrics["gcpo/teacher_no_correct"] == 2 and metrics["gcpo/golden_rows"] == 0
    assert metrics["gcpo/golden_from_teacher"] == 0 and len(rows) == 8 and rows.advantages.abs().max() == 0
    assert cache_lines(tmp_path / "run") == []


def test_the_first_correct_candidate_is_the_answer(golden_models, tmp_path, one_thread):
    cfg, model, tokenizer, gold, sampler, funcs = setup(
        golden_models, tmp_path, "--reward_funcs", "golden_setup:second_candidate_reward", "--golden_temperature", "2.0"
    )
    record = next(sampler)[0]
    out = gold.candidates(record["prompt"])  # the same candidates answers() samples: the teacher's RNG is its own
    assert len(out.texts) == 4 and out.texts[0] != out.texts[1] and not out.truncated[1]
    texts, metrics = gold.answers([record])
    assert texts == [out.texts[1]] and metrics["gcpo/teacher_no_correct"] == 0


def test_an_erroring_teacher_costs_one_golden_answer(golden_models, tmp_path, one_thread):
    """The teacher's template refuses a system message: that prompt has no golden answer, the other one has."""
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": problem(0)["prompt"]}],
            "answer": "3",
        },
        {"prompt": problem(1)["prompt"], "answer": "5"},
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows=rows)
    cfg, model, tokenizer, gold, sampler, funcs = setup(golden_models, tmp_path, data=data)
    with pytest.warns(UserWarning, match="teacher failed on a prompt.*System role not supported"):
        ctx, sampled, rows, metrics = one_round(cfg, model, tokenizer, gold, sampler, funcs)
    assert metrics["gcpo/teacher_errors"] == 1 and metrics["gcpo/golden_rows"] == 1
    assert metrics["gcpo/golden_from_teacher"] == 1
    [entry] = cache_lines(tmp_path / "run")
    assert entry["prompt"] == problem(1)["prompt"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--golden_source", "teacher"],
            "golden_source teacher needs a teacher: --golden_model FOLDER or --golden_cache FILE",
        ),
        (
            ["--golden_model", "t", "--golden_source", "dataset"],
            "--golden_model would never be asked with golden_source dataset",
        ),
        (
            ["--golden_cache", "c.jsonl", "--loss_type", "grpo"],
            "--golden_cache would never be asked: golden_answer is off",
        ),
        (["--golden_model", "t", "--golden_num_candidates", "0"], "golden_num_candidates must be >= 1, got 0"),
        (["--golden_model", "t", "--golden_temperature", "0"], "golden_temperature must be > 0, got 0.0"),
    ],
)
def test_teacher_options_are_checked(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_no_golden_column_and_no_teacher_runs_as_gspo_with_a_warning(golden_models, tmp_path):
    data = answers_only(tmp_path / "answers.jsonl")
    cfg = parse_config(
        [
            "--model",
            str(golden_models[0]),
            "--dataset",
            str(data),
            "--answer_column",
            "answer",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    with pytest.warns(UserWarning, match="has no golden column 'solution' and no teacher is given .* runs as GSPO"):
        prepare(cfg)
    half = write_jsonl(
        tmp_path / "half.jsonl", rows=[{**problem(0), "answer": "3"}, {"prompt": "x", "answer": "1"}] * 8
    )
    cfg = parse_config(
        [
            "--model",
            str(golden_models[0]),
            "--dataset",
            str(half),
            "--answer_column",
            "answer",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    with pytest.raises(ValueError, match="8 of 16 records have no golden column 'solution' \\(the first: record 1\\)"):
        prepare(cfg)
