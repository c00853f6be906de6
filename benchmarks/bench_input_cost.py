"""What large inputs cost before and after issue 24's fixes, side by side: loading many rows, and a huge prompt.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_input_cost                 # 100k rows, a 10 MB prompt
    OMP_NUM_THREADS=1 python -m benchmarks.bench_input_cost --rows 20000 --prompt_mb 1

1. Loading N JSONL rows (answers: 1/4 integers, 1/4 decimals, 1/4 \\frac{a}{b}, 1/4 a\\sqrt{b} from 650 distinct
   ones): the load checks every distinct answer with math-verify (data.warn_unverifiable). "before" parses each
   one (PLAIN_NUMBER matching nothing), "after" skips the plain numbers.
2. Encoding one prompt of MB megabytes for the last 256 tokens (prompts.encode_prompts): "before" tokenises it
   whole (CHARS_PER_TOKEN huge), "after" cuts it to its last 256 x CHARS_PER_TOKEN characters first.
Wall time (time.perf_counter) and the peak resident memory of a child process per measurement (ru_maxrss).
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_rows(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            answer = [str(i), f"{i}.5", f"\\frac{{{i}}}{{{i % 97 + 2}}}", f"{i % 50}\\sqrt{{{i % 13 + 2}}}"][i % 4]
            f.write(json.dumps({"prompt": f"Problem {i}: compute it.", "solution": f"So \\boxed{{{answer}}}."}) + "\n")


def measure_load(path: str, before: bool) -> float:
    from gcpo_fast.data import files as data

    if before:
        data.PLAIN_NUMBER = re.compile(r"(?!x)x")  # matches nothing: every answer parsed
    start = time.perf_counter()
    data.load_prompts(path)
    return time.perf_counter() - start


def measure_prompt(megabytes: float, before: bool) -> float:
    from transformers import AutoTokenizer

    from gcpo_fast.data import prompts
    from gcpo_fast.models.loading import DEFAULT_MODEL

    if before:
        prompts.CHARS_PER_TOKEN = 10**12
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompt = "What is 1 + 2? " * int(megabytes * 10**6 / 15)
    start = time.perf_counter()
    prompts.encode_prompts(tokenizer, [prompt], 256)
    return time.perf_counter() - start


def child(kind: str, arg: str, before: bool) -> tuple[float, float]:
    """(seconds, peak MiB) of one measurement in a fresh process."""
    code = (
        "import json, resource, sys; from benchmarks.bench_input_cost import measure_load, measure_prompt; "
        f"s = measure_{kind}({arg!r} if {kind!r} == 'load' else float({arg!r}), {before}); "
        "print(json.dumps([s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--prompt_mb", type=float, default=10.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.jsonl"
        write_rows(rows, args.rows)
        table = [
            (f"load {args.rows} rows", child("load", str(rows), True), child("load", str(rows), False)),
            (
                f"encode a {args.prompt_mb:g} MB prompt",
                *(child("prompt", str(args.prompt_mb), b) for b in (True, False)),
            ),
        ]
    print(f"{'':28} {'before s':>10} {'after s':>10} {'before MiB':>11} {'after MiB':>10}")
    for name, (t0, m0), (t1, m1) in table:
        print(f"{name:28} {t0:10.2f} {t1:10.2f} {m0:11.0f} {m1:10.0f}")


if __name__ == "__main__":
    main()
