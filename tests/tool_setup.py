"""Models that call tools, for the tool tests (a helper module, not conftest): the shipped model taught a few
trajectories by supervised fine-tuning, with the tool tokens masked as the trainer masks them.

    from tool_setup import HERMES_TEMPLATE, multiply, teach, taught_python_caller
    model = teach(model, tokenizer, [(prompt_ids, completion_ids, tool_mask), ...], steps=150)
    model, tokenizer, tools, prompts = taught_python_caller(records, sandbox)   # calls the python tool on records
"""

# A Hermes / Qwen2.5-style chat template over the shipped model's byte-level tokenizer: tool schemas in a system
# turn, calls as <tool_call> JSON, results in a user turn as <tool_response>, eos ending every turn.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>\n{{ c['function'] | tojson }}\n</tool_call>{% endfor %}"
    "{{ eos_token }}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def fail(reason: str) -> str:
    """Raise an error, always.

    Args:
        reason: what the error says
    """
    raise RuntimeError(reason)


def teach(model, tokenizer, examples, steps: int = 200, lr: float = 3e-3, seed: int = 0):
    """Teacher-forced cross-entropy on each example's completion tokens where the mask is 1 (tool tokens are
    context), AdamW, full batch; the model in eval mode after. (torch is imported here: the sandbox imports this
    module for its tools, and an import of torch there would take seconds.)"""
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for prompt, completion, mask in examples:
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
            targets = torch.tensor(completion).masked_fill(torch.tensor(mask) == 0, -100)
            loss = loss + torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
        optimizer.zero_grad()
        (loss / len(examples)).backward()
        optimizer.step()
    return model.eval()


def taught_python_caller(records, sandbox, steps: int = 150):
    """The shipped model taught, by `teach`, the python-tool trajectories of these level-8 records (their golden
    answers as one-line calls, gcpo_fast/tools/task.py): it calls the tool on their prompts. Returns the model, its
    tokenizer, the python ToolSet and the records' prompt ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gcpo_fast.data.prompts import encode_prompts
    from gcpo_fast.golden.trajectories import encode_trajectory
    from gcpo_fast.models.loading import DEFAULT_MODEL
    from gcpo_fast.tools.formats import ToolSet
    from gcpo_fast.tools.task import with_python_golden

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    tools = ToolSet(["python"], tokenizer, sandbox)
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in records], 64)
    encoded = [encode_trajectory(tools, r["golden"], 128) for r in with_python_golden(records)]
    teach(model, tokenizer, [(p, e.ids, e.tool_mask) for p, e in zip(prompts, encoded)], steps=steps)
    return model, tokenizer, tools, prompts
