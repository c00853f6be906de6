"""benchmarks/forgetting: per-level accuracy of the shipped model and of each run's last checkpoint."""

import json
import shutil

from benchmarks.forgetting import main
from gcpo_fast.eval import main as eval_main
from gcpo_fast.models.loading import DEFAULT_MODEL


def test_an_unchanged_model_forgets_nothing(tmp_path, capsys, one_thread):
    """A "run" whose last checkpoint is the shipped model itself: after equals before at every level, and the
    figures are gcpo_fast.eval's."""
    runs = tmp_path / "runs"
    shutil.copytree(DEFAULT_MODEL, runs / "gcpo_seed0" / "checkpoint-7")
    (runs / "gcpo_seed0" / "checkpoint-3").mkdir()  # an earlier checkpoint, not the one scored
    out = tmp_path / "out"
    main(["--runs_dir", str(runs), "--methods", "gcpo", "--seeds", "0", "--builtin_levels", "1", "2"]
         + ["--eval_num_problems", "12", "--out", str(out), "--jobs", "1"])  # fmt: skip
    eval_main(["--builtin_levels", "1", "2", "--eval_num_problems", "12", "--output", str(tmp_path / "direct.json")])
    capsys.readouterr()
    direct = json.loads((tmp_path / "direct.json").read_text())
    table = (out / "forgetting.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| gcpo |"))
    shipped = next(line for line in table.splitlines() if line.startswith("| shipped (before) |"))
    for lv in (1, 2):
        acc = direct[f"eval/level_{lv}/mean@1"]
        assert f"| {acc:.3f} |" in shipped and f"{acc:.3f} (+0.000)" in row
    lines = (out / "forgetting.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 and "checkpoint-7" in lines[3]
