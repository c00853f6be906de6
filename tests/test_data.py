"""Prompt loading (TRL / verl layouts, errors naming file, row, column) and the resumable sampler."""

import json
import sys

import pytest

from gcpo_fast.data.files import PromptSampler, load_prompts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_trl_layout_string_and_chat_prompts(tmp_path):
    f = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "What is 1/2 as a decimal?", "solution": r"Half is $\boxed{\frac{1}{2}}$.", "id": 7},
            {"prompt": [{"role": "user", "content": "2+2?"}], "solution": r"\boxed{4} not \boxed{5}... \boxed{4}"},
        ],
    )
    records = load_prompts(f)
    assert records[0] == {
        "prompt": "What is 1/2 as a decimal?",
        "golden": r"Half is $\boxed{\frac{1}{2}}$.",
        "answer": r"\frac{1}{2}",
        "solution": r"Half is $\boxed{\frac{1}{2}}$.",
        "id": 7,
    }
    assert records[1]["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert records[1]["answer"] == "4"  # the last \boxed{}


def test_gsm8k_columns_and_hash_answer(tmp_path):
    f = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Q?", "answer": "48/2 = 24\n24+48 = 72\n#### 72"}])
    [r] = load_prompts(f, prompt_column="question", golden_column="answer", require_golden=True)
    assert r["prompt"] == "Q?" and "question" not in r
    assert r["golden"] == "48/2 = 24\n24+48 = 72\n#### 72" and r["answer"] == "72"


def test_verl_layout(tmp_path):
    msgs = [{"role": "user", "content": "Natalia sold clips..."}]
    f = write_jsonl(
        tmp_path / "verl.jsonl",
        [
            {
                "data_source": "gsm8k",
                "prompt": msgs,
                "reward_model": {"ground_truth": "72", "style": "rule"},
                "extra_info": {"answer": "... #### 72", "index": 0},
            },
            {
                "prompt": msgs,
                "reward_model": {"ground_truth": 5, "style": "rule"},
                "extra_info": {"solution": r"\boxed{5}"},
            },
        ],
    )
    a, b = load_prompts(f)
    assert a["answer"] == "72" and a["golden"] is None and a["data_source"] == "gsm8k"
    assert b["answer"] == "5" and b["golden"] == r"\boxed{5}"  # extra_info[golden_column]; int ground truth -> str
    a = load_prompts(f, golden_column="extra_info.answer")[0]
    assert a["golden"] == "... #### 72"
    with pytest.raises(ValueError, match=r"verl\.jsonl, line 1: missing golden column 'solution'"):
        load_prompts(f, require_golden=True)


def test_answer_column_overrides(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "solution": r"\boxed{3}", "final": "three"}])
    assert load_prompts(f, answer_column="final")[0]["answer"] == "three"


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "reward_model": {"ground_truth": str(i), "style": "rule"},
            "extra_info": {"solution": rf"\boxed{{{i}}}"},
        }
        for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    write_jsonl(tmp_path / "more.jsonl", [{"prompt": "x", "solution": r"\boxed{9}"}])
    records = load_prompts(tmp_path)  # a directory: more.jsonl then train.parquet
    assert [r["answer"] for r in records] == ["9", "0", "1", "2"]
    assert records[2]["golden"] == r"\boxed{1}" and records[2]["prompt"][0]["content"] == "q1"
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet, row 0: missing prompt column 'prompt'"):
        load_prompts(tmp_path / "bad.parquet")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"t\.parquet: reading Parquet needs pyarrow"):
        load_prompts(tmp_path / "t.parquet")


