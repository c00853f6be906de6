"""math-verify's time limit off the main thread (the rollout producer of --async_rollouts): the check runs in a
process of its own, where a completion that would hold sympy for minutes costs the limit and is counted.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_reward_timeout.py
"""

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gcpo_fast.data import rewards
from gcpo_fast.data.rewards import math_reward, take_checker_timeouts, within_limit

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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception, printed
def test_a_limit_whose_alarm_python_drops_still_ends_the_check():
    """The limit's first alarm lands in a __del__, where Python prints and drops what it raises (as it did inside
    math-verify in a weakref callback, and sympy ran on for 33 s): the alarm rings again and ends the check."""

    class SlowToGo:
        def __del__(self):
            time.sleep(1)

    def check():
        SlowToGo()
        start = time.monotonic()
        while time.monotonic() - start < 20:
            pass
        return "ran on"

    start = time.monotonic()
    assert within_limit(0.3, check) == (None, True)
    assert time.monotonic() - start < 5
    assert within_limit(0.3, lambda: 7) == (7, False)
    time.sleep(0.5)  # no alarm is left armed


def test_a_check_no_signal_reaches_is_cut_by_the_batch_limit(monkeypatch):
    """The checking process stopped dead (as in a sympy call that never returns to Python): the batch scores 0
    after its whole limit, every completion counted, and the next batch gets a fresh process."""
    monkeypatch.setattr(rewards, "MATH_VERIFY_TIMEOUT_S", 1)
    monkeypatch.setattr(rewards, "BATCH_SLACK_S", 3)
    out = []

    def check(completions):
        out.append((math_reward(completions, ["3"] * len(completions)), take_checker_timeouts()))

    first = threading.Thread(target=check, args=([r"\boxed{3}"],))
    first.start()
    first.join(90)
    worker = checking_process()
    os.kill(worker, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.warns(UserWarning, match="checking 2 completions took over 6 s; they score 0"):
            stuck = threading.Thread(target=check, args=([r"\boxed{3}", "4"],))
            stuck.start()
            stuck.join(60)
        assert 6 <= time.monotonic() - start < 30
    finally:
        os.kill(worker, signal.SIGKILL)
    fresh = threading.Thread(target=check, args=([r"\boxed{3}"],))
    fresh.start()
    fresh.join(90)
    assert out == [([1.0], 0), ([0.0, 0.0], 2), ([1.0], 0)]
    assert checking_process() != worker


def checking_process() -> int:
    """The pid of this process's answer-checking child (multiprocessing's spawned worker)."""
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"multiprocessing.spawn" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("no checking process")
