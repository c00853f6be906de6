"""The memory estimate (gcpo_fast.models.memory.plan_memory) against measured peaks of real training steps on the CPU.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_memory                 # all shapes; prints a markdown table
    OMP_NUM_THREADS=1 python -m benchmarks.bench_memory --out benchmarks/results/memory_estimate_cpu.md
    OMP_NUM_THREADS=1 python -m benchmarks.bench_memory --shapes wide+lora16 long+lora16   # some rows
    python -m benchmarks.bench_memory --plan_7b        # the estimate alone: Qwen2.5-7B LoRA r=16 and full, 80 GB

Each shape runs in a fresh process: a random Qwen2 model (fp32) and AdamW are built, then three training steps
run (packed forward, fused policy loss, backward, clipping, AdamW step) on B rows of prompt + completion
tokens. Measured: the process's peak resident memory (ru_maxrss) minus its resident memory after the imports,
before the model exists, twice: with glibc's default malloc, whose heap keeps freed blocks (fragmentation adds
to the peak, as a caching allocator's would), and with MALLOC_MMAP_THRESHOLD_=65536, which returns every large
block at once, so the peak is that of the live tensors, what the estimate counts. The estimate is
plan_memory(config, device="cpu", bf16=False, ...) for the same tokens, gradient checkpointing and attention
(packed_sdpa, which keeps K/V repeated to every query head: repeated_kv). A `+loraR`
shape trains PEFT's LoRA adapters of rank R (alpha 2R, dropout 0.05, the attention and MLP projections; base and
lm_head frozen, gcpo_fast.models.lora.attach), AdamW over the adapters only, against plan_memory(..., lora=PeftOptions).

--plan_7b prints plan_memory for Qwen2.5-7B (its config values written below, nothing downloaded) on one 80 GB
GPU: bf16, gradient checkpointing, 8 rows of 512 prompt + 1024 completion tokens per micro-batch, the colocated
vLLM engine at 0.3 of the device; LoRA r=16 beside full fine-tuning (without peft installed, full fine-tuning
alone: PEFT counts the adapters).
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys

# (name, hidden, intermediate, layers, heads, kv heads, vocab, rows, prompt, completion, checkpointing, LoRA rank
# or 0 for full fine-tuning)
SHAPES = [
    ("small", 256, 768, 4, 8, 2, 4096, 16, 64, 64, False, 0),
    ("small+ckpt", 256, 768, 4, 8, 2, 4096, 16, 64, 64, True, 0),
    ("wide", 512, 1536, 4, 8, 2, 8192, 16, 96, 96, False, 0),
    ("wide+ckpt", 512, 1536, 4, 8, 2, 8192, 16, 96, 96, True, 0),
    ("deep", 256, 768, 12, 8, 4, 4096, 32, 64, 64, False, 0),
    ("long", 384, 1024, 6, 6, 2, 4096, 8, 256, 512, False, 0),
    ("wide+lora16", 512, 1536, 4, 8, 2, 8192, 16, 96, 96, False, 16),
    ("wide+lora16+ckpt", 512, 1536, 4, 8, 2, 8192, 16, 96, 96, True, 16),
    ("long+lora16", 384, 1024, 6, 6, 2, 4096, 8, 256, 512, False, 16),
    ("realvocab+lora16", 256, 704, 2, 4, 2, 151936, 8, 64, 192, False, 16),
]
QWEN_7B = dict(  # Qwen2.5-7B's config.json
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(shape) -> dict:
    """Run the training steps of one shape in this process; returns measured and estimated bytes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gcpo_fast.kernels import PolicyLossConfig
    from gcpo_fast.models.attention import repeats_kv
    from gcpo_fast.models.loading import enable_checkpointing
    from gcpo_fast.models.lora import PeftOptions, attach
    from gcpo_fast.models.memory import plan_memory
    from gcpo_fast.packing import pack_rows
    from gcpo_fast.update import ModelWithLoss

    name, h, inter, layers, heads, kv, vocab, rows, prompt, completion, ckpt, rank = shape
    lora = PeftOptions(use_peft=True, lora_r=rank, lora_alpha=2 * rank) if rank else None
    baseline = rss_bytes()
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).train()
    if ckpt:
        enable_checkpointing(model)
    if lora:
        model = attach(model, lora, base_path="random").train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    module = ModelWithLoss(model, PolicyLossConfig())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, prompt + completion), generator=g).tolist()
    advantages = torch.randn(rows, generator=g)
    packed = pack_rows([r[:prompt] for r in ids], [r[prompt:] for r in ids], advantages=advantages)
    for _ in range(3):
        loss, _ = module(packed, float(rows * completion))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    plan = plan_memory(
        config,
        tokens_per_micro_batch=rows * (prompt + completion),
        completion_tokens=rows * completion,
        device="cpu",
        bf16=False,
        gradient_checkpointing=ckpt,
        lora=lora,
        repeated_kv=repeats_kv(model.config._attn_implementation, "cpu"),  # packed_sdpa: forward_hidden's choice
    )
    return {
        "name": name,
        "tokens": rows * (prompt + completion),
        "measured": measured,
        "estimate": plan.total(),
        "summary": plan.summary(),
    }


