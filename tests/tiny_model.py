"""A tiny causal LM and tokenizer built from nothing, for the trainer's tests (a helper module, not conftest).

    from tiny_model import make_tiny_model, write_jsonl
    model_dir = make_tiny_model(tmp_path / "model")          # Qwen2, hidden 32, 2 layers; byte-level BPE tokenizer
    data = write_jsonl(tmp_path / "train.jsonl", n=16)       # TRL layout: prompt + solution ending in \\boxed{}

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few lines with the `tokenizers`
library (exact round trip of any text), wrapped in PreTrainedTokenizerFast with <eos>/<pad> and an
optional chat template; the model is randomly initialised from a seed. Both are saved with
save_pretrained, so the folder loads like any Hugging Face model.
"""

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]


def problem(i: int) -> dict:
    a, b = i % 7 + 1, i % 5 + 2
    return {"prompt": f"What is {a} + {b}?", "solution": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."}


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [problem(i)["prompt"] + " " + problem(i)["solution"] for i in range(40)]
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(path, *, chat_template: bool = True, tied: bool = True, seed: int = 0) -> Path:
    """Save a random tiny Qwen2 causal LM and its tokenizer to `path`; returns the path."""
    path = Path(path)
    tokenizer = make_tokenizer(chat_template)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, n: int = 16, rows=None) -> Path:
    """A TRL-layout JSONL file of n tiny addition problems (or the given rows)."""
    path = Path(path)
    rows = [problem(i) for i in range(n)] if rows is None else rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def child_env() -> dict:
    """The environment of a trainer started in a child process by a test: one thread, and this folder on
    PYTHONPATH so `--reward_funcs tiny_model:...` (and the other helper modules here) import there too."""
    tests = str(Path(__file__).resolve().parent)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }


def zero_reward(prompts, completions, **columns):
    """A reward function that says every completion is wrong (so every group gets a golden row)."""
    return [0.0] * len(completions)


def one_reward(prompts, completions, **columns):
    """A reward function that says every completion is right (every group solved, none gets a golden row)."""
    return [1.0] * len(completions)


def even_answer_reward(prompts, completions, answer, **columns):
    """Varied rewards (1, 0, 1, 0, ...) for prompts whose answer is even, all 0 for odd ones: half the groups
    carry a signal (for DAPO's dynamic sampling and GPG's valid-row counting)."""
    return [float(k % 2 == 0 and int(a) % 2 == 0) for k, a in enumerate(answer)]
