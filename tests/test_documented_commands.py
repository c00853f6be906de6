"""Every `python -m ...` command of this project that README.md, docs/ and benchmarks/README.md show still runs:
each answers --help with its usage (a moved module or a renamed command fails here, not in a reader's terminal)."""

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tiny_model import child_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OURS = re.compile(r"python -m ((?:gcpo_fast|benchmarks)(?:\.\w+)*)")


def documented_commands() -> list[str]:
    return sorted({m for doc in DOCS for m in OURS.findall(doc.read_text())})


def help_of(module: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, "--help"]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)


def test_every_documented_command_answers_help():
    commands = documented_commands()
    assert {"gcpo_fast.train", "gcpo_fast.eval", "gcpo_fast.golden", "gcpo_fast.serve", "gcpo_fast.data"} <= set(
        commands
    )
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(commands, pool.map(help_of, commands)))
    broken = {m: d.stderr.strip().splitlines()[-1:] for m, d in done.items() if d.returncode or "usage" not in d.stdout}
    assert not broken, broken
