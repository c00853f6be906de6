"""TRL's GRPOTrainer against FusedGRPOTrainer: one micro-batch's update (compute_loss + backward), time and memory.

    python -m benchmarks.bench_trl                         # Qwen2.5-0.5B's shape cut to 2 layers (V=151936), fp32
    python -m benchmarks.bench_trl --quick                 # tiny shapes, a smoke run (seconds)
    python -m benchmarks.bench_trl --layers 4 --rows 8 --completion 256 --case offpolicy-seq

The model is a random Qwen2 with Qwen2.5-0.5B's widths (d=896, V=151936, tied embeddings) and --layers
layers; the batch is TRL's padded layout (--rows rows, --prompt prompt slots, --completion completion
slots; completion lengths evenly spread from --completion / 4 to --completion: 320 tokens by default).
On the CPU TRL 1.16 scores every position of the padded batch, prompt slots included (it compacts to the
completion tokens only on CUDA and XPU), so its CPU time here overstates what it spends on a GPU. Cases:
onpolicy-token (dapo, no old log-probs) and offpolicy-seq (grpo with sequence-level ratios, old log-probs
from the model plus noise). Each (case, trainer) runs in its own process: warm-up (for the fused trainer
this includes its self-check against TRL's loss on this very batch), the median of --repeats timed
updates (wall and CPU seconds; the speedup is of CPU seconds, which a busy machine inflates less), then
the peak memory of one update above what was allocated before it (as bench_loss measures it; it includes
the parameters' gradients, which both trainers keep: printed beside it). The loss
and the lm_head gradient's norm of the two trainers are compared. Writes bench_trl.json under --out and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.bench_loss import _libc, machine_info, peak_above, timed

CASES = {
    "onpolicy-token": dict(loss_type="dapo", importance_sampling_level="token"),
    "offpolicy-seq": dict(loss_type="grpo", importance_sampling_level="sequence"),
}
TRAINERS = ("stock", "fused")
QUICK = dict(d=64, v=4096, layers=2, rows=4, prompt=16, completion=64, repeats=2, warmup=1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="both", help="onpolicy-token, offpolicy-seq or both")
    ap.add_argument("--d", type=int, default=896, help="hidden size (Qwen2.5-0.5B: 896)")
    ap.add_argument("--v", type=int, default=151936, help="vocabulary size (Qwen2.5: 151936)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers")
    ap.add_argument("--rows", type=int, default=4, help="rows B of the micro-batch")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (left-padded layout)")
    ap.add_argument("--completion", type=int, default=128, help="completion slots per row (max_completion_length)")
    ap.add_argument("--repeats", type=int, default=3, help="timed updates")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results", help="folder for bench_trl.json")
    ap.add_argument("--quick", action="store_true", help=f"tiny shapes: {QUICK}")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: "case/trainer"
    ap.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        for k, val in QUICK.items():
            setattr(a, k, val)
    a.cases = list(CASES) if a.case == "both" else a.case.split(",")
    for case in a.cases:
        if case not in CASES:
            ap.error(f"--case {case!r}: choose from {', '.join(CASES)} or both")
    return a


def build(a, case: str, trainer_name: str):
    """(trainer, model, inputs): a trainer over a random Qwen2 and one batch in TRL's layout."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from gcpo_fast.integrations.trl import FusedGRPOTrainer

    # GRPOTrainer needs a tokenizer only for padding and decoding; the batch below is made of token ids.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2}, unk_token="a")),
        pad_token="<pad>",
        eos_token="<eos>",
    )
    heads = max(1, a.d // 64)
    config = Qwen2Config(
        vocab_size=a.v,
        hidden_size=a.d,
        intermediate_size=int(a.d * 5.43),
        num_hidden_layers=a.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 7),
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(a.seed)
    model = Qwen2ForCausalLM(config)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=a.rows,
        num_generations=a.rows,
        max_completion_length=a.completion,
        bf16=False,
        use_cpu=True,
        report_to=[],
        beta=0.0,
        **CASES[case],
    )
    trainer_class = FusedGRPOTrainer if trainer_name == "fused" else GRPOTrainer
    trainer = trainer_class(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a"] * a.rows}),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1  # transformers sets it in its training loop
    model.train()

    g = torch.Generator().manual_seed(a.seed)
    prompt_ids = torch.randint(2, a.v, (a.rows, a.prompt), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[::2, : a.prompt // 4] = 0  # left padding on every other row
    prompt_ids[prompt_mask == 0] = 0
    lengths = torch.linspace(a.completion // 4, a.completion, a.rows).long()  # mixed completion lengths
    completion_mask = (torch.arange(a.completion) < lengths[:, None]).long()
    completion_ids = torch.randint(2, a.v, (a.rows, a.completion), generator=g) * completion_mask
    inputs = dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.randn(a.rows, generator=g),
        num_items_in_batch=completion_mask.sum(),
    )
    if case == "offpolicy-seq":
        with torch.no_grad():
            logp = trainer._get_per_token_logps_and_entropies(
                model,
                torch.cat([prompt_ids, completion_ids], 1),
                torch.cat([prompt_mask, completion_mask], 1),
                a.completion,
            )[0]
        inputs["old_per_token_logps"] = logp + 0.05 * torch.randn(logp.shape, generator=g)
    return trainer, model, inputs


def worker(a):
    case, trainer_name = a.worker.split("/")
    torch.set_num_threads(a.threads)
    trainer, model, inputs = build(a, case, trainer_name)

    def clear():
        model.zero_grad(set_to_none=True)

    def update():
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach()

    for _ in range(a.warmup):  # the fused trainer's self-check runs here, on this batch
        clear()
        update()
    cpu_times = []

    def cpu_timed_update():  # CPU seconds too: on a shared machine wall time includes waiting for a core
        t0 = time.process_time()
        out = update()
        cpu_times.append(time.process_time() - t0)
        return out

    times, loss = timed(cpu_timed_update, torch.device("cpu"), a.repeats, before=clear)
    grad_norm = model.get_output_embeddings().weight.grad.norm().item()
    clear()
    _libc().mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD fixed: freed tensors leave the RSS at once
    mem, _, method = peak_above(update, torch.device("cpu"))
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    res = dict(
        case=case,
        trainer=trainer_name,
        update_s=times,
        update_med=statistics.median(times),
        update_cpu_s=cpu_times,
        update_cpu_med=statistics.median(cpu_times),
        loss=loss.item(),
        lm_head_grad_norm=grad_norm,
        mem_update=mem,
        mem_grads=grad_bytes,
        mem_method=method,
        tokens=int(inputs["completion_mask"].sum()),
        self_checked=trainer_name == "fused" and a.warmup > 0,
    )
    with open(os.path.join(a.worker_dir, f"{case}-{trainer_name}.json"), "w") as f:
        json.dump(res, f)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    import trl

    info = machine_info(torch.device("cpu"))
    info.update(trl=trl.__version__, threads=a.threads)
    print(
        f"bench_trl: d={a.d} V={a.v} layers={a.layers} rows={a.rows} prompt={a.prompt} completion={a.completion} "
        f"fp32 on cpu ({info['cpu']}, {a.threads} thread), trl {trl.__version__}, torch {info['torch']}, "
        f"repeats={a.repeats} warmup={a.warmup}, {info['date']}"
    )
    wdir = tempfile.mkdtemp(prefix="bench_trl_")
    results = []
    for case in a.cases:
        for trainer_name in TRAINERS:
            t0 = time.perf_counter()
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench_trl",
                *(argv if argv is not None else sys.argv[1:]),
                "--worker",
                f"{case}/{trainer_name}",
                "--worker-dir",
                wdir,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            path = os.path.join(wdir, f"{case}-{trainer_name}.json")
            if proc.returncode != 0 or not os.path.exists(path):
                raise SystemExit(f"[{case} / {trainer_name}] failed:\n{proc.stderr[-3000:]}")
            with open(path) as f:
                results.append(json.load(f))
            print(
                f"  [{case} / {trainer_name}] {results[-1]['update_med']:.2f} s wall, "
                f"{results[-1]['update_cpu_med']:.2f} s CPU per update ({time.perf_counter() - t0:.0f} s)"
            )
    print(
        f"\n{'case':16} {'trainer':8} {'wall s':>8} {'CPU s':>8} {'speedup':>8} {'peak MiB':>9} {'grads MiB':>9} "
        f"{'mem ratio':>9} {'tokens':>6} {'loss':>13} {'|dW lm_head|':>13}"
    )
    for case in a.cases:
        stock, fused = (next(r for r in results if r["case"] == case and r["trainer"] == t) for t in TRAINERS)
        fused["speedup"] = stock["update_cpu_med"] / fused["update_cpu_med"]
        fused["mem_ratio"] = fused["mem_update"] / max(stock["mem_update"], 1)
        fused["loss_rel_err"] = abs(fused["loss"] - stock["loss"]) / max(abs(stock["loss"]), 1e-12)
        fused["grad_norm_rel_err"] = (
            abs(fused["lm_head_grad_norm"] - stock["lm_head_grad_norm"]) / stock["lm_head_grad_norm"]
        )
        for r in (stock, fused):
            print(
                f"{case:16} {r['trainer']:8} {r['update_med']:8.2f} {r['update_cpu_med']:8.2f} "
                f"{r.get('speedup', 1.0):7.2f}x {r['mem_update'] / 2**20:9.1f} {r['mem_grads'] / 2**20:9.1f} "
                f"{r.get('mem_ratio', 1.0):9.2f} {r['tokens']:6d} {r['loss']:13.6e} {r['lm_head_grad_norm']:13.6e}"
            )
        print(
            f"{'':16} fused vs stock: loss rel. error {fused['loss_rel_err']:.1e}, "
            f"lm_head grad norm rel. error {fused['grad_norm_rel_err']:.1e}"
        )
    os.makedirs(a.out, exist_ok=True)
    config = {
        k: getattr(a, k)
        for k in ("d", "v", "layers", "rows", "prompt", "completion", "repeats", "warmup", "threads", "seed", "cases")
    }
    with open(os.path.join(a.out, "bench_trl.json"), "w") as f:
        json.dump(dict(machine=info, config=config, results=results), f, indent=1)
    print(f"\nwrote {a.out}/bench_trl.json")


if __name__ == "__main__":
    main()
