"""Build the small models that ship in gcpo_fast/assets: tokenizer, causal LM, SFT warm start.

    python -m gcpo_fast.make_default_model [--out gcpo_fast/assets/default_model] [--seed 0]
    python -m gcpo_fast.make_default_model --tool-levels 3 7 --out gcpo_fast/assets/tool_model   # the tool demo's

1. Tokenizer: byte-level BPE trained with the `tokenizers` library on text of the task (gcpo_fast/data/tasks.py):
   371 tokens (256 bytes, 3 specials, 112 merges: BPE runs out of pairs below the 384 asked for). Its
   normalizer, pre-tokenizer and decoder are Qwen2's, verbatim, because transformers 5 loads the tokenizer of
   any "qwen2" model as Qwen2Tokenizer, rebuilt from vocab + merges with that pipeline; save_tokenizer checks
   that AutoTokenizer reads back the same ids. Digits are single tokens; a prompt and its solution tokenized
   apart give the ids of their concatenation. Specials: <|endoftext|> (eos, id 0), <|pad|> (id 1), <|bos|>
   (id 2, defined but never added: the tokenizer adds no special tokens, so add_special_tokens changes
   nothing). The chat template is the identity (contents verbatim, eos after assistant turns), so a prompt
   wrapped as a user message renders as the prompt itself. padding_side is left (for generation).
2. Model: Qwen2ForCausalLM, hidden 128, 4 layers, 4 heads (head_dim 32), MLP 512, tied embeddings, fp32:
   1.10M parameters, model.safetensors 4.4 MB.
3. Warm start: teacher-forced cross-entropy on the solution tokens and eos (prompt tokens masked), AdamW
   (lr 3e-3, 100 warm-up steps, cosine to 0), 4000 steps of 32 train_split problems, levels weighted by
   SFT_MIX: levels 1-4 fully, 6 and 7 at 0.1, and never the word problems (5) or level 8 (--sft-mix
   changes it). Word problems use only one-digit facts the model knows, in a form it has never seen: it
   solves 6% of them and 75% of their groups of 8 rollouts fail every rollout, which is where GCPO's
   golden answers teach and GRPO-style methods get no signal (README, "The shipped default").
4. Held-out evaluation: greedy decoding of distinct heldout_split problems, math_reward, per level; written to
   README.md and build_info.json beside the weights.
5. The tool model (`--tool-levels 3 7`): the same build, except that the warm start solves the arithmetic
   problems of levels 3 and 7 with the python tool in its layout (gcpo_fast/tools/task.py), the tool's output
   block tokenised apart and left out of the loss, as the tool loop appends it. Why a second model: the default
   model's warm start never wrote a byte of that layout, so a level-8 golden call ("```python\nprint(27*41)...")
   costs it about 900 nats, and GCPO on level 8 never sampled one (docs/results.md, "Tools on level 8"). With
   level 7 alone (one-digit operands) GCPO taught the call but not the copying of two-digit operands and
   four-digit outputs in 300 steps; level 3 (two-digit sums) gives the copying. The tool model calls the tool
   on levels 3 and 7 (98-100% of samples) and seldom on level 8 (4% of samples, every call wrong at the start).

Seeded end to end (tokenizer training is deterministic; torch, the data stream and the batch order are
seeded; one torch thread by default): a rerun on the same machine and torch gives the same weights
(checked on an earlier mix: two builds, one beside another job and one alone, wrote byte-identical
model.safetensors).

Measured on the 2-core CPU machine this was built on (torch 2.13 CPU, 1 thread, another job on the other
core): 432 s for tokenizer + SFT (about 9 steps/s), a few seconds of evaluation, 7 min 18 s wall clock.

Held-out accuracy it starts from (greedy, distinct heldout_split problems; levels 1-2 hold only 24 and 29):
    level       1       2       3       4       5       6       7       8       all
    correct   23/24   20/29  100/100  91/100   6/100  13/100   8/100   0/100   261/653 = 40.0%
Sampled at temperature 1, 8 rollouts per train_split prompt (24 prompts per level), the groups all wrong,
where golden answers come in, are 0% at levels 1-4, 75% at 5, 79% at 6, 71% at 7, 100% at 8.
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from gcpo_fast.data.rewards import math_reward
from gcpo_fast.data.tasks import LEVELS, generate_problems, heldout_split, train_split
from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.tools.formats import python_output_text, split_python_trajectory
from gcpo_fast.tools.task import python_golden

DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "default_model"
REPO = DEFAULT_OUT.parents[2]

EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<|bos|>"
VOCAB_SIZE = 384  # an upper bound: BPE stops when no pair is left to merge (the task has few distinct words)
# Qwen2's pre-tokenizer, verbatim: transformers 5 loads any "qwen2" model's tokenizer as Qwen2Tokenizer, which
# rebuilds the pipeline from vocab + merges with this regex, so ours must be the same for the ids to match
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (verbatim)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)

MODEL = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=512,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)

# relative weight of each level in the SFT stream: the hard levels are held back so RL has work to do
SFT_MIX = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 0.0, 6: 0.1, 7: 0.1, 8: 0.0}
STEPS, BATCH_SIZE, LR, WARMUP = 4000, 32, 3e-3, 100
MAX_NEW_TOKENS = 64
EVAL_PER_LEVEL = 100


def build_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    records = generate_problems(20000, seed=seed)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, PAD, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((r["prompt"] + r["solution"] for r in records), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=BOS,
        padding_side="left",
        model_max_length=MODEL["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """save_pretrained, naming the class Qwen2Tokenizer (which transformers 4 and 5 both know, and which
    transformers 5 forces on qwen2 models anyway), then check that AutoTokenizer reads back the same ids."""
    tokenizer.save_pretrained(out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    loaded = AutoTokenizer.from_pretrained(out)
    for r in generate_problems(500, seed=12345):
        text = r["prompt"] + r["solution"]
        if loaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
            raise RuntimeError(f"{out}: AutoTokenizer ({type(loaded).__name__}) tokenizes {text!r} differently")
    if (loaded.eos_token_id, loaded.pad_token_id) != (tokenizer.eos_token_id, tokenizer.pad_token_id):
        raise RuntimeError(f"{out}: AutoTokenizer reads back different eos/pad tokens")


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    return model


def sft_records(n: int, seed: int, mix: dict[int, float], tool_levels: tuple[int, ...] = ()) -> list[dict]:
    """n train_split problems with levels in proportion to mix (level -> weight), in a seeded order; the
    arithmetic problems of tool_levels solved with the python tool instead (gcpo_fast/tools/task.py)."""
    total = sum(mix.values())
    records = []
    for level, weight in mix.items():
        if weight > 0:
            records += train_split(math.ceil(n * weight / total), seed=seed * 100 + level, levels=[level])
    for r in records:
        if r["level"] in tool_levels:
            r["solution"] = python_golden(r) or r["solution"]
    random.Random(seed).shuffle(records)
    return records[:n]


def encode(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """Input ids (prompt, solution, eos) and labels (-100 on the prompt and on tool outputs). A python tool's
    output block is context the model reads, never text it writes, and is tokenised apart, as the tool loop
    appends it (gcpo_fast/tools/loop.py)."""
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = ids_of(record["prompt"])
    labels = [-100] * len(ids)
    for model_text, _, output in split_python_trajectory(record["solution"]) or [(record["solution"], None, None)]:
        ids, labels = ids + ids_of(model_text), labels + ids_of(model_text)
        if output is not None:
            output_ids = ids_of(python_output_text(output))
            ids, labels = ids + output_ids, labels + [-100] * len(output_ids)
    return ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train(
    model, tokenizer, seed: int, steps: int, batch_size: int, lr: float, mix: dict[int, float], tool_levels=()
) -> list[float]:
    data = [encode(tokenizer, r) for r in sft_records(steps * batch_size, seed, mix, tool_levels)]
    # batches of similar lengths (less padding): sort each window of 16 batches by length, shuffle the batches
    batches = []
    for w in range(0, len(data), 16 * batch_size):
        window = sorted(data[w : w + 16 * batch_size], key=lambda pair: len(pair[0]))
        batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    random.Random(seed).shuffle(batches)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="SFT warm start")
    for step in bar:
        batch = collate(batches[step], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The raw "Q: ...\n" prompts as ids (no chat template: the warm start never saw one)."""
    return [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]


