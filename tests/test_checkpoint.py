"""Checkpoints: Hugging Face folders with trainer state, written atomically, pruned, and a resumed run that
ends with exactly the weights of the uninterrupted one."""

import errno
import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_model import make_tiny_model, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from gcpo_fast.config import parse_config
from gcpo_fast.errors import TrainingError
from gcpo_fast.run.checkpoint import (
    check_checkpoint,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from gcpo_fast.train import train


@pytest.fixture
def tiny(tmp_path):
    path = make_tiny_model(tmp_path / "model")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def save(out, step, tiny, limit=None, **state):
    model, tokenizer = tiny
    return save_checkpoint(
        out, step, model, tokenizer, {"step": step, **state}, {"buffer": []}, config={"seed": 1}, save_total_limit=limit
    )


def test_round_trip(tmp_path, tiny):
    model, _ = tiny
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    path = save(tmp_path / "run", 7, tiny, optimizer=optimizer.state_dict())
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)

    state, rank_state = load_checkpoint(path)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert state["step"] == 7 and rank_state == {"buffer": []}
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert (path / "model.safetensors").is_file() and (path / "train_config.yaml").is_file()
    AutoTokenizer.from_pretrained(path)


def test_a_crash_mid_write_leaves_the_previous_checkpoint_latest(tmp_path, tiny, monkeypatch):
    out = tmp_path / "run"
    first = save(out, 1, tiny)
    monkeypatch.setattr(tiny[1], "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save(out, 2, tiny)
    assert (out / ".tmp-checkpoint-2").is_dir() and not (out / "checkpoint-2").exists()
    assert find_checkpoint(out, "latest") == first
    monkeypatch.undo()
    assert save(out, 2, tiny) == find_checkpoint(out, "latest") and not (out / ".tmp-checkpoint-2").exists()


def test_save_total_limit_and_resave(tmp_path, tiny):
    out = tmp_path / "run"
    for step in (1, 2, 3, 10):
        save(out, step, tiny, limit=2)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-10"]  # numeric order, not text
    save(out, 10, tiny, limit=2, marker=1)  # the same step again (a resumed run) replaces it
    assert torch.load(out / "checkpoint-10" / "trainer_state.pt", weights_only=True)["marker"] == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_find_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> folder"):
        find_checkpoint(tmp_path, "latest")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path))


def run_config(tmp_path, output_dir, *extra):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, n=12)
        make_tiny_model(tmp_path / "model")
    # steps_per_generation 3 > gradient_accumulation_steps 1: a generation round covers 3 optimizer steps, so
    # the checkpoint at step 2 falls in the middle of a round (its buffer and old log-probs must survive),
    # and dapo's dynamic sampling is off but its overlong shaping and token-level clipping are on.
    return parse_config(
        [
            "--model",
            str(tmp_path / "model"),
            "--dataset",
            str(data),
            "--output_dir",
            str(output_dir),
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--steps_per_generation",
            "3",
            "--max_completion_length",
            "24",
            "--max_steps",
            "4",
            "--save_steps",
            "2",
            "--learning_rate",
            "1e-2",
            "--eval_steps",
            "0",
            "--lr_scheduler_type",
            "cosine",
            "--warmup_ratio",
            "0.25",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "extra",
    [
        ["--loss_type", "gcpo", "--reward_funcs", "tiny_model:zero_reward"],
        ["--loss_type", "dapo", "--dynamic_sampling", "false", "--num_iterations", "2"],
        ["--loss_type", "gcpo", "--reward_funcs", "tiny_model:zero_reward", "--tools", "python"],  # the tool loop
    ],
)
def test_resume_gives_the_uninterrupted_weights(tmp_path, extra):
    whole = tmp_path / "whole"
    train(run_config(tmp_path, whole, *extra))  # 4 steps, checkpoints at 2 and 4
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    train(run_config(tmp_path, resumed, *extra, "--resume"))  # steps 3 and 4 from the copy of checkpoint-2

    a, b = (
        load_file(whole / "checkpoint-4" / "model.safetensors"),
        load_file(resumed / "checkpoint-4" / "model.safetensors"),
    )
    b2 = load_file(whole / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(a[k], b2[k]) for k in a)  # steps 3-4 did change the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert metrics(whole)[2:] == metrics(resumed)  # the same steps 3 and 4, logged once


def metrics(run):
    """metrics.jsonl lines without the timings"""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in m.items() if k not in ("step_time", "tokens_per_second") and not k.startswith("timing/")}
        for m in lines
    ]


