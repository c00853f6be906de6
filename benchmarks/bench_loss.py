"""Loss benchmark: the fused linear policy loss vs the naive loss and the installed peers.

    python -m benchmarks.bench_loss --quick                       # smoke run, tiny shapes (< 2 min on a CPU)
    python -m benchmarks.bench_loss                               # qwen0.5b (d=896, V=151936), N=4096, both cases
    python -m benchmarks.bench_loss --model llama8b --n 8192      # another lm_head shape
    python -m benchmarks.bench_loss --case offpolicy-seq --variants naive,torch,liger
    python -m benchmarks.bench_loss --aot                         # also print the Triton AOT compile report

Variants: naive (materialised [N, V] logits, then `policy_loss`), torch and triton (our
`linear_policy_loss` backends), liger (LigerFusedLinearGRPOLoss), trl (TRL's fused LM head, then the
same policy loss), cce (Cut Cross-Entropy, an advantage-weighted cross-entropy: the floor of a linear
loss, not a policy loss) and gemm-floor
(the bare GEMM triplet X W^T, dZ W, dZ^T X). Cases: onpolicy-token (dapo, old_logp=None) and
offpolicy-seq (gcpo, sequence-level ratios, one row longer than the torch backend's chunk).

Every (case, variant) runs in its own subprocess (`--worker`): warm-up, then the median fwd+bwd and
forward-only (no_grad) times, then the peak memory above the inputs (CUDA: max_memory_allocated;
CPU: VmHWM reset through /proc/self/clear_refs, with glibc's mmap threshold fixed so freed memory
leaves the RSS), then the loss / dW / dX / logp relative errors against naive's. Writes
bench_loss.csv, bench_loss.json and bench_loss.png under --out. Protocol: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import torch

from benchmarks.bench_loss_report import CSV_FIELDS, add_ratios, plot, print_case
from benchmarks.variants import BUILDERS, CASES, MODELS, VARIANTS, Skip, make_inputs, to_device, torch_path
from gcpo_fast.kernels.options import workspace_for_device

QUICK = dict(n=512, d=64, v=4096, rows=4, repeats=3, warmup=1, workspace_mib=1.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--case", default="both", help="onpolicy-token, offpolicy-seq or both (comma list ok)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {','.join(VARIANTS)}")
    ap.add_argument("--model", default="qwen0.5b", choices=sorted(MODELS), help="lm_head shape (d, V) of a real model")
    ap.add_argument("--n", type=int, default=None, help="packed tokens N (default 4096)")
    ap.add_argument("--d", type=int, default=None, help="hidden size (overrides --model)")
    ap.add_argument("--v", type=int, default=None, help="vocabulary size (overrides --model)")
    ap.add_argument("--rows", type=int, default=None, help="packed rows B, mixed lengths summing to N (default 8)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default cuda when available)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 10 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 CUDA, 1 CPU)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature T of the logits")
    ap.add_argument("--target-entropy", type=float, default=1.0, help="mean per-token entropy (nats) of the inputs")
    ap.add_argument("--old-noise", type=float, default=0.05, help="std of old_logp - true logp (offpolicy-seq)")
    ap.add_argument(
        "--workspace-mib",
        type=float,
        default=None,
        help="workspace bound of our backends (default: the ops' own, sized for the device: 256 MiB on the CPU, "
        "1/8 of free memory clamped to [256 MiB, 4 GiB] on CUDA)",
    )
    ap.add_argument("--rtol", type=float, default=None, help="agreement tolerance (default 1e-4 fp32, 5e-2 16-bit)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    ap.add_argument("--out", default="benchmarks/results", help="folder for bench_loss.{csv,json,png}")
    ap.add_argument("--quick", action="store_true", help=f"tiny shapes for a smoke run: {QUICK}")
    ap.add_argument("--aot", action="store_true", help="print gcpo_fast.kernels.aot_report's table too")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    ap.add_argument("--worker-case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    a.device = torch.device(a.device or ("cuda" if cuda else "cpu"))
    d, v = MODELS[a.model]
    a.label = a.model if a.d is None and a.v is None and not a.quick else "custom"
    quick = QUICK if a.quick else {}
    a.d, a.v = a.d or quick.get("d", d), a.v or quick.get("v", v)
    a.n, a.rows = a.n or quick.get("n", 4096), a.rows or quick.get("rows", 8)
    on_gpu = a.device.type == "cuda"
    a.repeats = a.repeats or quick.get("repeats", 10 if on_gpu else 3)
    a.warmup = a.warmup if a.warmup is not None else quick.get("warmup", 3 if on_gpu else 1)
    a.dtype = a.dtype or ("bf16" if on_gpu else "fp32")
    a.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    mib = a.workspace_mib if a.workspace_mib is not None else quick.get("workspace_mib")
    a.workspace_bytes = workspace_for_device(None if mib is None else int(mib * 2**20), a.device)
    a.rtol = a.rtol or (1e-4 if a.dtype == "fp32" else 5e-2)
    a.cases = list(CASES) if a.case == "both" else a.case.split(",")
    a.variant_list = a.variants.split(",")
    if a.n < a.rows:
        ap.error(f"--n {a.n} must be at least --rows {a.rows}")
    for names, known, what in ((a.cases, CASES, "case"), (a.variant_list, VARIANTS, "variant")):
        for name in names:
            if name not in known:
                ap.error(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    return a


# ------------------------------------------------------------------------------ measuring (worker)


def _status(key):
    m = re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read())
    return int(m.group(1)) * 1024


def _libc():
    return ctypes.CDLL("libc.so.6")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_above(fn, device):
    """(bytes allocated at the peak of fn() above what was allocated before it, fn's result, method)."""
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before, out, "cuda max_memory_allocated"
    _libc().malloc_trim(0)  # free heap chunks give their pages back: reusing them shows in the RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _status("VmRSS")
        out = fn()
        return _status("VmHWM") - before, out, "VmHWM - VmRSS (clear_refs reset)"
    except OSError:  # no clear_refs: ru_maxrss is a peak since start, an upper bound
        before = _status("VmRSS")
        out = fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, out, "ru_maxrss (upper bound)"


def timed(fn, device, repeats, before=None):
    times, out = [], None
    for _ in range(repeats):
        if before:
            before()
        out = None
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def rel_err(a, b):
    if a is None or b is None:
        return None
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    num = torch.linalg.vector_norm(a - b, dtype=torch.float64).item()
    return num / max(torch.linalg.vector_norm(b, dtype=torch.float64).item(), 1e-30)


def worker(a):
    variant, case, wdir = a.worker, a.worker_case, a.worker_dir
    res = dict(case=case, variant=variant, status="ok", notes=[])
    dev = a.device

    def finish():
        with open(os.path.join(wdir, f"{case}-{variant}.json"), "w") as f:
            json.dump(res, f)

    inp = to_device(torch.load(os.path.join(wdir, "inputs.pt")), dev)
    try:
        built = BUILDERS[variant](inp, case, workspace_bytes=a.workspace_bytes)
    except Skip as e:
        res.update(status="skipped", reason=str(e))
        return finish()

    def clear():
        for leaf in built.leaves:
            leaf.grad = None

    def call_fb():
        return built.fwd_bwd()

    def call_f():
        with torch.no_grad():
            return built.fwd()

    t0 = time.perf_counter()
    while True:  # first call (compiles, if the variant compiles) with fallbacks
        try:
            clear()
            call_fb()
            _sync(dev)
            break
        except Exception as e:  # noqa: BLE001 - a peer failing here is reported, not raised
            if built.fallback is None:
                raise
            built = built.fallback(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    res["first_call_s"] = time.perf_counter() - t0
    for _ in range(max(0, a.warmup - 1)):
        clear()
        call_fb()
    for _ in range(a.warmup):
        call_f()
    fb_times, loss = timed(call_fb, dev, a.repeats, before=clear)
    dx, dw = built.grads()
    host = lambda t: None if not isinstance(t, torch.Tensor) else t.detach().float().cpu()  # noqa: E731
    kept = dict(loss=host(loss), dx=host(dx), dw=host(dw))
    f_times, logp = timed(call_f, dev, a.repeats)
    kept["logp"] = None if variant == "gemm-floor" else host(logp)
    del loss, dx, dw, logp
    clear()
    if dev.type == "cpu":  # fixed mmap threshold: freed tensors leave the RSS at once
        _libc().mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    mem_fb, out, method = peak_above(call_fb, dev)
    grads = [leaf.grad for leaf in built.leaves if leaf.grad is not None] or [
        t for t in (out if isinstance(out, tuple) else ()) if isinstance(t, torch.Tensor)
    ]
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    del out, grads
    clear()
    mem_f, _, _ = peak_above(call_f, dev)
    n, d, v = a.n, a.d, a.v
    res.update(
        path=built.path,
        notes=built.notes,
        tokens=built.tokens,
        fwdbwd_s=fb_times,
        fwd_s=f_times,
        fwdbwd_med=statistics.median(fb_times),
        fwd_med=statistics.median(f_times),
        tflops_fwdbwd=6 * n * v * d / statistics.median(fb_times) / 1e12,
        tflops_fwd=2 * n * v * d / statistics.median(f_times) / 1e12,
        mem_fwdbwd=mem_fb,
        mem_grads=grad_bytes,
        mem_workspace=mem_fb - grad_bytes,
        mem_fwd=mem_f,
        mem_method=method,
        loss=None if kept["loss"] is None else kept["loss"].item(),
    )
    if variant == "naive":
        torch.save(kept, os.path.join(wdir, f"{case}-ref.pt"))
        if "cce" in a.variant_list:  # the reference of CCE's objective (advantage-weighted CE)
            ce = BUILDERS["naive"](inp, case, objective="ce")
            for leaf in ce.leaves:
                leaf.grad = None
            loss = ce.fwd_bwd()
            dx, dw = ce.grads()
            torch.save(
                dict(loss=loss.detach().cpu(), dx=dx.float().cpu(), dw=dw.float().cpu(), logp=kept["logp"]),
                os.path.join(wdir, f"{case}-ref-ce.pt"),
            )
    ref_file = os.path.join(wdir, f"{case}-ref{'-ce' if variant == 'cce' else ''}.pt")
    if variant != "gemm-floor" and os.path.exists(ref_file):
        ref = torch.load(ref_file)
        errs = {k: rel_err(kept[k], ref[k]) for k in ("loss", "dw", "dx", "logp")}
        res.update({f"err_{k}": e for k, e in errs.items()})
        res["ok"] = all(e is None or e <= a.rtol for e in errs.values())
    return finish()


# ------------------------------------------------------------------------------------------ driver


def machine_info(dev):
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        cpu=cpu,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        platform=platform.platform(),
    )
    for pkg in ("torch", "triton", "liger-kernel", "cut-cross-entropy", "trl"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    if dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
    return info


def run_worker(a, case, variant, wdir):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_loss",
        *a.argv,
        "--worker",
        variant,
        "--worker-case",
        case,
        "--worker-dir",
        wdir,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = os.path.join(wdir, f"{case}-{variant}.json")
    if proc.returncode != 0 or not os.path.exists(path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(case=case, variant=variant, status="error", reason=" | ".join(tail)[-400:], notes=[])
    with open(path) as f:
        return json.load(f)


def run_config(a, lengths, entropy, paths, inputs_s) -> dict:
    """The configuration block of bench_loss.json."""
    return dict(
        model=a.label,
        n=a.n,
        d=a.d,
        v=a.v,
        rows=a.rows,
        lengths=lengths,
        dtype=a.dtype,
        device=str(a.device),
        inputs_s=round(inputs_s, 2),
        repeats=a.repeats,
        warmup=a.warmup,
        temperature=a.temperature,
        workspace_bytes=a.workspace_bytes,
        rtol=a.rtol,
        seed=a.seed,
        entropy=entropy,
        torch_paths=paths,
        cases={c: CASES[c] for c in a.cases},
        flops_fwdbwd=6 * a.n * a.v * a.d,
        flops_fwd=2 * a.n * a.v * a.d,
    )


def write_json(out_dir, info, config, results, aot) -> None:
    """bench_loss.json, whole, through a temporary file (a reader never sees half of it)."""
    path = os.path.join(out_dir, "bench_loss.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(machine=info, config=config, results=results, aot=aot), f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    info = machine_info(a.device)
    print(
        f"bench_loss: {a.label} d={a.d} V={a.v} N={a.n} rows={a.rows} {a.dtype} on {a.device} "
        f"({info.get('gpu', info['cpu'])}), repeats={a.repeats} warmup={a.warmup}, "
        f"workspace={a.workspace_bytes / 2**20:g} MiB, T={a.temperature}"
    )
    print(
        f"torch {info['torch']}, triton {info['triton']}, liger-kernel {info['liger-kernel']}, "
        f"cut-cross-entropy {info['cut-cross-entropy']}, {info['date']}"
    )
    aot = None
    if a.aot:
        try:
            from gcpo_fast.kernels import aot_report

            rows = aot_report.build_report()
            print("\nTriton AOT compile report (registers, spills, shared memory per kernel and config):")
            print(aot_report.format_table(rows))
            aot = [vars(r) for r in rows]
        except Exception as e:  # noqa: BLE001
            print(f"--aot: no report ({type(e).__name__}: {e})")
    out_dir = os.path.abspath(a.out)
    os.makedirs(out_dir, exist_ok=True)
    wdir = tempfile.mkdtemp(prefix="bench_loss_")
    try:
        t0 = time.perf_counter()
        chunk = max(1, a.workspace_bytes // (4 * a.v))
        inp = make_inputs(
            a.n, a.d, a.v, a.rows, a.torch_dtype, a.device, a.temperature, a.target_entropy, a.old_noise, chunk, a.seed
        )
        ent, inputs_s = inp["entropy"], time.perf_counter() - t0
        print(
            f"inputs ({inputs_s:.1f} s, built on {a.device}): entropy per token over {ent['rows_sampled']} rows: "
            f"mean {ent['mean']:.3f} nats (p10 {ent['p10']:.3f}, p50 {ent['p50']:.3f}, p90 {ent['p90']:.3f}); "
            f"target {a.target_entropy}; row lengths {inp['lengths']}"
        )
        paths = {case: torch_path(inp, case, a.workspace_bytes) for case in a.cases}
        for case, path in paths.items():
            print(f"  {case}: our torch backend takes: {path}")
            if case == "offpolicy-seq" and not path.startswith("recompute"):
                print(
                    "  WARNING: no row is longer than the chunk, so offpolicy-seq does not exercise the recompute "
                    "path (raise --n or lower --workspace-mib)"
                )
        torch.save(to_device(inp, "cpu"), os.path.join(wdir, "inputs.pt"))
        lengths, entropy = inp["lengths"], inp["entropy"]
        del inp
        gc.collect()
        if a.device.type == "cuda":
            torch.cuda.empty_cache()  # the workers get the device's memory
        config = run_config(a, lengths, entropy, paths, inputs_s)
        results = []
        order = ["naive"] + [v for v in a.variant_list if v != "naive"] if "naive" in a.variant_list else a.variant_list
        for case in a.cases:
            for variant in order:
                t1 = time.perf_counter()
                r = run_worker(a, case, variant, wdir)
                results.append(r)
                write_json(out_dir, info, config, results, aot)  # a cut run keeps every finished variant
                state = r["status"] if r["status"] != "ok" else f"{r['fwdbwd_med']:.4f} s fwd+bwd"
                print(
                    f"  [{case} / {variant}] {state} ({time.perf_counter() - t1:.1f} s)"
                    + (f": {r.get('reason')}" if r["status"] != "ok" else "")
                )
    finally:
        shutil.rmtree(wdir, ignore_errors=True)
    add_ratios(results)
    for case in a.cases:
        print_case(case, results, a)
    flagged = [f"{r['case']}/{r['variant']}" for r in results if r.get("ok") is False]
    if flagged:
        print(f"\nDISAGREE WITH NAIVE (rtol {a.rtol:g}): {', '.join(flagged)}")
    write_json(out_dir, info, config, results, aot)
    with open(os.path.join(out_dir, "bench_loss.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    plot(
        results,
        os.path.join(out_dir, "bench_loss.png"),
        f"{a.label} d={a.d} V={a.v} N={a.n} {a.dtype} on {info.get('gpu', info['cpu'])} ({info['date']})",
    )
    print(f"\nwrote {out_dir}/bench_loss.csv, bench_loss.json, bench_loss.png")


if __name__ == "__main__":
    main()
