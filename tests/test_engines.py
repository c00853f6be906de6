"""The rollout engine's contract on a tiny random model (gcpo_fast/engines/): Hugging Face generate left-pads, cuts
at the first EOS and keeps the token ids; prompts with and without a chat template. vLLM and the server: their own
test files (test_vllm_engine.py, test_serve.py)."""

import pytest
import torch
from tiny_model import make_tiny_model, write_jsonl
from trainer_steps import one_round, setup
from transformers import AutoTokenizer

from gcpo_fast.data.prompts import encode_prompts
from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.hf import HFEngine


def test_generate_left_pads_cuts_at_eos_and_keeps_ids(files, one_thread):
    _, model, tokenizer, _, _ = setup(files)
    prompts = encode_prompts(tokenizer, ["What is 1 + 2?", "What is 12 + 7 and then some more words?"], 64)
    assert tokenizer.decode(prompts[0]) == "<|user|>What is 1 + 2?\n<|assistant|>"  # the chat template
    engine, greedy = HFEngine(model, tokenizer), Sampling(max_completion_length=6, greedy=True)
    batched = engine.generate(prompts, 2, greedy)
    alone = [engine.generate([p], 1, greedy).completion_ids[0] for p in prompts]
    assert batched.completion_ids == [alone[0], alone[0], alone[1], alone[1]]  # padding changes nothing
    assert batched.prompt_ids == [prompts[0], prompts[0], prompts[1], prompts[1]]
    torch.manual_seed(0)
    out = engine.generate(prompts, 8, Sampling(max_completion_length=6))
    eos = tokenizer.eos_token_id
    for ids, cut, text in zip(out.completion_ids, out.truncated, out.texts):
        assert (eos not in ids and len(ids) == 6) if cut else (ids[-1] == eos and eos not in ids[:-1])
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert (
        encode_prompts(tokenizer, ["What is 12 + 7?"], 3)[0]
        == encode_prompts(tokenizer, ["What is 12 + 7?"], 64)[0][-3:]
    )


def test_plain_text_prompts_without_a_chat_template(tmp_path, one_thread):
    path = make_tiny_model(tmp_path / "model", chat_template=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert encode_prompts(tokenizer, ["What is 1 + 2?"], 64)[0] == tokenizer("What is 1 + 2?").input_ids
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        encode_prompts(tokenizer, [[{"role": "user", "content": "hi"}]], 64)


def test_conversational_prompts(tmp_path, files, one_thread):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"What is {i} + 1?"}],
            "solution": f"\\boxed{{{i + 1}}}",
        }
        for i in range(4)
    ]
    cfg, model, tokenizer, sampler, funcs = setup((files[0], write_jsonl(tmp_path / "chat.jsonl", rows=rows)))
    sampled, rows, metrics, samples = one_round(cfg, model, tokenizer, sampler, funcs)
    assert tokenizer.decode(sampled.rows.prompt_ids[0]).startswith("<|system|>Add.\n<|user|>What is ")
    assert samples[0]["prompt"].startswith("What is ") and metrics["rewards/accuracy_reward/mean"] >= 0