def plan_7b() -> None:
    """The estimates for Qwen2.5-7B on one 80 GB GPU, LoRA r=16 and full fine-tuning, printed."""
    from transformers import Qwen2Config

    from gcpo_fast.models.lora import PeftOptions
    from gcpo_fast.models.memory import GIB, fit_warning, plan_memory

    config = Qwen2Config(**QWEN_7B)
    rows, prompt, completion = 8, 512, 1024
    options = dict(
        tokens_per_micro_batch=rows * (prompt + completion),
        completion_tokens=rows * completion,
        bf16=True,
        device="cuda",
        gradient_checkpointing=True,
        vllm_gpu_memory_utilization=0.3,
    )
    print(f"Qwen2.5-7B, one 80 GiB GPU, {rows} rows x ({prompt} + {completion}) tokens, bf16, checkpointing, vLLM 0.3")
    for name, rank in (("LoRA r=16", 16), ("full fine-tuning", 0)):
        if rank and importlib.util.find_spec("peft") is None:  # the adapters are counted by PEFT itself
            print(f"{name}: no estimate: the adapters are counted with peft, which is not installed")
            continue
        lora = PeftOptions(use_peft=True, lora_r=rank) if rank else None
        plan = plan_memory(config, device_memory=80 * GIB, lora=lora, **options)
        print(f"{name}: {plan.summary()}")
        print(f"  {fit_warning(config, device_memory=80 * GIB, lora=lora, **options) or 'fits'}")


def run_child(i: int, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_memory", "--child", str(i)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown table here too")
    ap.add_argument("--shapes", nargs="+", choices=[s[0] for s in SHAPES], help="these rows only (default: all)")
    ap.add_argument("--plan_7b", action="store_true", help="print the Qwen2.5-7B estimates and stop")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(SHAPES[args.child])))
        return
    if args.plan_7b:
        plan_7b()
        return
    lines = [
        "| shape | hidden x inter x layers (heads/kv), vocab | tokens | estimate MiB | peak MiB, default malloc "
        "| estimate / peak | peak MiB, mmap threshold 64 KiB | estimate / peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, shape in enumerate(SHAPES):
        if args.shapes and shape[0] not in args.shapes:
            continue
        default, live = (run_child(i, env) for env in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}))
        _, h, inter, layers, heads, kv, vocab, *_ = shape
        estimate = default["estimate"]
        lines.append(
            f"| {default['name']} | {h} x {inter} x {layers} ({heads}/{kv}), {vocab} | {default['tokens']} | "
            f"{estimate / 2**20:.0f} | {default['measured'] / 2**20:.0f} | {estimate / default['measured']:.2f} | "
            f"{live['measured'] / 2**20:.0f} | {estimate / live['measured']:.2f} |"
        )
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