@pytest.mark.parametrize(
    "rows_text, kwargs, pattern",
    [
        (
            '{"prompt": "a", "solution": "\\\\boxed{1}"}\n\n{"prompt": "b", "solution": oops}\n',
            {},
            r"d\.jsonl, line 3: malformed JSON \(Expecting value at column 29\)",
        ),
        ('{"question": "a", "solution": "\\\\boxed{1}"}\n', {}, r"d\.jsonl, line 1: missing prompt column 'prompt'"),
        (
            '{"prompt": "a", "solution": "\\\\boxed{1}"}\n{"prompt": "b"}\n',
            {"require_golden": True},
            r"d\.jsonl, line 2: missing golden column 'solution'",
        ),
        ('{"prompt": "a"}\n', {}, r"d\.jsonl, line 1: no ground-truth answer: column 'solution'"),
        ('{"prompt": "a", "solution": "no idea"}\n', {}, r"d\.jsonl, line 1: column 'solution': no final answer found"),
        (
            '{"prompt": [{"role": "user"}], "solution": "\\\\boxed{1}"}\n',
            {},
            r"d\.jsonl, line 1: column 'prompt', message 0: expected",
        ),
        (
            '{"prompt": 3.5, "solution": "\\\\boxed{1}", "q": {"a": 1}}\n',
            {"prompt_column": "q"},
            r"d\.jsonl, line 1: column 'q' must be a string or a list of chat messages, got dict",
        ),
        ("[1, 2]\n", {}, r"d\.jsonl, line 1: expected a JSON object, got list"),
        ("\n  \n", {}, r"d\.jsonl: empty dataset"),
    ],
)
def test_bad_rows_name_file_row_column(tmp_path, rows_text, kwargs, pattern):
    (tmp_path / "d.jsonl").write_text(rows_text, encoding="utf-8")
    with pytest.raises(ValueError, match=pattern):
        load_prompts(tmp_path / "d.jsonl", **kwargs)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.jsonl: no such file"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match=r"x\.json: unsupported file type '\.json'"):
        load_prompts(tmp_path / "x.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: directory holds no"):
        load_prompts(tmp_path / "empty")


def make_records(n):
    return [{"prompt": f"p{i}", "golden": None, "answer": str(i)} for i in range(n)]


def ids(batch):
    return [int(r["answer"]) for r in batch]


def test_sampler_epochs_are_seeded_shuffles():
    s = PromptSampler(make_records(10), batch_size=3, seed=1)
    epoch0 = [ids(next(s)) for _ in range(3)]  # 9 of 10 prompts; the partial tail is skipped
    assert s.epoch == 0 and len(set(sum(epoch0, []))) == 9
    epoch1 = ids(next(s))
    assert s.epoch == 1
    assert sum(epoch0, []) != list(range(9))  # shuffled
    again = PromptSampler(make_records(10), batch_size=3, seed=1)
    assert [ids(next(again)) for _ in range(4)] == epoch0 + [epoch1]
    other = PromptSampler(make_records(10), batch_size=3, seed=2)
    assert [ids(next(other)) for _ in range(3)] != epoch0
    plain = PromptSampler(make_records(10), batch_size=5, shuffle=False)
    assert [ids(next(plain)) for _ in range(3)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]


def test_sampler_resumes_exactly():
    s = PromptSampler(make_records(11), batch_size=4, seed=3)
    for _ in range(3):
        next(s)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    expected = [ids(next(s)) for _ in range(6)]  # crosses two epoch boundaries
    resumed = PromptSampler(make_records(11), batch_size=4, seed=999)
    resumed.load_state_dict(state)
    assert [ids(next(resumed)) for _ in range(6)] == expected
    with pytest.raises(ValueError, match="dataset had 11 prompts, this one has 12"):
        PromptSampler(make_records(12), batch_size=4).load_state_dict(state)


def test_sampler_ranks_are_disjoint():
    r0 = PromptSampler(make_records(12), batch_size=3, seed=0, rank=0, world_size=2)
    r1 = PromptSampler(make_records(12), batch_size=3, seed=0, rank=1, world_size=2)
    whole = PromptSampler(make_records(12), batch_size=6, seed=0)
    for _ in range(4):
        a, b = ids(next(r0)), ids(next(r1))
        assert a + b == ids(next(whole))
    with pytest.raises(ValueError, match="needs at least that many prompts"):
        PromptSampler(make_records(5), batch_size=3, world_size=2)


def test_unverifiable_answers_are_reported_when_the_data_loads(tmp_path):
    # an answer column of words ("foo") scored every rollout 0 for the whole run, silently
    rows = [
        {"prompt": f"q{i}", "solution": "s", "label": a}
        for i, a in enumerate(["72", "foo", r"\$5", "1/2", "foo", "bar", "baz"])
    ]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.warns(UserWarning) as caught:
        records = load_prompts(f, answer_column="label")
    [message] = [str(w.message) for w in caught]
    assert message.startswith("5 of 7 answers can never be verified by the accuracy reward")
    assert r"d.jsonl, line 2: 'foo' (math-verify reads 'foo' as a product of one-letter variables" in message
    assert r"d.jsonl, line 3: '\\$5' (math-verify cannot parse it)" in message
    assert "line 6" not in message and message.count("line ") == 3  # the first three examples
    assert len(records) == 7  # reported, not dropped: a custom reward function may not use the answer


