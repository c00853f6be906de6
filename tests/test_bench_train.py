"""benchmarks/bench_train and bench_train_report: the report is the first step apart and medians of what each trainer
logged."""

import csv
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks import bench_train as bt
from benchmarks import bench_train_report as report

ROOT = Path(__file__).resolve().parents[1]


def ours_metrics(step_times, update=0.25, cpu=False):
    """metrics.jsonl lines as gcpo_fast.train writes them: an evaluation line at step 0, then one per step."""
    lines = [{"step": 0, "eval/mean@1": 0.5, "timing/eval": 1.0}]
    for i, t in enumerate(step_times, start=1):
        lines.append(
            {
                "step": i,
                "step_time": t,
                "timing/generate": t / 2,
                "timing/reward": 0.01,
                "timing/update": update,
                "tokens_per_second": 800 / t,
                "completions/mean_length": 64.0,
            }
        )  # no old_logp / weight_sync
        if cpu:  # what CpuPhaseTimer adds: CPU seconds of each phase
            lines[-1].update({"cpu/generate": t / 4, "cpu/reward": 0.01, "cpu/update": update / 2})
    return lines


def trl_steps(step_times):
    return [
        dict(
            generate=t / 4,
            reward=0.02,
            old_logp=0.0,
            update=t / 2,
            weight_sync=0.0,
            other=t / 4 - 0.02,
            step_time=t,
            tokens=800,
            completion_length=60.0,
            scored_positions=1024,
        )
        for t in step_times
    ]


def test_ours_steps_from_metrics():
    steps = bt.ours_steps(ours_metrics([6.0, 1.0, 2.0]))
    assert len(steps) == 3  # the step-0 evaluation line is not a step
    s = steps[1]
    assert s["generate"] == 0.5 and s["update"] == 0.25 and s["old_logp"] == 0.0 and s["weight_sync"] == 0.0
    assert s["other"] == pytest.approx(1.0 - 0.5 - 0.01 - 0.25)
    assert s["tokens"] == pytest.approx(800) and s["completion_length"] == 64.0
    assert "step_cpu" not in s and "first_step_cpu" not in report.summarize([bt.ours_steps(ours_metrics([6.0, 1.0]))])
    s = bt.ours_steps(ours_metrics([6.0, 1.0, 2.0], cpu=True))[1]
    first_cpu = report.summarize([bt.ours_steps(ours_metrics([6.0, 1.0, 2.0], cpu=True))])["first_step_cpu"]
    assert first_cpu == pytest.approx(1.5 + 0.01 + 0.125)  # cpu/generate 6/4, reward, update 0.25/2
    assert (
        s["generate_cpu"] == 0.25 and s["update_cpu"] == 0.125 and s["step_cpu"] == pytest.approx(0.25 + 0.01 + 0.125)
    )


def test_cpu_phase_timer_counts_cpu_not_waiting():
    timer = bt.CpuPhaseTimer()
    with timer("generate"):
        sum(i * i for i in range(200_000))  # busy
    with timer("update"):
        time.sleep(0.2)  # waiting: wall time, next to no CPU time
    t = timer.pop()
    assert t["cpu/generate"] > 0 and t["timing/generate"] >= t["cpu/generate"] * 0.5
    assert t["timing/update"] >= 0.2 and t["cpu/update"] < 0.1
    assert timer.pop() == {}


def test_summary_keeps_the_first_step_apart():
    steps = bt.ours_steps(ours_metrics([6.0, 1.0, 2.0, 4.0]))
    s = report.summarize([steps])
    assert s["first_step"] == 6.0 and s["step"] == 2.0  # median of 1, 2, 4: the 6 s warm-up is not in it
    assert s["generate"] == 1.0 and s["steps"] == 4
    assert s["tokens_per_s"] == pytest.approx(statistics.median([800 / 1, 800 / 2, 800 / 4]))
    assert "scored_positions" not in s
    with pytest.raises(ValueError, match="at least 2"):
        report.summarize([steps, steps[:1]])
    # two rounds: every run's first step is warm-up; the others are pooled
    s = report.summarize([steps, bt.ours_steps(ours_metrics([8.0, 3.0, 5.0]))])
    assert s["first_step"] == 7.0 and s["step"] == 3.0 and s["steps"] == 7  # median of 1, 2, 4, 3, 5


