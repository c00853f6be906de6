"""The training loop: rollouts -> rewards -> golden rows -> advantages -> packed fused-loss update.

    python -m gcpo_fast.train                                         # shipped model on the builtin math task (CPU ok)
    python -m gcpo_fast.train --help                                  # every option (gcpo_fast/config.py)
    python -m gcpo_fast.train --model ~/Qwen2.5-Math-1.5B --dataset train.jsonl --output_dir runs/q --max_steps 500
    python -m gcpo_fast.train --loss_type dapo --config dapo.yaml     # another method; options from a file
    python -m gcpo_fast.train --output_dir runs/q --resume            # continue from the latest checkpoint, exactly
    torchrun --nproc_per_node 8 -m gcpo_fast.train ...                # one process per GPU (DDP; gloo on CPUs)
    torchrun --nproc_per_node 8 -m gcpo_fast.train --parallelism fsdp ...   # FSDP2: the model sharded over them

One optimizer step (docs/design.md, "The trainer: data flow of one step"):
1. When the buffer of prepared steps is empty, a generation round (gcpo_fast/rounds.py): the rollout engine
   (gcpo_fast/rollout.py) samples G completions of the next prompts, rewards score them, GCPO adds golden
   rows to all-wrong groups (the dataset's golden answers, or a teacher's: gcpo_fast/golden.py),
   advantages per group, and the rows are cut into micro-batches for the
   round's optimizer steps (with old log-probs when the round is reused).
2. The step: forward + backward of its micro-batches with the fused loss, normalised by the step's global
   token (or row) count, gradient clipping, AdamW, scheduler (gcpo_fast/update.py); then the engine gets
   the new weights.
3. Metrics to metrics.jsonl (TRL's names), rollouts to samples.jsonl, evaluation, checkpoint.

The process group, the DDP and FSDP2 wrappers and every reduction across ranks live in gcpo_fast/parallel.py;
generation, evaluation and the old-logp pass run inside `policy.unsharded()` (FSDP: weights gathered once).
Metrics are means over ranks. Rollout statistics (reward*, frac_reward_zero_std, frac_reward_all_wrong,
completions/*) count every sampled rollout of the round and never a golden row; gcpo/* count the golden
rows of the groups kept; the update's (loss, entropy, clip_ratio/*) cover the rows trained on, golden rows
included. At the end, the held-out accuracy of the first and last evaluation (overall and per level) and
the paths of metrics.jsonl, samples.jsonl and the final checkpoint are printed.
"""

