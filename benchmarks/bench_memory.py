"""The memory estimate (gcpo_fast.memory.plan_memory) against measured peaks of real training steps on the CPU.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_memory                 # all shapes; prints a markdown table
    OMP_NUM_THREADS=1 python -m benchmarks.bench_memory --out benchmarks/results/memory_estimate_cpu.md

Each shape runs in a fresh process: a random Qwen2 model (fp32) and AdamW are built, then three training steps
run (packed forward, fused policy loss, backward, clipping, AdamW step) on B rows of prompt + completion
tokens. Measured: the process's peak resident memory (ru_maxrss) minus its resident memory after the imports,
before the model exists, twice: with glibc's default malloc, whose heap keeps freed blocks (fragmentation adds
to the peak, as a caching allocator's would), and with MALLOC_MMAP_THRESHOLD_=65536, which returns every large
block at once, so the peak is that of the live tensors, what the estimate counts. The estimate is
plan_memory(config, device="cpu", bf16=False, ...) for the same tokens and gradient checkpointing.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

# (name, hidden, intermediate, layers, heads, kv heads, vocab, rows, prompt, completion, checkpointing)
SHAPES = [
    ("small", 256, 768, 4, 8, 2, 4096, 16, 64, 64, False),
    ("small+ckpt", 256, 768, 4, 8, 2, 4096, 16, 64, 64, True),
    ("wide", 512, 1536, 4, 8, 2, 8192, 16, 96, 96, False),
    ("wide+ckpt", 512, 1536, 4, 8, 2, 8192, 16, 96, 96, True),
    ("deep", 256, 768, 12, 8, 4, 4096, 32, 64, 64, False),
    ("long", 384, 1024, 6, 6, 2, 4096, 8, 256, 512, False),
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(shape) -> dict:
    """Run the training steps of one shape in this process; returns measured and estimated bytes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gcpo_fast.kernels import PolicyLossConfig
    from gcpo_fast.memory import plan_memory
    from gcpo_fast.packing import pack_rows
    from gcpo_fast.update import ModelWithLoss

    name, h, inter, layers, heads, kv, vocab, rows, prompt, completion, ckpt = shape
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
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    module = ModelWithLoss(model, PolicyLossConfig(), temperature=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, prompt + completion), generator=g).tolist()
    packed = pack_rows([r[:prompt] for r in ids], [r[prompt:] for r in ids])
    for _ in range(3):
        loss, _ = module(packed, torch.randn(rows), None, None, float(rows * completion))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
    )
    return {
        "name": name,
        "tokens": rows * (prompt + completion),
        "measured": measured,
        "estimate": plan.total(),
        "summary": plan.summary(),
    }


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
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(SHAPES[args.child])))
        return
    lines = [
        "| shape | hidden x inter x layers (heads/kv), vocab | tokens | estimate MiB | peak MiB, default malloc "
        "| estimate / peak | peak MiB, mmap threshold 64 KiB | estimate / peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, shape in enumerate(SHAPES):
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
