"""The training progress bar: steps, rate and time left, with the two figures a user watches.

    from gcpo_fast.run.progress import ProgressBar

    bar = ProgressBar(total=500, initial=0, disable=rank != 0, logging_steps=10, start_metrics=step0_eval)
    for step in range(1, 501):
        bar.step(step, metrics)     # metrics: the step's line of metrics.jsonl
    bar.close()

The postfix carries the training reward (its mean over the steps since the last logging step) and the latest
held-out accuracy (eval/mean@k, from the last evaluation). It changes every logging_steps and at each
evaluation; the bar is redrawn at most every REFRESH_SECONDS, so that a run whose output is captured to a file
(where each redraw is one more line) stays short: the default run's 500 steps give about 25 redraws.
"""

import statistics

from tqdm.auto import tqdm

REFRESH_SECONDS = 10.0


def held_out(metrics: dict) -> float | None:
    """The overall held-out accuracy of a metrics line (eval/mean@k), None if it has no evaluation."""
    return next((v for k, v in metrics.items() if k.startswith("eval/mean@")), None)


class ProgressBar:
    def __init__(self, total: int, initial: int, *, disable: bool, logging_steps: int, start_metrics: dict):
        self.bar = tqdm(
            total=total, initial=initial, desc="train", disable=disable, dynamic_ncols=True, mininterval=REFRESH_SECONDS
        )
        self.logging_steps, self.rewards = logging_steps, []
        self.figures = {"reward": "-", "held_out": "-"}
        if held_out(start_metrics) is not None:
            self.figures["held_out"] = f"{held_out(start_metrics):.3f}"
        self.bar.set_postfix(self.figures, refresh=False)

    def step(self, step: int, metrics: dict) -> None:
        """Count one optimizer step; new figures every logging_steps and at an evaluation."""
        self.rewards.append(metrics["reward"])
        accuracy = held_out(metrics)
        if accuracy is not None:
            self.figures["held_out"] = f"{accuracy:.3f}"
        if step % self.logging_steps == 0 or accuracy is not None:
            self.figures["reward"] = f"{statistics.fmean(self.rewards):.3f}"
            self.rewards = []
            self.bar.set_postfix(self.figures, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
