"""One optimizer step with LoRA adapters against full fine-tuning: step time and peak memory, side by side.

    python -m benchmarks.bench_lora                              # both shapes, LoRA r=16 against full
    python -m benchmarks.bench_lora --shapes wide --steps 5 --rank 64

Shapes (random Qwen2 weights, seeded): `wide` (4 layers, d=1024, MLP 2816, V=8192: the decoder dominates) and
`realvocab` (2 layers, d=256, V=151936: the lm_head and the loss dominate). One micro-batch of 8 rows, each
a 64-token prompt and a 192-token completion, packed; GSPO's sequence-level loss through the trainer's own
ModelWithLoss and optimizer_step (fused op, AdamW, clipping), fp32 on the CPU. LoRA: PEFT adapters of rank
--rank on the attention and MLP projections (gcpo_fast/models/lora.py), base and lm_head frozen, so the fused op
skips its dW GEMM. Each (shape, variant) runs in its own process: the median step time after one warm-up step,
and the process's peak RSS (VmHWM; CUDA: max_memory_allocated) after the steps, with the trainable
parameters and their gradient + AdamW bytes (16 per trainable fp32 parameter with the weight, 12 without).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "wide": dict(layers=4, d=1024, mlp=2816, v=8192),
    "realvocab": dict(layers=2, d=256, mlp=704, v=151936),
}
ROWS, PROMPT, COMPLETION = 8, 64, 192


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r)")
    ap.add_argument("--worker", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def build_model(shape: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = SHAPES[shape]
    config = Qwen2Config(
        vocab_size=s["v"], hidden_size=s["d"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
        num_attention_heads=s["d"] // 64, num_key_value_heads=max(1, s["d"] // 256), tie_word_embeddings=False,
        max_position_embeddings=PROMPT + COMPLETION,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def micro_batch(v: int):
    from gcpo_fast.packing import pack_rows

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, v, (PROMPT,), generator=g).tolist() for _ in range(ROWS)]
    completions = [torch.randint(0, v, (COMPLETION,), generator=g).tolist() for _ in range(ROWS)]
    return pack_rows(prompts, completions, advantages=torch.randn(ROWS, generator=g))


def peak_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(shape: str, variant: str, steps: int, rank: int) -> dict:
    from gcpo_fast.distributed.parallel import Policy
    from gcpo_fast.kernels import PolicyLossConfig
    from gcpo_fast.models.lora import PeftOptions, attach
    from gcpo_fast.update import ModelWithLoss, OptimizerConfig, build_optimizer, optimizer_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(shape).to(device)
    options = PeftOptions(use_peft=variant == "lora", lora_r=rank, lora_alpha=2 * rank, lora_dropout=0.0)
    with tempfile.TemporaryDirectory() as base:
        model = attach(model, options, base_path=base)
    loss = PolicyLossConfig(importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4)
    optim = OptimizerConfig(learning_rate=1e-5)
    optimizer, scheduler = build_optimizer(model, optim, max_steps=steps + 1)
    policy = Policy(model, ModelWithLoss(model, loss), device, ddp=False)
    mb = micro_batch(SHAPES[shape]["v"])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer_step(policy, optimizer, scheduler, [mb], optim, loss, bf16=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "shape": shape,
        "variant": variant,
        "step_s": statistics.median(times[1:]),
        "peak_mem": peak_memory(),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": trainable,
        "grad_adam_bytes": 12 * trainable,
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker, a.steps, a.rank)))
        return
    rows = []
    for shape in a.shapes:
        for variant in ("full", "lora"):
            cmd = [sys.executable, "-m", "benchmarks.bench_lora", "--worker", shape, variant]
            cmd += ["--steps", str(a.steps), "--rank", str(a.rank)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'shape':10} {'variant':8} {'step s':>8} {'peak MiB':>9} {'trainable':>12} {'grad+AdamW MiB':>15}")
    for r in rows:
        print(
            f"{r['shape']:10} {r['variant']:8} {r['step_s']:8.3f} {r['peak_mem'] / 2**20:9.0f} "
            f"{r['trainable']:12,d} {r['grad_adam_bytes'] / 2**20:15.1f}"
        )
    for shape in a.shapes:
        full, lora = (next(r for r in rows if r["shape"] == shape and r["variant"] == v) for v in ("full", "lora"))
        ratio = {key: lora[key] / full[key] for key in ("step_s", "peak_mem", "trainable")}
        print(
            f"{shape}: LoRA r={a.rank} / full: step time {ratio['step_s']:.2f}x, peak memory {ratio['peak_mem']:.2f}x, "
            f"trainable parameters {ratio['trainable']:.4f}x"
        )


if __name__ == "__main__":
    main()
