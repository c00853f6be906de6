"""Rewards: math answer checking with math-verify, and user reward functions (TRL's signature).

    from gcpo_fast.data.rewards import math_reward, load_reward_function, compute_rewards

    math_reward([r"... so \\boxed{1/2}", "it is 3"], ["0.5", "0.5"])          # -> [1.0, 0.0]

    funcs = [load_reward_function("accuracy_reward"),                       # built in
             load_reward_function("my_pkg.rewards:format_reward")]         # or my_pkg.rewards.format_reward
    rewards, per_func = compute_rewards(funcs, prompts, completions, records, reward_weights=[1.0, 0.1])
    # rewards [N] float32, per_func [N, F] (NaN where a function returned None)


User reward functions follow TRL's signature: `f(prompts, completions, **columns) -> list[float | None]`,
where `columns` holds every key of the prompt records (one value per completion: `answer`, `golden`,
`solution`, ...) plus any extra keyword the caller passes (e.g. `completion_ids`). Prompts and
completions are strings, or lists of chat messages for conversational data. `None` means "does not
apply to this sample": as in TRL it becomes NaN and drops out of the weighted sum (`torch.nansum`),
so a sample where every function returns None gets reward 0 (with a warning). Any other value must be a
finite real number (int, float, bool, a NumPy scalar or a one-element tensor): NaN, inf or anything else
is a bug in the function and raises ValueError naming it (TRL would silently drop a NaN like a None,
quietly turning a broken reward into 0). A function that raises is named in a RewardFunctionError with its
own traceback as the cause. Each function gets its own copies of the prompts, completions and columns.

`unverifiable_reason(answer)` says why math_reward can never reward a completion as correct against a
ground-truth answer as it is meant: math-verify cannot parse it at all (e.g. "\\$5"), or it reads a plain
word as a product of one-letter variables ("yes" -> E*s*y, "sin(x)" -> i*s*n(x); \\text{yes} and \\sin(x)
are read as meant). The data loader reports such answers when the dataset loads (gcpo_fast/data/files.py).

Each parse and verify has a time limit of MATH_VERIFY_TIMEOUT_S, set by SIGALRM, which only works on a main thread.
math-verify's own limit raises once; where that exception lands in a weakref callback or a __del__, Python prints
and drops it and sympy runs on for minutes. So math_reward passes math-verify no limit and sets its own, an alarm
that rings again every RING_AGAIN_S until the check ends. Off the main thread (the rollout producer of
--async_rollouts, a user's reward worker) math_reward sends the checking to a process of its own (a spawned pool of
one, started at the first such call, as verl and torchtitan check answers): there, on its main thread, each check
has the same limit, and a completion that hangs sympy costs MATH_VERIFY_TIMEOUT_S, not the run. A check that sympy
holds inside C code, where no signal reaches, is cut by a limit on the whole batch (the worker is then replaced,
every completion of the batch scores 0). A completion whose check timed out scores 0 and is counted:
take_checker_timeouts() gives this thread's count since it last asked (the trainer logs it per round as
rewards/checker_timeouts). extract_answer and unverifiable_reason (the data loader) run in the calling thread,
with the limit where it is the main thread.
"""

import atexit
import copy
import importlib
import logging
import math
import multiprocessing
import numbers
import re
import signal
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from math_verify import parse, verify

from gcpo_fast.errors import require
from gcpo_fast.options import check_options, option

# Seconds math-verify may spend parsing or comparing one expression (its own default).
MATH_VERIFY_TIMEOUT_S = 5
BATCH_SLACK_S = 60  # the checking process's own start, on top of a batch's limits
RING_AGAIN_S = 0.1  # the limit's alarm repeats until the check ends (a dropped exception does not end it)

_checker = threading.local()  # this thread's count of checks that timed out
_pool_lock = threading.Lock()
_pool = None  # the checking process, off the main thread


