"""Rollouts on adapters: merged weights pushed into vLLM against vLLM's own LoRA, sync time and decode speed.

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=$PWD /tmp/venv-vllm/bin/python -m benchmarks.bench_vllm_lora
    ... -m benchmarks.bench_vllm_lora --models shipped --syncs 3 --rank 64

The two ways a colocated vLLM engine can follow the trainer's LoRA adapters (PEFT, gcpo_fast/models/lora.py), each in
its own process (an external_launcher engine per process), on the shipped model and on a wider random Qwen2
(4 layers, d=1024, MLP 2816, the shipped vocabulary):
- merged (the trainer's way, as TRL's default): a plain engine; a sync is gcpo_fast.models.lora.merged_named_parameters
  (per adapted layer: PEFT's merge, copy, unmerge) streamed through VLLMEngine.sync_weights (vLLM's in-place
  reload); decoding runs on plain weights.
- lora: an engine built with enable_lora=True, max_lora_rank=r; a sync is the adapter written in PEFT's layout
  (save_pretrained into /dev/shm: vLLM 0.32 loads adapters from a folder only, LoRARequest.lora_path) and
  loaded with llm_engine.add_lora under a new id (the old one removed); decoding passes the LoRARequest, so
  every linear adds the punica LoRA kernels.
The adapters: rank --rank, alpha 2r, the attention and MLP projections, lora_B drawn at random (a trained
adapter, not the zero start) and nudged before every sync. Timed: the median of --syncs syncs after a first one
(warm-up), and greedy decoding of --prompts prompts x --tokens new tokens (ignore_eos), the fastest of three
after a warm-up, as generated tokens per second. Checked: each engine's log-prob of every prompt's first
greedy token against the adapted model's own (PEFT in fp32, the trainer's policy), the largest difference;
and the rows whose greedy completions the two engines agree on up to the first EOS.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WIDE = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4
)


def model_folder(name: str, scratch: Path) -> str:
    """The shipped model's folder, or a random wider Qwen2 with its tokenizer written to scratch."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gcpo_fast.models.loading import DEFAULT_MODEL

    if name == "shipped":
        return DEFAULT_MODEL
    out = scratch / "wide"
    config = AutoConfig.from_pretrained(DEFAULT_MODEL)
    for key, value in WIDE.items():
        setattr(config, key, value)
    config.head_dim = WIDE["hidden_size"] // WIDE["num_attention_heads"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL).save_pretrained(out)
    for extra in ("generation_config.json",):
        if (Path(DEFAULT_MODEL) / extra).is_file():
            (out / extra).write_text((Path(DEFAULT_MODEL) / extra).read_text())
    return str(out)


def adapted_model(path: str, rank: int):
    from gcpo_fast.models.loading import load_causal_lm
    from gcpo_fast.models.lora import PeftOptions, attach

    options = PeftOptions(use_peft=True, lora_r=rank, lora_alpha=2 * rank, lora_dropout=0.0)
    model = attach(load_causal_lm(path, device="cpu", dtype=torch.float32), options, base_path=path)
    nudge(model, 0.02, seed=0)
    return model


