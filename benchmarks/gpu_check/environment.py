"""What Triton needs on this machine before any stage compiles a kernel: a C compiler, Python's headers, one launch.

    python -m benchmarks.gpu_check.environment --json env.json

Triton (3.x) builds each kernel's launcher as a small C extension the first time it runs: with the compiler in
$CC, else `cc`, `gcc` or `clang` on the PATH, against Python.h from sysconfig's include folder (the scheme Triton
reads). Either missing fails every Triton kernel with a compiler error deep in a traceback; here it is one line,
and the stages that need Triton are skipped with that reason (plan.py). Then one tiny @triton.jit kernel (an add
of 1024 floats) is compiled, launched and checked on the GPU; without CUDA (the CPU rehearsal) the launch is
skipped and said so. Writes the findings to --json; exit status 1 when something is missing or the kernel fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def c_compiler() -> dict:
    """The compiler Triton would pick ($CC, else cc, gcc, clang on the PATH) and its version line."""
    path = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if path is None:
        return dict(ok=False, problem="no C compiler ($CC, cc, gcc, clang): Triton cannot build its launchers")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return dict(ok=False, path=path, problem=f"C compiler {path} does not run ({e.strerror})")
    if out.returncode:
        return dict(ok=False, path=path, problem=f"C compiler {path} --version exits {out.returncode}")
    return dict(ok=True, path=path, version=(out.stdout or out.stderr).splitlines()[0])


def python_headers() -> dict:
    """Python.h where Triton looks for it (sysconfig's include folder of the default scheme)."""
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    header = Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"
    if header.is_file():
        return dict(ok=True, path=str(header))
    return dict(ok=False, path=str(header), problem=f"{header} missing: install Python's headers (python3-dev)")


def tiny_kernel() -> dict:
    """Compile and launch one @triton.jit add on the GPU, and check its result."""
    import torch

    if not torch.cuda.is_available():
        return dict(ok=True, skipped="no CUDA device: nothing to launch (the CPU rehearsal)")
    import triton
    import triton.language as tl

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=keep) + tl.load(y_ptr + offs, mask=keep), mask=keep)

    x, y = torch.arange(1024.0, device="cuda"), torch.ones(1024, device="cuda")
    out = torch.empty_like(x)
    start = time.perf_counter()
    try:
        add[(4,)](x, y, out, 1024, BLOCK=256)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the compiler's or driver's error is the finding
        return dict(ok=False, problem=f"tiny Triton kernel failed: {type(e).__name__}: {str(e)[-300:]}")
    right = torch.equal(out, x + y)
    return dict(ok=right, seconds=round(time.perf_counter() - start, 2), **({} if right else {"problem": "wrong sum"}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    found = dict(python=sys.version.split()[0], compiler=c_compiler(), python_h=python_headers())
    if found["compiler"]["ok"] and found["python_h"]["ok"]:
        found["kernel"] = tiny_kernel()
    else:
        found["kernel"] = dict(ok=False, skipped="not tried: Triton cannot build a launcher here")
    Path(a.json).write_text(json.dumps(found, indent=1))
    problems = [part["problem"] for part in found.values() if isinstance(part, dict) and "problem" in part]
    for name, part in found.items():
        print(f"{name}: {part}")
    if problems:
        print("environment: " + "; ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
