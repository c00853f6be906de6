"""Rollouts: prompts to token ids, G sampled completions per prompt with Hugging Face `generate`, golden rows.

    from gcpo_fast.rollout import encode_prompts, generate, encode_completion, eos_token_ids

    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in batch], max_prompt_length=512)
    out = generate(model, tokenizer, prompt_ids, num_generations=8, max_completion_length=256,
                   temperature=1.0, top_p=1.0, top_k=0)
    out.prompt_ids[k], out.completion_ids[k], out.truncated[k], out.texts[k]   # row k = prompt k // 8
    ids, truncated = encode_completion(tokenizer, golden_text, 256)             # a golden answer as a completion

Prompts go through the tokenizer's chat template when it has one (a plain-text prompt becomes one user
message), else they are tokenised as plain text; either way, too-long prompts keep their last
max_prompt_length tokens. Generation is one batched `generate` over all prompts x G rows with the KV
cache and left padding. The trainer keeps the generated token ids as they are (never re-tokenised
text): a completion is cut after its first EOS (kept, so the model learns to stop), and a completion
with no EOS within the budget is "truncated".
"""
from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass
class Rollouts:
    prompt_ids: list[list[int]]  # per row; the G rows of a prompt share the same list
    completion_ids: list[list[int]]  # per row, up to and including the first EOS
    truncated: list[bool]  # per row: no EOS within max_completion_length
    texts: list[str]  # per row: the completion decoded without special tokens
    logprobs: list[list[float]] | None = None  # per row, per completion token: its sampling log-prob (vLLM rows)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation_config EOS ids
    (chat models often stop at an end-of-turn token that differs from the tokenizer's EOS)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation_config no eos_token_id: "
                         "completions could never end")
    return ids


def encode_prompts(tokenizer, prompts, max_prompt_length: int) -> list[list[int]]:
    """Token ids of each prompt (text or chat messages), chat template applied when the tokenizer has one."""
    out = []
    for prompt in prompts:
        if tokenizer.chat_template is not None:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # the template wrote any BOS itself
            ids = tokenizer(text, add_special_tokens=False).input_ids
        elif isinstance(prompt, str):
            ids = tokenizer(prompt).input_ids  # BOS where the tokenizer adds one, as in pretraining
        else:
            raise ValueError("a chat-message prompt needs a tokenizer with a chat template; this one has none")
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        out.append(ids[-max_prompt_length:])
    return out


def encode_completion(tokenizer, text: str, max_completion_length: int) -> tuple[list[int], bool]:
    """A text (GCPO's golden answer) as completion ids: tokens + EOS, cut to the budget; (ids, truncated).
    It follows the prompt ids of encode_prompts, which end where the template's assistant turn begins."""
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return ids[:max_completion_length], len(ids) > max_completion_length


def cut_at_eos(ids: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """(ids up to and including the first EOS, whether there was none)."""
    for j, t in enumerate(ids):
        if t in eos:
            return ids[: j + 1], False
    return ids, True


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], num_generations: int, *, max_completion_length: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False) -> Rollouts:
    """num_generations sampled completions of every prompt (greedy decoding if greedy=True), prompt-major rows.

    Call it on the bare model (not a DDP wrapper); it runs in eval mode and restores the previous mode.
    """
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    rows = [ids for ids in prompt_ids for _ in range(num_generations)]
    width = max(len(ids) for ids in rows)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
    # A full GenerationConfig, so that sampling settings saved with the model (repetition penalty,
    # its own temperature) never leak into the rollouts: the loss assumes exactly these. top_k must be
    # 0, not None, to be off: transformers fills None with 50.
    sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=top_k)
    config = GenerationConfig(max_new_tokens=max_completion_length, do_sample=not greedy, eos_token_id=eos,
                              pad_token_id=pad, use_cache=True, **sampling)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.train(was_training)
    eos_set = set(eos)
    completions, truncated = [], []
    for ids in out[:, width:].tolist():
        ids, cut = cut_at_eos(ids, eos_set)
        completions.append(ids)
        truncated.append(cut)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollouts(rows, completions, truncated, texts)
