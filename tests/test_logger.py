"""RunLogger on resume: lines past the checkpoint dropped, a partial last line (crash mid-write) dropped with a
warning, the files valid JSONL again."""

import json

import pytest

from gcpo_fast.run.logger import RunLogger


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("tail", ['{"step": 4, "loss": 0.1', "\x00" * 40])  # cut mid-line; a tail of NULs
def test_resume_drops_a_partial_last_line(tmp_path, tail):
    whole = "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(4))
    (tmp_path / "metrics.jsonl").write_text(whole + tail, encoding="utf-8")
    (tmp_path / "samples.jsonl").write_text('{"step": 2, "completion": "a"}\n{"step": 3, "compl', encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        log = RunLogger(tmp_path, report_to=[], config={}, logging_steps=1, resume_step=3)
    assert sorted(str(w.message).split("/")[-1] for w in caught) == [
        "metrics.jsonl, line 5: dropped a partial last line (the run stopped while writing it)",
        "samples.jsonl, line 2: dropped a partial last line (the run stopped while writing it)",
    ]
    log.metrics(4, {"loss": 0.4})
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]  # every line parses
    assert lines(tmp_path / "samples.jsonl") == [{"step": 2, "completion": "a"}]
    assert "metrics:" in log.summary()


def test_a_last_line_without_its_newline_is_kept_and_ended(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}', encoding="utf-8")
    RunLogger(tmp_path, report_to=[], config={}, logging_steps=1, resume_step=2).metrics(3, {"loss": 3})
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_damage_before_the_last_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: malformed JSON"):
        RunLogger(tmp_path, report_to=[], config={}, logging_steps=1, resume_step=3)
