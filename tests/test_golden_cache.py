"""The teacher's golden-answer cache: across a resume, filled by the offline command (python -m gcpo_fast.golden)
and read by the trainer with no teacher in memory, a partial last line, two processes sharing one file, and the
offline command's reward options checked as the trainer checks them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from golden_setup import RUN_OPTIONS, TEACHER_OPTIONS, N, answers_only, cache_lines, one_round, setup
from tiny_model import child_env

from gcpo_fast.config import parse_config
from gcpo_fast.distributed.parallel import free_port
from gcpo_fast.errors import ConfigError
from gcpo_fast.golden.teacher import CACHE_NAME, prompt_key
from gcpo_fast.train import train


def run_args(golden_models, data, run, *extra):
    policy, teacher = golden_models
    return parse_config(
        [
            *["--model", str(policy), "--dataset", str(data), "--output_dir", str(run), *RUN_OPTIONS],
            *["--golden_model", str(teacher), *TEACHER_OPTIONS],
            *["--num_generations", "2", "--per_device_train_batch_size", "4"],
            *["--save_steps", "2", *extra],
        ]
    )


def test_the_cache_survives_a_resume(golden_models, tmp_path, one_thread):
    """4 prompts, 2 a round: steps 1-2 ask the teacher for all 4; resumed, steps 3-4 meet them again (the next
    epoch) and take every answer from the cache, the teacher generating nothing."""
    data = answers_only(tmp_path / "answers.jsonl", n=4)
    run = tmp_path / "run"
    train(run_args(golden_models, data, run, "--max_steps", "2"))
    entries = cache_lines(run)
    assert len(entries) == 4 and len({e["prompt_key"] for e in entries}) == 4
    train(run_args(golden_models, data, run, "--max_steps", "4", "--resume"))
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


def test_the_offline_command_fills_a_cache_the_trainer_uses(golden_models, tmp_path, one_thread):
    data = answers_only(tmp_path / "answers.jsonl")
    cache = tmp_path / "cache.jsonl"
    env = child_env()
    cmd = [
        sys.executable,
        "-m",
        "gcpo_fast.golden",
        "--golden_model",
        str(golden_models[1]),
        "--dataset",
        str(data),
        "--answer_column",
        "answer",
        "--golden_cache",
        str(cache),
        "--golden_temperature",
        "0.3",
        "--golden_max_completion_length",
        "40",
        "--reward_funcs",
        "golden_setup:boxed_answer",
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
        golden_models, tmp_path, "--golden_source", "teacher", "--golden_cache", str(cache)
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


def test_a_partial_last_cache_line_is_skipped_and_written_after(golden_models, tmp_path, one_thread):
    run = tmp_path / "run"
    run.mkdir()
    (run / CACHE_NAME).write_text('{"prompt_key": "ab", "teacher": "x", "golden": "1"}\n{"prompt_key": "cd", "tea')
    cfg, model, tokenizer, gold, sampler, funcs = setup(golden_models, tmp_path)
    one_round(cfg, model, tokenizer, gold, sampler, funcs)
    lines = (run / CACHE_NAME).read_text().splitlines()
    assert lines[1] == '{"prompt_key": "cd", "tea' and [json.loads(line)["golden"] for line in lines[2:]]
    (run / CACHE_NAME).write_text('{"prompt_key": "ab"}\n{}\n')
    with pytest.raises(ValueError, match=f"golden cache {run / CACHE_NAME}, line 1: not a cache entry"):
        setup(golden_models, tmp_path)


def _ddp_worker(rank, world, port, golden_models, data, run):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from gcpo_fast.distributed.parallel import init_distributed

    init_distributed()
    try:
        train(run_args(golden_models, data, run, "--max_steps", "2"))
        torch.distributed.barrier()  # every rank done before the group goes (rank 0 hosts the store)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_share_one_cache(golden_models, tmp_path, one_thread):
    """Each rank asks the teacher for its own prompts; every answer reaches the file once, written by rank 0."""
    import torch.multiprocessing as mp

    data, run = answers_only(tmp_path / "answers.jsonl", n=8), tmp_path / "run"
    port = free_port()
    mp.spawn(_ddp_worker, args=(2, port, golden_models, data, run), nprocs=2, join=True)
    entries = cache_lines(run)
    assert len(entries) == 8 and len({e["prompt_key"] for e in entries}) == 8  # 2 steps x 2 ranks x 2 prompts
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["gcpo/golden_from_teacher"]) for m in lines] == [(1, 4.0), (2, 4.0)]  # summed over ranks


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--reward_weights", "1", "2"], "reward_weights has 2 values for 1 reward_funcs"),
        (["--correct_reward", "nan"], "correct_reward must be a finite number, got nan"),
        (["--reward_weights", "inf"], "reward_weights must be a finite number, got inf"),
    ],
)
def test_golden_cli_checks_the_reward_options_as_the_trainer_does(tmp_path, capsys, options, problem):
    from gcpo_fast.golden.offline import main

    argv = [
        "--golden_model",
        str(tmp_path / "teacher"),
        "--dataset",
        "builtin",
        "--golden_cache",
        str(tmp_path / "c.jsonl"),
    ]
    with pytest.raises(SystemExit) as e:
        main([*argv, *options])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(problem)
    with pytest.raises(ConfigError, match=problem):  # the same words from the trainer
        parse_config(options)
