"""benchmarks/tune_default: the per-level table (worst level's change beside the mean), and the reading of a
two-digit subtraction rollout that the failure table counts."""

import json

import pytest

from benchmarks.tune_default import level_of, subtraction_outcome, summary_row, write_table
from gcpo_fast.data import tasks


def fake_run(folder, evals):
    """A finished run folder as the search leaves it: run/metrics.jsonl with per-level evaluations."""
    (folder / "run").mkdir(parents=True)
    lines = [{"step": step, "reward": 0.5} for step in range(1, 3)]
    for step, (l3, l4) in evals.items():
        lines.append(
            {
                "step": step,
                "eval/mean@1": (l3 + l4) / 2,
                "eval/level_3/mean@1": l3,
                "eval/level_4/mean@1": l4,
            }
        )
    (folder / "run" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_the_worst_levels_change_beside_the_mean(tmp_path):
    fake_run(tmp_path / "a0", {0: (1.0, 0.9), 2: (1.0, 0.8)})
    fake_run(tmp_path / "a1", {0: (1.0, 0.9), 2: (0.95, 0.9)})
    rows = [summary_row("a", seed, tmp_path / f"a{seed}", 10.0 + seed) for seed in (0, 1)]
    assert rows[0]["worst_level_change"] == pytest.approx(-0.1) and rows[1]["worst_level_change"] == pytest.approx(
        -0.05
    )
    table = write_table(rows, "t", tmp_path, "note")
    assert (
        "| a | 0, 1 | 2 | 0.913 [0.900, 0.925] | 0.975 [0.950, 1.000] (-0.025) | 0.850 [0.800, 0.900] (-0.050)" in table
    )
    assert "| -0.075 [-0.100, -0.050] | 10 |" in table
    assert (tmp_path / "t.csv").read_text().splitlines()[0].split(",")[-2:] == ["worst_level_change", "wall_time_s"]


def test_levels_are_read_from_the_prompts():
    for record in tasks.train_split(60, seed=3, levels=[3, 4, 5]):
        assert level_of(record["prompt"]) == record["level"]


@pytest.mark.parametrize(
    "completion, outcome",
    [
        ("71-40=31. 31-8=23. \\boxed{23}", "correct"),
        ("71-40=31. 31-8=22. \\boxed{22}", "wrong second step"),
        ("71-40=21. 21-8=13. \\boxed{13}", "wrong first step"),
        ("71-48=22. \\boxed{22}", "skipped a step"),
        ("71-40=31. 31-8=23. \\boxed{24}", "other"),
    ],
)
def test_a_subtraction_rollout_is_read_step_by_step(completion, outcome):
    assert subtraction_outcome("Q: 71-48=?\n", completion) == outcome
