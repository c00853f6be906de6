"""Evaluation: the unbiased pass@k estimator by hand, mean@k / pass@k summaries, and the CLI on a tiny model."""

import json
import math

import pytest
import torch
from tiny_model import make_tiny_model, write_jsonl

from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.eval import count_correct, level_summary, main, pass_at_k, summarize


def test_pass_at_k_by_hand():
    # n = 5 samples, c = 2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10;
    # pass@3 = 1 - C(3,3)/C(5,3) = 1 - 1/10; pass@4 = 1 (any 4 of 5 hold a correct one).
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_pass_at_k_is_the_chance_that_k_draws_hold_a_correct_one():
    # brute force over all k-subsets of n samples of which the first c are correct
    from itertools import combinations

    n, c, k = 6, 2, 3
    subsets = list(combinations(range(n), k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(i < c for i in s) for s in subsets) / len(subsets))


def test_summarize():
    out = summarize([0, 2, 4], num_samples=4)
    assert out["eval/mean@4"] == pytest.approx(6 / 12)
    assert out["eval/pass@1"] == pytest.approx(6 / 12)
    assert out["eval/pass@2"] == pytest.approx((0 + (1 - math.comb(2, 2) / math.comb(4, 2)) + 1) / 3)
    assert out["eval/pass@4"] == pytest.approx(2 / 3)
    assert set(summarize([1], num_samples=1)) == {"eval/mean@1", "eval/pass@1"}
    assert set(summarize([1], num_samples=6)) == {
        "eval/mean@6",
        "eval/pass@1",
        "eval/pass@2",
        "eval/pass@4",
        "eval/pass@6",
    }


def test_level_summary():
    records = [{"level": 2}, {"level": 10}, {"level": 2}, {"level": 1}]
    out = level_summary(records, [1, 0, 3, 2], num_samples=4)
    assert list(out) == [
        "eval/level_1/mean@4",
        "eval/level_1/num_problems",
        "eval/level_2/mean@4",
        "eval/level_2/num_problems",
        "eval/level_10/mean@4",
        "eval/level_10/num_problems",
    ]
    assert out["eval/level_2/mean@4"] == pytest.approx(4 / 8) and out["eval/level_2/num_problems"] == 2
    assert out["eval/level_1/mean@4"] == pytest.approx(2 / 4) and out["eval/level_10/mean@4"] == 0
    assert level_summary([{"level": "Level 5"}], [1], num_samples=1) == {
        "eval/level_Level_5/mean@1": 1.0,
        "eval/level_Level_5/num_problems": 1,
    }
    assert level_summary([{"level": 1}, {"prompt": "no level"}], [1, 1], num_samples=1) == {}
    with pytest.raises(ValueError):
        level_summary(records, [1, 0], num_samples=1)


def test_count_correct_leaves_the_global_rng_alone(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / "model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    records = [{"prompt": "What is 1 + 2?", "answer": "3"}, {"prompt": "What is 2 + 2?", "answer": "4"}]
    torch.manual_seed(1)
    before = torch.get_rng_state()
    engine, sampling = HFEngine(model, tokenizer), Sampling(max_completion_length=4)
    a = count_correct(engine, tokenizer, records, sampling, num_samples=3, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert a == count_correct(engine, tokenizer, records, sampling, num_samples=3, seed=5)
    assert len(a) == 2 and all(0 <= c <= 3 for c in a)


def test_cli(tmp_path, capsys, one_thread):
    path = make_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "test.jsonl", n=5)
    main(
        [
            "--model",
            str(path),
            "--eval_dataset",
            str(data),
            "--eval_num_samples",
            "2",
            "--max_completion_length",
            "4",
            "--output",
            str(tmp_path / "eval.json"),
        ]
    )
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["num_problems"] == 5
    assert set(metrics) == {"num_problems", "eval/mean@2", "eval/pass@1", "eval/pass@2"}
    assert metrics["eval/pass@1"] == pytest.approx(metrics["eval/mean@2"])
    assert '"eval/mean@2"' in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    return make_tiny_model(root / "model"), write_jsonl(root / "test.jsonl", n=3), root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        (["--max_completion_length", "0"], "max_completion_length must be >= 1, got 0"),
        (["--eval_num_samples", "2", "--temperature", "0"], "temperature must be > 0 for sampling, got 0.0"),
        (["--temperature", "nan"], "temperature must be a finite number, got nan"),
        (["--top_k", "-1"], "top_k must be >= 0, got -1"),
        (["--eval_num_samples", "0"], "eval_num_samples must be >= 1, got 0"),
        (["--model", "{root}/absent"], "model folder {root}/absent does not exist"),
        (
            ["--output", "{root}/absent/eval.json"],
            "--output {root}/absent/eval.json: folder {root}/absent does not exist",
        ),
        (
            ["--eval_dataset", "builtin", "--builtin_levels", "1"],
            "could not draw 500 distinct heldout problems from levels [1]",
        ),
        (
            ["--batch_size", "x"],
            "argument --batch_size: invalid int value: 'x' (see --help)",
        ),  # argparse's own, one line too
    ],
)
def test_cli_usage_errors_come_before_anything_runs(tiny, capsys, argv, message):
    model, data, root = tiny
    argv = [a.format(root=root) for a in ["--model", str(model), "--eval_dataset", str(data), *argv]]
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""  # nothing evaluated: the metrics used to be printed, then not saved
    assert err.startswith(f"python -m gcpo_fast.eval: error: {message.format(root=root)}") and err.count("\n") == 1
    assert "distinct=False" not in err  # not an option of this command


def test_cli_damaged_model_is_a_runtime_error(tiny, tmp_path, capsys):
    import shutil

    model, data, _ = tiny
    shutil.copytree(model, tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "model"), "--eval_dataset", str(data)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "cannot load the weights" in err
