"""Rollouts sampled ahead of the trainer, by weights at most max_staleness optimizer steps old.

    python -m gcpo_fast.train --async_rollouts --max_staleness 1            # the HF engine in a process of its own
    python -m gcpo_fast.train --async_rollouts --max_staleness 2 --use_vllm --vllm_mode server ...   # a vLLM server

    producer = RolloutProducer(ctx, sampler, max_staleness=2, steps_per_round=1, start_step=state.step)
    producer.start()
    ready = producer.next_round(step)       # a SampledGroups round; waits for it; re-raises the producer's error
    producer.weights_synced(step)           # after each weight sync: the producer may now sample further ahead
    producer.close()

Synchronous rounds alternate: the engine samples a round with the trainer's newest weights, then the trainer
trains on it while the engine waits. With --async_rollouts a background thread (the producer) draws the prompts,
has the engine sample them (an engine in another process: gcpo_fast.serve, the trainer's own HF server or a vLLM
server), rewards them (and refills DAPO's groups) and queues the round, while the main thread trains on earlier
rounds; golden rows, advantages, packing and the old log-probs stay on the main thread, at training time.

The bound. Let s be the optimizer steps taken when the trainer starts a round and v the policy version (the step
count of the weights) that sampled its rows: the round's staleness is s - v. The trainer sends its weights every
weight_sync_steps steps (<= max_staleness = K), and the producer starts the round planned for step s only once the
engine holds version >= s - K, so no round is older than K when it trains (0 is today's synchronous loop). A round
that is (a vLLM server restarted under the run and sampled with its initial weights: RemoteEngine waits up to
--vllm_server_timeout for it to come back, retries the generate, and gives up the sync the restart broke) is
dropped, counted in async/dropped_rounds, and the engine is synced again. The producer runs at most
K // steps_per_round + 1 rounds ahead. The trainer's own HF server dies with the trainer and is never restarted:
its death stops the run. Off the main thread the answer checks' time limit holds only in a process of its own, which
gcpo_fast.data.rewards uses (rewards/checker_timeouts counts what ran out of time).

The gap is corrected per row: each row keeps the engine's sampling log-probs, and the trainer's own log-probs at
training time are the old log-probs as in synchronous training, so the sampling weight exp(old - sampling)
(--vllm_importance_sampling_*, TRL's correction, for every loss type) carries the policy lag together with the
engine's numerical mismatch; golden rows, never sampled, keep weight 1.

Metrics: async/staleness (mean over the round's sampled rows) and async/staleness_max, async/queue_wait (seconds
the trainer waited for the round), async/dropped_rounds (so far); the producer's phases as timing/rollout/<phase>
(generate, reward), the trainer's as timing/<phase>.

Resume: a checkpoint holds the sampler's cursor as of the rounds the trainer took, not those the producer drew
ahead, so the rounds in flight are sampled again from the restored weights: the same prompts and seeds, not
bit-identical to an uninterrupted run (the engine's random stream and weights differ).
"""

import copy
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass

from gcpo_fast.errors import TrainingError, require
from gcpo_fast.options import at_least, check_options, option
from gcpo_fast.rounds import RoundContext, SampledGroups, sample_groups
from gcpo_fast.run.timing import PhaseTimer


@dataclass
class AsyncConfig:
    """Rollouts sampled ahead of the trainer (TRL's AsyncGRPO names)."""

    _argument_group_name = "async rollouts"

    async_rollouts: bool = option(
        False,
        "sample rounds ahead of the trainer while it trains, in a generation process of its own (the HF engine) or "
        "a vLLM server (--use_vllm --vllm_mode server)",
    )
    max_staleness: int = option(
        1, "with --async_rollouts: how many optimizer steps the weights that sampled a round may lag the trainer's"
    )
    weight_sync_steps: int = option(
        1, "with --async_rollouts: optimizer steps between weight syncs to the rollout engine (<= max_staleness)"
    )

    def __post_init__(self):
        check_options(self)
        at_least(self, 1, "max_staleness", "weight_sync_steps")
        require(
            self.weight_sync_steps <= self.max_staleness,
            f"weight_sync_steps={self.weight_sync_steps} must be <= max_staleness={self.max_staleness}: rounds "
            "would wait for weights that are never sent",
        )


