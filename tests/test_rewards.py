"""math_reward (forms of the same answer, worker threads), reward loading and weighting."""

import math
import re
import threading

import pytest
import torch

from gcpo_fast.data.rewards import (
    RewardFunctionError,
    compute_rewards,
    extract_answer,
    load_reward_function,
    math_reward,
    unverifiable_reason,
)

CASES = [  # (completion, answer, reward)
    (r"Half of one is \boxed{1/2}.", "0.5", 1.0),
    (r"So the result is \boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("The answer is 0.5", r"\boxed{\dfrac{1}{2}}", 1.0),
    (r"\boxed{\frac{2}{4}}", "1/2", 1.0),
    (r"\boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
    (r"\boxed{(1,2)}", "(1, 2)", 1.0),
    (r"\boxed{2}", "(1, 2)", 0.0),  # unboxed, math-verify would read the gold "(1, 2)" as 2
    (r"\boxed{1/3}", "0.5", 0.0),
    ("I do not know.", "0.5", 0.0),
    (r"\boxed{72}", "72", 1.0),
    (r"\boxed{71}", "72", 0.0),
    ([{"role": "assistant", "content": r"\boxed{72}"}], "72", 1.0),  # conversational completion
]


def test_math_reward_forms_of_the_same_answer():
    completions, answers, expected = zip(*CASES)
    assert math_reward(list(completions), list(answers)) == list(expected)
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_reward(["a", "b"], ["1"])


def test_math_reward_from_worker_thread():
    completions, answers, expected = zip(*CASES)
    out, errors = [], []

    def work():
        try:
            out.append(math_reward(list(completions), list(answers)))
        except Exception as e:  # surfaced below: a signal-based timeout raises ValueError off the main thread
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors
    assert out == [list(expected)]


def test_extract_answer():
    assert extract_answer(r"so $\boxed{\frac{1}{2}}$ and done") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{1} then \boxed{ {2}+3 }") == "{2}+3"
    assert extract_answer("24 + 48 = 72\n#### 72") == "72"
    assert extract_answer("Adding gives 41 apples in all") == "41"  # math-verify's extraction
    assert extract_answer("no idea") is None
    assert extract_answer(r"unclosed \boxed{3 but the sum is 7") == "7"  # falls through to math-verify
    assert extract_answer(r"\boxed{}  x = 5") == "5"  # an empty box does not count


def fmt_reward(prompts, completions, **kwargs):
    return [1.0 if c.startswith("<think>") else 0.0 for c in completions]


def test_load_reward_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("my_rewards:length", "my_rewards.length"):
        assert load_reward_function(spec)(prompts=["p"], completions=["abc"]) == [3]
    acc = load_reward_function("accuracy_reward")
    assert acc(prompts=["p", "p"], completions=[r"\boxed{3}", "4"], answer=["3", "3"]) == [1.0, 0.0]
    assert load_reward_function(fmt_reward) is fmt_reward
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        load_reward_function("no_such_module:f")
    with pytest.raises(ValueError, match="has no callable 'nothing'"):
        load_reward_function("my_rewards:nothing")
    with pytest.raises(ValueError, match="expected a built-in name"):
        load_reward_function("accuracy")


def test_compute_rewards_weighted_nansum():
    def maybe(prompts, completions, answer, **kw):  # applies only where answer != "skip"
        return [None if a == "skip" else 2.0 for a in answer]

    def sees_columns(prompts, completions, answer, golden, extra, **kw):
        return [float(len(golden[i] or "")) + extra[i] for i in range(len(completions))]

    records = [
        {"prompt": "p", "answer": "1", "golden": "ab", "extra": 0.5},
        {"prompt": "p", "answer": "skip", "golden": None, "extra": 1.0},
    ]
    rewards, per_func = compute_rewards(
        [maybe, sees_columns], ["p", "p"], ["x", "y"], records, reward_weights=[0.5, 2.0]
    )
    assert torch.isnan(per_func[1, 0]) and per_func[0].tolist() == [2.0, 2.5]
    assert rewards.tolist() == [0.5 * 2.0 + 2.0 * 2.5, 2.0 * 1.0]  # NaN drops out of the sum
    with pytest.warns(UserWarning, match="every reward function returned None for completion 1"):
        rewards, _ = compute_rewards([maybe], ["p", "p"], ["x", "y"], records)
    assert rewards.tolist() == [2.0, 0.0]

    def short(**kw):
        return [1.0]

    with pytest.raises(ValueError, match="'short' returned 1 values for 2 completions"):
        compute_rewards([fmt_reward, short], ["p"] * 2, ["a", "b"], records[:1] * 2)
    with pytest.raises(ValueError, match="1 reward functions but 2 reward_weights"):
        compute_rewards([fmt_reward], ["p"], ["a"], records[:1], reward_weights=[1.0, 1.0])


@pytest.mark.parametrize(
    "bad, shown",
    [
        (float("nan"), "returned nan for completion 1"),
        (float("inf"), "returned inf for completion 1"),
        (-math.inf, "returned -inf for completion 1"),
        ("1.0", "returned str '1.0' for completion 1"),
        ([1.0], "returned list [1.0] for completion 1"),
        (torch.tensor(float("nan")), "returned nan for completion 1"),
    ],
)
def test_a_non_finite_or_non_numeric_reward_names_the_function(bad, shown):
    # NaN used to be taken for None ("does not apply") and silently became reward 0
    def flaky_reward(prompts, completions, **kw):
        return [1.0, bad]

    records = [{"prompt": "p", "answer": "1"}] * 2
    with pytest.raises(ValueError, match=r"^reward function 'flaky_reward' " + re.escape(shown)):
        compute_rewards([flaky_reward], ["p", "p"], ["a", "b"], records)


def test_reward_values_that_are_numbers():
    import numpy as np

    def typed(prompts, completions, **kw):
        return [True, np.float32(0.5), torch.tensor(2.0), None]

    def as_array(prompts, completions, **kw):
        return np.array([1.0, 2.0, 3.0, 4.0])

    records = [{"prompt": "p", "answer": "1"}] * 4
    rewards, per_func = compute_rewards([typed, as_array], ["p"] * 4, ["a"] * 4, records)
    assert rewards.tolist() == [2.0, 2.5, 5.0, 4.0]

    def scalar(**kw):
        return 0.5

    with pytest.raises(ValueError, match="'scalar' returned float, expected a list of 1 rewards"):
        compute_rewards([scalar], ["p"], ["a"], records[:1])
    with pytest.raises(ValueError, match=r"reward_weights must be finite, got \[nan\]"):
        compute_rewards([typed], ["p"] * 4, ["a"] * 4, records, reward_weights=[float("nan")])


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("foo", "reads 'foo' as a product of one-letter variables"),  # a word is read as f*o*o
        ("yes", "reads 'yes' as a product of one-letter variables"),
        ("sin(x)", "reads 'sin' as a product of one-letter variables"),
        (r"\$5", "cannot parse it"),
    ],
)
def test_unverifiable_answers(answer, reason):
    assert reason in unverifiable_reason(answer)
    # math_reward agrees: the answer as it is meant, boxed, does not score (or scores by accident for a
    # permutation of the letters); the cannot-parse kind never scores at all
    if "cannot parse" in reason:
        assert math_reward([rf"\boxed{{{answer}}}", answer], [answer, answer]) == [0.0, 0.0]


