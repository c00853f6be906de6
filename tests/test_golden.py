"""Golden answers from a teacher: two tiny models with different tokenizers and chat templates, the teacher
trained here (supervised, a few seconds) until it solves every problem greedily, the policy random (every
group all wrong). Verified answers only, re-encoded with the policy's template, the right advantage, the cache
across rounds, resumes and the offline command, and a teacher that fails on one prompt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import make_tiny_model, problem, write_jsonl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from gcpo_fast.config import parse_config
from gcpo_fast.data import PromptSampler
from gcpo_fast.errors import ConfigError
from gcpo_fast.golden import CACHE_NAME, prompt_key
from gcpo_fast.parallel import free_port
from gcpo_fast.prepare import prepare
from gcpo_fast.rewards import extract_answer, math_reward
from gcpo_fast.rollout import HFEngine, Sampling, encode_prompts
from gcpo_fast.rounds import RoundContext, build_rows, sample_groups
from gcpo_fast.train import load_teacher, train

TESTS = Path(__file__).resolve().parent
# The teacher's own template, Mistral-like: no system role (as Gemma's and Mistral's templates refuse one)
TEACHER_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "[INST]{{ m['content'] }}[/INST]{% endfor %}"
)
N = 12


def teacher_tokenizer() -> PreTrainedTokenizerFast:
    """Another vocabulary than tiny_model's (other special tokens, other merges, 300 tokens) and another template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "[INST]", "[/INST]", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([problem(i)["solution"] for i in range(40)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<unk>")
    fast.chat_template = TEACHER_TEMPLATE
    return fast