def test_resumed_logs_drop_the_steps_after_the_checkpoint(tmp_path):
    from gcpo_fast.run.logger import RunLogger

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(5)))
    log = RunLogger(tmp_path, report_to=[], config={}, logging_steps=1, resume_step=2)
    log.metrics(3, {"loss": 9.0})
    assert [(m["step"], m["loss"]) for m in metrics(tmp_path)] == [(0, 0), (1, 1), (2, 2), (3, 9.0)]
    RunLogger(tmp_path, report_to=[], config={}, logging_steps=1, resume_step=None)  # a fresh run starts over
    assert not (tmp_path / "metrics.jsonl").exists()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated model.safetensors": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is"),
    "empty model.safetensors": (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors is"),
    "truncated trainer_state.pt": (lambda c: _truncate(c / "trainer_state.pt"), "trainer_state.pt is"),
    "missing rank file": (lambda c: (c / "rank_0.pt").unlink(), "rank_0.pt is missing"),
    "truncated rank file": (lambda c: _truncate(c / "rank_0.pt"), "rank_0.pt is"),
    "missing config.json": (lambda c: (c / "config.json").unlink(), "config.json is missing"),
    "damaged checkpoint.json": (lambda c: (c / "checkpoint.json").write_text("{"), "checkpoint.json is damaged"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped(tmp_path, tiny, capsys, damage):
    """--resume (latest) falls back to the newest whole checkpoint and says why; a damaged checkpoint named
    explicitly is an error. The manifest's sizes also catch what the structural checks alone would miss."""
    out = tmp_path / "run"
    good, bad = save(out, 1, tiny), save(out, 2, tiny)
    harm, reason = DAMAGE[damage]
    harm(bad)
    assert find_checkpoint(out, "latest") == good
    assert f"--resume: skipped checkpoint-2: {reason}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"--resume {bad}: the checkpoint is damaged: {reason}"):
        find_checkpoint(out, str(bad))
    # without the manifest, the structural checks still catch the cut or missing files
    (bad / "checkpoint.json").unlink(missing_ok=True)
    if damage != "damaged checkpoint.json":
        assert find_checkpoint(out, "latest") == good


def test_no_whole_checkpoint_left_is_one_error(tmp_path, tiny):
    out = tmp_path / "run"
    _truncate(save(out, 1, tiny) / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no whole checkpoint in .*checkpoint-1: model.safetensors is"):
        find_checkpoint(out, "latest")


def torch_write_fails(*args, **kwargs):
    """What torch.save raises when the disk fills mid-archive (seen on a full 64 KiB tmpfs)."""
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", ["oserror", "torch"])
def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_folder(tmp_path, tiny, monkeypatch, failure):
    # A full disk cannot be made portably (a tmpfs needs root): the write fails as it does on one, and for
    # torch.save's cryptic error the disk reports no free space.
    out = tmp_path / "run"
    first = save(out, 1, tiny)
    if failure == "oserror":
        monkeypatch.setattr(tiny[1], "save_pretrained", no_space)
    else:
        monkeypatch.setattr(torch, "save", torch_write_fails)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(TrainingError, match=r"^checkpoint-2: no space left on device in .*run") as e:
        save(out, 2, tiny)
    assert "\n" not in str(e.value) and "checkpoint-1" in str(e.value)
    monkeypatch.undo()
    assert not (out / ".tmp-checkpoint-2").exists() and not (out / "checkpoint-2").exists()
    assert find_checkpoint(out, "latest") == first and check_checkpoint(first) is None


def test_symlinked_checkpoints_are_never_followed_out_of_the_run_directory(tmp_path, tiny):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    kept = save(elsewhere, 1, tiny)
    out.mkdir()
    (out / "checkpoint-1").symlink_to(kept)  # a checkpoint linked in from another disk
    (out / ".tmp-checkpoint-7").symlink_to(kept)  # a stale partial save that is a link
    save(out, 2, tiny, limit=1)
    save(out, 3, tiny, limit=1)  # the next save, and so a later --resume, works too
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    assert check_checkpoint(kept) is None  # the links went, never what they point at
