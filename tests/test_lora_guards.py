"""What a --use_peft run and `python -m gcpo_fast.lora merge` refuse: a resumed adapter on a base whose files
changed, an adapter on the output layer the fused loss reads itself, a merge over an existing model or the base,
damaged adapters and adapters of other shapes, LoRA options that mean nothing, an adapter given as a model."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import save_file
from tiny_model import child_env, make_tiny_model, make_tokenizer, write_jsonl

from gcpo_fast.config import parse_config
from gcpo_fast.errors import ConfigError
from gcpo_fast.models.loading import load_causal_lm
from gcpo_fast.models.lora import PeftOptions, attach
from gcpo_fast.train import train

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base, its data, and a finished 2-step --use_peft run on it (checkpoint-2: the adapter)."""
    root = tmp_path_factory.mktemp("lora_guards")
    make_tiny_model(root / "model", tied=False)
    write_jsonl(root / "train.jsonl", n=12)
    train(run_config(root, root / "model", root / "run"))
    return root


def run_config(root, model, out, *extra):
    args = ["--model", str(model), "--dataset", str(root / "train.jsonl"), "--output_dir", str(out)]
    args += ["--num_generations", "2", "--per_device_train_batch_size", "4", "--max_completion_length", "8"]
    args += ["--max_steps", "2", "--save_steps", "2", "--eval_steps", "0", "--use_peft", "--lora_r", "4"]
    return parse_config(args + list(extra))


def resume_error(root, model, run) -> str:
    with pytest.raises(ValueError) as e:
        train(run_config(root, model, run, "--max_steps", "4", "--resume"))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("change", ["weights", "tokenizer"])
def test_resuming_an_adapter_on_a_changed_base_is_refused_by_name(trained, tmp_path, change):
    base, run = tmp_path / "model", tmp_path / "run"
    shutil.copytree(trained / "model", base)
    train(run_config(trained, base, run))
    if change == "weights":  # retrained weights of the same shapes under the same path
        make_tiny_model(tmp_path / "other", tied=False, seed=1)
        shutil.copy(tmp_path / "other" / "model.safetensors", base / "model.safetensors")
    else:  # one more token: the adapter's rows no longer mean the same words
        tokenizer = make_tokenizer()
        tokenizer.add_tokens(["<|tool|>"])
        tokenizer.save_pretrained(base)
    message = resume_error(trained, base, run)
    assert f"the base model --model {base}: its config, tokenizer or weight files are not those" in message


