"""The shipped math task: arithmetic and short word problems at graded difficulty, with worked golden solutions.

    from gcpo_fast.data.tasks import generate_problems, train_split, heldout_split

    train = train_split(4096, seed=0)                   # never shares a prompt with any held-out split
    test = heldout_split(400, seed=0, levels=[1, 2, 3])
    # a record: {"prompt": "Q: 23+48=?\\n",
    #            "solution": "20+40=60. 3+8=11. 60+11=71. \\\\boxed{71}",
    #            "answer": "71", "level": 3}

Records are in TRL's layout (`prompt`, `solution`) plus the final `answer` and the difficulty `level`.
The prompt is "Q: <question>\\n"; the solution follows it directly (no leading space) and ends in
\\boxed{answer}. Solutions are chains of small steps ("a op b=c.") so a tiny model can learn them; they
are at most 44 tokens of the shipped tokenizer. The vocabulary is digits, + - * ( ) = ? . and a few dozen
words.

Levels (the shipped model's greedy held-out accuracy at each is in assets/default_model/README.md):
    1  one-digit addition                      3+5
    2  one-digit subtraction / multiplication  7-3, 7*6
    3  two-digit addition                      23+48
    4  two-digit subtraction                   71-48
    5  one-step word problems                  Tom has 12 apples. He gets 7 more. ...
    6  two-digit times one-digit               47*6
    7  two or three operations                 (3+4)*5, 3*4+5*6, two-step word problems
    8  two-digit times two-digit               23*47

Sampling: each record draws its level uniformly from `levels`, then its numbers; everything comes from a
`random.Random` seeded from (stream, seed), never from the global RNG, so a seed gives the same records
on any machine and Python >= 3.2. Records are drawn with replacement (the small levels hold only ~100
distinct problems), unless `distinct=True`.

Splits: a prompt is held out iff a SHA-256 hash of its text falls in the held-out bucket (20% of all
prompts), so `train_split` and `heldout_split` can never share a prompt, whatever their sizes and seeds.
They share skills (the single-digit facts that are the steps of every level), not problems.
"""

import hashlib
import random
from collections.abc import Callable, Iterable

LEVELS = tuple(range(1, 9))
HELDOUT_FRACTION = 0.2  # of all prompts (by hash), per level approximately

_HE = ("Tom", "Sam", "Ben")
_SHE = ("Ann", "Mia", "Eva")
_ITEMS = ("apples", "pens", "eggs", "cards", "books", "coins")
_BOXES = ("bags", "boxes")


def _record(question: str, steps: list[str], answer: int, level: int) -> dict:
    return {
        "prompt": f"Q: {question}\n",
        "solution": " ".join(steps + [f"\\boxed{{{answer}}}"]),
        "answer": str(answer),
        "level": level,
    }


def _step(a, op: str, b, result: int) -> str:
    return f"{a}{op}{b}={result}."


