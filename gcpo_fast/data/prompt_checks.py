"""What the prompts and completions of a run say about its settings: checked once before any model work, and
watched each round.

    from gcpo_fast.data.prompt_checks import check_prompts, warn_if_mostly_truncated

    check_prompts(tokenizer, {"train.jsonl": records, "test.jsonl": eval_records}, max_prompt_length=256)
    warn_if_mostly_truncated(rollouts.truncated, max_completion_length=128)   # after each generation round

check_prompts, before the model loads:
- a chat template that refuses a record's messages (Llama-2's and Mistral's templates raise_exception on a
  system message or on roles that do not alternate): ValueError naming the dataset, the record and its
  roles. One record of each distinct sequence of roles is rendered, so this costs a few renders.
- prompts longer than max_prompt_length tokens (they keep only their last max_prompt_length tokens, losing
  the start of the question): a warning with how many. A subword token is at least one byte of the text,
  so only prompts whose rendered text has more bytes than max_prompt_length can be too long; of those at
  most SAMPLE are tokenised (a random sample, and the count is then an estimate, said so), which keeps a
  100k-row dataset's check well under a second.
warn_if_mostly_truncated: TRL's most reported first-run trap (TRL #5697) is a completion budget that cuts
nearly every completion, so that no answer is ever reached and rewards and the loss are all 0. When more
than half of a round's rollouts reach max_completion_length without an EOS, a warning says how many, once
per run (the metric completions/clipped_ratio has it every step).
"""

import random
import warnings

from gcpo_fast.data.prompts import encode_prompts, messages_of, render_prompt

SAMPLE = 2000  # prompts tokenised at most to count the long ones
_warned_truncation: set[int] = set()  # the budgets already warned about in this process


def check_prompts(tokenizer, datasets: dict[str, list[dict]], max_prompt_length: int) -> None:
    """Refuse a chat template that cannot render a record; warn about prompts longer than max_prompt_length."""
    for name, records in datasets.items():
        _check_template(tokenizer, name, records)
        _warn_long_prompts(tokenizer, name, records, max_prompt_length)


def _check_template(tokenizer, name: str, records: list[dict]) -> None:
    if tokenizer.chat_template is None:
        return  # text prompts go in as they are; chat prompts are refused by encode_prompts
    seen = set()
    for i, record in enumerate(records):
        messages = messages_of(record["prompt"])
        roles = tuple(m["role"] for m in messages)
        if roles not in seen:
            seen.add(roles)
            render_prompt(tokenizer, messages, f"{name}, record {i}")


def _warn_long_prompts(tokenizer, name: str, records: list[dict], max_prompt_length: int) -> None:
    empty = [{"role": "user", "content": ""}]
    per_message = len(render_prompt(tokenizer, empty, name).encode()) if tokenizer.chat_template else 0
    per_message += 1  # a BOS
    candidates = [
        i
        for i, r in enumerate(records)
        if sum(len(m["content"].encode()) + per_message for m in messages_of(r["prompt"])) > max_prompt_length
    ]
    if not candidates:
        return
    checked = candidates if len(candidates) <= SAMPLE else random.Random(0).sample(candidates, SAMPLE)
    # one token more than the budget tells a long prompt (and keeps a huge one cheap: encode_prompts cuts first)
    long = sum(
        len(encode_prompts(tokenizer, [records[i]["prompt"]], max_prompt_length + 1)[0]) > max_prompt_length
        for i in checked
    )
    if long:
        count = f"{long}" if checked is candidates else f"about {round(long * len(candidates) / len(checked))}"
        warnings.warn(
            f"{name}: {count} of {len(records)} prompts are longer than max_prompt_length={max_prompt_length} tokens "
            f"and keep only their last {max_prompt_length}, losing their "
            "start: raise --max_prompt_length, or shorten them",
            stacklevel=3,
        )


def warn_if_mostly_truncated(truncated: list[bool], max_completion_length: int) -> None:
    """Warn (once per budget) when more than half of a round's rollouts end at the budget without an EOS."""
    cut = sum(truncated)
    if cut * 2 > len(truncated) and max_completion_length not in _warned_truncation:
        _warned_truncation.add(max_completion_length)
        warnings.warn(
            f"{cut} of {len(truncated)} completions of this round reached max_completion_length="
            f"{max_completion_length} tokens without ending: they reach no final answer, so rewards (and the "
            "loss) stay near 0; raise --max_completion_length (completions/clipped_ratio in metrics.jsonl "
            "follows it; this is shown once)",
            stacklevel=2,
        )
