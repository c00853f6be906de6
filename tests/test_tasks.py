"""The shipped math task: seeded generation, disjoint splits, golden solutions that the reward accepts, export."""

import random

import pytest

from gcpo_fast.data.export import main as data_main
from gcpo_fast.data.files import load_prompts
from gcpo_fast.data.rewards import extract_answer, math_reward
from gcpo_fast.data.tasks import LEVELS, generate_problems, heldout_split, is_heldout, train_split


def test_deterministic_per_seed_and_independent_of_global_rng():
    random.seed(1)
    a = generate_problems(200, seed=3)
    random.seed(2)
    random.random()
    assert generate_problems(200, seed=3) == a
    assert generate_problems(200, seed=4) != a
    assert train_split(100, seed=5) == train_split(100, seed=5)
    assert heldout_split(100, seed=5) == heldout_split(100, seed=5)


def test_records_layout_and_levels():
    records = generate_problems(400, seed=0)
    assert {r["level"] for r in records} == set(LEVELS)
    for r in records:
        assert set(r) == {"prompt", "solution", "answer", "level"}
        assert r["prompt"].startswith("Q: ") and r["prompt"].endswith("\n")
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}") and not r["solution"].startswith(" ")
        assert extract_answer(r["solution"]) == r["answer"]
        assert int(r["answer"]) >= 0
    assert {r["level"] for r in generate_problems(50, seed=0, levels=[2, 7])} == {2, 7}
    with pytest.raises(ValueError, match="levels"):
        generate_problems(5, seed=0, levels=[9])


def test_train_and_heldout_never_overlap():
    train = {r["prompt"] for r in train_split(3000, seed=0)}
    for seed in (0, 1):
        held = heldout_split(1000, seed=seed)
        assert all(is_heldout(r["prompt"]) for r in held)
        assert not train & {r["prompt"] for r in held}
    # the small levels too: all of their problems are drawn, and still none is shared
    small_train = {r["prompt"] for r in train_split(2000, seed=0, levels=[1, 2])}
    small_held = {r["prompt"] for r in heldout_split(500, seed=0, levels=[1, 2])}
    assert small_train and small_held and not small_train & small_held


def test_distinct():
    records = heldout_split(300, seed=0, levels=[3, 4], distinct=True)
    assert len({r["prompt"] for r in records}) == 300
    with pytest.raises(ValueError, match="distinct"):
        heldout_split(200, seed=0, levels=[1], distinct=True)  # level 1 holds ~25 held-out problems


@pytest.mark.parametrize("level", LEVELS)
def test_every_golden_solution_earns_the_reward(level):
    records = generate_problems(60, seed=level, levels=[level])
    assert math_reward([r["solution"] for r in records], [r["answer"] for r in records]) == [1.0] * len(records)
    wrong = [str(int(r["answer"]) + 1) for r in records[:10]]
    assert math_reward([r["solution"] for r in records[:10]], wrong) == [0.0] * 10


def test_export_reads_back_with_load_prompts(tmp_path, capsys):
    data_main(["--export", str(tmp_path), "--train-size", "64", "--test-size", "16", "--seed", "1"])
    assert str(tmp_path / "train.jsonl") in capsys.readouterr().out
    train, test = load_prompts(tmp_path / "train.jsonl"), load_prompts(tmp_path / "test.jsonl")
    assert len(train) == 64 and len(test) == 16
    assert [r["prompt"] for r in train] == [r["prompt"] for r in train_split(64, seed=1)]
    for r in train + test:
        assert r["golden"] == r["solution"] and r["answer"] == extract_answer(r["solution"])
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in test}) == 16  # a benchmark never repeats a problem


def test_export_of_chosen_levels(tmp_path):
    data_main(["--export", str(tmp_path), "--train-size", "40", "--test-size", "30", "--levels", "3", "5"])
    records = load_prompts(tmp_path / "train.jsonl") + load_prompts(tmp_path / "test.jsonl")
    assert {r["level"] for r in records} == {3, 5}
