"""benchmarks/compare_methods: the table and curves it reports are the means of what the runs logged."""

import csv
import json
import statistics

import pytest

from benchmarks.compare_methods import main


def fake_run(root, method, seed, evals, rewards, wall, tool_calls=None):
    """A finished run folder as gcpo_fast.train leaves it: metrics.jsonl (+ per-level eval, + tool calls per rollout
    when given) and wall_time.json."""
    out = root / f"{method}_seed{seed}"
    out.mkdir(parents=True)
    lines = []
    for step, reward in enumerate(rewards, start=1):
        lines.append(
            {
                "step": step,
                "reward": reward,
                "frac_reward_all_wrong": 1 - reward,
                "num_gen_batches": 1 + seed,
                "gcpo/golden_rows": 2 if method == "gcpo" else 0,
                "num_generated_tokens": step * (300 if method == "dapo" else 100),
                **({} if tool_calls is None else {"tools/calls_per_rollout": tool_calls[step - 1]}),
            }
        )
    for step, (acc, acc5) in evals.items():
        line = next((m for m in lines if m["step"] == step), None)
        if line is None:
            line = {"step": step}
            lines.insert(0, line)
        line.update(
            {
                "eval/mean@1": acc,
                "eval/pass@1": acc,
                "eval/num_problems": 10,
                "eval/level_3/mean@1": 1.0,
                "eval/level_3/num_problems": 6,
                "eval/level_5/mean@1": acc5,
                "eval/level_5/num_problems": 4,
            }
        )
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (out / "wall_time.json").write_text(json.dumps({"wall_time_s": wall}))


def test_report_from_finished_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    rewards = [0.1 * i for i in range(1, 31)]
    fake_run(runs, "gcpo", 0, {0: (0.5, 0.25), 30: (0.8, 0.75)}, rewards, 100.0)
    fake_run(runs, "gcpo", 1, {0: (0.5, 0.25), 30: (0.6, 0.5)}, rewards, 120.0)
    fake_run(runs, "dapo", 0, {0: (0.5, 0.25), 30: (0.4, 0.0)}, [0.5] * 30, 300.0)
    out = tmp_path / "out"
    main(["--report_only", "--methods", "gcpo,dapo", "--seeds", "0", "1", "--runs_dir", str(runs), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "left out: dapo seed 1" in printed
    rows = list(csv.DictReader(open(out / "compare_methods.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("gcpo", "0"), ("gcpo", "1"), ("dapo", "0")]
    assert float(rows[0]["eval_after"]) == 0.8 and float(rows[0]["level_5_after"]) == 0.75
    assert float(rows[0]["reward_first_20"]) == pytest.approx(statistics.mean(rewards[:20]))
    assert float(rows[0]["reward_last_20"]) == pytest.approx(statistics.mean(rewards[-20:]))
    assert float(rows[2]["frac_all_wrong_last_20"]) == pytest.approx(0.5)
    assert int(rows[0]["golden_rows"]) == 60 and int(rows[2]["golden_rows"]) == 0
    table = (out / "compare_methods.md").read_text()
    gcpo = next(line for line in table.splitlines() if line.startswith("| gcpo |"))
    cells = [c.strip() for c in gcpo.strip("|").split("|")]
    assert cells[1] == "0, 1"  # seeds
    assert cells[3] == f"{0.7:.3f} ± {statistics.stdev([0.8, 0.6]):.3f}"  # held-out after: mean ± std
    assert cells[4] == f"{0.2:.3f} ± {statistics.stdev([0.3, 0.1]):.3f}"  # change
    # dapo generates 3x the tokens a step: at gcpo's 3000 it is a third of the way from 0.5 to 0.4
    assert "| dapo | 0 | 0.500 | 0.400 | -0.100 | 0.467 |" in table
    assert cells[5] == f"{0.7:.3f} ± {statistics.stdev([0.8, 0.6]):.3f}"  # gcpo at 3000 tokens: its last eval
    assert "held-out at 0.00M generated tokens" in table and float(rows[2]["generated_tokens"]) == 9000
    assert "on 10 distinct held-out problems (per level 3: 6, 5: 4)" in table
    curves = list(csv.DictReader(open(out / "compare_methods_curves.csv")))
    assert len(curves) == 3 * 31 and curves[0]["step"] == "0" and curves[0]["eval_mean@1"] == "0.5"
    assert (out / "compare_methods.png").stat().st_size > 0


def test_unknown_method_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["--report_only", "--methods", "gcpo,ppo", "--runs_dir", str(tmp_path)])


def test_tool_runs_report_their_calls_per_rollout_and_the_seeds_min_max(tmp_path):
    runs = tmp_path / "runs"
    calls = [0.0] * 20 + [0.5] * 10 + [1.0] * 20
    fake_run(runs, "gcpo_tools", 0, {0: (0.0, 0.0), 50: (0.6, 0.6)}, [0.1] * 50, 100.0, tool_calls=calls)
    fake_run(runs, "gcpo_tools", 1, {0: (0.0, 0.0), 50: (0.2, 0.2)}, [0.1] * 50, 100.0, tool_calls=calls[::-1])
    fake_run(runs, "gcpo", 0, {0: (0.0, 0.0), 50: (0.1, 0.1)}, [0.1] * 50, 100.0)
    out = tmp_path / "out"
    main(
        [
            "--report_only",
            "--methods",
            "gcpo_tools,gcpo",
            "--seeds",
            "0",
            "1",
            "--runs_dir",
            str(runs),
            "--out",
            str(out),
        ]
    )
    rows = list(csv.DictReader(open(out / "compare_methods.csv")))
    assert [float(rows[0]["tool_calls_first_20"]), float(rows[0]["tool_calls_last_20"])] == [0.0, 1.0]
    assert [float(rows[1]["tool_calls_first_20"]), float(rows[1]["tool_calls_last_20"])] == [1.0, 0.0]
    assert rows[2]["tool_calls_first_20"] == ""  # no tools
    lines = (out / "compare_methods.md").read_text().splitlines()
    tools, plain = (next(line for line in lines if line.startswith(f"| {m} |")) for m in ("gcpo_tools", "gcpo"))
    assert tools.endswith(f"| [0.200, 0.600] | 0.500 ± {statistics.stdev([0.0, 1.0]):.3f} | 0.500 ± 0.707 |")
    assert plain.endswith("| [0.100, 0.100] | - | - |")
    curves = list(csv.DictReader(open(out / "compare_methods_curves.csv")))
    assert [c["tool_calls_per_rollout"] for c in curves if c["method"] == "gcpo_tools"][1:4] == ["0.0"] * 3
    assert (out / "compare_methods.png").stat().st_size > 0
