"""The report's numbers, read from what each stage wrote: one summarizer per stage, (figures dict, markdown lines).

Model FLOPs utilisation of an update: 6 * params * tokens / update time / peak dense bf16 FLOP/s, the
usual convention (Kaplan et al.; PaLM's MFU): params counts every parameter once (the tied embedding is
the lm_head's matmul), tokens are every prompt and completion token the step trains on; attention's
own FLOPs and gradient checkpointing's recomputation are not counted (with checkpointing the GPU does
~8 instead of 6 per parameter and token, so its MFU reads lower by design). Peak: PEAK_BF16_TFLOPS by
the GPU's name (datasheet dense bf16; the H200's is the H100 SXM's, 989 TFLOP/s; a large bf16 matmul reaches
about 80% of it in practice), --peak_tflops overrides.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
# The fused op's goal against the bare GEMM triplet (6NVd): its Triton path recomputes the logits in the backward
# (8NVd), so 8/6 = 1.33x is its floor by construction; 1.45x leaves ~9% for the softmax and the loss.
GOAL_X_FLOOR = 1.45
GiB = 2**30


def peak_tflops(gpu_name: str | None) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if gpu_name and key in gpu_name:
            return value
    return None


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(name: str, work: Path, output: str, peak: float | None) -> tuple[dict, list[str]]:
    """(figures, markdown lines) of stage `name` from its files under `work` and its output."""
    if name == "tests":
        return tests(output)
    if name == "kernel_regs":
        return kernel_regs(_load(work / "kernel_regs.json"))
    if name == "make_model":
        m = re.search(r"([\d.]+) B parameters", output)
        return ({"params_B": float(m.group(1))} if m else {}), []
    if name == "loss_7b":
        return loss(_load(work / "loss_7b" / "bench_loss.json"), output)
    if name == "environment":
        return environment(_load(work / "environment.json"))
    return train(_load(work / f"{name}.json"), peak, output)


def environment(res: dict | None) -> tuple[dict, list[str]]:
    """The compiler, Python.h and the tiny kernel, one line each."""
    if res is None:
        return {}, ["no environment.json"]
    parts = {k: v for k, v in res.items() if isinstance(v, dict)}
    fig = {f"{k}_ok": v["ok"] for k, v in parts.items()}
    fig["compiler"] = parts["compiler"].get("version")
    return fig, [f"{k}: {v}" for k, v in parts.items()]


# the trainer's two estimate lines (gcpo_fast.train.report_memory): the worst case, then the first round's lengths
ESTIMATES = (("estimate_worst_GiB", r"\(estimate, worst case .*?\): ([\d.]+) GiB"),
             ("estimate_round_GiB", r"\(estimate at the first round's lengths.*?\): ([\d.]+) GiB"))  # fmt: skip


def estimates(output: str) -> dict:
    """The planner's figures the trainer printed (rank 0), in GiB."""
    found = {}
    for key, pattern in ESTIMATES:
        m = re.search(pattern, output)
        if m:
            found[key] = float(m.group(1))
    return found


