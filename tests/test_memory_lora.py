"""The memory estimate with LoRA adapters (gcpo_fast.models.memory, lora=PeftOptions): the trainable parameters equal
PEFT's own count on real models, and the parts follow from them (Qwen2.5-7B's shape, config only)."""

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from gcpo_fast.models.loading import DEFAULT_MODEL
from gcpo_fast.models.lora import PeftOptions, attach
from gcpo_fast.models.memory import (
    GIB,
    adapter_shape,
    fit_warning,
    model_shape,
    plan_memory,
)

pytest.importorskip("peft")

TINY_QWEN = Qwen2Config(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    tie_word_embeddings=False,
)
TINY_LLAMA = LlamaConfig(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=3,
    vocab_size=200,
    tie_word_embeddings=True,
)
QWEN_7B = Qwen2Config(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)
OPTIONS = [
    PeftOptions(use_peft=True),
    PeftOptions(use_peft=True, lora_r=8, lora_target_modules=["q_proj", "v_proj"]),
    PeftOptions(use_peft=True, lora_target_modules=["all-linear"], use_dora=True),
    PeftOptions(use_peft=True, lora_r=4, lora_modules_to_save=["lm_head"]),
]


def lora_per_layer(config, r: int) -> int:
    """r * (in + out) summed over q, k, v, o, gate, up, down of one decoder layer."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return r * (2 * h + 2 * (h + kv) + 2 * h + 3 * (h + i))


@pytest.mark.parametrize("config", [TINY_QWEN, TINY_LLAMA, "shipped"], ids=["qwen2", "llama", "shipped"])
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "qv-r8", "all-linear-dora", "lm_head"])
def test_trainable_parameters_equal_peft_count(config, options):
    if config == "shipped":
        config = AutoConfig.from_pretrained(DEFAULT_MODEL)
    if options.lora_modules_to_save and config.tie_word_embeddings:
        pytest.skip("a tied head as a module to save is not a LoRA layout this checks")
    planned = adapter_shape(config, options, torch.float32)
    torch.manual_seed(0)
    model = attach(AutoModelForCausalLM.from_config(config), options, base_path="base")
    trainable, total = model.get_nb_trainable_parameters()
    assert planned.trainable == trainable
    assert planned.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert planned.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert planned.head_trainable == bool(options.lora_modules_to_save)
    if options.lora_target_modules is None and not options.lora_modules_to_save:
        assert trainable == config.num_hidden_layers * lora_per_layer(config, options.lora_r)


def test_qwen_7b_lora_parts():
    shape = model_shape(QWEN_7B)
    options = PeftOptions(use_peft=True, lora_r=16)
    adapters = adapter_shape(QWEN_7B, options, torch.bfloat16)
    assert adapters.trainable == 28 * lora_per_layer(QWEN_7B, 16) == 40_370_176  # PEFT's print for Qwen2.5-7B r=16
    tokens, completion = 8 * (512 + 1024), 8 * 1024
    base = dict(tokens_per_micro_batch=tokens, completion_tokens=completion, shape=shape, gradient_checkpointing=True)
    lora = plan_memory(QWEN_7B, lora=options, adapters=adapters, **base)
    full = plan_memory(QWEN_7B, **base)
    p, a = shape.params, adapters.trainable
    assert lora.weights == 2 * p + 4 * a  # frozen bf16 base, fp32 adapters
    assert (lora.gradients, lora.optimizer) == (4 * a, 8 * a)  # only the adapters train
    assert lora.autocast_copies == 2 * a  # no bf16 copy of the already-bf16 base
    h, i = 3584, 18944
    extra = 2 * 7 * 16 + 3 * (6 * h + i)  # lora_B inputs (bf16) and, with dropout, lora_A inputs + masks
    assert lora.activations - full.activations == tokens * extra  # one layer's, under checkpointing
    assert lora.total() < 80 * GIB < full.total()  # the point of LoRA on one 80 GB GPU
    no_dropout = plan_memory(QWEN_7B, lora=PeftOptions(use_peft=True, lora_dropout=0.0), **base)
    assert lora.activations - no_dropout.activations == tokens * 3 * (6 * h + i)
    # on the CPU everything is fp32 and the torch backend's dW [V, h] is gone with the frozen head
    cpu_full = plan_memory(QWEN_7B, device="cpu", **base)
    cpu_lora = plan_memory(QWEN_7B, device="cpu", lora=options, **base)
    assert cpu_lora.weights == 4 * (p + a) and cpu_lora.autocast_copies == 0
    per_token = (cpu_lora.activations - cpu_full.activations) / tokens
    assert per_token * tokens == tokens * (4 * 7 * 16 + 5 * (6 * h + i)) - 4 * 152064 * h


def test_fit_warning_with_lora():
    options = dict(tokens_per_micro_batch=8 * 1536, gradient_checkpointing=True)
    assert fit_warning(QWEN_7B, device_memory=80 * GIB, lora=PeftOptions(use_peft=True), **options) is None
    assert "more than the device has" in fit_warning(QWEN_7B, device_memory=80 * GIB, **options)


def test_the_trainer_prints_the_lora_estimate(capsys):
    from types import SimpleNamespace

    from gcpo_fast.config import parse_config
    from gcpo_fast.train import report_memory

    cpu = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    report_memory(parse_config(["--use_peft", "--lora_r", "8"]), DEFAULT_MODEL, cpu)
    lora = capsys.readouterr().err
    report_memory(parse_config([]), DEFAULT_MODEL, cpu)
    full = capsys.readouterr().err
    assert all(text.startswith("memory per device (estimate, worst case") for text in (lora, full))
    activations = [float(re.search(r"activations ([0-9.]+)", text).group(1)) for text in (lora, full)]
    assert activations[0] > activations[1]  # the adapters' plan (dropout copies), not full fine-tuning's