def make_teacher(path: Path) -> Path:
    """A tiny Qwen2 taught the N problems' worked solutions under its own template (Adam, full batch)."""
    fast = teacher_tokenizer()
    config = Qwen2Config(
        vocab_size=len(fast) + 4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    config.save_pretrained(path)
    fast.save_pretrained(path)
    # trained with the tokenizer as the trainer loads it: with a qwen2 config.json beside it, transformers
    # converts it to Qwen2Tokenizer (its own pre-tokenizer, and an <|endoftext|> token: hence the + 4 above)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) <= config.vocab_size
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    rows = []
    for i in range(N):
        prompt = encode_prompts(tok, [problem(i)["prompt"]], 256)[0]
        completion = tok(problem(i)["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append((prompt + completion, [-100] * len(prompt) + completion))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    prompts = [problem(i)["prompt"] for i in range(N)]
    answers = [extract_answer(problem(i)["solution"]) for i in range(N)]
    for _ in range(20):  # until it solves every problem greedily (typically 400-800 steps, 10-20 s)
        for _ in range(100):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        out = HFEngine(model, tok).generate(encode_prompts(tok, prompts, 256), 1, Sampling(40, greedy=True))
        if math_reward(out.texts, answers) == [1.0] * N:
            break
    model.save_pretrained(path)
    return path


def answers_only(path, n=N, rows=None) -> Path:
    """A dataset with a final answer and no worked solution (most real math datasets)."""
    rows = rows or [
        {"prompt": problem(i)["prompt"], "answer": extract_answer(problem(i)["solution"])} for i in range(n)
    ]
    return write_jsonl(path, rows=rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    teacher = make_teacher(root / "teacher")
    torch.set_num_threads(n)
    return make_tiny_model(root / "policy"), teacher


def test_the_teacher_is_a_different_tokenizer_that_solves_the_problems(tiny, one_thread):
    """The premise of the tests below: another vocabulary and template, and every problem solved greedily."""
    policy, teacher = tiny
    p_tok, t_tok = AutoTokenizer.from_pretrained(policy), AutoTokenizer.from_pretrained(teacher)
    text = problem(3)["solution"]
    assert p_tok(text, add_special_tokens=False).input_ids != t_tok(text, add_special_tokens=False).input_ids
    assert p_tok.eos_token_id != t_tok.eos_token_id
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(teacher), t_tok)
    out = engine.generate(
        encode_prompts(t_tok, [problem(i)["prompt"] for i in range(N)], 256), 1, Sampling(40, greedy=True)
    )
    assert math_reward(out.texts, [extract_answer(problem(i)["solution"]) for i in range(N)]) == [1.0] * N


def setup(tiny, tmp_path, *argv, data=None):
    policy, teacher = tiny
    data = data or answers_only(tmp_path / "answers.jsonl")
    cfg = parse_config(
        [
            "--model",
            str(policy),
            "--dataset",
            str(data),
            "--answer_column",
            "answer",
            "--reward_funcs",
            "test_golden:boxed_answer",
            "--output_dir",
            str(tmp_path / "run"),
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--max_completion_length",
            "24",
            "--golden_max_completion_length",
            "40",
            "--golden_temperature",
            "0.3",
            "--eval_steps",
            "0",
            "--learning_rate",
            "1e-2",
            *(["--golden_model", str(teacher)] if "--golden_cache" not in argv else []),
            *argv,
        ]
    )
    prepared = prepare(cfg)
    torch.manual_seed(0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(policy)
    gold = load_teacher(cfg, prepared.golden_cache, prepared.reward_funcs, torch.device("cpu"))
    sampler = PromptSampler(prepared.records, cfg.prompts_per_round, seed=cfg.run.seed)
    return cfg, model, tokenizer, gold, sampler, prepared.reward_funcs


def one_round(cfg, model, tokenizer, gold, sampler, funcs):
    ctx = RoundContext.of(cfg, HFEngine(model, tokenizer), tokenizer, funcs)
    sampled, metrics = sample_groups(ctx, sampler)
    rows, _ = build_rows(ctx, sampled, metrics, gold, cfg.golden.golden_source)
    return ctx, sampled, rows, metrics


def cache_lines(run: Path) -> list[dict]:
    path = run / CACHE_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_correct_answer_is_reencoded_for_the_policy_appended_and_cached(tiny, tmp_path, one_thread):
    cfg, model, tokenizer, gold, sampler, funcs = setup(tiny, tmp_path)
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
    t_tok = AutoTokenizer.from_pretrained(tiny[1])
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
    metrics2 = {}
    rows2, _ = build_rows(ctx, sampled, metrics2, gold, cfg.golden.golden_source)
    assert metrics2["gcpo/golden_cache_hits"] == metrics2["gcpo/golden_from_teacher"] == P
    assert cache_lines(tmp_path / "run") == entries
    assert rows2.completion_ids == rows.completion_ids


def boxed_answer(prompts, completions, answer, **columns):
    """Correct when the text holds \\boxed{answer} (the random policy's text never does; math-verify alone
    sometimes accepts a bare number it happens to end with)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(f"\\boxed{{{a}}}" in t) for t, a in zip(texts, answer)]


def never_correct(prompts, completions, **columns):
    return [0.0] * len(completions)


def second_candidate_reward(prompts, completions, answer, **columns):
    """Only the second of a batch is correct: of a teacher's k candidates, the second; of a round's rollouts, one
    per group, so no group is all wrong."""
    return [float(k % 4 == 1) for k in range(len(completions))]


@pytest.mark.parametrize("case", ["reward", "budget"])
def test_a_teacher_answer_that_fails_is_never_used(tiny, tmp_path, case):
    """Candidates the reward calls wrong, or cut by the teacher's budget (no EOS), give no golden row."""
    argv = (
        ["--reward_funcs", "test_golden:never_correct"] if case == "reward" else ["--golden_max_completion_length", "4"]
    )  # the solutions are longer: every candidate is cut
    cfg, model, tokenizer, gold, sampler, funcs = setup(tiny, tmp_path, *argv)
    ctx, sampled, rows, metrics = one_round(cfg, model, tokenizer, gold, sampler, funcs)
    assert metrics["gcpo/teacher_no_correct"] == 2 and metrics["gcpo/golden_rows"] == 0
    assert metrics["gcpo/golden_from_teacher"] == 0 and len(rows) == 8 and rows.advantages.abs().max() == 0
    assert cache_lines(tmp_path / "run") == []


def test_the_first_correct_candidate_is_the_answer(tiny, tmp_path, one_thread):
    cfg, model, tokenizer, gold, sampler, funcs = setup(
        tiny, tmp_path, "--reward_funcs", "test_golden:second_candidate_reward", "--golden_temperature", "2.0"
    )
    record = next(sampler)[0]
    out = gold.candidates(record["prompt"])  # the same candidates answers() samples: the teacher's RNG is its own
    assert len(out.texts) == 4 and out.texts[0] != out.texts[1] and not out.truncated[1]
    texts, metrics = gold.answers([record])
    assert texts == [out.texts[1]] and metrics["gcpo/teacher_no_correct"] == 0


def test_an_erroring_teacher_costs_one_golden_answer(tiny, tmp_path, one_thread):
    """The teacher's template refuses a system message: that prompt has no golden answer, the other one has."""
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": problem(0)["prompt"]}],
            "answer": "3",
        },
        {"prompt": problem(1)["prompt"], "answer": "5"},
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows=rows)
    cfg, model, tokenizer, gold, sampler, funcs = setup(tiny, tmp_path, data=data)
    with pytest.warns(UserWarning, match="teacher failed on a prompt.*System role not supported"):
        ctx, sampled, rows, metrics = one_round(cfg, model, tokenizer, gold, sampler, funcs)
    assert metrics["gcpo/teacher_errors"] == 1 and metrics["gcpo/golden_rows"] == 1
    assert metrics["gcpo/golden_from_teacher"] == 1
    [entry] = cache_lines(tmp_path / "run")
    assert entry["prompt"] == problem(1)["prompt"]


def run_args(tiny, data, run, *extra):
    return parse_config(
        [
            "--model",
            str(tiny[0]),
            "--dataset",
            str(data),
            "--answer_column",
            "answer",
            "--reward_funcs",
            "test_golden:boxed_answer",
            "--golden_model",
            str(tiny[1]),
            "--output_dir",
            str(run),
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--max_completion_length",
            "24",
            "--golden_max_completion_length",
            "40",
            "--golden_temperature",
            "0.3",
            "--eval_steps",
            "0",
            "--save_steps",
            "2",
            *extra,
        ]
    )


def test_the_cache_survives_a_resume(tiny, tmp_path, one_thread):
    """4 prompts, 2 a round: steps 1-2 ask the teacher for all 4; resumed, steps 3-4 meet them again (the next
    epoch) and take every answer from the cache, the teacher generating nothing."""
    data = answers_only(tmp_path / "answers.jsonl", n=4)
    run = tmp_path / "run"
    train(run_args(tiny, data, run, "--max_steps", "2"))
    entries = cache_lines(run)
    assert len(entries) == 4 and len({e["prompt_key"] for e in entries}) == 4
    train(run_args(tiny, data, run, "--max_steps", "4", "--resume"))
    assert cache_lines(run) == entries
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert [(m["gcpo/golden_from_teacher"], m["gcpo/golden_cache_hits"]) for m in lines] == [
        (2, 0),
        (2, 0),
        (2, 2),
        (2, 2),
    ]
    assert all(m["gcpo/teacher_no_correct"] == 0 and "timing/teacher" in m for m in lines)


def test_the_offline_command_fills_a_cache_the_trainer_uses(tiny, tmp_path, one_thread):
    data = answers_only(tmp_path / "answers.jsonl")
    cache = tmp_path / "cache.jsonl"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "gcpo_fast.golden",
        "--model",
        str(tiny[1]),
        "--dataset",
        str(data),
        "--answer_column",
        "answer",
        "--out",
        str(cache),
        "--temperature",
        "0.3",
        "--max_completion_length",
        "40",
        "--reward_funcs",
        "test_golden:boxed_answer",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = [json.loads(line) for line in cache.read_text().splitlines()]
    assert f"{len(entries)} new golden answers for {N} prompts" in done.stdout and len(entries) >= N - 1
    assert "golden answers: 100%" in done.stderr  # the progress bar
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # nothing left to do
    assert again.returncode == 0 and f"0 new golden answers for {N - len(entries)} prompts" in again.stdout

    # the trainer with the cache alone: no teacher in memory, every all-wrong group answered from the file
    cfg, model, tokenizer, gold, sampler, funcs = setup(
        tiny, tmp_path, "--golden_source", "teacher", "--golden_cache", str(cache)
    )
    assert gold.engine is None
    cached = {e["prompt_key"] for e in entries}
    ctx, sampled, rows, metrics = one_round(cfg, model, tokenizer, gold, sampler, funcs)
    answered = sum(prompt_key(r["prompt"]) in cached for r in sampled.records)
    assert (
        metrics["gcpo/golden_cache_hits"]
        == metrics["gcpo/golden_from_teacher"]
        == metrics["gcpo/golden_rows"]
        == answered
        >= 1
    )
    assert cache_lines(tmp_path / "run") == []  # the prefilled file is read, never copied or written


def test_a_partial_last_cache_line_is_skipped_and_written_after(tiny, tmp_path, one_thread):
    run = tmp_path / "run"
    run.mkdir()
    (run / CACHE_NAME).write_text('{"prompt_key": "ab", "teacher": "x", "golden": "1"}\n{"prompt_key": "cd", "tea')
    cfg, model, tokenizer, gold, sampler, funcs = setup(tiny, tmp_path)
    one_round(cfg, model, tokenizer, gold, sampler, funcs)
    lines = (run / CACHE_NAME).read_text().splitlines()
    assert lines[1] == '{"prompt_key": "cd", "tea' and [json.loads(line)["golden"] for line in lines[2:]]
    (run / CACHE_NAME).write_text('{"prompt_key": "ab"}\n{}\n')
    with pytest.raises(ValueError, match=f"golden cache {run / CACHE_NAME}, line 1: not a cache entry"):
        setup(tiny, tmp_path)


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


def test_no_golden_column_and_no_teacher_runs_as_gspo_with_a_warning(tiny, tmp_path):
    data = answers_only(tmp_path / "answers.jsonl")
    cfg = parse_config(
        [
            "--model",
            str(tiny[0]),
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
            str(tiny[0]),
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


def _ddp_worker(rank, world, port, tiny, data, run):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from gcpo_fast.parallel import init_distributed

    init_distributed()
    try:
        train(run_args(tiny, data, run, "--max_steps", "2"))
        torch.distributed.barrier()  # every rank done before the group goes (rank 0 hosts the store)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_share_one_cache(tiny, tmp_path, one_thread):
    """Each rank asks the teacher for its own prompts; every answer reaches the file once, written by rank 0."""
    import torch.multiprocessing as mp

    data, run = answers_only(tmp_path / "answers.jsonl", n=8), tmp_path / "run"
    port = free_port()
    mp.spawn(_ddp_worker, args=(2, port, tiny, data, run), nprocs=2, join=True)
    entries = cache_lines(run)
    assert len(entries) == 8 and len({e["prompt_key"] for e in entries}) == 8  # 2 steps x 2 ranks x 2 prompts
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["gcpo/golden_from_teacher"]) for m in lines] == [(1, 2.0), (2, 2.0)]  # mean over ranks


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--reward_weights", "1", "2"], "reward_weights has 2 values for 1 reward_funcs"),
        (["--correct_reward", "nan"], "correct_reward must be a finite number, got nan"),
        (["--reward_weights", "inf"], "reward_weights must be a finite number, got inf"),
    ],
)
def test_golden_cli_checks_the_reward_options_as_the_trainer_does(tmp_path, capsys, options, problem):
    from gcpo_fast.golden import main

    argv = ["--model", str(tmp_path / "teacher"), "--dataset", "builtin", "--out", str(tmp_path / "c.jsonl")]
    with pytest.raises(SystemExit) as e:
        main([*argv, *options])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(problem)
    with pytest.raises(ConfigError, match=problem):  # the same words from the trainer
        parse_config(options)