def tests(output: str) -> tuple[dict, list[str]]:
    """pytest's closing counts; its -rs lines (every skip and its reason) stay in the output tail."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", output)}
    lines = [ln for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR", "SKIPPED"))]
    return counts, lines[:40]


def kernel_regs(res: dict | None) -> tuple[dict, list[str]]:
    if res is None:
        return {}, ["no kernel_regs.json"]
    rows = res.get("kernels", [])
    figures = dict(kernels=len(rows), max_registers=max((r["registers"] for r in rows), default=None))
    figures["spilling"] = [r["kernel"] for r in rows if r["spills"] > 0]
    if "skipped" in res:
        figures.update(skipped=res["skipped"], jit_functions=len(res.get("jit_functions", [])))
        return figures, [f"skipped: {res['skipped']}; @triton.jit functions found: {res.get('jit_functions')}"]
    md = ["| kernel | regs | spills | smem B | warps | stages |", "|---|---|---|---|---|---|"]
    md += [
        f"| {r['kernel']} | {r['registers']} | {r['spills']} | {r['shared_bytes']} | {r['num_warps']} "
        f"| {r['num_stages']} |"
        for r in rows
    ]
    return figures, md


def train(res: dict | None, peak: float | None, output: str = "") -> tuple[dict, list[str]]:
    """Medians over the steps after the first (warm-up: kernel compiles, allocator growth); the measured peak
    memory beside the planner's estimates (worst case over measured: the planner aims within 1.25 at full length)."""
    if res is None:
        return {}, ["no result file (the trainer did not return)"]
    steps = res.get("steps") or []
    timed = steps[1:] or steps
    fig: dict = dict(exit=res.get("exit"), steps=len(steps), peak_mem_GiB=round(res["peak_mem_bytes"] / GiB, 2))
    fig.update(estimates(output))
    if "estimate_worst_GiB" in fig and fig["peak_mem_GiB"]:
        fig["worst_over_measured"] = round(fig["estimate_worst_GiB"] / fig["peak_mem_GiB"], 2)
    fig["mem_method"] = res.get("mem_method")
    fig["attention"] = res.get("attention")
    fig["fused_op"] = res.get("fused_op")
    if res.get("error"):
        fig["error"] = res["error"]
    if not timed:
        return fig, [f"no step finished: {res.get('error')}"]
    med = lambda key: statistics.median(s.get(key, 0.0) for s in timed)  # noqa: E731
    update, tokens = med("timing/update"), med("tokens")
    fig.update(
        params_B=res["params"] and round(res["params"] / 1e9, 4),
        step_s=round(med("step_time"), 3),
        update_s=round(update, 3),
        first_step_s=round(steps[0]["step_time"], 3),
        tokens_per_step=round(tokens),
        update_tokens_per_s=round(tokens / update) if update else None,
        phases_s={k[7:]: round(med(k), 3) for k in sorted({k for s in timed for k in s if k.startswith("timing/")})},
        losses=[s.get("loss") for s in steps],
    )
    if update and peak and res["params"]:
        fig["mfu"] = round(6 * res["params"] * tokens / update / (peak * 1e12), 4)
    line = (
        f"update {fig['update_s']} s for {fig['tokens_per_step']} tokens ({fig['update_tokens_per_s']} tokens/s), "
        f"MFU {fig.get('mfu', 'n/a (no peak FLOP/s for this device)')}; fused op received {_dtypes(fig['fused_op'])}"
    )
    memory = (
        f"memory: measured peak {fig['peak_mem_GiB']} GiB ({fig['mem_method']}); planner: worst case "
        f"{fig.get('estimate_worst_GiB', '-')} GiB, at the first round's lengths {fig.get('estimate_round_GiB', '-')} "
        f"GiB; worst case / measured {fig.get('worst_over_measured', '-')}; attention {fig['attention']}"
    )
    return fig, [line, memory, f"phases (median s): {fig['phases_s']}", f"losses per step: {fig['losses']}"]


def _dtypes(op: dict | None) -> str:
    if not op:
        return "nothing (never called)"
    return (
        f"hidden {op['hidden_dtype']} {op['hidden_shape']}, weight {op['weight_dtype']} {op['weight_shape']} "
        f"({op['calls']} calls, autocast {op['autocast']}, backend {op.get('backend')})"
    )


def loss(res: dict | None, output: str) -> tuple[dict, list[str]]:
    """Per variant: fwd+bwd median, peak memory above the inputs, and the ratios the goals name."""
    if res is None:  # cut before bench_loss wrote its JSON: its per-variant progress lines are all there is
        done = re.findall(r"\[(\S+) / (\S+)\] ([\d.]+) s fwd\+bwd", output)
        return {f"{v}_fwdbwd_s": float(t) for _, v, t in done}, ["bench_loss did not finish: progress lines only"]
    rows = {r["variant"]: r for r in res["results"] if r["status"] == "ok"}
    fig: dict = {}
    md = [
        "| variant | fwd+bwd ms | fwd ms | peak above inputs MiB | x floor | agrees with naive |",
        "|---|---|---|---|---|---|",
    ]
    floor = rows.get("gemm-floor", {}).get("fwdbwd_med")
    for v, r in rows.items():
        ratio = r["fwdbwd_med"] / floor if floor else None
        fig[v] = dict(fwdbwd_ms=round(r["fwdbwd_med"] * 1e3, 2), mem_MiB=round(r["mem_fwdbwd"] / 2**20), x_floor=ratio)
        md.append(
            f"| {v} | {r['fwdbwd_med'] * 1e3:.2f} | {r['fwd_med'] * 1e3:.2f} | {r['mem_fwdbwd'] / 2**20:.0f} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} | {r.get('ok', '-')} |"
        )
    for r in res["results"]:
        if r["status"] != "ok":
            md.append(f"| {r['variant']} | {r['status']}: {str(r.get('reason'))[:150]} | | | | |")
    ours = rows.get("triton")
    if ours:
        for peer in ("gemm-floor", "liger", "trl", "cce", "naive"):
            if peer in rows:
                fig[f"triton_over_{peer}"] = round(ours["fwdbwd_med"] / rows[peer]["fwdbwd_med"], 3)
    config = res.get("config", {})
    fig["inputs"] = dict(seconds=config.get("inputs_s"), device=config.get("device"))
    md.append(f"inputs built on {config.get('device')} in {config.get('inputs_s')} s")
    md.append(f"goal: triton <= {GOAL_X_FLOOR} x gemm-floor, faster than liger and trl; ratios: "
              f"{ {k: v for k, v in fig.items() if k.startswith('triton_over')} }")  # fmt: skip
    return fig, md
