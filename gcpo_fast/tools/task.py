"""The shipped math task with the python tool: golden answers that are one-line calls (`--tools python`).

    from gcpo_fast.tools.task import with_python_golden
    records = with_python_golden(load_records("builtin", levels=[8]))
    records[0]["golden"]    # "```python\\nprint(23*47)\\n```\\n```output\\n1081\\n```\\n\\\\boxed{1081}"

The prompts stay as they are (the model is never told that a tool exists); a record whose question is arithmetic
("Q: <expression>=?", levels 1-4, 6, 8 and part of 7) gets as its golden answer the trajectory that prints the
expression with the python tool and boxes the output, in ToRL's layout (gcpo_fast/tools/formats.py); word
problems keep their worked solution. GCPO's golden rows re-run the call before they use it
(gcpo_fast/golden/trajectories.py).
"""

import re

from gcpo_fast.tools.formats import FENCE, OUTPUT_OPEN, PYTHON_OPEN, python_output_text

QUESTION = re.compile(r"Q: ([0-9+\-*() ]+)=\?\n")


def python_golden(record: dict) -> str | None:
    """The python-tool trajectory of an arithmetic record, or None for a word problem."""
    question = QUESTION.fullmatch(record["prompt"]) if isinstance(record["prompt"], str) else None
    if question is None:
        return None
    code = f"print({question.group(1)})"
    answer = record["answer"]
    return f"{PYTHON_OPEN}\n{code}\n{FENCE}\n{OUTPUT_OPEN}{python_output_text(answer)}\\boxed{{{answer}}}"


def with_python_golden(records: list[dict]) -> list[dict]:
    """The records with the python-tool trajectory as the golden answer where there is one."""
    return [{**r, "golden": python_golden(r) or r["golden"]} for r in records]
