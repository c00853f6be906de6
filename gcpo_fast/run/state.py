"""A run: its options (where it writes, how long it trains, its seed) and its state, which checkpoints itself.

    from gcpo_fast.run.state import RunConfig, RunState

    state = RunState()                                     # step 0, no prepared steps
    state.restore(trainer_state, rank_state)               # from a checkpoint (gcpo_fast/run/checkpoint.py)
    trainer_state = state.shared_state(optimizer_state=..., scheduler=..., sampler_state=...)   # what all ranks share
    rank_state = state.rank_state()                        # the unfinished round of this rank

The loop's state is this one object (gcpo_fast/train.py reads and advances it); nothing else of a run's
progress lives in locals, so a checkpoint holds all of it.
"""

import sys
from dataclasses import dataclass, field

from gcpo_fast.errors import TrainingError, require
from gcpo_fast.options import at_least, check_options, option


@dataclass
class RunConfig:
    """Where a run writes and how long it trains."""

    _argument_group_name = "run"

    output_dir: str = option("runs/gcpo", "run directory: metrics.jsonl, samples.jsonl, checkpoint-<step>/")
    max_steps: int = option(500, "optimizer steps to train")
    seed: int = option(42, "seed of the data order, sampling and everything random")
    max_skipped_steps: int = option(
        3, "stop the run when this many optimizer steps in a row are skipped for a non-finite loss or gradient norm"
    )

    def __post_init__(self):
        check_options(self)
        require(self.output_dir.strip() != "", "output_dir must name a folder, got ''")
        at_least(self, 1, "max_steps", "max_skipped_steps")
        require(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")


@dataclass
class SkippedSteps:
    """The optimizer steps skipped for a non-finite loss or gradient norm: counted (metric skipped_steps),
    each warned about, and the run stopped after max_in_a_row of them in a row."""

    total: int = 0
    in_a_row: int = 0

    def record(self, step: int, metrics: dict, max_in_a_row: int, warn: bool) -> None:
        """Count step's outcome (metrics["step_skipped"], popped) and add skipped_steps to metrics."""
        skipped = metrics.pop("step_skipped") > 0  # the same on every rank
        self.total, self.in_a_row = self.total + skipped, self.in_a_row + 1 if skipped else 0
        metrics["skipped_steps"] = self.total
        if skipped and warn:
            print(
                f"warning: step {step}: loss {metrics['loss']:.4g}, grad_norm {metrics['grad_norm']:.4g}: not finite, "
                f"the step was skipped (no optimizer or scheduler step; {self.in_a_row} in a row)",
                file=sys.stderr,
            )
        if self.in_a_row >= max_in_a_row:
            raise TrainingError(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient norm "
                "(--max_skipped_steps); stopped with the weights of the last good step. Look for a "
                "reward of inf, a learning rate too large, or fp16 overflow"
            )


@dataclass
class RunState:
    """The loop's progress: the step, the tokens trained on and generated, the prepared optimizer steps of the
    current generation round with its metrics and samples, the skipped steps, and whether the engine's weights lag."""

    step: int = 0
    num_tokens: float = 0.0
    num_generated_tokens: float = 0.0  # every completion token the engine sampled, kept or not, on every rank
    buffer: list = field(default_factory=list)  # [optimizer step][micro-batch] of gcpo_fast.packing.PackedBatch
    round_metrics: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)  # the round's rollouts for samples.jsonl, until logged
    skipped: SkippedSteps = field(default_factory=SkippedSteps)
    engine_stale: bool = False  # new weights since the engine last synced (it syncs before it samples)
    dropped_rounds: int = 0  # --async_rollouts: rounds dropped for sampling with weights older than max_staleness

    def shared_state(self, *, optimizer_state: dict, scheduler, sampler_state: dict) -> dict:
        """trainer_state.pt: what every rank shares."""
        return dict(
            step=self.step,
            num_tokens=self.num_tokens,
            num_generated_tokens=self.num_generated_tokens,
            **optimizer_state,
            scheduler=scheduler.state_dict(),
            sampler=sampler_state,
            skipped=vars(self.skipped),
            dropped_rounds=self.dropped_rounds,
        )

    def rank_state(self) -> dict:
        """This rank's part of rank_<rank>.pt: the unfinished round."""
        return dict(buffer=self.buffer, round_metrics=self.round_metrics)

    def restore(self, state: dict, rank_state: dict) -> None:
        self.step, self.num_tokens = state["step"], state["num_tokens"]
        self.num_generated_tokens = state.get("num_generated_tokens", 0.0)
        self.skipped = SkippedSteps(**state.get("skipped", {}))
        self.dropped_rounds = state.get("dropped_rounds", 0)
        self.buffer, self.round_metrics = rank_state.get("buffer", []), rank_state.get("round_metrics", {})
