"""Golden answers that call tools: a trajectory's tool outputs re-run in the sandbox, its ids and tool mask.

    from gcpo_fast.golden.trajectories import encode_trajectory

    encoded = encode_trajectory(tools, golden_text, max_completion_length)   # tools: gcpo_fast.tools.formats.ToolSet
    encoded.ids, encoded.tool_mask, encoded.truncated, encoded.mismatch

A golden answer with tools is written in the run's tool layout (the python tool's: "```python\\n<code>\\n```\\n
```output\\n<output>\\n```\\n", as a dataset's golden column or a teacher's verified trajectory). Each call it makes
is run again in the sandbox, and its output must be the one written (surrounding blank lines aside): a golden
row whose outputs the tool would not give teaches the model to trust outputs it will never see, so it is dropped
and counted (gcpo/golden_tool_mismatch). The model's text is tokenised a part at a time and each output exactly as
a rollout gets it (ToolSet.output_ids), so a golden row's tool tokens are those of a rollout that made the same
calls, masked the same way (Rows.tool_mask 0).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Encoded:
    """A golden text as completion ids (EOS at the end), with its tool mask; mismatch: a re-run output differed
    (or an output block was not closed), and the row is not used."""

    ids: list[int]
    tool_mask: list[int]
    truncated: bool
    mismatch: bool = False


def encode_trajectory(tools, text: str, max_completion_length: int) -> Encoded:
    """The golden text's ids and tool mask, its calls re-run (module docstring); cut to the budget."""
    parts = tools.split_trajectory(text)
    if parts is None:
        return Encoded([], [], False, mismatch=True)
    tokenizer = tools.tokenizer
    ids, mask = [], []
    for model_text, call, written in parts:
        model_ids = tokenizer(model_text, add_special_tokens=False).input_ids
        ids, mask = ids + model_ids, mask + [1] * len(model_ids)
        if call is None:
            continue
        result = tools.run(call)
        if result.status != "ok" or result.output.strip("\n") != written.strip("\n"):
            return Encoded([], [], False, mismatch=True)
        output_ids = tools.output_ids([call], [result])
        ids, mask = ids + output_ids, mask + [0] * len(output_ids)
    ids, mask = ids + [tokenizer.eos_token_id], mask + [1]
    cut = len(ids) > max_completion_length
    return Encoded(ids[:max_completion_length], mask[:max_completion_length], cut)
