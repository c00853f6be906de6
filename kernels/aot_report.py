"""Ahead-of-time compile report: every kernel configuration built for real GPUs, on a machine
without one.

The Triton interpreter checks numerics on the CPU but cannot show that a kernel compiles for a GPU,
uses the tensor cores, does not spill or fits in shared memory. Triton compiles ahead of time with
no GPU present: `triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc,
32))` gives PTX and a cubin; `cuobjdump --dump-resource-usage` (shipped in the triton wheel) reads
registers, stack frame and local memory from the cubin. Spilled registers live in the stack frame
(ptxas -v: "N bytes stack frame, M bytes spill stores"), so spills are reported as (stack + local
bytes) / 4, Triton's `n_spills` convention; shared memory is the kernel's dynamic shared memory
(`metadata.shared`).

    python -m gcpo_fast.kernels.aot_report            # table for sm_80 and sm_90
    python -m gcpo_fast.kernels.aot_report --json     # the rows as JSON

To add a kernel, append a `KernelEntry` to REGISTRY: the @triton.jit function, its configurations
(objects with `num_warps` / `num_stages`, each with the dtypes it is launched for) and a function
(dtype, config) -> (signature, constexprs, names of args that are multiples of 16).
Builds use the worst-case constexpr variant (bias and entropy on). Under TRITON_INTERPRET=1 the
kernels are interpreter objects that cannot be compiled, so `build_report` runs in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic smem per block (A100 / H100)
_PTR = {"fp32": "*fp32", "tf32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


@dataclass(frozen=True)
class KernelEntry:
    name: str
    kernel: Any  # the @triton.jit function
    configs: dict[str, tuple[Any, tuple[str, ...]]]  # name -> (config, dtypes it runs with)
    signature: Callable[[str, Any], tuple[dict, dict, set]]
    uses_dot: bool  # tl.dot tile kernel: 16-bit sm_90 builds need wgmma


@dataclass
class ReportRow:
    kernel: str
    config: str
    dtype: str
    arch: str
    registers: int
    spills: int  # (stack frame + local memory bytes) / 4, Triton's n_spills
    shared_bytes: int
    uses_wgmma: bool
    uses_mma: bool  # mma.sync (Ampere tensor cores) or wgmma
    uses_dot: bool


def _logprob_entries() -> list[KernelEntry]:
    from . import logprob_triton as lt

    def dot_precision(dtype: str) -> str:
        return "ieee" if dtype == "fp32" else "tf32"

    def fwd_signature(dtype: str, cfg: lt.Config):
        p = _PTR[dtype]
        sig = {
            "X": p,
            "W": p,
            "BIAS": p,
            "TGT": "*i64",
            "WS_M": "*fp32",
            "WS_S": "*fp32",
            "WS_A": "*fp32",
            "WS_ZT": "*fp32",
            "N": "i32",
            "V": "i32",
            "D": "i32",
            "stride_x": "i32",
            "stride_w": "i32",
            "v_per_split": "i32",
            "inv_temp": "fp32",
        }
        const = {
            "HAS_BIAS": True,
            "WITH_ENTROPY": True,
            "DOT_PRECISION": dot_precision(dtype),
            "BLOCK_N": cfg.block_n,
            "BLOCK_V": cfg.block_v,
            "BLOCK_D": cfg.block_d,
        }
        div16 = {k for k, v in sig.items() if v.startswith("*")} | {"D", "stride_x", "stride_w", "v_per_split"}
        return sig, const, div16

    def bwd_signature(dtype: str, cfg: lt.Config):
        p = _PTR[dtype]
        sig = {
            "X": p,
            "W": p,
            "BIAS": p,
            "TGT": "*i64",
            "LSE": "*fp32",
            "ENT": "*fp32",
            "GLP": "*fp32",
            "GENT": "*fp32",
            "DZ": p,
            "N": "i32",
            "V": "i32",
            "D": "i32",
            "stride_x": "i32",
            "stride_w": "i32",
            "stride_dz": "i32",
            "inv_temp": "fp32",
            "ignore_index": "i32",
        }
        const = {
            "HAS_BIAS": True,
            "HAS_ENT_GRAD": True,
            "DOT_PRECISION": dot_precision(dtype),
            "BLOCK_N": cfg.block_n,
            "BLOCK_V": cfg.block_v,
            "BLOCK_D": cfg.block_d,
        }
        div16 = {k for k, v in sig.items() if v.startswith("*")} | {"D", "stride_x", "stride_w", "stride_dz"}
        return sig, const, div16

    def table(configs):
        # what `pick_config` launches: the "fp32" entry for fp32 inputs (IEEE, or TF32 when
        # torch allows it), the others for 16-bit inputs
        return {name: (cfg, ("fp32", "tf32") if name == "fp32" else ("bf16", "fp16")) for name, cfg in configs.items()}

    return [
        KernelEntry(
            "_linear_logprob_fwd_kernel",
            lt._linear_logprob_fwd_kernel,
            table(lt.FWD_CONFIGS),
            fwd_signature,
            uses_dot=True,
        ),
        KernelEntry(
            "_linear_logprob_bwd_dz_kernel",
            lt._linear_logprob_bwd_dz_kernel,
            table(lt.BWD_CONFIGS),
            bwd_signature,
            uses_dot=True,
        ),
    ]


def _policy_loss_entries() -> list[KernelEntry]:
    from types import SimpleNamespace

    from . import policy_loss_triton as pt

    def signature(dtype: str, cfg):
        sig = {
            "LP": "*fp32",
            "OLD": "*fp32",
            "REF": "*fp32",
            "SW": "*fp32",
            "MASK": "*i8",
            "ADV": "*fp32",
            "SHP": "*i8",
            "CU": "*i32",
            "NORM": "*fp32",
            "GRAD": "*fp32",
            "OUT": "*fp32",
            "eps_low": "fp32",
            "eps_high": "fp32",
            "delta": "fp32",
            "clip_c": "fp32",
            "beta": "fp32",
            "log_gamma": "fp32",
        }
        const = {
            "HAS_OLD": True,
            "HAS_KL": True,
            "HAS_SW": True,
            "SEQ_LEVEL": cfg.seq_level,
            "NO_RATIO": False,
            "SHAPED": True,
            "PER_ROW_MEAN": True,
            "HAS_DELTA": True,
            "HAS_CLIP_C": True,
            "CLAMP": pt.LOG_RATIO_CLAMP,
            "BLOCK": pt.BLOCK_TOKENS,
        }
        return sig, const, {k for k, v in sig.items() if v.startswith("*")}

    configs = {
        level: (SimpleNamespace(num_warps=pt.NUM_WARPS, num_stages=1, seq_level=level == "sequence"), ("fp32",))
        for level in ("token", "sequence")
    }
    return [KernelEntry("_policy_loss_row_kernel", pt._policy_loss_row_kernel, configs, signature, uses_dot=False)]


def registry() -> list[KernelEntry]:
    """Every kernel to compile, with every configuration its launcher can pick."""
    return _logprob_entries() + _policy_loss_entries()


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame + local memory bytes) of the single kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    if regs is None or stack is None or local is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    return int(regs.group(1)), int(stack.group(1)) + int(local.group(1))


def compile_one(entry: KernelEntry, config_name: str, dtype: str, arch: int) -> ReportRow:
    import triton
    from triton.backends.compiler import GPUTarget

    cfg = entry.configs[config_name][0]
    sig, const, div16 = entry.signature(dtype, cfg)
    names = entry.kernel.arg_names
    signature = dict(sig)
    signature.update({k: "constexpr" for k in const})
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in div16}
    src = triton.compiler.ASTSource(fn=entry.kernel, signature=signature, constexprs=const, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True},
    )
    regs, local = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    wgmma = "wgmma.mma_async" in ptx
    return ReportRow(
        kernel=entry.name,
        config=f"{config_name}({_describe(cfg)})",
        dtype=dtype,
        arch=f"sm_{arch}",
        registers=regs,
        spills=local // 4,
        shared_bytes=int(compiled.metadata.shared),
        uses_wgmma=wgmma,
        uses_mma=wgmma or "mma.sync" in ptx,
        uses_dot=entry.uses_dot,
    )


def _describe(cfg: Any) -> str:
    fields = getattr(cfg, "__dataclass_fields__", None)
    parts = [f"{k}={getattr(cfg, k)}" for k in fields] if fields else [repr(cfg)]
    short = {"block_n": "BN", "block_v": "BV", "block_d": "BD", "num_warps": "w", "num_stages": "s"}
    return (
        ",".join(short.get(p.split("=")[0], p.split("=")[0]) + "=" + p.split("=")[1] for p in parts)
        if fields
        else parts[0]
    )


def _interpreted() -> bool:
    from triton.runtime.jit import JITFunction

    return not all(isinstance(e.kernel, JITFunction) for e in registry())


def build_report(archs: tuple[int, ...] = ARCHS) -> list[ReportRow]:
    """Compile every (kernel, config, dtype) for each arch. Needs no GPU."""
    if _interpreted():  # TRITON_INTERPRET=1 at import: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "gcpo_fast.kernels.aot_report", "--json", "--arch", *map(str, archs)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        return [ReportRow(**r) for r in json.loads(out)]
    rows = []
    for entry in registry():
        for config_name, (_, dtypes) in entry.configs.items():
            for dtype in dtypes:
                for arch in archs:
                    rows.append(compile_one(entry, config_name, dtype, arch))
    return rows


def format_table(rows: list[ReportRow]) -> str:
    head = ["kernel", "config", "dtype", "arch", "regs", "spills", "smem_B", "wgmma", "mma"]
    body = [
        [
            r.kernel,
            r.config,
            r.dtype,
            r.arch,
            str(r.registers),
            str(r.spills),
            str(r.shared_bytes),
            "yes" if r.uses_wgmma else "no",
            "yes" if r.uses_mma else "no",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 80 90")
    args = ap.parse_args(argv)
    rows = build_report(tuple(args.arch))
    print(json.dumps([asdict(r) for r in rows]) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