def test_resuming_an_adapter_after_the_hub_snapshot_moved_is_refused(trained, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--base"
    (repo / "refs").mkdir(parents=True)
    shutil.copytree(trained / "model", repo / "snapshots" / "aaaa")
    (repo / "refs" / "main").write_text("aaaa")
    train(run_config(trained, "someone/base", tmp_path / "run"))
    make_tiny_model(repo / "snapshots" / "bbbb", tied=False, seed=1)  # `hf download` of a newer revision
    (repo / "refs" / "main").write_text("bbbb")
    assert "the base model --model someone/base: its config" in resume_error(trained, "someone/base", tmp_path / "run")


def test_an_adapter_on_the_output_layer_is_refused_and_modules_to_save_trains_it(trained):
    base = load_causal_lm(trained / "model", device="cpu")
    options = PeftOptions(use_peft=True, lora_target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="lora_target_modules lm_head: the fused loss reads the output layer's"):
        attach(base, options, base_path=trained / "model")
    with pytest.raises(
        ConfigError, match="lora_modules_to_save nosuch: no such module; the model's modules: .*lm_head"
    ):
        attach(base, PeftOptions(use_peft=True, lora_modules_to_save=["nosuch"]), base_path=trained / "model")
    model = attach(base, PeftOptions(use_peft=True, lora_modules_to_save=["lm_head"]), base_path=trained / "model")
    assert model.get_output_embeddings().weight.requires_grad


@pytest.mark.parametrize("alpha", ["0", "-8"])
def test_a_lora_alpha_that_is_not_positive_is_refused(alpha):
    with pytest.raises(ConfigError, match=f"lora_alpha must be > 0 .the adapter's scale is alpha / r., got {alpha}"):
        parse_config(["--use_peft", "--lora_alpha", alpha])


def merge(*argv):
    return subprocess.run(
        [sys.executable, "-m", "gcpo_fast.lora", "merge", *map(str, argv)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )


def refused(done) -> str:
    """The one error line (after what loading the base printed, when it loaded: transformers' progress bar)."""
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("python -m gcpo_fast.lora: error: ")]
    assert done.returncode == 1 and errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def test_merge_never_writes_over_the_base_and_over_a_model_only_with_overwrite(trained, tmp_path):
    adapter = trained / "run" / "checkpoint-2"
    before = (trained / "model" / "model.safetensors").read_bytes()
    assert "is the adapter's base model" in refused(merge("--adapter", adapter, "--out", trained / "model"))
    assert "is the adapter's base model" in refused(
        merge("--adapter", adapter, "--out", trained / "model", "--overwrite")
    )
    assert (trained / "model" / "model.safetensors").read_bytes() == before
    assert "is the adapter folder" in refused(merge("--adapter", adapter, "--out", adapter, "--overwrite"))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_bytes(b"a shard of the model that was there")
    assert "already exists and is not empty: pass --overwrite" in refused(merge("--adapter", adapter, "--out", out))
    assert "--out /dev/null/merged: cannot write there (Not a directory)" in refused(
        merge("--adapter", adapter, "--out", "/dev/null/merged")
    )
    done = merge("--adapter", adapter, "--out", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert not (out / "model-00002-of-00002.safetensors").exists()  # no stale shard beside the merged weights
    assert load_causal_lm(out, device="cpu") is not None


def damage(adapter, kind: str, tmp_path):
    broken = tmp_path / kind
    shutil.copytree(adapter, broken)
    config_path = broken / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if kind == "truncated":
        weights = broken / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "missing":
        (broken / "adapter_model.safetensors").unlink()
    elif kind == "empty":  # a weights file without the adapter's tensors: PEFT warns and keeps fresh ones (B = 0)
        save_file({}, broken / "adapter_model.safetensors")
    elif kind == "rank":
        config["r"] = "sixteen"
    else:  # an adapter trained on a base of other shapes (hidden 32) named on a base of hidden 64
        make_wide_model(tmp_path / "wide")
        config["base_model_name_or_path"] = str(tmp_path / "wide")
    config_path.write_text(json.dumps(config))
    return broken


def make_wide_model(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "cannot load it on its base .*: Error while deserializing header"),
        ("missing", "no adapter weights .none of adapter_model.safetensors, adapter_model.bin."),
        ("empty", r"cannot load it on its base .*: its weights lack 28 of the adapter's tensors \(e.g. base_model"),
        ("rank", "cannot load it on its base .*: '<=' not supported between instances of 'str' and 'int'"),
        ("shapes", "cannot load it on its base .*wide: size mismatch for .*lora_A.*torch.Size"),
    ],
)
def test_a_damaged_adapter_or_one_of_other_shapes_is_one_line(trained, tmp_path, kind, message):
    broken = damage(trained / "run" / "checkpoint-2", kind, tmp_path)
    line = refused(merge("--adapter", broken, "--out", tmp_path / "merged"))
    assert re.search(f"adapter folder {broken}: {message}", line), line
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", ["gcpo_fast.train", "gcpo_fast.golden"])
def test_an_adapter_given_as_a_model_says_to_merge_it(trained, tmp_path, command):
    adapter = trained / "run" / "checkpoint-2"
    model = "--model" if command == "gcpo_fast.train" else "--golden_model"  # the teacher's, for the golden command
    argv = [model, str(adapter), "--dataset", str(trained / "train.jsonl")]
    argv += (
        ["--output_dir", str(tmp_path / "run")]
        if command == "gcpo_fast.train"
        else ["--golden_cache", str(tmp_path / "c")]
    )
    done = subprocess.run(
        [sys.executable, "-m", command, *argv], capture_output=True, text=True, env=child_env(), timeout=300
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert (
        f"{adapter} is a LoRA adapter (a --use_peft checkpoint), not a whole model: merge it onto its base" in lines[0]
    )
    assert f"python -m gcpo_fast.lora merge --adapter {adapter} --out DIR" in lines[0]


def test_the_base_identity_sees_a_change_confined_to_the_middle_of_a_weight_file(tmp_path):
    """An adapter merged into some layers changes tensors far from a weight file's first and last MiB, which is all
    a teacher's identity reads: the base's identity also reads the start of every tensor."""
    import struct

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gcpo_fast.models.identity import base_identity, model_identity

    tokenizer = make_tokenizer()
    config = Qwen2Config(  # about 9 MB of weights
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    mib = 1 << 20
    name, (begin, end) = next(
        (n, e["data_offsets"])
        for n, e in header.items()
        if n != "__metadata__"
        and 8 + size + e["data_offsets"][0] > mib
        and len(raw) - (8 + size + e["data_offsets"][1]) > mib
    )
    before = model_identity(tmp_path), base_identity(tmp_path)
    raw[8 + size + begin] ^= 0xFF  # the first byte of a tensor in the middle of the file
    weights.write_bytes(bytes(raw))
    assert model_identity(tmp_path) == before[0]  # (what the identity of a teacher does not see)
    assert base_identity(tmp_path) != before[1], name