def test_verifiable_answers_load_without_a_warning(tmp_path, recwarn):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "q", "solution": r"so \boxed{\frac{1}{2}}"}, {"prompt": "q", "solution": "#### 72"}],
    )
    load_prompts(f)
    assert not [w for w in recwarn if "verified" in str(w.message)]


def test_an_answer_column_that_disagrees_with_the_solutions_answer_is_warned_and_kept(tmp_path):
    rows = [
        {"prompt": "q0", "solution": r"so \boxed{7}", "answer": "7"},
        {"prompt": "q1", "solution": r"so \boxed{\frac{1}{2}}", "answer": "0.5"},  # the same number: no word
        {"prompt": "q2", "solution": r"so \boxed{9}", "answer": "8"},
        {"prompt": "q3", "solution": "#### 12", "answer": 13},
    ]
    with pytest.warns(UserWarning) as caught:
        records = load_prompts(write_jsonl(tmp_path / "d.jsonl", rows))
    [message] = [str(w.message) for w in caught]
    assert message.startswith(
        "2 of 4 rows have an answer column that disagrees with the answer the reward checks, from column 'solution': "
    )
    assert "d.jsonl, line 3: '8' against '9'; " in message and "d.jsonl, line 4: '13' against '12'." in message
    assert message.endswith("Pass answer_column='answer' (--answer_column answer) to check the dataset's own")
    assert [r["answer"] for r in records] == ["7", "\\frac{1}{2}", "9", "12"]  # the reward checks the solution's
    assert [r.get("dataset_answer") for r in records] == [None, "0.5", "8", 13]  # the dataset's, kept beside it


def test_an_answer_column_that_is_the_checked_or_golden_one_is_not_compared(tmp_path, recwarn):
    rows = [{"prompt": "q", "solution": r"so \boxed{9}", "answer": "8"}]
    assert load_prompts(write_jsonl(tmp_path / "a.jsonl", rows), answer_column="answer")[0]["answer"] == "8"
    gsm8k = [{"question": "q", "answer": "4 + 4 = 8\n#### 8"}]
    load_prompts(write_jsonl(tmp_path / "g.jsonl", gsm8k), prompt_column="question", golden_column="answer")
    assert not [w for w in recwarn if "disagrees" in str(w.message)]


def export(argv, capsys):
    from gcpo_fast.data.export import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("python -m gcpo_fast.data: error: ")
    return e.value.code, err


def test_export_refuses_to_overwrite_without_overwrite(tmp_path, capsys):
    from gcpo_fast.data.export import main

    main(["--export", str(tmp_path), "--train-size", "8", "--test-size", "4"])
    before = (tmp_path / "train.jsonl").read_text()
    status, err = export(["--export", str(tmp_path), "--train-size", "8", "--test-size", "4", "--seed", "1"], capsys)
    assert status == 2 and "train.jsonl and" in err and "already exist: pass --overwrite" in err
    assert (tmp_path / "train.jsonl").read_text() == before  # untouched
    main(["--export", str(tmp_path), "--train-size", "8", "--test-size", "4", "--seed", "1", "--overwrite"])
    assert (tmp_path / "train.jsonl").read_text() != before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train-size", "0"], "--train-size must be >= 1, got 0"),  # used to write an empty file and exit 0
        (["--test-size", "-3"], "--test-size must be >= 1, got -3"),
        (["--levels", "9"], "levels must be a non-empty subset of"),
        (["--train-size", "x"], "argument --train-size: invalid int value: 'x' (see --help)"),
    ],
)
def test_export_usage_errors(tmp_path, capsys, argv, message):
    status, err = export(["--export", str(tmp_path / "out"), *argv], capsys)
    assert status == 2 and message in err and not (tmp_path / "out").exists()


def test_export_into_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    status, err = export(["--export", str(tmp_path / "f")], capsys)
    assert status == 2 and f"--export {tmp_path / 'f'} is a file, not a folder" in err
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("answer", ["72", "-3", "+5", "3.25", "1/2", "\\frac{3}{4}", "\\dfrac{10}{3}", "007"])
def test_answers_the_load_skips_parsing_are_ones_math_verify_reads_as_meant(answer):
    from gcpo_fast.data.files import PLAIN_NUMBER
    from gcpo_fast.data.rewards import math_reward, unverifiable_reason

    assert PLAIN_NUMBER.fullmatch(answer) and unverifiable_reason(answer) is None
    assert math_reward([f"so \\boxed{{{answer}}}"], [answer]) == [1.0]
