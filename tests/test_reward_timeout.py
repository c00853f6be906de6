"""math-verify's time limit off the main thread (the rollout producer of --async_rollouts): the check runs in a
process of its own, where a completion that would hold sympy for minutes costs the limit and is counted.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_reward_timeout.py
"""

import logging
import threading
import time

from gcpo_fast import rewards
from gcpo_fast.rewards import math_reward, take_checker_timeouts

# verify() against 3 expands this for ~100 s on a 2-core machine, in Python code a signal interrupts
SLOW = r"\boxed{(x+y+z+1)^{40}}"


def test_the_checker_has_a_time_limit_off_the_main_thread_and_counts_timeouts(monkeypatch, caplog):
    monkeypatch.setattr(rewards, "MATH_VERIFY_TIMEOUT_S", 2)
    out = {}

    def producer():
        start = time.monotonic()
        out["rewards"] = math_reward([SLOW, r"\boxed{3}", "no answer"], ["3", "3", "3"])
        out["seconds"], out["timeouts"] = time.monotonic() - start, take_checker_timeouts()
        out["again"] = take_checker_timeouts()

    with caplog.at_level(logging.WARNING):
        thread = threading.Thread(target=producer)
        thread.start()
        thread.join(90)  # the checking process's start (a spawned interpreter) and the 2 s limit
        assert not thread.is_alive(), "the check has no time limit off the main thread"
    assert out["rewards"] == [0.0, 1.0, 0.0] and out["timeouts"] == 1 and out["again"] == 0
    assert not [r for r in caplog.records if "Timeout is disabled" in r.getMessage()]  # math-verify's warning
    assert take_checker_timeouts() == 0  # the main thread's count is its own


def test_the_main_thread_counts_its_timeouts_too(monkeypatch):
    monkeypatch.setattr(rewards, "MATH_VERIFY_TIMEOUT_S", 1)
    take_checker_timeouts()
    start = time.monotonic()
    assert math_reward([SLOW, r"\boxed{3}"], ["3", "3"]) == [0.0, 1.0]
    assert time.monotonic() - start < 10 and take_checker_timeouts() == 1
