"""Findings 2 and 3 of issue 24: files a user did not write must never run code.
- an FSDP checkpoint whose optimizer/.metadata (a pickle, read by torch.distributed.checkpoint) carries a payload:
  --resume refuses it in one line and the payload never runs;
- a model folder whose config.json maps to its own Python file (auto_map): without --trust_remote_code that file
  never runs, even with `yes` answering every prompt on stdin."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_model import child_env, make_tiny_model, write_jsonl


def run(*argv, stdin=None):
    env = child_env()
    return subprocess.run(
        [sys.executable, "-m", "gcpo_fast.train", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def small_run(model_dir, data, out, max_steps, *extra):
    return [
        "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out), "--num_generations", "2",
        "--per_device_train_batch_size", "4", "--max_completion_length", "8", "--max_steps", str(max_steps),
        "--save_steps", "1", "--eval_steps", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    return make_tiny_model(root / "model"), write_jsonl(root / "train.jsonl", n=8)


class Payload:
    """Unpickling this calls exec: what a crafted .metadata can do to a loader that trusts pickles."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_crafted_fsdp_optimizer_metadata_is_refused_and_never_runs(tmp_path, files):
    model_dir, data = files
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    first = run(*small_run(model_dir, data, out, 1, "--parallelism", "fsdp"))
    assert first.returncode == 0, first.stderr
    checkpoint = out / "checkpoint-1"
    metadata = checkpoint / "optimizer" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"]["optimizer/.metadata"] = metadata.stat().st_size  # the size check alone passes it
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))

    resumed = run(*small_run(model_dir, data, out, 2, "--parallelism", "fsdp", "--resume"))
    lines = resumed.stderr.strip().splitlines()
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert resumed.returncode == 1 and "optimizer/.metadata" in lines[-1] and "refused" in lines[-1], resumed.stderr
    assert not (out / "checkpoint-2").exists()


def remote_code_model(path: Path, marker: Path) -> Path:
    """The tiny model, its config mapped (auto_map) to a Python file of the folder that writes `marker` on import."""
    make_tiny_model(path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gcpo_custom"  # a type transformers does not know: only the folder's code can load it
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "class CustomConfig(Qwen2Config):\n    model_type = 'gcpo_custom'\n"
        "class CustomModel(Qwen2ForCausalLM):\n    config_class = CustomConfig\n"
    )
    return path


def test_a_model_folders_own_code_never_runs_without_trust_remote_code(tmp_path, files):
    _, data = files
    marker = tmp_path / "remote-code-ran"
    model_dir = remote_code_model(tmp_path / "model", marker)
    result = run(*small_run(model_dir, data, tmp_path / "run", 1), stdin="y\n" * 100)  # `yes y |`
    assert not marker.exists(), "the model folder's Python file ran"
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "--trust_remote_code" in lines[-1], result.stderr
    trusted = run(*small_run(model_dir, data, tmp_path / "trusted", 1, "--trust_remote_code"))
    assert trusted.returncode == 0 and marker.exists(), trusted.stderr  # asked for: it runs (and trains)