@dataclass
class RewardConfig:
    """The reward functions and what counts as a correct answer (shared by the trainer and gcpo_fast.golden)."""

    _argument_group_name = "rewards"

    reward_funcs: list[str] = option(
        ["accuracy_reward"], "reward functions: built-in names or 'package.module:function' (TRL signature)"
    )
    reward_weights: list[float] | None = option(None, "one weight per reward function (default: all 1)")
    correct_reward: float = option(
        1.0,
        "the reward of a correct answer: a prompt is all-wrong when no rollout reaches it, and golden rows get it",
    )

    def __post_init__(self):
        check_options(self)
        require(bool(self.reward_funcs), "reward_funcs must name at least one reward function")
        require(
            self.reward_weights is None or len(self.reward_weights) == len(self.reward_funcs),
            f"reward_weights has {len(self.reward_weights or [])} values for {len(self.reward_funcs)} reward_funcs",
        )


class _CheckTimedOut(BaseException):
    """The limit's alarm; a BaseException, so the `except Exception` of math-verify and sympy lets it through."""


class _NoTimeoutWarning(logging.Filter):
    """math-verify warns that a check without its limit can hang: math_reward sets the limit itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def within_limit(seconds: float, check: Callable, *args) -> tuple[object, bool]:
    """(check(*args), False), or (None, True) when it ran past `seconds`. On the main thread an alarm raises
    _CheckTimedOut at the limit and every RING_AGAIN_S after it until the check ends; elsewhere no signal can be
    used and the check runs unlimited (math_reward sends those checks to a process of its own)."""
    if threading.current_thread() is not threading.main_thread():
        return check(*args), False
    live = [True]

    def ring(signum, frame):
        if live[0]:
            raise _CheckTimedOut

    previous = signal.signal(signal.SIGALRM, ring)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds, RING_AGAIN_S)
            return check(*args), False
        finally:
            live[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _CheckTimedOut:
        return None, True
    finally:  # again: a ring that came just as the check ended raised in the inner finally, before it disarmed
        live[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in text, braces matched; None if there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(solution: str) -> str | None:
    """The final answer of a worked solution: its last `\\boxed{}`, else what follows GSM8K's `####`,
    else the string math-verify extracts from it; None when nothing can be extracted."""
    boxed = _last_boxed(solution)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    if "####" in solution:
        tail = solution.rsplit("####", 1)[1].strip()
        if tail:
            return tail
    parsed, _ = within_limit(MATH_VERIFY_TIMEOUT_S, _parse, solution)
    parsed = parsed or []
    # parse returns [sympy object, extracted string] on success
    return parsed[-1] if len(parsed) == 2 and isinstance(parsed[-1], str) and parsed[-1].strip() else None


def _completion_text(completion) -> str:
    """A completion as text: strings pass through, chat messages give the last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def _parse_gold(answer: str) -> list:
    """The ground truth as math-verify reads it, [] when it cannot (nor within the limit)."""
    gold, _ = within_limit(MATH_VERIFY_TIMEOUT_S, _parse_answer, answer)
    return gold or []


def _parse_answer(answer: str) -> list:
    # A bare answer such as "\sqrt{2}" or "(1, 2)" has no LaTeX delimiters, and math-verify's
    # anchor-free parsing then misses it or reads only part of it ("(1, 2)" -> 2): box it (as verl does).
    if "\\boxed" not in answer and "$" not in answer:
        gold = _parse("\\boxed{" + answer + "}")
        if gold:
            return gold
    return _parse(answer)


def _parse(text: str) -> list:
    return parse(text, parsing_timeout=None)  # the limit is within_limit's


def math_reward(completions: Sequence, answers: Sequence[str]) -> list[float]:
    """1.0 where the completion's final answer equals the ground-truth answer per math-verify, else 0.0.

    answers are final answers ("0.5", "\\frac{1}{2}", "\\boxed{(1, 2)}") or texts holding one; the gold is
    parsed first (once per distinct answer), then the completion, then `verify(gold, completion)`.
    An unparseable gold answer gives every completion for it 0.0; so does a check that timed out
    (counted: take_checker_timeouts). Off the main thread the checks run in a process of their own.
    """
    if len(completions) != len(answers):
        raise ValueError(f"math_reward: {len(completions)} completions but {len(answers)} answers")
    texts, golds = [_completion_text(c) for c in completions], [str(a) for a in answers]
    if threading.current_thread() is threading.main_thread():
        rewards, timed_out = check_answers(texts, golds)
    else:
        rewards, timed_out = _check_elsewhere(texts, golds)
    _checker.timeouts = getattr(_checker, "timeouts", 0) + timed_out
    return rewards