@pytest.mark.parametrize(
    "answer",
    [
        "72",
        r"\frac{1}{2}",
        "(1, 2)",
        r"\sqrt{2}",
        "10 meters",
        "1 and 2",
        "x=3 or x=5",
        r"\text{yes}",
        r"\text{(C)}",
        "C",
        "2xy",
        r"(-\infty, 3]",
        "infinity",
        r"\begin{pmatrix}1\\2\end{pmatrix}",
        r"y = \frac{1}{2}x + 3",
        "2+3i",
    ],
)
def test_verifiable_answers(answer):
    assert unverifiable_reason(answer) is None
    assert math_reward([rf"\boxed{{{answer}}}"], [answer]) == [1.0]


def test_a_failing_reward_function_is_named_and_keeps_its_traceback():
    def picky_reward(prompts, completions, **columns):
        raise ValueError("cannot score this")

    with pytest.raises(
        RewardFunctionError, match="reward function 'picky_reward' raised ValueError: cannot score"
    ) as e:
        compute_rewards([picky_reward], ["p"], ["c"], [{"prompt": "p", "answer": "1"}])
    assert not isinstance(e.value, ValueError)  # not taken for a user's option mistake: the traceback is kept
    assert isinstance(e.value.__cause__, ValueError)


def test_reward_functions_get_their_own_copies_of_prompts_and_completions():
    records = [{"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}] * 2
    completions = [[{"role": "assistant", "content": "\\boxed{2}"}]] * 2

    def mutating_reward(prompts, completions, **columns):
        prompts[0][0]["content"] = "changed"  # a function that edits the messages it is given
        completions.clear()  # ... and empties the shared list
        return [0.0, 0.0]

    seen = []

    def recording_reward(prompts, completions, **columns):
        seen.append(len(completions))
        return [1.0] * len(completions)

    rewards, _ = compute_rewards(
        [mutating_reward, recording_reward], [r["prompt"] for r in records], completions, records
    )
    assert records[0]["prompt"][0]["content"] == "What is 1 + 1?"  # later epochs see the dataset as it is
    assert seen == [2] and len(completions) == 2 and rewards.tolist() == [1.0, 1.0]