@torch.no_grad()
def nudge(model, scale: float, seed: int) -> None:
    """lora_B moved at random, as an optimizer step would move it (the same in every worker: seeded here, as
    the engine's start draws from the global RNG differently with and without LoRA)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.add_(scale * torch.randn(p.shape, generator=g))


def prompts(tokenizer, n: int) -> list[list[int]]:
    from gcpo_fast.data.tasks import heldout_split

    return [tokenizer(r["prompt"])["input_ids"] for r in heldout_split(n, seed=0)]


@torch.no_grad()
def trainer_logprobs(model, prompt_ids: list[list[int]], tokens: list[int]) -> list[float]:
    """The adapted model's own (PEFT, fp32) log-prob of each prompt's next token."""
    model.eval()
    logp = []
    for ids, token in zip(prompt_ids, tokens, strict=True):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        logp.append(torch.log_softmax(logits, -1)[token].item())
    return logp


def worker(mode: str, path: str, rank: int, syncs: int, n_prompts: int, tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from gcpo_fast.engines import vllm_engine
    from gcpo_fast.engines.base import cut_at_eos
    from gcpo_fast.models.loading import load_tokenizer
    from gcpo_fast.models.lora import merged_named_parameters

    tokenizer = load_tokenizer(path)
    model = adapted_model(path, rank)
    engine = vllm_engine.VLLMEngine(
        path, tokenizer, max_model_len=512, dtype="float32", max_lora_rank=rank if mode == "lora" else None
    )  # fp32 as the trainer builds it on a CPU (gcpo_fast/engines/factory.py)
    scratch = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    request = None

    def sync(k: int):
        nonlocal request
        if mode == "merged":
            engine.sync_weights(merged_named_parameters(model))
            return
        folder = scratch / f"adapter-{k}"
        model.save_pretrained(folder)
        new = LoRARequest(f"adapter-{k}", k, str(folder))
        engine.llm.llm_engine.add_lora(new)
        if request is not None:
            engine.llm.llm_engine.remove_lora(request.lora_int_id)
        request = new

    times = []
    for k in range(1, syncs + 2):
        nudge(model, 0.002, seed=k)
        start = time.perf_counter()
        sync(k)
        times.append(time.perf_counter() - start)
    params = SamplingParams(n=1, max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False, logprobs=0)
    prompt_ids = prompts(tokenizer, n_prompts)
    batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    decode = []
    for _ in range(4):  # a warm-up, then the fastest of three: the machine is shared
        start = time.perf_counter()
        out = engine.llm.generate(batch, params, use_tqdm=False, lora_request=request)
        decode.append(time.perf_counter() - start)
    generated = sum(len(o.outputs[0].token_ids) for o in out)
    engine.close()
    first = [o.outputs[0].token_ids[0] for o in out]
    engine_logp = [next(iter(o.outputs[0].logprobs[0].values())).logprob for o in out]
    return {
        "mode": mode,
        "sync_s": statistics.median(times[1:]),
        "first_sync_s": times[0],
        "decode_tok_s": generated / min(decode[1:]),
        "first_logp": engine_logp,
        "first_logp_error": max(abs(a - b) for a, b in zip(engine_logp, trainer_logprobs(model, prompt_ids, first))),
        "greedy": [cut_at_eos(list(o.outputs[0].token_ids), set(engine.eos_ids))[0] for o in out],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_vllm_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["shipped", "wide"], choices=["shipped", "wide"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--syncs", type=int, default=5, help="timed syncs after a first (warm-up) one")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker, a.rank, a.syncs, a.prompts, a.tokens)))
        return
    print(f"rank {a.rank}, {a.syncs} timed syncs, greedy decode of {a.prompts} prompts x {a.tokens} tokens")
    print(
        f"{'model':8} {'mode':7} {'sync s':>8} {'first sync s':>13} {'decode tok/s':>13} "
        f"{'|engine - trainer| first-token log-prob':>40}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for name in a.models:
            path = model_folder(name, Path(scratch))
            rows = {}
            for mode in ("merged", "lora"):
                cmd = [sys.executable, "-m", "benchmarks.bench_vllm_lora", "--worker", mode, path]
                cmd += ["--rank", str(a.rank), "--syncs", str(a.syncs), "--prompts", str(a.prompts)]
                cmd += ["--tokens", str(a.tokens)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if done.returncode:
                    print(f"{name} {mode}: failed:\n{done.stderr[-3000:]}", flush=True)
                    continue
                rows[mode] = r = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"{name:8} {mode:7} {r['sync_s']:8.3f} {r['first_sync_s']:13.3f} {r['decode_tok_s']:13.0f} "
                    f"{r['first_logp_error']:40.1e}",
                    flush=True,
                )
            if len(rows) == 2:
                m, lo = rows["merged"], rows["lora"]
                same = statistics.mean(a_ == b_ for a_, b_ in zip(m["greedy"], lo["greedy"]))
                logp = max(abs(a_ - b_) for a_, b_ in zip(m["first_logp"], lo["first_logp"]))
                print(
                    f"{name}: lora/merged sync time {lo['sync_s'] / m['sync_s']:.2f}x, decode speed "
                    f"{lo['decode_tok_s'] / m['decode_tok_s']:.2f}x; first greedy token log-prob max difference "
                    f"{logp:.1e}; rows equal up to EOS: {same:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
