"""curves.png from metrics.jsonl: drawn for any run the trainer leaves (with or without evaluations, levels or
golden rows), and `python -m gcpo_fast.run.curves` refuses a folder without metrics.jsonl in one line."""

import json
import subprocess
import sys

import pytest

from gcpo_fast.run.curves import moving_average, write_curves

matplotlib = pytest.importorskip("matplotlib")


def write_metrics(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_moving_average_is_trailing():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize("kind", ["gcpo with levels", "grpo without evaluation"])
def test_a_run_gets_its_picture(tmp_path, kind):
    gcpo = kind.startswith("gcpo")
    lines = [{"step": 0, "eval/mean@1": 0.5, "eval/level_3/mean@1": 1.0, "eval/level_5/mean@1": 0.0}] if gcpo else []
    for step in range(1, 31):
        line = {"step": step, "reward": step / 30, "completions/mean_length": 20 + step % 5}
        if gcpo:
            line["gcpo/golden_rows"] = step % 4
        if gcpo and step % 10 == 0:
            line.update({"eval/mean@1": 0.5 + step / 100, "eval/level_3/mean@1": 1.0, "eval/level_5/mean@1": step / 50})
        lines.append(line)
    write_metrics(tmp_path, lines)
    path = write_curves(tmp_path, title=kind)
    assert path == tmp_path / "curves.png"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 500 and image.shape[1] > 800  # four panels, readable


def test_the_command_line(tmp_path):
    write_metrics(tmp_path / "run", [{"step": 1, "reward": 0.5}])
    done = subprocess.run(
        [sys.executable, "-m", "gcpo_fast.run.curves", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "run" / "curves.png")
    bad = subprocess.run([sys.executable, "-m", "gcpo_fast.run.curves", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "metrics.jsonl" in bad.stderr
