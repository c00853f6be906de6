"""The generation server against the in-process engine: one generate round (rows/s) and one weight sync (s).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_serve                        # HFEngine vs the --engine hf server
    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 /tmp/venv-vllm/bin/python -m benchmarks.bench_serve --engines hf vllm

The shipped model (gcpo_fast/assets/default_model), fp32; a round is --prompts held-out prompts x --n
completions of up to --max_tokens tokens at temperature 1, the trainer's shape. Each engine: one warm-up
round, then the median of --repeats rounds, and for a server the median of --repeats weight syncs (every
parameter of the model, streamed over gloo on loopback, loaded, version recorded). The in-process HFEngine
shares the trainer's weights: it has no sync. Rows/s count completions; the engines sample different
completions (lengths differ), so mean completion tokens are printed too.
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gcpo_fast.data.prompts import encode_prompts
from gcpo_fast.data.sources import load_records
from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.engines.remote import launch_server
from gcpo_fast.models.loading import DEFAULT_MODEL


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", nargs="+", default=["hf"], choices=("hf", "vllm"), help="servers to measure")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args(argv)


def timed(fn, repeats):
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def report(name, round_s, rows, sync_s=None):
    tokens = statistics.mean(len(c) for c in rows.completion_ids)
    sync = "-" if sync_s is None else f"{sync_s:.3f}"
    print(f"{name:<22} {len(rows) / round_s:>9.1f} {round_s:>9.3f} {tokens:>12.1f} {sync:>10}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    records = load_records("builtin", split="test", num_problems=args.prompts)
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in records], max_prompt_length=256)
    sampling = Sampling(max_completion_length=args.max_tokens, temperature=1.0)
    print(f"{args.prompts} prompts x {args.n} completions, up to {args.max_tokens} tokens, {DEFAULT_MODEL}")
    print(f"{'engine':<22} {'rows/s':>9} {'round s':>9} {'mean tokens':>12} {'sync s':>10}")
    local = HFEngine(model, tokenizer)
    report("HFEngine (in process)", *timed(lambda: local.generate(prompts, args.n, sampling), args.repeats))
    for engine_name in args.engines:
        measure_server(engine_name, model, tokenizer, prompts, sampling, args)


def measure_server(engine_name, model, tokenizer, prompts, sampling, args):
    server_args = ("--dtype", "float32", "--gpu_memory_utilization", "0.2", "--max_model_len", "512")
    engine = launch_server(
        DEFAULT_MODEL, tokenizer, engine=engine_name, timeout=300,
        server_args=server_args if engine_name == "vllm" else (),
    )  # fmt: skip
    try:
        round_s, rows = timed(lambda: engine.generate(prompts, args.n, sampling), args.repeats)
        sync_s, _ = timed(lambda: engine.sync_weights(model.named_parameters()), args.repeats)
        report(f"server --engine {engine_name}", round_s, rows, sync_s)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