def greedy_completions(
    model, tokenizer, prompts: list[str], batch_size: int = 100, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[str]:
    engine, greedy = HFEngine(model, tokenizer), Sampling(max_new_tokens, greedy=True)
    out = []
    for i in range(0, len(prompts), batch_size):
        out += engine.generate(prompt_ids(tokenizer, prompts[i : i + batch_size]), 1, greedy).texts
    return out


def evaluate(model, tokenizer, seed: int, per_level: int = EVAL_PER_LEVEL) -> dict[int, tuple[int, int]]:
    """{level: (correct, total)} of greedy decoding on per_level distinct held-out problems of each level
    (fewer where the level has fewer distinct held-out problems: levels 1 and 2)."""
    results = {}
    for level in tqdm(LEVELS, desc="held-out eval"):
        records = heldout_split(20 * per_level, seed=seed, levels=[level])
        records = list({r["prompt"]: r for r in records}.values())[:per_level]
        completions = greedy_completions(model, tokenizer, [r["prompt"] for r in records])
        rewards = math_reward(completions, [r["answer"] for r in records])
        results[level] = (int(sum(rewards)), len(records))
    return results


def rollout_stats(model, tokenizer, seed: int, per_level: int = 24, group: int = 8) -> dict[int, dict]:
    """What RL will see: per level, `group` samples (temperature 1, no top-k/top-p) for each of per_level
    train_split prompts: mean reward, and the fractions of groups all wrong (golden answer injected by
    GCPO) and all right (no signal)."""
    torch.manual_seed(seed)
    engine, sampling = HFEngine(model, tokenizer), Sampling(MAX_NEW_TOKENS, temperature=1.0)
    stats = {}
    for level in tqdm(LEVELS, desc="rollout stats"):
        records = train_split(per_level, seed=seed + 1, levels=[level])
        texts = engine.generate(prompt_ids(tokenizer, [r["prompt"] for r in records]), group, sampling).texts
        rewards = torch.tensor(math_reward(texts, [r["answer"] for r in records for _ in range(group)])).view(-1, group)
        stats[level] = {
            "prompts": per_level,
            "group": group,
            "mean_reward": round(rewards.mean().item(), 3),
            "all_wrong": round((rewards.sum(1) == 0).float().mean().item(), 3),
            "all_right": round((rewards.sum(1) == group).float().mean().item(), 3),
        }
    return stats


def rollout_table(stats: dict[int, dict]) -> str:
    rows = ["| level | mean reward | groups all wrong | groups all right |", "|---|---|---|---|"]
    for level, s in stats.items():
        rows.append(f"| {level} | {s['mean_reward']:.2f} | {s['all_wrong']:.0%} | {s['all_right']:.0%} |")
    return "\n".join(rows)


def accuracy_table(results: dict[int, tuple[int, int]]) -> str:
    rows = ["| level | correct / problems | accuracy |", "|---|---|---|"]
    for level, (c, n) in results.items():
        rows.append(f"| {level} | {c} / {n} | {c / n:.0%} |")
    c, n = sum(c for c, _ in results.values()), sum(n for _, n in results.values())
    rows.append(f"| all | {c} / {n} | {c / n:.1%} |")
    return "\n".join(rows)


README = """# gcpo_fast {title}

{purpose}, warm-started by supervised fine-tuning on part of the math task of `gcpo_fast/data/tasks.py`.
Built by `python -m gcpo_fast.make_default_model{build_args}` (seed {seed}); see that module for every choice.

- Model: Qwen2 architecture, {params:.2f}M parameters: hidden {hidden_size}, {num_hidden_layers} layers,
  {num_attention_heads} heads, MLP {intermediate_size}, tied embeddings, fp32; model.safetensors {size_mb:.1f} MB.
- Tokenizer: {vocab}-token byte-level BPE with Qwen2's pre-tokenizer (digits one by one).

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained("{path}")
    model = AutoModelForCausalLM.from_pretrained("{path}")
    ids = tok(["Q: 23+48=?\\n"], return_tensors="pt")
    print(tok.decode(model.generate(**ids)[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))

- Prompts are "Q: <question>\\n"; the model answers with short steps and `\\boxed{{answer}}`, then eos
  (`<|endoftext|>`, id {eos}). pad is `<|pad|>` (id {pad}); `<|bos|>` exists but the tokenizer never adds
  it (no special tokens are added to any text). The chat template is the identity: message contents
  verbatim, eos after assistant turns. Generation defaults: greedy, {max_new_tokens} new tokens.
- Warm start: {steps} AdamW steps of {batch_size} problems (lr {lr}, cosine), teacher-forced cross-entropy
  on the solution tokens, all drawn from `train_split`, levels weighted
  {mix}
  (levels never seen: {unseen}); arithmetic solved with the python tool at levels: {tool_levels}.
  Final training loss {final_loss:.3f}.
- Build time: {build_s:.0f} s ({train_s:.0f} s tokenizer + SFT, the rest evaluation) on a 2-core CPU
  machine shared with other jobs, {threads} torch thread, torch {torch}.

## Held-out accuracy before RL

Greedy decoding, `math_reward` against the answer, on distinct `heldout_split` problems of each level
(seed {seed}; levels 1 and 2 hold only {n1} and {n2} distinct held-out problems, all used){tool_note}:

{table}

## What RL starts from

Sampled rollouts (temperature 1, no top-k / top-p, {group} per prompt) on {prompts} `train_split` prompts of
each level: the mean reward, and the share of groups whose {group} rollouts are all wrong (where GCPO injects
the golden answer) or all right (no learning signal):

{rollouts}

Levels: 1 one-digit addition, 2 one-digit subtraction / multiplication, 3 two-digit addition, 4 two-digit
subtraction, 5 one-step word problems, 6 two-digit times one-digit, 7 two or three operations (incl. two-step
word problems), 8 two-digit times two-digit.
"""


def write_readme(out: Path, model, tokenizer, info: dict, results: dict, rollouts: dict) -> None:
    tools = ", ".join(map(str, info["tool_levels"]))
    path = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
    text = README.format(
        title="tool model" if tools else "default model",
        purpose=(
            f"The small causal LM of the tool demo (`python -m gcpo_fast.train --tools python --builtin_levels 8 "
            f"--model {path}`): the default model's recipe with the arithmetic of levels {tools} "
            "solved by the python tool"
            if tools
            else "The small causal LM that `python -m gcpo_fast.train` trains when given no `--model`"
        ),
        build_args=f" --tool-levels {tools.replace(',', '')} --out {path}" if tools else "",
        tool_note=", no tool run: a call is scored as the text it is, so the tool levels score near 0" if tools else "",
        path=path,
        rollouts=rollout_table(rollouts),
        group=rollouts[1]["group"],
        prompts=rollouts[1]["prompts"],
        params=info["parameters"] / 1e6,
        size_mb=(out / "model.safetensors").stat().st_size / 1e6,
        vocab=len(tokenizer),
        seed=info["seed"],
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
        steps=info["steps"],
        batch_size=info["batch_size"],
        lr=info["lr"],
        mix=", ".join(f"{k}: {v:g}" for k, v in info["sft_mix"].items()),
        final_loss=info["final_loss"],
        unseen=", ".join(str(k) for k, v in info["sft_mix"].items() if v == 0) or "none",
        tool_levels=tools or "none",
        build_s=info["build_seconds"],
        train_s=info["train_seconds"],
        threads=info["torch_threads"],
        torch=info["torch"],
        n1=results[1][1],
        n2=results[2][1],
        table=accuracy_table(results),
        **{
            k: getattr(model.config, k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        },
    )
    (out / "README.md").write_text(text)


def parse_mix(text: str) -> dict[int, float]:
    """'1:1,2:1,5:0.3' -> {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 0.3, ...}: every level, 0 where not given."""
    mix = dict.fromkeys(LEVELS, 0.0)
    try:
        for item in text.split(","):
            level, weight = item.split(":")
            if int(level) not in mix or float(weight) < 0:
                raise ValueError
            mix[int(level)] = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LEVEL:WEIGHT,... with levels {LEVELS[0]}-{LEVELS[-1]} and weights >= 0, got {text!r}"
        ) from None
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("--sft-mix gives every level weight 0")
    return mix


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--eval-per-level", type=int, default=EVAL_PER_LEVEL)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the same weights whatever the core count, and no "
        "thread thrashing on a busy machine)",
    )
    ap.add_argument(
        "--sft-mix",
        type=parse_mix,
        default=SFT_MIX,
        metavar="LEVEL:WEIGHT,...",
        help="relative weight of each level in the warm start (default: "
        + ",".join(f"{k}:{v:g}" for k, v in SFT_MIX.items())
        + "; levels left out get 0)",
    )
    ap.add_argument(
        "--tool-levels",
        type=int,
        nargs="*",
        default=[],
        choices=LEVELS,
        metavar="LEVEL",
        help="levels whose arithmetic problems the warm start solves with the python tool, in its layout "
        "(gcpo_fast/tools/task.py); default none. The tool model (assets/tool_model) is built with 3 7",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.time()
    tokenizer = build_tokenizer(args.seed)
    model = build_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tokenizer)} tokens; model: {n_params / 1e6:.2f}M parameters")
    losses = train(model, tokenizer, args.seed, args.steps, args.batch_size, args.lr, args.sft_mix, args.tool_levels)
    train_s = time.time() - start
    results = evaluate(model, tokenizer, args.seed, args.eval_per_level)
    rollouts = rollout_stats(model, tokenizer, args.seed)
    total_s = time.time() - start
    print(accuracy_table(results))
    print(rollout_table(rollouts))

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    save_tokenizer(tokenizer, args.out)
    info = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "sft_mix": args.sft_mix,
        "tool_levels": args.tool_levels,
        "parameters": n_params,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "build_seconds": round(total_s),
        "train_seconds": round(train_s),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "heldout_accuracy": {str(k): {"correct": c, "problems": n} for k, (c, n) in results.items()},
        "rollout_stats": {str(k): v for k, v in rollouts.items()},
    }
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    write_readme(args.out, model, tokenizer, info, results, rollouts)
    print(f"saved to {args.out} in {total_s:.0f} s (training {train_s:.0f} s)")


if __name__ == "__main__":
    main()
