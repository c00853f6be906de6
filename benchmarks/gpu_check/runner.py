"""The GPU check's driver: stages under one time budget, each in its own process group, the report after each.

A stage runs as `Popen(..., start_new_session=True)` with timeout min(its cap, budget left - KILL_GRACE_S);
past it the whole process group (torchrun's workers, bench_loss's workers) gets SIGTERM, then SIGKILL, and
the runner waits until none of it is left, so no stage keeps the GPU busy past the budget. A stage that
would start with under MIN_STAGE_S left is reported as skipped. `incomplete` names the stages that neither
passed nor were skipped by design: the check's exit status is 1 when there is one. After every stage the report
(OUT/gpu_report.md and OUT/gpu_report.json) is written again whole, and the stage's full output is
appended to OUT/gpu_check.log, so a run cut at any point returns what it measured.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check import figures
from benchmarks.gpu_check.plan import ROOT, Stage

KILL_GRACE_S = 10
MIN_STAGE_S = 15
TAIL_LINES = 30


def env_info(timeout: float) -> dict:
    """benchmarks.gpu_check.envinfo in a subprocess (the runner holds no CUDA context)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check.envinfo"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return dict(error=f"envinfo failed: {type(e).__name__}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group, SIGKILL what is left after the grace, and wait until it is gone."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S * 0.6), (signal.SIGKILL, KILL_GRACE_S * 0.4)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # raises once no process of the group is left
            except ProcessLookupError:
                proc.wait()
                return
            proc.poll()  # reap the leader, or it stays a zombie of the group
            time.sleep(0.2)
    proc.wait()


def run_stage(stage: Stage, timeout: float, log: Path) -> tuple[str, float]:
    """(status, seconds) of one stage; its stdout and stderr go to `log`."""
    # TRITON_INTERPRET (set by tests/conftest.py when a test runs the rehearsal) would make kernel_regs see
    # interpreter objects; pytest's conftest sets it again for the tests stage where there is no CUDA.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1", **stage.env)
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            stage.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
            status = "passed" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            status = f"timed out after {timeout:.0f} s (process group killed)"
    return status, time.monotonic() - start


class Report:
    """OUT/gpu_report.md and OUT/gpu_report.json, rewritten whole after every stage."""

    def __init__(self, out: Path, info: dict, budget: float, rehearsal: bool, argv: list[str], peak: float | None):
        self.out, self.info, self.budget, self.rehearsal, self.argv, self.peak = (
            out,
            info,
            budget,
            rehearsal,
            argv,
            peak,
        )
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.stages: list[dict] = []

    def add(self, result: dict) -> None:
        self.stages.append(result)
        self.write()

    def header(self) -> list[str]:
        i = self.info
        title = "GPU check" + (
            " - REHEARSAL on the CPU (toy shapes: nothing here is a GPU measurement)" if self.rehearsal else ""
        )
        device = (
            f"{i['gpu']} (compute capability {i['capability']}, {i['gpu_memory_GiB']} GiB, {i['sms']} SMs, "
            f"driver {i.get('driver')})"
            if i.get("gpu")
            else f"no CUDA device ({i.get('cpu_count')} CPU cores)"
        )
        peak = f"{self.peak:g} TFLOP/s dense bf16" if self.peak else "none known for this device"
        versions = ", ".join(f"{k} {i.get(k) or 'not installed'}" for k in figures_packages())
        return [
            f"# {title}, {self.date}",
            "",
            f"`python -m benchmarks.gpu_check {' '.join(self.argv)}` (benchmarks/gpu_check/), "
            f"budget {self.budget:.0f} s",
            "",
            f"- device: {device}",
            f"- Python {i.get('python')}, CUDA {i.get('cuda')}; {versions}",
            f"- MFU peak: {peak} (figures.py)",
            "",
            "| stage | status | wall s | figures |",
            "|---|---|---|---|",
        ]

    def write(self) -> None:
        md = self.header()
        for s in self.stages:
            brief = json.dumps({k: v for k, v in s["figures"].items() if not isinstance(v, (dict, list))})
            md.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {brief[:300]} |")
        for s in self.stages:
            md += ["", f"## {s['name']}: {s['status']}", "", s["title"], "", "```", " ".join(s["cmd"]), "```", ""]
            md += s["lines"]
            if s["tail"]:
                md += ["", f"Last lines of its output ({TAIL_LINES} at most):", "", "```", *s["tail"], "```"]
        _write(self.out / "gpu_report.md", "\n".join(md) + "\n")
        data = dict(
            date=self.date, rehearsal=self.rehearsal, budget_s=self.budget, machine=self.info, stages=self.stages
        )
        _write(self.out / "gpu_report.json", json.dumps(data, indent=1))


def figures_packages() -> tuple[str, ...]:
    from benchmarks.gpu_check.envinfo import PACKAGES

    return PACKAGES


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_all(
    plan: list[Stage], out: Path, work: Path, budget: float, report: Report, peak: float | None, start=None
) -> list[dict]:
    """Every stage of `plan` within `budget` seconds from `start` (time.monotonic(); default now); returns the
    stages' results (as the report holds them)."""
    start = time.monotonic() if start is None else start
    passed: set[str] = set()
    planned = {s.name for s in plan}
    for stage in plan:
        left = budget - (time.monotonic() - start)
        skip = stage.skip
        missing = [n for n in stage.needs if n in planned and n not in passed]
        if skip is None and missing:
            skip = f"needs stage {', '.join(missing)}, which did not pass"
        if skip is None and left - KILL_GRACE_S < MIN_STAGE_S:
            skip = f"budget spent ({left:.0f} s left of {budget:.0f})"
        result = dict(name=stage.name, title=stage.title, cmd=stage.cmd, cap_s=stage.cap_s, figures={}, lines=[])
        result["by_design"] = stage.skip is not None
        if skip:
            result.update(status=f"skipped: {skip}", seconds=0.0, tail=[])
            print(f"[{stage.name}] skipped: {skip}", flush=True)
            report.add(result)
            continue
        timeout = min(stage.cap_s, left - KILL_GRACE_S)
        print(f"[{stage.name}] (limit {timeout:.0f} s) {' '.join(stage.cmd)}", flush=True)
        log = work / f"{stage.name}.log"
        status, seconds = run_stage(stage, timeout, log)
        output = log.read_text(errors="replace")
        with open(out / "gpu_check.log", "a") as f:
            f.write(f"\n===== {stage.name}: {status} in {seconds:.1f} s\n{' '.join(stage.cmd)}\n{output}")
        try:
            figs, lines = figures.summarize(stage.name, work, output, peak)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # a cut stage's partial files
            figs, lines = {}, [f"figures unreadable: {type(e).__name__}: {e}"]
        if status == "passed":
            passed.add(stage.name)
        result.update(status=status, seconds=seconds, figures=figs, lines=lines, tail=output.splitlines()[-TAIL_LINES:])
        print(f"[{stage.name}] {status} in {seconds:.0f} s: {json.dumps(figs)[:400]}", flush=True)
        report.add(result)
        if stage.name == "loss_7b" and (work / "loss_7b" / "bench_loss.json").exists():
            shutil.copy(work / "loss_7b" / "bench_loss.json", out / "bench_loss.json")
    return report.stages


def incomplete(results: list[dict]) -> list[str]:
    """'name: status' of every stage that neither passed nor was skipped by design (it cannot run on this
    machine): failed, timed out, or skipped because the budget ran out or a stage it needs did not pass."""
    return [f"{r['name']}: {r['status']}" for r in results if r["status"] != "passed" and not r["by_design"]]
