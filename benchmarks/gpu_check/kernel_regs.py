"""Registers and spills of the Triton kernels as the device's Triton compiled them for this GPU.

    python -m benchmarks.gpu_check.kernel_regs --json regs.json                       # CUDA: d=1536, V=151936
    python -m benchmarks.gpu_check.kernel_regs --json regs.json --n 256 --d 64 --v 4096

Runs the fused op (bench_loss's `triton` variant: fwd+bwd and the forward-only log-probs, both cases) in
bf16 and fp32, so that every kernel configuration the launchers pick at this shape is compiled, then reads
each compiled kernel from its JIT cache: `n_regs` and `n_spills` (what the driver reports when it loads
the cubin), shared memory, warps and stages (`metadata`). Ahead-of-time builds for sm_80/sm_90 without a
GPU are kernels/aot_report.py's; this is the same question answered by the Triton installed on the GPU
machine. Without CUDA (the CPU rehearsal) there is nothing compiled: the result says so (`skipped`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

import torch


def jit_functions() -> dict[str, object]:
    """Every @triton.jit function (autotuners unwrapped) in the gcpo_fast.kernels modules, by name (the launchers
    import their Triton modules lazily: every module of the package is imported first)."""
    import gcpo_fast.kernels as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"gcpo_fast.kernels.{info.name}")
    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("gcpo_fast.kernels") or module is None:
            continue
        for attr, value in vars(module).items():
            fn = value
            while hasattr(fn, "fn") and not hasattr(fn, "device_caches"):  # Autotuner / Heuristics
                fn = fn.fn
            if hasattr(fn, "device_caches"):
                found[f"{name.rsplit('.', 1)[-1]}.{attr}"] = fn
    return found


def compiled_kernels() -> list[dict]:
    """One row per compiled kernel in the JIT caches: name, registers, spills, shared bytes, warps, stages."""
    rows = []
    for name, fn in sorted(jit_functions().items()):
        for cache in fn.device_caches.values():
            kernels = cache[0] if isinstance(cache, tuple) else cache  # (kernel_cache, ...) in triton 3.x
            for kernel in kernels.values():
                kernel._init_handles()  # loads the cubin: n_regs / n_spills come from the driver
                md = kernel.metadata
                rows.append(
                    dict(
                        kernel=name,
                        registers=int(kernel.n_regs),
                        spills=int(kernel.n_spills),
                        shared_bytes=int(getattr(md, "shared", 0)),
                        num_warps=int(getattr(md, "num_warps", 0)),
                        num_stages=int(getattr(md, "num_stages", 0)),
                    )
                )
    return rows


def run_op(n: int, d: int, v: int, dtype: torch.dtype) -> None:
    """bench_loss's triton variant, both cases: fwd+bwd and forward-only."""
    from benchmarks.variants import BUILDERS, CASES, make_inputs, to_device
    from gcpo_fast.kernels.logprob_torch import WORKSPACE_BYTES

    inp = make_inputs(n, d, v, 4, dtype, "cuda", 1.0, 1.0, 0.05, max(1, WORKSPACE_BYTES // (4 * v)), seed=0)
    for case in CASES:
        built = BUILDERS["triton"](to_device(inp, "cuda"), case, workspace_bytes=WORKSPACE_BYTES)
        built.fwd_bwd()
        with torch.no_grad():
            built.fwd()
    torch.cuda.synchronize()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--n", type=int, default=2048, help="packed tokens")
    ap.add_argument("--d", type=int, default=1536, help="hidden size")
    ap.add_argument("--v", type=int, default=151936, help="vocabulary size")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        result = dict(
            skipped="no CUDA device: nothing is compiled for a GPU here (AOT builds: kernels/aot_report.py)",
            jit_functions=sorted(jit_functions()),
            kernels=compiled_kernels(),  # empty here; exercises the reading
        )
    else:
        for dtype in (torch.bfloat16, torch.float32):
            run_op(a.n, a.d, a.v, dtype)
        result = dict(kernels=compiled_kernels(), shape=dict(n=a.n, d=a.d, v=a.v), dtypes=["bf16", "fp32"])
    Path(a.json).write_text(json.dumps(result, indent=1))
    for row in result.get("kernels", []):
        print(row)
    print(
        f"{len(result['kernels'])} compiled kernels"
        + (f"; skipped: {result['skipped']}" if "skipped" in result else "")
    )


if __name__ == "__main__":
    main()
