"""Model loading: folders that cannot train are refused in one line before any weights load (missing, hub id not
cached, empty, no config / weights / tokenizer, encoders, encoder-decoders), damaged or incomplete weights when
loading; a good folder loads exactly as transformers loads it."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_model import make_tiny_model, make_tokenizer
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

from gcpo_fast.models.loading import check_model_folder, is_checkpointing, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "good")


def copy_without(good, dest, *names):
    shutil.copytree(good, dest)
    for name in names:
        (dest / name).unlink()
    return dest


def refused(path, match):
    """The same one-line ValueError from the folder check and from both loaders."""
    for load in (check_model_folder, load_tokenizer, lambda p: load_causal_lm(p, device="cpu")):
        with pytest.raises(ValueError, match=match) as e:
            load(path)
        assert "\n" not in str(e.value)


def test_a_missing_folder_is_named(tmp_path):
    # transformers said "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    refused(tmp_path / "nope", rf"^model folder {tmp_path / 'nope'} does not exist$")


def test_a_hub_id_loads_only_from_the_local_cache(tmp_path, good, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    refused(
        "someone/tiny-model", "nor is someone/tiny-model a model in the local Hugging Face cache .nothing is downloaded"
    )
    snapshot = tmp_path / "hub" / "models--someone--tiny-model" / "snapshots" / "0123abcd"
    shutil.copytree(good, snapshot)
    (tmp_path / "hub" / "models--someone--tiny-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-model" / "refs" / "main").write_text("0123abcd")
    assert check_model_folder("someone/tiny-model") == snapshot
    assert type(load_causal_lm("someone/tiny-model", device="cpu")).__name__ == "Qwen2ForCausalLM"


@pytest.mark.parametrize(
    "remove, match",
    [
        ("all", "is empty$"),
        (("config.json",), "has no config.json"),
        (("model.safetensors",), "has no weights .none of model.safetensors, model.safetensors.index.json"),
        (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer"),
    ],
)
def test_incomplete_folders(tmp_path, good, remove, match):
    if remove == "all":
        (tmp_path / "m").mkdir()
    else:
        copy_without(good, tmp_path / "m", *remove)
    refused(tmp_path / "m", f"^model folder {tmp_path / 'm'} {match}")


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    refused(tmp_path / "model.safetensors", "is a file; expected a Hugging Face model folder")


def test_an_encoder_is_refused_with_its_class(tmp_path):
    # AutoModelForCausalLM turned a BERT folder into a BertLMHeadModel that sees future tokens and a random head
    config = BertConfig(
        vocab_size=320, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    make_tokenizer().save_pretrained(tmp_path / "bert")
    refused(tmp_path / "bert", r"is an encoder \(bert\): as BertLMHeadModel it would attend to future tokens")
    # the same architecture configured as a decoder is causal: accepted
    BertForMaskedLM(BertConfig(**{**config.to_dict(), "is_decoder": True})).save_pretrained(tmp_path / "bert_decoder")
    make_tokenizer().save_pretrained(tmp_path / "bert_decoder")
    assert type(load_causal_lm(tmp_path / "bert_decoder", device="cpu")).__name__ == "BertLMHeadModel"


def test_an_encoder_decoder_is_refused(tmp_path):
    T5ForConditionalGeneration(
        T5Config(vocab_size=320, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(tmp_path / "t5")
    make_tokenizer().save_pretrained(tmp_path / "t5")
    refused(tmp_path / "t5", r"\(t5\) is an encoder-decoder, not a causal decoder-only LM")


@pytest.mark.parametrize("size", [0, 0.5])
def test_damaged_weights_are_one_line(tmp_path, good, size):
    path = copy_without(good, tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: int(len(data) * size)])
    with pytest.raises(ValueError, match=r"cannot load the weights: Error while deserializing header") as e:
        load_causal_lm(path, device="cpu")
    assert "\n" not in str(e.value)


def test_weights_that_miss_a_parameter_are_refused(tmp_path):
    # an untied head whose weights are absent would start random, and transformers only logs it
    path = make_tiny_model(tmp_path / "m", tied=False)
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the weights lack 1 of the model's parameters \(e\.g\. lm_head\.weight\)"):
        load_causal_lm(path, device="cpu")


def test_a_tokenizer_without_vocabulary_is_refused(tmp_path, good):
    # with tokenizer_config.json but no tokenizer.json transformers builds a tokenizer of special tokens only
    path = copy_without(good, tmp_path / "m", "tokenizer.json")
    with pytest.raises(ValueError, match=r"the tokenizer has no vocabulary \(\d+ tokens, all special\)"):
        load_tokenizer(path)


def test_a_good_folder_loads_as_transformers_loads_it(good, one_thread):
    model = load_causal_lm(good, device="cpu", attn_implementation="sdpa", gradient_checkpointing=True)
    reference = AutoModelForCausalLM.from_pretrained(good, dtype=torch.float32)
    assert is_checkpointing(model) and model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    ids = load_tokenizer(good)("What is 1 + 2?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reference.eval()(ids).logits)


def test_the_missing_shipped_model_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr("gcpo_fast.models.loading.DEFAULT_MODEL", str(tmp_path / "default_model"))
    refused(
        tmp_path / "default_model",
        "the shipped model is missing from .*: build it with `python -m gcpo_fast.make_default_model`",
    )