def take_checker_timeouts() -> int:
    """The checks of this thread that timed out (scored 0) since it last asked."""
    count, _checker.timeouts = getattr(_checker, "timeouts", 0), 0
    return count


def check_answers(texts: list[str], answers: list[str]) -> tuple[list[float], int]:
    """(math_reward's rewards, how many completions' checks timed out), on this (main) thread."""
    gold_cache: dict[str, list] = {}
    rewards, timed_out = [], 0
    for text, answer in zip(texts, answers):
        if answer not in gold_cache:
            gold_cache[answer] = _parse_gold(answer)
        gold = gold_cache[answer]
        correct, late = within_limit(MATH_VERIFY_TIMEOUT_S, _verified, gold, text) if gold else (False, False)
        rewards.append(1.0 if correct else 0.0)
        timed_out += late
    return rewards, timed_out


def _verified(gold: list, text: str) -> bool:
    predicted = _parse(text)
    return bool(predicted) and verify(gold, predicted, timeout_seconds=None)


def _check_elsewhere(texts: list[str], answers: list[str]) -> tuple[list[float], int]:
    """check_answers in the checking process, on its main thread, where math-verify's limits work; a batch past
    its whole limit (a check stuck in C code) scores 0 throughout, and the process is replaced."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = multiprocessing.get_context("spawn").Pool(1)  # not fork: the trainer runs threads
        pool = _pool
    limit = MATH_VERIFY_TIMEOUT_S * (len(texts) + len(set(answers))) + BATCH_SLACK_S
    try:
        return pool.apply_async(check_answers, (texts, answers)).get(limit)
    except multiprocessing.TimeoutError:
        with _pool_lock:
            if _pool is pool:
                _pool = None
        # terminate() waits for the worker to go: not on this thread, whatever state the worker is in
        threading.Thread(target=pool.terminate, daemon=True, name="checker-terminate").start()
        warnings.warn(f"math_reward: checking {len(texts)} completions took over {limit} s; they score 0", stacklevel=3)
        return [0.0] * len(texts), len(texts)


@atexit.register
def _stop_checker() -> None:
    if _pool is not None:
        _pool.terminate()


# A word of three or more letters that is not a LaTeX command (\\frac) nor its argument (\\text{odd}, \\begin{pmatrix}).
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_COMMAND_ARGUMENT = re.compile(r"\\[A-Za-z]+\{[^{}]*\}")


def unverifiable_reason(answer: str) -> str | None:
    """Why math_reward can never reward a completion as correct against this ground-truth answer as it is
    meant, or None when math-verify reads it as mathematics. Parses the way math_reward does."""
    gold = _parse_gold(str(answer))
    if not gold:
        return "math-verify cannot parse it"
    # math-verify strips units and joins ("10 meters" -> 10, "1 and 2" -> {1, 2}); a word still in the
    # string it extracted was read as variables
    word = _WORD.search(_COMMAND_ARGUMENT.sub("", str(gold[-1])))
    if word:
        return f"math-verify reads {word.group()!r} as a product of one-letter variables ({gold[0]})"
    return None


def accuracy_reward(prompts, completions, answer, **columns) -> list[float]:
    """TRL-signature wrapper of math_reward over the records' `answer` column (built-in name "accuracy_reward")."""
    return math_reward(completions, answer)


BUILTIN_REWARDS = {"accuracy_reward": accuracy_reward}


