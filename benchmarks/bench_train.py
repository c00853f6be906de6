"""One training step, phase by phase: our trainer against TRL's GRPOTrainer on the same model, data and settings.

    python -m benchmarks.bench_train                          # both shapes (tiny, realvocab), then the report
    python -m benchmarks.bench_train --shapes tiny --steps 20 # one shape, more steps
    python -m benchmarks.bench_train --trainers ours          # without TRL (pip install 'trl>=1.10,<1.17' for it)
    python -m benchmarks.bench_train --report_only            # the tables and plot again, from bench_train.json
    python -m benchmarks.bench_train --help                   # every flag

Shapes (random Qwen2 weights, seeded, written once to a temporary model folder with the shipped tokenizer):
`tiny` (4 layers, d=128, V=1024: overhead-bound) and `realvocab` (2 layers, d=256, V=151936: the lm_head and
the loss dominate). Both trainers get the same model folder, the same prompts (the builtin math task,
written to a jsonl), G=8 completions of one prompt per optimizer step (one micro-batch of 8), the same
completion budget, temperature 1, no top-k/top-p, GSPO settings (sequence-level ratios, eps 3e-4 / 4e-4,
seq-mean-token-mean, group-scaled advantages, beta 0, one optimizer pass per round: no old log-probs), AdamW
at lr 1e-6 with a linear schedule, gradient clipping at 1, the same seed, fp32 on the CPU and bf16 autocast
on CUDA. The reward is `parity_reward` below: cheap, and it varies within a group so advantages are nonzero.
Random weights rarely sample EOS, so completions mostly fill the budget; tokens per step are reported.

Each (shape, trainer) runs in its own process, one after the other, --rounds times (default 2; the order
flips every round, so that a load drifting during the invocation favours neither trainer):
- ours: `python -m gcpo_fast.train --model M --dataset D ...` (run as gcpo_fast.train.main in the worker, so
  the worker can read the peak memory when it returns, with CpuPhaseTimer in place of the trainer's
  PhaseTimer: the same wall times, plus each phase's CPU seconds); per-step phases from its metrics.jsonl:
  timing/generate, timing/reward, timing/old_logp, timing/update (forward + backward + optimizer),
  timing/weight_sync, and step_time; `other` = step_time minus those phases (advantages, packing, metrics).
- trl: `trl.GRPOTrainer(...).train()`. TRL 1.16 sends its own profiling timings only to W&B / MLflow, so the
  worker subclasses GRPOTrainer and times TRL's own methods: `_generate` (tokenize, generate, decode) is
  generate, `_calculate_rewards` is reward, `_get_per_token_logps_and_entropies` without grad is old_logp;
  a callback times each optimizer step (on_step_begin to on_step_end) and update = step - `_prepare_inputs`
  (compute_loss + backward + clipping + optimizer + scheduler); `other` = `_prepare_inputs` minus the three.
  On the CPU TRL scores every position of its padded [B, P + C] batch, prompt slots included (it keeps only
  completion positions on CUDA / XPU): `scored_positions` reports that count per step.

Reported per (shape, trainer): the first step alone (warm-up; the median over rounds); the median over the
other steps of all rounds of the step and of each phase; CPU seconds (process time) of the first step, the
step, generate and update (on a shared machine wall time includes waiting for a core; ours sums its phases,
the rest of its step being about a millisecond); tokens per step (prompt + completion, no padding) and
tokens/s (median of tokens / step_time); peak memory (CPU: the process's peak RSS, VmHWM; CUDA:
torch.cuda.max_memory_allocated); and per shape the ratio ours / TRL of each (below 1: ours is faster or
smaller). Writes bench_train.csv (shape, metric, ours, trl, ratio), bench_train.json (machine, load
average, configuration, every step of every run) and bench_train.png (matplotlib, when installed) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.bench_train_report import CPU_PHASES, PHASES, TRAINERS, write_report
from gcpo_fast.run.timing import PhaseTimer

SHAPES = {"tiny": dict(layers=4, d=128, v=1024, steps=20), "realvocab": dict(layers=2, d=256, v=151936, steps=4)}
DEFAULT_STEPS = ", ".join(f"{name} {shape['steps']}" for name, shape in SHAPES.items())
GSPO_TRL = dict(
    loss_type="grpo",
    importance_sampling_level="sequence",
    epsilon=3e-4,
    epsilon_high=4e-4,
    scale_rewards="group",
    beta=0.0,
)  # TRL's spelling of our --loss_type gspo (gcpo_fast/methods.py)
SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "gcpo_fast" / "assets" / "default_model"


def parity_reward(completions, **kwargs):
    """1 when the completion's text has an even length: deterministic, nearly free, and it varies in a group."""
    return [float(len(c if isinstance(c, str) else c[-1]["content"]) % 2 == 0) for c in completions]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny,realvocab", help=f"comma list from {','.join(SHAPES)}")
    ap.add_argument("--trainers", default="ours,trl", help="comma list from ours,trl")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per run, the first one reported apart (default per shape: {DEFAULT_STEPS})",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs of each trainer per shape, alternating which goes "
        "first; steps pooled, each run's first step is warm-up",
    )
    ap.add_argument("--layers", type=int, default=None, help="override the shape's decoder layers")
    ap.add_argument("--d", type=int, default=None, help="override the shape's hidden size")
    ap.add_argument("--v", type=int, default=None, help="override the shape's vocabulary size")
    ap.add_argument("--num_generations", type=int, default=8, help="G; also the completions per step (one prompt)")
    ap.add_argument("--max_completion_length", type=int, default=64, help="new tokens per completion at most")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results", help="folder for bench_train.{csv,json,png}")
    ap.add_argument("--report_only", action="store_true", help="rebuild the report from --out/bench_train.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: "shape/trainer/round"
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.shape_list, a.trainer_list = a.shapes.split(","), a.trainers.split(",")
    for s in a.shape_list:
        if s not in SHAPES:
            ap.error(f"--shapes {s!r}: choose from {', '.join(SHAPES)}")
    for t in a.trainer_list:
        if t not in TRAINERS:
            ap.error(f"--trainers {t!r}: choose from {', '.join(TRAINERS)}")
    if a.rounds < 1:
        ap.error(f"--rounds {a.rounds}: at least 1")
    if a.steps is not None and a.steps < 2:
        ap.error(f"--steps {a.steps}: at least 2 (the first step is warm-up, reported apart)")
    return a


def shape_config(a, shape: str) -> dict:
    cfg = dict(SHAPES[shape])
    for k in ("layers", "d", "v", "steps"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    return cfg


# ---- inputs: one model folder and one dataset per shape, shared by both trainers ------------------------


def make_model_folder(folder: Path, layers: int, d: int, v: int, seed: int) -> None:
    """A random Qwen2 (tied embeddings) with the shipped tokenizer: ids the tokenizer lacks decode to nothing."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    if v < len(tokenizer):  # prompt ids would index past the embedding
        raise ValueError(f"--v {v}: the vocabulary must hold the shipped tokenizer's {len(tokenizer)} tokens")
    heads = max(1, d // 32)
    config = Qwen2Config(
        vocab_size=v,
        hidden_size=d,
        intermediate_size=4 * d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)


def make_dataset(path: Path, seed: int, num_problems: int = 256) -> None:
    from gcpo_fast.data.sources import load_records

    with open(path, "w") as f:
        for r in load_records("builtin", split="train", num_problems=num_problems, seed=seed):
            f.write(json.dumps(dict(prompt=r["prompt"], solution=r["solution"], answer=r["answer"])) + "\n")


def ours_argv(model: str, dataset: str, output_dir: str, steps: int, a) -> list[str]:
    """`python -m gcpo_fast.train` options for the shared settings (module docstring)."""
    g = a.num_generations
    return [
        "--model",
        model,
        "--dataset",
        dataset,
        "--output_dir",
        output_dir,
        "--loss_type",
        "gspo",
        "--reward_funcs",
        "benchmarks.bench_train:parity_reward",
        "--num_generations",
        str(g),
        "--per_device_train_batch_size",
        str(g),
        "--gradient_accumulation_steps",
        "1",
        "--max_completion_length",
        str(a.max_completion_length),
        "--temperature",
        "1.0",
        "--top_p",
        "1.0",
        "--top_k",
        "0",
        "--learning_rate",
        "1e-6",
        "--lr_scheduler_type",
        "linear",
        "--max_grad_norm",
        "1.0",
        "--max_steps",
        str(steps),
        "--seed",
        str(a.seed),
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--sample_steps",
        "0",
    ]


# ---- workers ---------------------------------------------------------------------------------------------


class CpuPhaseTimer(PhaseTimer):
    """The trainer's PhaseTimer that also sums each phase's CPU seconds of this process, popped as cpu/<phase>:
    on a shared machine a phase's wall time includes waiting for a core, its CPU time much less so."""

    def __init__(self, cuda: bool = False):
        super().__init__(cuda)
        self.cpu = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.process_time()
        try:
            with super().__call__(phase):
                yield
        finally:
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - start

    def pop(self) -> dict[str, float]:
        out = {**super().pop(), **{f"cpu/{phase}": seconds for phase, seconds in self.cpu.items()}}
        self.cpu = {}
        return out


def peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024, "peak RSS (VmHWM)"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (ru_maxrss)"


def ours_steps(metrics: list[dict]) -> list[dict]:
    """Per-step phase times from our metrics.jsonl lines (the step-0 evaluation line has no step_time)."""
    steps = []
    for m in metrics:
        if "step_time" not in m:
            continue
        s = {p: m.get(f"timing/{p}", 0.0) for p in PHASES if p != "other"}
        s["other"] = m["step_time"] - sum(s.values())
        s.update(
            step_time=m["step_time"],
            tokens=m["tokens_per_second"] * m["step_time"],
            completion_length=m.get("completions/mean_length"),
        )
        if any(k.startswith("cpu/") for k in m):  # logged when the run used CpuPhaseTimer (run_ours)
            cpu = {p: m.get(f"cpu/{p}", 0.0) for p in PHASES if p != "other"}
            s.update({f"{p}_cpu": cpu[p] for p in CPU_PHASES}, step_cpu=sum(cpu.values()))
        steps.append(s)
    return steps


def run_ours(a, shape: str, work: Path, name: str) -> dict:
    from gcpo_fast import train

    train.PhaseTimer = CpuPhaseTimer  # the same wall times, plus cpu/<phase> in metrics.jsonl
    cfg = shape_config(a, shape)
    out = work / name
    argv = ours_argv(str(work / f"{shape}-model"), str(work / "prompts.jsonl"), str(out), cfg["steps"], a)
    print("python -m gcpo_fast.train " + " ".join(argv), flush=True)
    train.main(argv)
    with open(out / "metrics.jsonl") as f:
        steps = ours_steps([json.loads(line) for line in f if line.strip()])
    return dict(steps=steps, command="python -m gcpo_fast.train " + " ".join(argv))


def run_trl(a, shape: str, work: Path, name: str) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cfg, cuda = shape_config(a, shape), torch.cuda.is_available()
    timer, steps = CpuPhaseTimer(cuda=cuda), []
    positions, completion_lengths = [], []  # per micro-batch, recorded by compute_loss

    class TimedGRPOTrainer(GRPOTrainer):  # TRL's own methods, timed; nothing else changes
        def _generate(self, prompts):
            with timer("generate"):
                return super()._generate(prompts)

        def _calculate_rewards(self, *args, **kwargs):
            with timer("reward"):
                return super()._calculate_rewards(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if torch.is_grad_enabled():  # the loss's forward: part of update
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            with timer("old_logp"):
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)

        def _prepare_inputs(self, *args, **kwargs):
            with timer("prepare"):
                return super()._prepare_inputs(*args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            positions.append(inputs["prompt_ids"].numel() + inputs["completion_ids"].numel())
            completion_lengths.append(inputs["completion_mask"].sum().item() / inputs["completion_mask"].shape[0])
            return super().compute_loss(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.pop()
            self.start, self.cpu, self.tokens = time.perf_counter(), time.process_time(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            step_time, step_cpu = time.perf_counter() - self.start, time.process_time() - self.cpu
            t = timer.pop()
            phase = {p: t.get(f"timing/{p}", 0.0) for p in ("generate", "reward", "old_logp")}
            prepare = t.get("timing/prepare", 0.0)
            steps.append(
                dict(
                    **phase,
                    update=step_time - prepare,
                    weight_sync=0.0,
                    other=prepare - sum(phase.values()),
                    step_time=step_time,
                    tokens=state.num_input_tokens_seen - self.tokens,
                    completion_length=completion_lengths[-1],
                    scored_positions=positions[-1],
                    step_cpu=step_cpu,
                    generate_cpu=t.get("cpu/generate", 0.0),
                    update_cpu=step_cpu - t.get("cpu/prepare", 0.0),
                )
            )

    model_dir = work / f"{shape}-model"
    prompts = [json.loads(line)["prompt"] for line in open(work / "prompts.jsonl")]
    g = a.num_generations
    args = GRPOConfig(
        output_dir=str(work / name),
        per_device_train_batch_size=g,
        num_generations=g,
        gradient_accumulation_steps=1,
        max_completion_length=a.max_completion_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=1e-6,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        max_steps=cfg["steps"],
        seed=a.seed,
        bf16=cuda,
        use_cpu=not cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        **GSPO_TRL,
    )
    trainer = TimedGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=parity_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[StepClock()],
    )
    trainer.train()
    return dict(steps=steps, trl=trl.__version__, command=f"trl.GRPOTrainer(GRPOConfig(**{GSPO_TRL!r}, ...)).train()")


def worker(a) -> None:
    shape, trainer, rnd = a.worker.split("/")
    torch.set_num_threads(a.threads)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    work = Path(a.workdir)
    name = f"{shape}-{trainer}-{rnd}"
    res = (run_ours if trainer == "ours" else run_trl)(a, shape, work, name)
    res["peak_mem"], res["mem_method"] = peak_memory()
    res["torch_threads_at_end"] = torch.get_num_threads()  # a trainer that changed it would not compare fairly
    res.update(shape=shape, trainer=trainer, round=int(rnd))
    (work / f"{name}.json").write_text(json.dumps(res))


def run_all(a, argv: list[str], work: Path) -> list[dict]:
    """Every (shape, round, trainer) run, each in its own worker process; their results in run order."""
    make_dataset(work / "prompts.jsonl", a.seed)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    results = []
    for shape in a.shape_list:
        cfg = shape_config(a, shape)
        try:
            make_model_folder(work / f"{shape}-model", cfg["layers"], cfg["d"], cfg["v"], a.seed)
        except ValueError as e:
            raise SystemExit(f"bench_train: error: {e}") from None
        for rnd in range(a.rounds):
            # the order flips every round, so that a load that drifts during the invocation favours neither
            for trainer in a.trainer_list if rnd % 2 == 0 else a.trainer_list[::-1]:
                t0 = time.perf_counter()
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_train",
                    *argv,
                    "--worker",
                    f"{shape}/{trainer}/{rnd}",
                    "--workdir",
                    str(work),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                path = work / f"{shape}-{trainer}-{rnd}.json"
                if proc.returncode != 0 or not path.exists():
                    raise SystemExit(
                        f"bench_train: [{shape} / {trainer}] failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
                    )
                results.append(json.loads(path.read_text()))
                print(
                    f"  [{shape} / {trainer} / round {rnd}] {len(results[-1]['steps'])} steps in "
                    f"{time.perf_counter() - t0:.0f} s (process wall time, loading included)",
                    flush=True,
                )
    return results


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    out = Path(a.out)
    if a.report_only:
        saved = json.loads((out / "bench_train.json").read_text())
        return write_report(out, saved["machine"], saved["results"])
    from benchmarks.bench_loss import machine_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info(device)
    info.update(
        threads=a.threads,
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
        config=dict(
            shapes={s: shape_config(a, s) for s in a.shape_list},
            num_generations=a.num_generations,
            max_completion_length=a.max_completion_length,
            seed=a.seed,
            rounds=a.rounds,
        ),
    )
    if "trl" in a.trainer_list:
        import trl

        info["trl"] = trl.__version__
    with tempfile.TemporaryDirectory(
        prefix="bench_train_"
    ) as tmp:  # model folders, run folders, checkpoints: hundreds of MB
        results = run_all(a, argv if argv is not None else sys.argv[1:], Path(tmp))
    info["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return write_report(out, info, results)


if __name__ == "__main__":
    main()
