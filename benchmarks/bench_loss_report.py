"""The loss benchmark's report: the per-case tables, the ratios between variants, the CSV columns and the plot.

    from benchmarks.bench_loss_report import CSV_FIELDS, add_ratios, plot, print_case
    add_ratios(results)                      # speedups and memory ratios against naive and between every pair
    print_case("offpolicy-seq", results, a)  # one case's table (a: bench_loss's parsed arguments, for --rtol)
    plot(results, "bench_loss.png", title)   # fwd+bwd time and peak memory per variant per case (matplotlib)

`results` are bench_loss's worker outputs (one dict per (case, variant)); `python -m benchmarks.bench_loss`
calls these after its workers finish.
"""

from __future__ import annotations

from benchmarks.variants import CASES, VARIANTS


def fmt(x, spec):
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return f"{'-':>{width or 1}}" if x is None else format(x, spec)


def mib(x):
    return None if x is None else x / 2**20


def add_ratios(results):
    for case in {r["case"] for r in results}:
        rows = {r["variant"]: r for r in results if r["case"] == case and r["status"] == "ok"}
        naive = rows.get("naive")
        for r in rows.values():
            if naive:
                r["speedup_vs_naive"] = naive["fwdbwd_med"] / r["fwdbwd_med"]
                r["fwd_speedup_vs_naive"] = naive["fwd_med"] / r["fwd_med"]
                r["mem_ratio_vs_naive"] = r["mem_fwdbwd"] / max(naive["mem_fwdbwd"], 1)
            r["speedup_vs"] = {p: q["fwdbwd_med"] / r["fwdbwd_med"] for p, q in rows.items()}


def print_case(case, results, a):
    rows = [r for r in results if r["case"] == case]
    old = "given" if CASES[case]["off_policy"] else "None"
    print(f"\n== {case}: method={CASES[case]['method']}, old_logp={old}")
    head = (
        f"{'variant':<11}{'fwd+bwd s':>10}{'xnaive':>8}{'fwd s':>9}{'xnaive':>8}{'TFLOP/s':>8}"
        f"{'extra MiB':>10}{'grads':>8}{'wkspace':>9}{'fwd MiB':>9}{'err loss':>10}{'err dW':>9}"
        f"{'err dX':>9}{'err logp':>9}  check"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['variant']:<11}{r['status'].upper()}: {r.get('reason')}")
            continue
        check = (
            "reference"
            if r["variant"] == "naive"
            else "-"
            if "ok" not in r
            else "ok"
            if r["ok"]
            else f"MISMATCH (rtol {a.rtol:g})"
        )
        print(
            f"{r['variant']:<11}{r['fwdbwd_med']:>10.4f}{fmt(r.get('speedup_vs_naive'), '>7.2f')}x"
            f"{r['fwd_med']:>9.4f}{fmt(r.get('fwd_speedup_vs_naive'), '>7.2f')}x{r['tflops_fwdbwd']:>8.3f}"
            f"{mib(r['mem_fwdbwd']):>10.1f}{mib(r['mem_grads']):>8.1f}{mib(r['mem_workspace']):>9.1f}"
            f"{mib(r['mem_fwd']):>9.1f}{fmt(r.get('err_loss'), '>10.1e')}{fmt(r.get('err_dw'), '>9.1e')}"
            f"{fmt(r.get('err_dx'), '>9.1e')}{fmt(r.get('err_logp'), '>9.1e')}  {check}"
        )
    ok = [r for r in rows if r["status"] == "ok"]
    print("speedup of row over column (fwd+bwd time column / row):")
    print(" " * 11 + "".join(f"{r['variant']:>11}" for r in ok))
    for r in ok:
        print(f"{r['variant']:<11}" + "".join(f"{r['speedup_vs'][q['variant']]:>10.2f}x" for q in ok))
    for r in rows:
        if r["status"] == "ok":
            print(
                f"  {r['variant']}: path: {r['path']}; first call (incl. any compile) {r['first_call_s']:.2f} s; "
                f"tokens {r['tokens']}"
            )
        for note in r.get("notes", []):
            print(f"    {note}")


CSV_FIELDS = [
    "case",
    "variant",
    "status",
    "reason",
    "path",
    "tokens",
    "fwdbwd_med",
    "fwd_med",
    "speedup_vs_naive",
    "fwd_speedup_vs_naive",
    "tflops_fwdbwd",
    "tflops_fwd",
    "mem_fwdbwd",
    "mem_grads",
    "mem_workspace",
    "mem_fwd",
    "mem_ratio_vs_naive",
    "mem_method",
    "loss",
    "err_loss",
    "err_dw",
    "err_dx",
    "err_logp",
    "ok",
    "first_call_s",
]


def plot(results, path, title):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no bench_loss.png")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in results}, key=list(CASES).index)
    names = [v for v in VARIANTS if any(r["variant"] == v and r["status"] == "ok" for r in results)]
    get = {(r["case"], r["variant"]): r for r in results if r["status"] == "ok"}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(cases))]
        rs = [get.get((case, name)) for case in cases]
        ax_t.bar(
            xs,
            [r["fwdbwd_med"] if r else 0 for r in rs],
            width,
            label=name,
            hatch="//" if name == "gemm-floor" else None,
        )
        if name != "gemm-floor":
            grads = [mib(r["mem_grads"]) if r else 0 for r in rs]
            ax_m.bar(xs, grads, width, color=f"C{i}", alpha=0.5)
            ax_m.bar(
                xs, [mib(r["mem_workspace"]) if r else 0 for r in rs], width, bottom=grads, color=f"C{i}", label=name
            )
    for ax, ylabel in ((ax_t, "fwd+bwd time, median (s)"), (ax_m, "peak memory above inputs (MiB)")):
        ax.set_xticks(range(len(cases)), cases)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    ax_m.set_title("pale: gradient outputs (dX, dW); solid: workspace beyond them", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