def load_reward_function(spec: str | Callable) -> Callable:
    """A reward function from a built-in name, `package.module:function` or `package.module.function`."""
    if callable(spec):
        return spec
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {spec!r}: expected a built-in name ({', '.join(BUILTIN_REWARDS)}), "
            "'package.module:function' or 'package.module.function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r}: {e}") from e
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}")
    return func


class RewardFunctionError(RuntimeError):
    """A reward function raised: its name here, its own traceback as the cause. Not a ValueError on purpose:
    the commands print those as a user's option mistake in one line, which would hide where the code failed."""


def reward_function_name(func: Callable) -> str:
    """The name used in metrics (`rewards/{name}/mean`), as TRL derives it."""
    return getattr(func, "__name__", type(func).__name__)


def as_completions(records: list[dict], texts: list[str]) -> list:
    """Completions as the reward functions see them: TRL gives conversational prompts assistant messages."""
    return [
        t if isinstance(r["prompt"], str) else [{"role": "assistant", "content": t}] for r, t in zip(records, texts)
    ]


def compute_rewards(
    reward_funcs: Sequence[Callable],
    prompts: Sequence,
    completions: Sequence,
    records: Sequence[dict],
    reward_weights: Sequence[float] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of several reward functions, TRL-style.

    records: one prompt record per completion (the record repeated G times for its G completions);
    every key except "prompt" becomes a keyword column. Returns (rewards [N], per_func [N, F]), both
    float32 on the CPU; per_func holds NaN where a function returned None.
    """
    n = len(completions)
    if len(prompts) != n or len(records) != n:
        raise ValueError(f"compute_rewards: {len(prompts)} prompts, {n} completions, {len(records)} records")
    weights = (
        torch.ones(len(reward_funcs)) if reward_weights is None else torch.tensor(reward_weights, dtype=torch.float32)
    )
    if weights.numel() != len(reward_funcs):
        raise ValueError(f"compute_rewards: {len(reward_funcs)} reward functions but {weights.numel()} reward_weights")
    if not torch.isfinite(weights).all():
        raise ValueError(f"compute_rewards: reward_weights must be finite, got {weights.tolist()}")
    keys = dict.fromkeys(k for r in records for k in r if k != "prompt")  # union, in first-seen order
    columns = {k: [r.get(k) for r in records] for k in keys}
    per_func = torch.full((n, len(reward_funcs)), float("nan"))
    for j, func in enumerate(reward_funcs):
        # each function gets its own copies: one that edits the messages (or empties the list) it is given would
        # otherwise change the dataset for later epochs, or the next function's input
        mine = copy.deepcopy((prompts, completions, columns))
        try:
            out = func(prompts=mine[0], completions=mine[1], **mine[2], **kwargs)
        except Exception as e:
            raise RewardFunctionError(
                f"reward function {reward_function_name(func)!r} raised {type(e).__name__}: {e}"
            ) from e
        if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
            raise ValueError(
                f"reward function {reward_function_name(func)!r} returned {type(out).__name__}, "
                f"expected a list of {n} rewards"
            )
        if len(out) != n:
            raise ValueError(
                f"reward function {reward_function_name(func)!r} returned {len(out)} values for {n} completions"
            )
        per_func[:, j] = torch.tensor(
            [float("nan") if r is None else _reward_value(r, func, i) for i, r in enumerate(out)]
        )
    missing = torch.isnan(per_func).all(dim=1)
    if len(reward_funcs) and missing.any():
        warnings.warn(
            f"every reward function returned None for completion {int(missing.nonzero()[0])} "
            f"({int(missing.sum())} such completions in all); they get reward 0",
            stacklevel=2,
        )
    rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    return rewards, per_func


def _reward_value(value, func: Callable, index: int) -> float:
    """A reward function's value as a float; ValueError naming the function unless it is a finite number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    shown = repr(value) if isinstance(value, numbers.Real) else f"{type(value).__name__} {value!r:.40}"
    raise ValueError(
        f"reward function {reward_function_name(func)!r} returned {shown} for completion {index}: a reward "
        "must be a finite number, or None where the function does not apply"
    )
