"""Prompts to token ids, and a text (a golden answer) to completion ids.

    from gcpo_fast.data.prompts import encode_prompts, encode_completion

    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in batch], max_prompt_length=512)
    ids, truncated = encode_completion(tokenizer, golden_text, 256)

Prompts go through the tokenizer's chat template when it has one (a plain-text prompt becomes one user
message), else they are tokenised as plain text; either way, too-long prompts keep their last
max_prompt_length tokens (a text longer than max_prompt_length x CHARS_PER_TOKEN characters is cut to that
many last characters before tokenising: the same tokens, unless one word spans the cut, at a fraction of
the cost).
"""

from jinja2 import TemplateError


def encode_prompts(tokenizer, prompts, max_prompt_length: int, tools: list[dict] | None = None) -> list[list[int]]:
    """Token ids of each prompt (text or chat messages), chat template applied when the tokenizer has one; tools:
    the JSON schemas of the tools the model may call, which the template writes into the prompt."""
    if tools and tokenizer.chat_template is None:
        raise ValueError("user tools need a tokenizer with a chat template that writes their schemas into the prompt")
    out = []
    for prompt in prompts:
        if tokenizer.chat_template is not None:
            text = render_prompt(tokenizer, messages_of(prompt), f"prompt {str(prompt)[:60]!r}", tools)
            # the template wrote any BOS itself
            ids = tokenizer(_tail(text, max_prompt_length), add_special_tokens=False).input_ids
        elif isinstance(prompt, str):
            ids = tokenizer(_tail(prompt, max_prompt_length)).input_ids  # BOS where the tokenizer adds one
        else:
            raise ValueError("a chat-message prompt needs a tokenizer with a chat template; this one has none")
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        out.append(ids[-max_prompt_length:])
    return out


CHARS_PER_TOKEN = 64  # far more characters than any token of a real vocabulary spans


def _tail(text: str, max_prompt_length: int) -> str:
    """The end of a text too long to tokenise whole for the last max_prompt_length tokens: its last
    max_prompt_length x CHARS_PER_TOKEN characters (a 10 MB prompt took 44 s and 3.4 GB to tokenise whole)."""
    keep = max_prompt_length * CHARS_PER_TOKEN
    return text if len(text) <= keep else text[-keep:]


def messages_of(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def render_prompt(tokenizer, messages: list[dict], where: str, tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:
        roles = ", ".join(m["role"] for m in messages)
        raise ValueError(f"{where}: the tokenizer's chat template refuses its messages (roles {roles}): {e}") from None


def encode_completion(tokenizer, text: str, max_completion_length: int) -> tuple[list[int], bool]:
    """A text (GCPO's golden answer) as completion ids: tokens + EOS, cut to the budget; (ids, truncated).
    It follows the prompt ids of encode_prompts, which end where the template's assistant turn begins."""
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return ids[:max_completion_length], len(ids) > max_completion_length
