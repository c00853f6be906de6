"""The training loop: rollouts -> rewards -> golden rows -> advantages -> packed fused-loss update.

    python -m gcpo_fast.train                                         # shipped model on the builtin math task (CPU ok)
    python -m gcpo_fast.train --help                                  # every option, grouped by component
    python -m gcpo_fast.train --model ~/Qwen2.5-Math-1.5B --dataset train.jsonl --output_dir runs/q --max_steps 500
    python -m gcpo_fast.train --loss_type dapo --config dapo.yaml     # another method; options from a file
    python -m gcpo_fast.train --output_dir runs/q --resume            # continue from the latest checkpoint, exactly
    torchrun --nproc_per_node 8 -m gcpo_fast.train ...                # one process per GPU (DDP; gloo on CPUs)
    torchrun --nproc_per_node 8 -m gcpo_fast.train --parallelism fsdp ...   # FSDP2: the model sharded over them

`prepare` (gcpo_fast/prepare.py) checks and loads everything a user can get wrong before any model loads;
`Trainer` builds the run and `Trainer.fit` loops over `train_step`: a generation round when no prepared step is left
(`generate_round`), one optimizer step, metrics, evaluation and checkpoint. What one step does, stage by
stage, is docs/design.md ("The trainer: data flow of one step"); the loop's state is one `RunState`
(gcpo_fast/run/state.py), which the checkpoint saves and restores whole.
"""

import dataclasses
import sys
import time
from pathlib import Path

import torch
from transformers import set_seed

from gcpo_fast.async_rollouts import RolloutProducer, take_round
from gcpo_fast.config import TrainConfig, parse_config
from gcpo_fast.data.files import PromptSampler
from gcpo_fast.data.prompt_checks import check_prompts
from gcpo_fast.distributed import parallel
from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.factory import make_engine, make_teacher_engine
from gcpo_fast.errors import ConfigError, TrainingError
from gcpo_fast.eval import count_correct, level_summary, summarize
from gcpo_fast.golden.teacher import GoldenCache, Teacher
from gcpo_fast.models import lora
from gcpo_fast.models.attention import resolve_attn_implementation
from gcpo_fast.models.loading import frozen_dtype, load_causal_lm, load_tokenizer
from gcpo_fast.models.memory import fit_warning, model_shape, plan_memory
from gcpo_fast.prepare import Prepared, prepare
from gcpo_fast.rounds import (
    RoundContext,
    ScoringOptions,
    build_rows,
    pack_micro_batches,
    sample_groups,
    score_micro_batches,
)
from gcpo_fast.run import lock, resume_policy
from gcpo_fast.run.checkpoint import (
    load_checkpoint,
    save_checkpoint,
)
from gcpo_fast.run.logger import RunLogger
from gcpo_fast.run.progress import ProgressBar
from gcpo_fast.run.state import RunState
from gcpo_fast.run.timing import PhaseTimer
from gcpo_fast.scoring import SamplingCorrection
from gcpo_fast.tools.loop import with_tools
from gcpo_fast.update import ModelWithLoss, build_optimizer, optimizer_step, weights_finite


def load_teacher(cfg: TrainConfig, cache: GoldenCache | None, reward_funcs: list, device) -> Teacher | None:
    """The golden-answer teacher of --golden_source: the cache, and the --golden_model engine when given."""
    if cache is None:
        return None
    engine = tokenizer = None
    folder, budget = cfg.golden.golden_model, cfg.golden.golden_max_completion_length
    if folder:
        tokenizer = load_tokenizer(folder, trust_remote_code=cfg.model.trust_remote_code)
        engine = make_teacher_engine(
            cfg.vllm, folder, tokenizer, device=device, bf16=cfg.model.bf16, seed=cfg.run.seed,
            max_model_len=cfg.rollout.max_prompt_length + budget, trust_remote_code=cfg.model.trust_remote_code,
        )  # fmt: skip
        engine = with_tools(engine, cfg.tools, tokenizer)  # its candidates are trajectories, re-run by the round
    return Teacher.of(
        cfg.golden, cache, reward_funcs, engine, tokenizer, cfg.rewards, budget, cfg.rollout.max_prompt_length,
        cfg.run.seed,
    )  # fmt: skip