@dataclass
class ProducedRound:
    """A round the producer sampled: its groups, rollout metrics (with the producer's timing) and the sampler's
    cursor after its prompts (what a checkpoint saves once the trainer took it)."""

    sampled: SampledGroups
    metrics: dict
    sampler_state: dict


def staleness(sampled: SampledGroups, step: int) -> list[int]:
    """step - version of each sampled row of a round (rows without a version, sampled in-process: 0)."""
    versions = sampled.rows.policy_version or []
    return [step - v for v in versions if v is not None] or [0]


class RolloutProducer:
    """Samples rounds in a background thread, each once the engine's weights are recent enough for it."""

    def __init__(self, ctx: RoundContext, sampler, *, max_staleness: int, steps_per_round: int, start_step: int):
        # a tokenizer of its own: a fast tokenizer is not safe to share between threads
        self.ctx = dataclasses.replace(ctx, tokenizer=copy.deepcopy(ctx.tokenizer), timer=PhaseTimer())
        self.sampler, self.max_staleness, self.steps_per_round = sampler, max_staleness, steps_per_round
        self.next_start = start_step  # the step at which the next round the producer samples will train
        self.engine_version = start_step  # the weights the engine holds (loaded from the run's current weights)
        self.rounds: queue.Queue = queue.Queue()
        self.changed = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._produce, name="rollout-producer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def weights_synced(self, version: int) -> None:
        """The engine now samples with the weights of step `version`."""
        with self.changed:
            self.engine_version = version
            self.changed.notify_all()

    def round_dropped(self) -> None:
        """The trainer dropped a round: the rounds after it train one round earlier than planned."""
        with self.changed:
            self.next_start -= self.steps_per_round
            self.changed.notify_all()

    def next_round(self, poll_seconds: float = 1.0) -> ProducedRound:
        """The next round, waiting for it; the producer's error, raised here, if it failed."""
        while True:
            try:
                item = self.rounds.get(timeout=poll_seconds)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise TrainingError("the rollout producer stopped without a round or an error") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def stop(self) -> None:
        """Sample no further round (the one in flight finishes, or fails once the engine is closed)."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        """Stop, and wait up to timeout seconds for the round in flight (close the engine first to cut it short)."""
        self.stop()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _ready(self) -> bool:
        return self.stopping or self.engine_version >= self.next_start - self.max_staleness

    def _produce(self) -> None:
        try:
            while True:
                with self.changed:
                    self.changed.wait_for(self._ready)
                    if self.stopping:
                        return
                    self.next_start += self.steps_per_round
                sampled, metrics = sample_groups(self.ctx, self.sampler)
                timing = {k.replace("timing/", "timing/rollout/"): v for k, v in self.ctx.timer.pop().items()}
                self.rounds.put(ProducedRound(sampled, {**metrics, **timing}, self.sampler.state_dict()))
        except BaseException as e:  # the trainer raises it on its thread
            if not self.stopping:
                self.rounds.put(e)


def take_round(
    producer: RolloutProducer, step: int, max_staleness: int, *, reduce_max, resync
) -> tuple[ProducedRound, dict]:
    """The next round fresh enough to train at `step`, and its async/* metrics (the rounds dropped on the way
    in async/dropped_rounds_now). reduce_max: the max over ranks, so that every rank drops the same rounds;
    resync(): send the trainer's weights to the engine again (after a drop: its weights were not ours)."""
    start, dropped = time.perf_counter(), 0
    while True:
        ready = producer.next_round()
        lag = staleness(ready.sampled, step)
        if reduce_max(max(lag)) <= max_staleness:
            break
        dropped += 1
        producer.round_dropped()
        resync()
    metrics = {
        "async/staleness": sum(lag) / len(lag),
        "async/staleness_max": float(max(lag)),
        "async/queue_wait": time.perf_counter() - start,
        "async/dropped_rounds_now": float(dropped),
    }
    return ready, metrics
