"""A randomly initialised Qwen2 model folder at a real model's dimensions, with the shipped tokenizer: no download.

    python -m benchmarks.gpu_check.make_model --out /tmp/q15 --shape qwen2.5-1.5b            # 1.54 B parameters
    python -m benchmarks.gpu_check.make_model --out /tmp/q15-4 --shape qwen2.5-1.5b --layers 4
    python -m benchmarks.gpu_check.make_model --out /tmp/toy --shape toy                       # CPU rehearsal

SHAPES holds Qwen2.5-1.5B's published config (hidden 1536, 28 layers, 12 query / 2 key-value heads,
intermediate 8960, vocabulary 151936, tied embeddings) and a toy shape of the same structure. The
tokenizer is gcpo_fast/assets/default_model's (371 tokens): a model vocabulary larger than the
tokenizer's is fine (sampled ids it lacks decode to nothing), and a random model seldom samples EOS,
so completions run to the budget. Weights are initialised on the GPU when there is one (seconds, not
minutes, for 1.5 B parameters) and saved in bf16 (half the disk; the trainer loads them in fp32).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SHIPPED_TOKENIZER = Path(__file__).resolve().parents[2] / "gcpo_fast" / "assets" / "default_model"
SHAPES = {
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    ),
    "toy": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=4096,
        max_position_embeddings=1024,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    ),
}


def make_model(out: Path, shape: str, layers: int | None = None, seed: int = 0) -> int:
    """Write the model folder; returns its parameter count."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    config = Qwen2Config(
        **dims,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write")
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    params = make_model(Path(a.out), a.shape, a.layers, a.seed)
    print(f"{a.out}: {a.shape}, {params / 1e9:.6f} B parameters")


if __name__ == "__main__":
    main()