def report_memory(cfg: TrainConfig, model_path, dist):
    """Print the per-device memory estimate (gcpo_fast/models/memory.py) on rank 0: the worst case at the run's budgets
    (memory.run_options: every row of a micro-batch, golden rows on top, at max_prompt_length +
    max_completion_length), and a one-line warning naming the options that would fit when it exceeds the device
    (CUDA; on the CPU the host's memory is not checked). Returns a function to call with the first round's packed
    micro-batches, which prints the estimate at the lengths the run sees (its largest micro-batch); None on other
    ranks or without an estimate."""
    if dist.rank != 0:
        return None
    from transformers import AutoConfig

    from gcpo_fast.models.attention import repeats_kv
    from gcpo_fast.models.memory import run_options, worst_case_rows

    trust = cfg.model.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
        shape = model_shape(config, trust_remote_code=trust)
    except (AttributeError, TypeError, ValueError) as e:  # a model of another layout: no estimate, the run goes on
        print(f"memory per device: no estimate for this model ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    cuda = dist.device.type == "cuda"
    memory = torch.cuda.get_device_properties(dist.device).total_memory if cuda else None
    attention = resolve_attn_implementation(cfg.model.attn_implementation, dist.device, cfg.model.bf16)
    repeated = repeats_kv(attention, dist.device)
    options = dict(run_options(cfg, world_size=dist.world_size, device=dist.device, repeated_kv=repeated), shape=shape)
    worst = plan_memory(config, device_memory=memory, **options)
    r = cfg.rollout
    budget = f"{worst_case_rows(cfg)} rows x ({r.max_prompt_length} + {r.max_completion_length}) tokens a micro-batch"
    print(worst.summary(f"estimate, worst case at these budgets: {budget}"), file=sys.stderr, flush=True)
    warning = fit_warning(config, device_memory=memory, **options) if cuda else None
    if warning:
        print(warning, file=sys.stderr, flush=True)

    def at_round_lengths(micro_batches) -> None:
        largest = max(micro_batches, key=lambda mb: mb.input_ids.numel())
        tokens, scored = largest.input_ids.numel(), largest.targets.numel()
        plan = plan_memory(
            config, device_memory=memory, **dict(options, tokens_per_micro_batch=tokens, completion_tokens=scored)
        )
        what = f"estimate at the first round's lengths: {largest.num_rows} rows, {tokens} tokens, {scored} scored"
        print(f"{plan.summary(what)}; worst case {worst.total() / 2**30:.2f} GiB", file=sys.stderr, flush=True)

    return at_round_lengths


# ---- the run ---------------------------------------------------------------------------------------------------


class Trainer:
    """A run's parts, built once; `fit` trains to max_steps."""

    def __init__(self, cfg: TrainConfig, prepared: Prepared | None = None):
        self.cfg = cfg
        self.dist = parallel.init_distributed(cpu_offload=cfg.parallel.fsdp_cpu_offload)
        rank, world = self.dist.rank, self.dist.world_size
        self.prepared = prepared = prepared or prepare(cfg)
        set_seed(cfg.run.seed + rank)
        # --use_peft: a checkpoint holds the adapter; the base weights and the tokenizer are --model's
        model_path = cfg.model.model if cfg.lora.use_peft else prepared.resume or cfg.model.model
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
        # a chat template that refuses a record: one line; prompts longer than max_prompt_length: counted
        records = {cfg.data.dataset: prepared.records, "the held-out set": prepared.eval_records or []}
        check_prompts(self.tokenizer, records, cfg.rollout.max_prompt_length)
        # the worst-case estimate, and a warning naming what fits, before any weight; then the first round's
        self.memory_at_round_lengths = report_memory(cfg, model_path, self.dist)
        adapter = prepared.resume if cfg.lora.use_peft else None
        self.model = lora.attach(
            self.load_model(model_path), cfg.lora, base_path=cfg.model.model, adapter=adapter, seed=cfg.run.seed
        )
        max_model_len = cfg.rollout.max_prompt_length + cfg.rollout.max_completion_length
        self.engine = make_engine(
            cfg.vllm, self.model, self.tokenizer, model_path, bf16=cfg.model.bf16, seed=cfg.run.seed,
            max_model_len=max_model_len, rank=rank, trust_remote_code=cfg.model.trust_remote_code,
            own_process=cfg.asynchronous.async_rollouts, log_dir=cfg.run.output_dir,
        )  # fmt: skip
        self.engine = with_tools(self.engine, cfg.tools, self.tokenizer)  # --tools: multi-turn rollouts
        self.ref_model = None
        if cfg.method.beta > 0:  # the reference is the initial policy, also when resuming
            reference = self.load_model(cfg.model.model, frozen_dtype(cfg.model.bf16, self.dist.device))
            self.ref_model = reference.eval().requires_grad_(False)
        self.teacher = load_teacher(cfg, prepared.golden_cache, prepared.reward_funcs, self.dist.device)
        self.loss_config = cfg.loss_config()
        self.correction = SamplingCorrection.of(cfg.vllm)  # None: no engine samples elsewhere, or switched off
        self.policy = parallel.parallelize(
            ModelWithLoss(self.model, self.loss_config, self.correction),
            cfg.parallel.parallelism,
            cpu_offload=cfg.parallel.fsdp_cpu_offload,
            bf16=cfg.model.bf16,
        )
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.run.max_steps)
        self.sampler = PromptSampler(
            prepared.records, cfg.prompts_per_round, seed=cfg.run.seed, rank=rank, world_size=world
        )
        self.state = RunState()
        if prepared.resume:
            self.restore(prepared.resume)
        self.state.engine_stale |= cfg.lora.use_peft  # an engine loaded from --model lacks the adapters
        self.state.engine_stale |= cfg.vllm.use_vllm and cfg.vllm.vllm_mode == "server"  # its weights: anyone's
        self.log = None
        if rank == 0:
            self.log = RunLogger(
                cfg.run.output_dir,
                report_to=cfg.log.report_to,
                config=cfg.to_dict(),
                logging_steps=cfg.log.logging_steps,
                resume_step=self.state.step if prepared.resume else None,
            )
        self.timer = PhaseTimer(cuda=self.dist.device.type == "cuda")
        self.round = RoundContext.of(
            cfg, self.engine, self.tokenizer, prepared.reward_funcs, self.timer, teacher=self.teacher
        )
        self.taken_cursor = None  # --async_rollouts: the data cursor after the rounds the loop took
        # --async_rollouts: rounds sampled ahead, on a thread of its own
        self.producer = self.make_producer() if cfg.asynchronous.async_rollouts else None

    def restore(self, checkpoint) -> None:
        """Optimizer, scheduler, data cursor and loop state from a checkpoint (a new --learning_rate wins)."""
        shared, own = load_checkpoint(checkpoint, reshards=self.policy.reshards)
        self.policy.load_optimizer(self.optimizer, checkpoint, shared)
        self.scheduler.load_state_dict(shared["scheduler"])
        resume_policy.apply(self.cfg.optim, self.optimizer, self.scheduler)
        self.sampler.load_state_dict(shared["sampler"])
        self.state.restore(shared, own)

    def make_producer(self) -> RolloutProducer:
        """The producer of --async_rollouts, sampling rounds on a process group of its own (parallel.side_group)."""
        batch = self.cfg.batch
        return RolloutProducer(
            dataclasses.replace(self.round, group=parallel.side_group()),
            self.sampler,
            max_staleness=self.cfg.asynchronous.max_staleness,
            steps_per_round=len(batch.optimizer_steps(range(batch.steps_per_generation))),
            start_step=self.state.step,
        )

    def load_model(self, path, dtype=None):
        model = self.cfg.model
        return load_causal_lm(
            path,
            device=self.dist.device,
            dtype=dtype or lora.base_dtype(self.cfg.lora, model.bf16, self.dist.device),
            attn_implementation=resolve_attn_implementation(model.attn_implementation, self.dist.device, model.bf16),
            gradient_checkpointing=model.gradient_checkpointing,
            trust_remote_code=model.trust_remote_code,
        )

    # ---- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> Path:
        cfg, state = self.cfg, self.state
        metrics = {}
        if self.prepared.eval_records and state.step == 0:
            metrics = self.evaluate()
            metrics.update(self.timer.pop())  # on every rank, so that no phase leaks into step 1's reduction
            if self.log:
                self.log.metrics(0, metrics)
        bar = ProgressBar(
            cfg.run.max_steps, state.step, disable=self.dist.rank != 0, logging_steps=cfg.log.logging_steps,
            start_metrics=metrics,
        )  # fmt: skip
        try:
            self.model.train()
            if self.producer:
                self.resync_engine()  # the engine's version is the trainer's step from here on
                self.producer.start()
            while state.step < cfg.run.max_steps:
                metrics = self.train_step()
                bar.step(state.step, metrics)
        finally:  # also on an error: vLLM's own teardown at exit would fail once the process group is gone
            bar.close()
            if self.producer:
                self.producer.stop()  # no new round; the one in flight ends with the engine
            self.engine.close()
            if self.producer:
                self.producer.close()
            if self.teacher is not None and self.teacher.engine is not None:
                self.teacher.engine.close()
            lock.release(cfg.run.output_dir)
        if self.log:
            self.log.close()
            print(self.log.summary(), flush=True)
        return Path(cfg.run.output_dir)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the next prepared step (a generation round first when none is left), then its
        metrics, and the evaluation and checkpoint when due."""
        cfg, state = self.cfg, self.state
        start = time.perf_counter()
        if not state.buffer:
            self.generate_round()
        micro_batches = state.buffer.pop(0)
        with self.timer("update"):
            metrics = optimizer_step(
                self.policy, self.optimizer, self.scheduler, micro_batches, cfg.optim, self.loss_config, cfg.model.bf16
            )
        state.engine_stale = True
        state.step += 1
        if self.producer and state.step % cfg.asynchronous.weight_sync_steps == 0:
            self.sync_engine()  # the producer may now sample further ahead
        tokens = sum(mb.input_ids.numel() for mb in micro_batches)  # prompt + completion tokens
        metrics = parallel.reduce_over_ranks({**state.round_metrics, **metrics, **self.timer.pop(), "tokens": tokens})
        metrics["step_time"] = time.perf_counter() - start
        state.num_tokens += metrics["tokens"]  # every rank's
        metrics["tokens_per_second"] = metrics.pop("tokens") / metrics["step_time"]
        metrics["num_tokens"] = state.num_tokens
        metrics["num_generated_tokens"] = state.num_generated_tokens
        try:
            state.skipped.record(state.step, metrics, cfg.run.max_skipped_steps, warn=self.dist.rank == 0)
        except TrainingError:
            if self.log:
                self.log.metrics(state.step, metrics)  # the step that stopped the run is on record
            raise
        last = state.step == cfg.run.max_steps
        if self.prepared.eval_records and (state.step % cfg.eval.eval_steps == 0 or last):
            metrics.update(self.evaluate())
            self.engine.sleep()
        if (cfg.checkpoint.save_steps and state.step % cfg.checkpoint.save_steps == 0) or last:
            with self.timer("checkpoint"):
                self.save()
        metrics.update(self.timer.pop())  # this rank's eval and checkpoint time (the same work on every rank)
        if self.log:
            self.log.metrics(state.step, metrics)
            if cfg.log.sample_steps and state.step % cfg.log.sample_steps == 0 and state.samples:
                self.log.samples(state.step, state.samples)  # each round's samples once, at the first sample step
                state.samples = []
        return metrics

    def generate_round(self) -> None:
        """The next round, sampled, rewarded, given golden rows, packed and scored, into the buffer of prepared
        optimizer steps."""
        cfg, state = self.cfg, self.state
        if self.producer:  # sampled ahead, by weights at most max_staleness steps old
            ready, wait = take_round(
                self.producer,
                state.step,
                cfg.asynchronous.max_staleness,
                reduce_max=lambda x: parallel.all_reduce([x], "max")[0],
                resync=self.resync_engine,
            )
            state.dropped_rounds += int(wait.pop("async/dropped_rounds_now"))
            sampled, state.round_metrics = ready.sampled, {**ready.metrics, **wait}
            state.round_metrics["async/dropped_rounds"] = state.dropped_rounds
            self.taken_cursor = ready.sampler_state
        else:
            self.sync_engine()
        with self.policy.unsharded():  # FSDP: gather the layers once for the whole round (a no-op otherwise)
            if not self.producer:
                sampled, state.round_metrics = sample_groups(self.round, self.sampler)
            state.num_generated_tokens += parallel.all_reduce([state.round_metrics.pop("completions/num_tokens")])[0]
            rows, state.samples, row_metrics = build_rows(self.round, sampled)
            micro_batches = pack_micro_batches(rows, cfg.batch, cfg.rollout.mask_truncated_completions)
            if self.memory_at_round_lengths:  # once, rank 0
                self.memory_at_round_lengths(micro_batches)
                self.memory_at_round_lengths = None
            scoring = ScoringOptions(reused=cfg.batch.reused, temperature=cfg.rollout.temperature, bf16=cfg.model.bf16)
            micro_batches = score_micro_batches(micro_batches, self.model, self.ref_model, scoring, self.timer)
        state.round_metrics.update(row_metrics)
        state.buffer = cfg.batch.optimizer_steps(micro_batches)
        self.engine.sleep()  # --vllm_enable_sleep_mode: vLLM's memory is the trainer's until the next sync

    def sync_engine(self) -> None:
        """Send the trainer's weights to the engine if they changed since it last sampled (or it slept them away).
        Under FSDP every rank gathers each parameter in turn, so every rank calls this."""
        if self.state.engine_stale or self.engine.asleep:
            with self.timer("weight_sync"):
                adapted = lora.is_peft_model(self.model)  # the merged weights, under the base model's names
                self.engine.sync_weights(
                    lora.merged_named_parameters(self.model) if adapted else self.policy.named_parameters(),
                    version=self.state.step,
                )
            self.state.engine_stale = False
            if self.producer:
                self.producer.weights_synced(self.state.step)

    def resync_engine(self) -> None:
        """Send the weights again, changed or not (the engine sampled with weights that were not the trainer's)."""
        self.state.engine_stale = True
        self.sync_engine()

    def evaluate(self) -> dict[str, float]:
        """eval/mean@k, eval/pass@j (and per level, when records have one) on the held-out records, each rank
        scoring its share."""
        cfg, records = self.cfg, self.prepared.eval_records
        rank, world = self.dist.rank, self.dist.world_size
        k = cfg.eval.eval_num_samples
        r = cfg.rollout
        sampling = Sampling(r.max_completion_length, r.temperature, r.top_p, r.top_k, greedy=k == 1)
        self.sync_engine()
        with self.timer("eval"), self.policy.unsharded():
            correct = count_correct(
                self.engine, self.tokenizer, records[rank::world], sampling, num_samples=k,
                max_prompt_length=r.max_prompt_length, seed=cfg.run.seed,
            )  # fmt: skip
            if world > 1:
                correct = [c for part in parallel.all_gather_objects(correct) for c in part]
                records = [r for i in range(world) for r in records[i::world]]  # the gathered order
        return {**summarize(correct, k), "eval/num_problems": len(correct), **level_summary(records, correct, k)}

    def save(self) -> None:
        if not weights_finite(self.model):  # never replace a good checkpoint with poisoned weights
            raise TrainingError(
                f"step {self.state.step}: the weights hold NaN or inf; no checkpoint was written (the newest one "
                "in the run directory holds the last good weights)"
            )
        policy, state = self.policy, self.state
        # --async_rollouts: the cursor after the rounds the trainer took; those sampled ahead are sampled again
        cursor = self.taken_cursor or self.sampler.state_dict()
        shared = state.shared_state(
            optimizer_state=policy.optimizer_state(self.optimizer), scheduler=self.scheduler, sampler_state=cursor
        )
        shared["dataset_sha256"] = self.prepared.dataset_sha256
        shared[resume_policy.BASE_IDENTITY] = self.prepared.base_identity
        save_checkpoint(
            self.cfg.run.output_dir,
            state.step,
            self.model,
            self.tokenizer,
            shared,
            state.rank_state(),
            config=self.cfg.to_dict(),
            save_total_limit=self.cfg.checkpoint.save_total_limit,
            model_state=policy.full_state_dict(),
            save_sharded=lambda folder: policy.save_optimizer(self.optimizer, folder),
        )


def train(cfg: TrainConfig, prepared: Prepared | None = None) -> Path:
    """Run training as configured; returns the output directory. prepared: prepare(cfg), if already done."""
    return Trainer(cfg, prepared).fit()


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
