"""Print the installed versions of everything gcpo_fast needs, as pip constraints: run in a green environment (a
fresh venv with `pip install torch==2.13.0 -e ".[test]"` whose suite passed) to refresh the last known-good set.

    python constraints/freeze.py > constraints/tested.txt
    pip install -c constraints/tested.txt torch==2.13.0 -e ".[test]"      # that set again, on another machine

Only gcpo_fast's requirements and theirs are written (with the extras named below), not whatever else the
environment holds; local version labels are dropped (torch 2.13.0+cpu is written 2.13.0, which the CUDA build of
the same release also satisfies). triton is written as a comment: torch's CUDA builds pin their own triton, which a
constraint would contradict on a GPU machine.
"""

import importlib.metadata as metadata
import platform
import sys
from datetime import date

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("test", "lora", "data")  # what CI installs and tests; gpu, vllm and bench are not installed there


def requirement_closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """{distribution name: installed version} for `root` and every requirement it pulls in here."""
    versions, todo = {}, [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        if key in versions and not wanted:
            continue
        versions[key] = dist.version.split("+")[0]
        for line in dist.requires or []:
            req = Requirement(line)
            environments = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                if canonicalize_name(req.name) not in versions or req.extras:
                    todo.append((req.name, set(req.extras)))
    del versions[canonicalize_name(root)]
    return versions


def main() -> None:
    versions = requirement_closure("gcpo_fast", EXTRAS)
    print(f"# The last known-good set: gcpo_fast[{','.join(EXTRAS)}] and what it pulls in, frozen by")
    print(f"# constraints/freeze.py on {date.today()} (Python {platform.python_version()}, {sys.platform}) after")
    print("# the suite passed. Use: pip install -c constraints/tested.txt torch==2.13.0 -e '.[test]'")
    print(f"# triton=={versions.pop('triton')} (not constrained: torch's CUDA builds pin their own)")
    for name, version in sorted(versions.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
