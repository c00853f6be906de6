"""Where a step's time goes: wall time per phase, summed over the step, logged as timing/<phase>.

    timer = PhaseTimer(cuda=device.type == "cuda")
    with timer("generate"):
        out = engine.generate(...)
    metrics.update(timer.pop())          # {"timing/generate": 1.9, ...}, and the timer starts over

Phases of the trainer: generate, reward, teacher (golden answers from a teacher), old_logp (old and
reference log-probs of a reused round), update (forward + backward + optimizer), weight_sync, eval,
checkpoint. On CUDA each phase ends with a synchronize, so GPU work is charged to the phase that queued it
rather than to the next one that waits.
"""

import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, cuda: bool = False):
        self.cuda, self.totals = cuda, {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"timing/{phase}": seconds for phase, seconds in self.totals.items()}
        self.totals = {}
        return out