def test_report_ratios_and_files(tmp_path, capsys):
    results = [
        dict(shape="tiny", trainer="ours", steps=bt.ours_steps(ours_metrics([6.0, 1.0, 1.0, 1.0])), peak_mem=2**30),
        dict(shape="tiny", trainer="trl", steps=trl_steps([0.5, 2.0, 2.0, 2.0]), peak_mem=2**31),
        dict(shape="tiny", trainer="trl", steps=trl_steps([0.5, 2.0, 2.0]), peak_mem=2**30),
    ]  # a 2nd round
    rows = report.write_report(tmp_path, {"cpu": "test"}, results)
    by = {r["metric"]: r for r in rows}
    assert by["step"]["ours"] == 1.0 and by["step"]["trl"] == 2.0 and by["step"]["ratio"] == 0.5
    assert by["first_step"]["ratio"] == 12.0
    assert by["update"]["ratio"] == pytest.approx(0.25 / 1.0)
    assert by["peak_mem"]["ratio"] == 0.5  # TRL's larger peak of its two rounds
    assert by["steps"]["trl"] == 7
    assert by["steps"]["ratio"] is None
    assert by["scored_positions"]["ours"] is None and by["scored_positions"]["trl"] == 1024
    with open(tmp_path / "bench_train.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["metric"]: float(r["ratio"]) for r in table if r["ratio"]}["step"] == 0.5
    saved = json.loads((tmp_path / "bench_train.json").read_text())
    assert saved["report"] == rows and saved["results"][1]["steps"][0]["step_time"] == 0.5
    printed = capsys.readouterr().out
    assert "first_step" in printed and "0.50" in printed
    assert report.write_report(tmp_path, saved["machine"], saved["results"]) == rows  # --report_only rebuilds the same


def test_parity_reward_varies():
    assert bt.parity_reward(["ab", "abc", [{"role": "assistant", "content": "abcd"}]]) == [1.0, 0.0, 1.0]


def test_bad_options_are_one_line(capsys):
    bad = (
        (["--shapes", "huge"], "--shapes"),
        (["--rounds", "0"], "--rounds"),
        (["--trainers", "verl"], "--trainers"),
        (["--steps", "1"], "--steps"),
    )
    for argv, word in bad:
        with pytest.raises(SystemExit) as e:
            bt.parse_args(argv)
        assert e.value.code == 2 and word in capsys.readouterr().err


def test_vocabulary_smaller_than_the_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="--v 64: the vocabulary must hold"):
        bt.main(["--shapes", "tiny", "--trainers", "ours", "--v", "64", "--out", str(tmp_path)])


def test_end_to_end_tiny(tmp_path, monkeypatch):
    """Both trainers for real on a very small model: the same tokens per step, every phase logged."""
    monkeypatch.chdir(ROOT)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where bench_train puts its model folders and runs
    trainers = "ours,trl" if importlib.util.find_spec("trl") else "ours"
    rows = bt.main(
        [
            "--shapes",
            "tiny",
            "--trainers",
            trainers,
            "--steps",
            "2",
            "--layers",
            "1",
            "--d",
            "32",
            "--v",
            "400",
            "--max_completion_length",
            "8",
            "--num_generations",
            "4",
            "--rounds",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    by = {r["metric"]: r for r in rows}
    assert by["step"]["ours"] > 0 and by["update"]["ours"] > 0 and by["generate"]["ours"] > 0
    assert 0 < by["step_cpu"]["ours"] and 0 < by["update_cpu"]["ours"]
    if trainers == "ours,trl":
        assert by["step"]["trl"] > 0 and by["update"]["trl"] > 0 and by["generate"]["trl"] > 0
        assert 0 < by["update_cpu"]["trl"] < by["step_cpu"]["trl"]
        assert by["tokens_per_step"]["ours"] > 0 and by["tokens_per_step"]["trl"] > 0
    assert (tmp_path / "bench_train.csv").exists()
    assert list(scratch.iterdir()) == []  # the model folders and runs are removed
