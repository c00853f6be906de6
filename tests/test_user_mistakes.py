"""Findings 9-12 of issue 24: a user's model folder or data that the trainer used to meet with a traceback, or
silently: each is now one line naming the problem, before any model work, or (9) simply works.

    OMP_NUM_THREADS=1 python -m pytest tests/test_user_mistakes.py
"""

import json

import pytest
from tiny_model import make_tiny_model, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from gcpo_fast.data.files import load_prompts
from gcpo_fast.train import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", n=8)


def argv(model_dir, data, out, *extra):
    return [
        "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out), "--num_generations", "2",
        "--per_device_train_batch_size", "4", "--max_completion_length", "8", "--max_steps", "1",
        "--eval_steps", "0", "--reward_funcs", "tiny_model:zero_reward", *extra,
    ]  # fmt: skip


def refusal(args) -> str:
    """The one line main() exits with."""
    with pytest.raises(SystemExit) as e:
        main(args)
    message = str(e.value.code)
    assert "\n" not in message, message
    return message


def test_a_tokenizer_without_eos_ends_golden_rows_with_the_models_eos(tmp_path, data, one_thread):
    model_dir = make_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    tokenizer.eos_token = None  # generation_config.json still has the EOS id
    tokenizer.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).eos_token_id is None
    # every group is all-wrong (zero_reward): golden rows, which end with an EOS, are trained on at step 1
    main(argv(model_dir, data, tmp_path / "run", "--max_completion_length", "64"))
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["gcpo/golden_rows"] > 0
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "checkpoint-1").eos_token_id == eos


def test_a_chat_template_that_refuses_a_role_is_one_line(tmp_path, capsys, one_thread):
    model_dir = make_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = (  # as Llama-2's and Mistral's templates do
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"{i} + 1?"}], "solution": f"\\boxed{{{i + 1}}}"} for i in range(8)]
    rows[5]["prompt"].insert(0, {"role": "system", "content": "Be brief."})
    data = write_jsonl(tmp_path / "chat.jsonl", rows=rows)
    message = refusal(argv(model_dir, data, tmp_path / "run"))
    assert "record 5" in message and "system" in message and "System role not supported" in message
    from gcpo_fast.eval import main as eval_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_main(["--model", str(model_dir), "--eval_dataset", str(data)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and "record 5" in err and "System role not supported" in err


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_one_line_before_any_model_work(tmp_path, data):
    model_dir = make_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(100)  # the tokenizer has more tokens than the embedding has rows
    model.save_pretrained(model_dir)
    message = refusal(argv(model_dir, data, tmp_path / "run"))
    assert "vocab_size is 100" in message and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"prompt": 1, "solution": "\\\\boxed{1}"}\n', "line 1: column 'prompt' must be a string or a list"),
        (b'{"prompt": "a\xff", "solution": "\\\\boxed{1}"}\n', r"line 1: not UTF-8 text \(byte 0xff at column 14\)"),
    ],
)
def test_a_prompt_that_is_a_number_or_not_utf8_names_file_and_line(tmp_path, content, problem):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=problem) as e:
        load_prompts(path)
    assert str(path) in str(e.value)
