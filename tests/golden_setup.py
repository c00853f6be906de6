"""What the golden-answer tests (tests/test_golden_teacher.py, tests/test_golden_cache.py) share.

    policy, teacher = golden_models  # conftest's session fixture: make_tiny_model's policy, make_teacher's teacher
    cfg, model, tokenizer, gold, sampler, funcs = setup(golden_models, tmp_path, "--golden_temperature", "2.0")
    ctx, sampled, rows, metrics = one_round(cfg, model, tokenizer, gold, sampler, funcs)
    entries = cache_lines(tmp_path / "run")  # the run's golden cache, one dict a line

Two tiny models with different tokenizers and chat templates: the teacher trained here (supervised, a few
seconds) until it solves every problem greedily, the policy random (every group all wrong). The rewards at the
end are named by module path (`--reward_funcs golden_setup:boxed_answer`), by the trainer and the offline
command alike.
"""

import json
from pathlib import Path

import torch
from tiny_model import problem, write_jsonl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from gcpo_fast.config import parse_config
from gcpo_fast.data.files import PromptSampler
from gcpo_fast.data.prompts import encode_prompts
from gcpo_fast.data.rewards import extract_answer, math_reward
from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.golden.teacher import CACHE_NAME
from gcpo_fast.prepare import prepare
from gcpo_fast.rounds import RoundContext, build_rows, sample_groups
from gcpo_fast.train import load_teacher

# The teacher's own template, Mistral-like: no system role (as Gemma's and Mistral's templates refuse one)
TEACHER_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "[INST]{{ m['content'] }}[/INST]{% endfor %}"
)
N = 12


def teacher_tokenizer() -> PreTrainedTokenizerFast:
    """Another vocabulary than tiny_model's (other special tokens, other merges, 300 tokens) and another template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "[INST]", "[/INST]", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([problem(i)["solution"] for i in range(40)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<unk>")
    fast.chat_template = TEACHER_TEMPLATE
    return fast


def make_teacher(path: Path) -> Path:
    """A tiny Qwen2 taught the N problems' worked solutions under its own template (Adam, full batch)."""
    fast = teacher_tokenizer()
    config = Qwen2Config(
        vocab_size=len(fast) + 4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    config.save_pretrained(path)
    fast.save_pretrained(path)
    # trained with the tokenizer as the trainer loads it: with a qwen2 config.json beside it, transformers
    # converts it to Qwen2Tokenizer (its own pre-tokenizer, and an <|endoftext|> token: hence the + 4 above)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) <= config.vocab_size
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    rows = []
    for i in range(N):
        prompt = encode_prompts(tok, [problem(i)["prompt"]], 256)[0]
        completion = tok(problem(i)["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append((prompt + completion, [-100] * len(prompt) + completion))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    prompts = [problem(i)["prompt"] for i in range(N)]
    answers = [extract_answer(problem(i)["solution"]) for i in range(N)]
    for _ in range(20):  # until it solves every problem greedily (typically 400-800 steps, 10-20 s)
        for _ in range(100):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        out = HFEngine(model, tok).generate(encode_prompts(tok, prompts, 256), 1, Sampling(40, greedy=True))
        if math_reward(out.texts, answers) == [1.0] * N:
            break
    model.save_pretrained(path)
    return path


def answers_only(path, n=N, rows=None) -> Path:
    """A dataset with a final answer and no worked solution (most real math datasets)."""
    rows = rows or [
        {"prompt": problem(i)["prompt"], "answer": extract_answer(problem(i)["solution"])} for i in range(n)
    ]
    return write_jsonl(path, rows=rows)


# the options every golden-answer run here shares: final answers only, the boxed-answer reward, short rows
RUN_OPTIONS = [
    "--answer_column", "answer",
    "--reward_funcs", "golden_setup:boxed_answer",
    "--max_completion_length", "24",
    "--eval_steps", "0",
]  # fmt: skip
TEACHER_OPTIONS = ["--golden_max_completion_length", "40", "--golden_temperature", "0.3"]  # with --golden_model


def setup(golden_models, tmp_path, *argv, data=None):
    policy, teacher = golden_models
    data = data or answers_only(tmp_path / "answers.jsonl")
    cfg = parse_config(
        [
            *["--model", str(policy), "--dataset", str(data), "--output_dir", str(tmp_path / "run"), *RUN_OPTIONS],
            *["--num_generations", "4", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2"],
            *(["--golden_model", str(teacher), *TEACHER_OPTIONS] if "--golden_cache" not in argv else []),
            *argv,
        ]
    )
    prepared = prepare(cfg)
    torch.manual_seed(0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(policy)
    gold = load_teacher(cfg, prepared.golden_cache, prepared.reward_funcs, torch.device("cpu"))
    sampler = PromptSampler(prepared.records, cfg.prompts_per_round, seed=cfg.run.seed)
    return cfg, model, tokenizer, gold, sampler, prepared.reward_funcs


def one_round(cfg, model, tokenizer, gold, sampler, funcs):
    ctx = RoundContext.of(cfg, HFEngine(model, tokenizer), tokenizer, funcs, teacher=gold)
    sampled, metrics = sample_groups(ctx, sampler)
    rows, _, row_metrics = build_rows(ctx, sampled)
    return ctx, sampled, rows, {**metrics, **row_metrics}


def cache_lines(run: Path) -> list[dict]:
    path = run / CACHE_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def boxed_answer(prompts, completions, answer, **columns):
    """Correct when the text holds \\boxed{answer} (the random policy's text never does; math-verify alone
    sometimes accepts a bare number it happens to end with)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(f"\\boxed{{{a}}}" in t) for t, a in zip(texts, answer)]


def never_correct(prompts, completions, **columns):
    return [0.0] * len(completions)


def second_candidate_reward(prompts, completions, answer, **columns):
    """Only the second of a batch is correct: of a teacher's k candidates, the second; of a round's rollouts, one
    per group, so no group is all wrong."""
    return [float(k % 4 == 1) for k in range(len(completions))]