def _level1(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return _record(f"{a}+{b}=?", [_step(a, "+", b, a + b)], a + b, 1)


def _level2(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return _record(f"{a}-{b}=?", [_step(a, "-", b, a - b)], a - b, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return _record(f"{a}*{b}=?", [_step(a, "*", b, a * b)], a * b, 2)


def _level3(rng: random.Random) -> dict:
    x, y = rng.randint(10, 99), rng.randint(10, 99)
    tens, ones = (x // 10 + y // 10) * 10, x % 10 + y % 10
    steps = [
        _step(x // 10 * 10, "+", y // 10 * 10, tens),
        _step(x % 10, "+", y % 10, ones),
        _step(tens, "+", ones, x + y),
    ]
    return _record(f"{x}+{y}=?", steps, x + y, 3)


def _level4(rng: random.Random) -> dict:
    x = rng.randint(20, 99)
    y = rng.randint(10, x - 1)
    mid = x - y // 10 * 10
    steps = [_step(x, "-", y // 10 * 10, mid), _step(mid, "-", y % 10, x - y)]
    return _record(f"{x}-{y}=?", steps, x - y, 4)


def _who(rng: random.Random) -> tuple[str, str, str]:
    """A name, its pronoun and possessive-free object form: ("Tom", "He", "he")."""
    if rng.random() < 0.5:
        return rng.choice(_HE), "He", "he"
    return rng.choice(_SHE), "She", "she"


def _level5(rng: random.Random) -> dict:
    name, pron, pron_lc = _who(rng)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 19), rng.randint(1, 9)
        q = f"{name} has {a} {item}. {pron} gets {b} more. How many {item} does {pron_lc} have?"
        return _record(q, [_step(a, "+", b, a + b)], a + b, 5)
    if kind == 1:
        a = rng.randint(3, 19)
        b = rng.randint(1, min(9, a))
        q = f"{name} has {a} {item}. {pron} gives away {b}. How many {item} are left?"
        return _record(q, [_step(a, "-", b, a - b)], a - b, 5)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    box = rng.choice(_BOXES)
    q = f"{name} has {a} {box} with {b} {item} in each. How many {item} are there?"
    return _record(q, [_step(a, "*", b, a * b)], a * b, 5)


def _level6(rng: random.Random) -> dict:
    x, c = rng.randint(11, 99), rng.randint(2, 9)
    if x % 10 == 0:
        x += 1
    hi, lo = x // 10 * 10 * c, x % 10 * c
    steps = [_step(x // 10 * 10, "*", c, hi), _step(x % 10, "*", c, lo), _step(hi, "+", lo, x * c)]
    return _record(f"{x}*{c}=?", steps, x * c, 6)


def _level7(rng: random.Random) -> dict:
    kind = rng.randrange(8)
    d = lambda lo=2: rng.randint(lo, 9)  # noqa: E731 - a one-digit number
    if kind == 0:  # (a+b)*c
        a, b, c = d(1), d(1), d()
        s = a + b
        return _record(f"({a}+{b})*{c}=?", [_step(a, "+", b, s), _step(s, "*", c, s * c)], s * c, 7)
    if kind == 1:  # a*b+c
        a, b, c = d(), d(), d(1)
        p = a * b
        return _record(f"{a}*{b}+{c}=?", [_step(a, "*", b, p), _step(p, "+", c, p + c)], p + c, 7)
    if kind == 2:  # a*b-c
        a, b, c = d(), d(), d(1)
        p = a * b
        return _record(f"{a}*{b}-{c}=?", [_step(a, "*", b, p), _step(p, "-", c, p - c)], p - c, 7)
    if kind == 3:  # a+b*c
        a, b, c = d(1), d(), d()
        p = b * c
        return _record(f"{a}+{b}*{c}=?", [_step(b, "*", c, p), _step(a, "+", p, a + p)], a + p, 7)
    if kind == 4:  # a*b+c*d: three operations
        a, b, c, e = d(), d(), d(), d()
        p, q = a * b, c * e
        steps = [_step(a, "*", b, p), _step(c, "*", e, q), _step(p, "+", q, p + q)]
        return _record(f"{a}*{b}+{c}*{e}=?", steps, p + q, 7)
    # two-step word problems
    name, pron, pron_lc = _who(rng)
    item = rng.choice(_ITEMS)
    if kind == 5:
        a, b, box = d(), d(), rng.choice(_BOXES)
        p = a * b
        c = rng.randint(1, min(9, p))
        q = f"{name} has {a} {box} with {b} {item} in each. {pron} gives away {c}. How many {item} are left?"
        return _record(q, [_step(a, "*", b, p), _step(p, "-", c, p - c)], p - c, 7)
    if kind == 6:
        a, b, box = d(), d(), rng.choice(_BOXES)
        p = a * b
        c = d(1)
        q = f"{name} has {a} {box} with {b} {item} in each. {pron} gets {c} more. How many {item} does {pron_lc} have?"
        return _record(q, [_step(a, "*", b, p), _step(p, "+", c, p + c)], p + c, 7)
    a, b = rng.randint(2, 19), d(1)
    s = a + b
    c = rng.randint(1, min(9, s))
    q = f"{name} has {a} {item}. {pron} gets {b} more and gives away {c}. How many {item} are left?"
    return _record(q, [_step(a, "+", b, s), _step(s, "-", c, s - c)], s - c, 7)


def _level8(rng: random.Random) -> dict:
    x, y = rng.randint(11, 99), rng.randint(11, 99)
    if y % 10 == 0:
        y += 1
    hi, lo = x * (y // 10 * 10), x * (y % 10)
    steps = [_step(x, "*", y // 10 * 10, hi), _step(x, "*", y % 10, lo), _step(hi, "+", lo, x * y)]
    return _record(f"{x}*{y}=?", steps, x * y, 8)


_GENERATORS: dict[int, Callable[[random.Random], dict]] = {
    1: _level1,
    2: _level2,
    3: _level3,
    4: _level4,
    5: _level5,
    6: _level6,
    7: _level7,
    8: _level8,
}


def is_heldout(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out side (a fixed 20% of all prompts, by SHA-256 of the text)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h % 1000 < HELDOUT_FRACTION * 1000


def _levels(levels: Iterable[int] | None) -> tuple[int, ...]:
    levels = LEVELS if levels is None else tuple(levels)
    bad = [lv for lv in levels if lv not in _GENERATORS]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty subset of {list(LEVELS)}, got {list(levels)}")
    return levels


def _sample(n: int, stream: str, seed: int, levels, keep: Callable[[dict], bool], distinct: bool) -> list[dict]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = _levels(levels)
    # the seed string names the module where this task was first written: changing it would change every problem
    rng = random.Random(f"gcpo_fast.tasks/{stream}/{seed}")
    out, seen, attempts = [], set(), 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(
                f"could not draw {n} {'distinct ' if distinct else ''}{stream} problems from levels {list(levels)} "
                f"(found {len(out)}): the small levels hold only ~100 problems (1 and 2: fewer than 30 held out); ask "
                "for fewer problems or more levels"
            )
        record = _GENERATORS[rng.choice(levels)](rng)
        if not keep(record) or (distinct and record["prompt"] in seen):
            continue
        seen.add(record["prompt"])
        out.append(record)
    return out


def generate_problems(n: int, seed: int, levels: Iterable[int] | None = None, *, distinct: bool = False) -> list[dict]:
    """n problems, each of a level drawn uniformly from `levels` (default: all), from both sides of the split."""
    return _sample(n, "all", seed, levels, lambda r: True, distinct)


def train_split(n: int, seed: int = 0, levels: Iterable[int] | None = None, *, distinct: bool = False) -> list[dict]:
    """n training problems: never a prompt that `heldout_split` can return."""
    return _sample(n, "train", seed, levels, lambda r: not is_heldout(r["prompt"]), distinct)


def heldout_split(n: int, seed: int = 0, levels: Iterable[int] | None = None, *, distinct: bool = False) -> list[dict]:
    """n held-out problems: never a prompt that `train_split` can return."""
    return _sample(n, "heldout", seed, levels, lambda r: is_heldout(r["prompt"]), distinct)