import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from gcpo_fast import parallel
from gcpo_fast.attention import resolve_attn_implementation
from gcpo_fast.checkpoint import (
    check_checkpoint,
    checkpoint_step,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from gcpo_fast.config import ConfigError, TrainConfig, parse_config
from gcpo_fast.data import PromptSampler
from gcpo_fast.errors import TrainingError
from gcpo_fast.eval import count_correct, level_summary, summarize
from gcpo_fast.golden import CACHE_NAME, GoldenCache, Teacher, teacher_identity
from gcpo_fast.logger import RunLogger
from gcpo_fast.models import check_model_folder, frozen_dtype, load_causal_lm, load_tokenizer
from gcpo_fast.rewards import load_reward_function
from gcpo_fast.rollout import HFEngine, Sampling, make_engine
from gcpo_fast.rounds import build_rows, sample_groups, split_steps
from gcpo_fast.sources import load_records
from gcpo_fast.timing import PhaseTimer
from gcpo_fast.update import ModelWithLoss, SkippedSteps, build_optimizer, optimizer_step, weights_finite

# ---- setup -----------------------------------------------------------------------------------------------


def prepare(cfg: TrainConfig) -> dict:
    """Everything that can fail on bad input, before any model is loaded: the data, the reward functions,
    the run directory and the checkpoint to resume. Raises ValueError / FileNotFoundError."""
    check_output_dir(cfg.output_dir)
    columns = dict(prompt_column=cfg.prompt_column, golden_column=cfg.golden_column, answer_column=cfg.answer_column)
    records = load_records(
        cfg.dataset,
        split="train",
        num_problems=cfg.builtin_num_problems,
        seed=cfg.seed,
        levels=cfg.builtin_levels,
        **columns,
    )
    check_golden_answers(cfg, records)
    eval_dataset = cfg.eval_dataset or ("builtin" if cfg.dataset == "builtin" else None)
    eval_records = None
    if cfg.eval_steps and eval_dataset:
        # the builtin held-out split covers the levels trained on (python -m gcpo_fast.eval scores any level)
        eval_records = load_records(
            eval_dataset,
            split="test",
            num_problems=cfg.eval_num_problems,
            levels=sorted(set(cfg.builtin_levels)),
            **columns,
        )
        eval_records = eval_records[: cfg.eval_num_problems]
    funcs = [load_reward_function(spec) for spec in cfg.reward_funcs]
    resume = find_checkpoint(cfg.output_dir, cfg.resume) if cfg.resume else None
    if resume is None and list_checkpoints(cfg.output_dir):
        raise ValueError(
            f"output_dir {cfg.output_dir} already holds checkpoints: pass --resume to continue that "
            "run, or choose another output_dir"
        )
    if resume is not None:
        parallel.check_checkpoint(resume, cfg.parallelism)
        # Rewinding: continuing an older checkpoint beside newer ones would interleave two histories (and a
        # later --resume would pick the newer, abandoned one), so that is refused, not guessed at.
        newer = [
            p.name
            for p in list_checkpoints(cfg.output_dir)
            if (checkpoint_step(p) or 0) > (checkpoint_step(resume) or 0) and check_checkpoint(p) is None
        ]
        if newer:
            raise ValueError(
                f"--resume {resume}: {cfg.output_dir} holds newer checkpoints ({', '.join(newer)}) of the "
                "run that went on; resume into a new --output_dir (the checkpoint is read from where it "
                "is), or move the newer checkpoints away"
            )
    golden_cache = None
    if cfg.golden_answer != "off" and cfg.golden_source != "dataset":
        teacher = teacher_identity(check_model_folder(cfg.golden_model)) if cfg.golden_model else None
        golden_cache = GoldenCache(
            Path(cfg.output_dir) / CACHE_NAME, teacher, prefilled=[cfg.golden_cache] if cfg.golden_cache else []
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prompts = cfg.prompts_per_round
    if prompts * world > len(records):
        raise ValueError(
            f"a generation round takes {prompts} prompts x {world} processes, but the dataset has only {len(records)}"
        )
    check_model_folder(cfg.model)  # a causal decoder with weights and a tokenizer, or one line saying why not
    return dict(
        records=records, eval_records=eval_records, reward_funcs=funcs, resume=resume, golden_cache=golden_cache
    )


def check_golden_answers(cfg: TrainConfig, records: list[dict]) -> None:
    """With golden answers from the dataset only, every record needs one; with none at all GCPO is GSPO (warned)."""
    if cfg.golden_answer == "off" or cfg.golden_source != "dataset":
        return
    missing = [i for i, r in enumerate(records) if r["golden"] is None]
    if len(missing) == len(records):
        warnings.warn(
            f"--dataset {cfg.dataset} has no golden column {cfg.golden_column!r} and no teacher is given "
            f"(--golden_model, --golden_cache): loss_type {cfg.loss_type} has no golden answers and runs as "
            "GSPO would",
            stacklevel=2,
        )
    elif missing:
        raise ValueError(
            f"--dataset {cfg.dataset}: {len(missing)} of {len(records)} records have no golden column "
            f"{cfg.golden_column!r} (the first: record {missing[0]}); give them a teacher (--golden_model, "
            "--golden_source dataset_then_teacher) or pass --golden_answer off"
        )


def load_teacher(cfg: TrainConfig, cache, reward_funcs, device) -> Teacher | None:
    """The golden-answer teacher of --golden_source: the cache, and the --golden_model engine when given."""
    if cache is None:
        return None
    engine = tokenizer = None
    if cfg.golden_model:
        tokenizer = load_tokenizer(cfg.golden_model)
        if cfg.use_vllm:  # served by vLLM as well: a second engine in this process, never synced (fixed weights)
            from gcpo_fast.vllm_engine import VLLMEngine

            engine = VLLMEngine(
                cfg.golden_model,
                tokenizer,
                seed=cfg.seed,
                dtype="auto",
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                max_model_len=cfg.max_prompt_length + cfg.golden_max_completion_length,
            )
        else:
            dtype = frozen_dtype(cfg.bf16, device)
            model = load_causal_lm(cfg.golden_model, device=device, dtype=dtype).eval().requires_grad_(False)
            engine = HFEngine(model, tokenizer, bf16=cfg.bf16)
    return Teacher(
        cache,
        reward_funcs,
        engine=engine,
        tokenizer=tokenizer,
        num_candidates=cfg.golden_num_candidates,
        sampling=Sampling(cfg.golden_max_completion_length, cfg.golden_temperature),
        max_prompt_length=cfg.max_prompt_length,
        correct_reward=cfg.correct_reward,
        reward_weights=cfg.reward_weights,
        seed=cfg.seed,
    )


def check_output_dir(output_dir: str) -> None:
    """Fail now, not after the model has loaded, if the run directory cannot be created or written."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output_dir {output_dir}: cannot write there ({e.strerror or e})") from None


def load_model(path, device, cfg: TrainConfig, dtype=torch.float32):
    return load_causal_lm(
        path,
        device=device,
        dtype=dtype,
        attn_implementation=resolve_attn_implementation(None, device, cfg.bf16),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


# ---- the loop --------------------------------------------------------------------------------------------


def evaluate(cfg: TrainConfig, engine, tokenizer, records: list[dict]) -> dict[str, float]:
    """eval/mean@k, eval/pass@j (and per level, when records have one) on the held-out records, each rank
    scoring its share."""
    rank, world = parallel.rank_and_world()
    sampling = Sampling(
        cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k, greedy=cfg.eval_num_samples == 1
    )
    correct = count_correct(
        engine,
        tokenizer,
        records[rank::world],
        sampling,
        num_samples=cfg.eval_num_samples,
        max_prompt_length=cfg.max_prompt_length,
        seed=cfg.seed,
    )
    if world > 1:
        correct = [c for part in parallel.all_gather_objects(correct) for c in part]
        records = [r for i in range(world) for r in records[i::world]]  # the gathered order
    return {
        **summarize(correct, cfg.eval_num_samples),
        "eval/num_problems": len(correct),
        **level_summary(records, correct, cfg.eval_num_samples),
    }


def train(cfg: TrainConfig, prepared: dict | None = None) -> Path:
    """Run training as configured; returns the output directory. prepared: prepare(cfg), if already done."""
    dist = parallel.init_distributed(cpu_offload=cfg.fsdp_cpu_offload)
    rank, world = dist.rank, dist.world_size
    prepared = prepared or prepare(cfg)
    resume = prepared["resume"]
    set_seed(cfg.seed + rank)
    model_path = resume or cfg.model
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dist.device, cfg)
    engine = make_engine(cfg, model, tokenizer, model_path, rank)
    # beta > 0: the reference is the initial policy, also when resuming
    ref_dtype = frozen_dtype(cfg.bf16, dist.device)
    ref_model = (
        load_model(cfg.model, dist.device, cfg, ref_dtype).eval().requires_grad_(False) if cfg.beta > 0 else None
    )
    teacher = load_teacher(cfg, prepared.get("golden_cache"), prepared["reward_funcs"], dist.device)
    policy = parallel.parallelize(
        ModelWithLoss(model, cfg.loss_config(), cfg.temperature),
        cfg.parallelism,
        cpu_offload=cfg.fsdp_cpu_offload,
        bf16=cfg.bf16,
    )
    optimizer, scheduler = build_optimizer(model, cfg)
    sampler = PromptSampler(prepared["records"], cfg.prompts_per_round, seed=cfg.seed, rank=rank, world_size=world)
    step, num_tokens, buffer, round_metrics, samples = 0, 0.0, [], {}, []
    skipped = SkippedSteps()
    if resume:
        state, rank_state = load_checkpoint(resume, reshards=policy.reshards)
        policy.load_optimizer(optimizer, resume, state)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        step, num_tokens = state["step"], state["num_tokens"]
        skipped = SkippedSteps(**state.get("skipped", {}))
        buffer, round_metrics = rank_state.get("buffer", []), rank_state.get("round_metrics", {})
    log = (
        RunLogger(
            cfg.output_dir,
            report_to=cfg.report_to,
            config=cfg.to_dict(),
            logging_steps=cfg.logging_steps,
            resume_step=step if resume else None,
        )
        if rank == 0
        else None
    )
    eval_records = prepared["eval_records"]
    timer = PhaseTimer(cuda=dist.device.type == "cuda")
    stale = False  # whether the engine's weights lag the trainer's (synced before it next samples)

    def synced_engine():  # under FSDP every rank gathers each parameter in turn: every rank calls this
        nonlocal stale
        if stale or engine.asleep:  # new weights, or none at all (a sleeping engine freed them)
            with timer("weight_sync"):
                engine.sync_weights(policy.named_parameters())
            stale = False

    if eval_records and step == 0:
        with timer("eval"), policy.unsharded():
            eval_metrics = evaluate(cfg, engine, tokenizer, eval_records)
        eval_metrics.update(timer.pop())  # on every rank, so that no phase leaks into step 1's reduction
        if log:
            log.metrics(0, eval_metrics)

    def checkpoint():
        if not weights_finite(model):  # never replace a good checkpoint with poisoned weights
            raise TrainingError(
                f"step {step}: the weights hold NaN or inf; no checkpoint was written (the newest one "
                "in the run directory holds the last good weights)"
            )
        save_checkpoint(
            cfg.output_dir,
            step,
            model,
            tokenizer,
            dict(
                step=step,
                num_tokens=num_tokens,
                **policy.optimizer_state(optimizer),
                scheduler=scheduler.state_dict(),
                sampler=sampler.state_dict(),
                skipped=vars(skipped),
            ),
            dict(buffer=buffer, round_metrics=round_metrics),
            config=cfg.to_dict(),
            save_total_limit=cfg.save_total_limit,
            model_state=policy.full_state_dict(),
            save_sharded=lambda folder: policy.save_optimizer(optimizer, folder),
        )

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    try:
        model.train()
        while step < cfg.max_steps:
            start = time.perf_counter()
            if not buffer:
                synced_engine()
                with policy.unsharded():  # FSDP: gather the layers once for the whole round (a no-op otherwise)
                    sampled, round_metrics = sample_groups(
                        cfg, engine, tokenizer, sampler, prepared["reward_funcs"], timer
                    )
                    rows, samples = build_rows(cfg, tokenizer, sampled, round_metrics, teacher, timer)
                    buffer = split_steps(cfg, rows, model, ref_model, timer, round_metrics)
                engine.sleep()  # --vllm_enable_sleep_mode: vLLM's memory is the trainer's until the next sync
            micro_batches = buffer.pop(0)
            with timer("update"):
                metrics = optimizer_step(policy, optimizer, scheduler, micro_batches, cfg)
            stale = True
            step += 1
            tokens = sum(len(p) + len(c) for mb in micro_batches for p, c in zip(mb.prompt_ids, mb.completion_ids))
            metrics = parallel.mean_over_ranks({**round_metrics, **metrics, **timer.pop(), "tokens": tokens})
            metrics["step_time"] = time.perf_counter() - start
            num_tokens += metrics["tokens"] * world
            metrics["tokens_per_second"] = metrics.pop("tokens") * world / metrics["step_time"]
            metrics["num_tokens"] = num_tokens
            try:
                skipped.record(step, metrics, cfg.max_skipped_steps, warn=rank == 0)
            except TrainingError:
                if log:
                    log.metrics(step, metrics)  # the step that stopped the run is on record
                raise
            if eval_records and (step % cfg.eval_steps == 0 or step == cfg.max_steps):
                synced_engine()
                with timer("eval"), policy.unsharded():
                    metrics.update(evaluate(cfg, engine, tokenizer, eval_records))
                engine.sleep()
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
                with timer("checkpoint"):
                    checkpoint()
            metrics.update(timer.pop())  # this rank's eval and checkpoint time (the same work on every rank)
            if log:
                log.metrics(step, metrics)
                if cfg.sample_steps and step % cfg.sample_steps == 0 and samples:
                    log.samples(step, samples)  # each round's samples once, at the first sample step since it ran
                    samples = []
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{metrics['loss']:.4f}")
    finally:  # also on an error: vLLM's own teardown at exit would fail once the process group is gone
        bar.close()
        engine.close()
        if teacher is not None and teacher.engine is not None:
            teacher.engine.close()
    if log:
        log.close()
        print(log.summary(), flush=True)
    return Path(cfg.output_dir)


def main(argv=None) -> None:
    """The command line: a user's mistake (options, data, checkpoints, a run that cannot go on) is one line on
    stderr, exit status 2 for options and 1 for the rest; anything else keeps its traceback."""
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"python -m gcpo_fast.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        train(cfg, prepare(cfg))
    except (TrainingError, FloatingPointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"python -m gcpo_fast.train: error: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
