"""The memory estimate's arithmetic (gcpo_fast.models.memory), on Qwen2.5-7B's shape (config only, nothing loads)."""

import pytest
from transformers import Qwen2Config

from gcpo_fast.models.memory import GIB, activation_bytes_per_token_layer, fit_warning, model_shape, plan_memory

QWEN_7B = Qwen2Config(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)
P_7B = 7_615_616_512  # Qwen2.5-7B's published parameter count
TOKENS = 64 * 384


@pytest.fixture(scope="module")
def shape():
    return model_shape(QWEN_7B)


def test_model_shape_counts_parameters_exactly(shape):
    assert shape.params == P_7B
    assert shape.layers == 28 and shape.kv == 4 * 128 and shape.vocab == 152064
    assert shape.root_params == 2 * 152064 * 3584 + 3584  # embedding, untied head, final norm
    assert shape.params == shape.root_params + 28 * shape.layer_params


def test_ddp_bf16_parts(shape):
    plan = plan_memory(QWEN_7B, tokens_per_micro_batch=TOKENS, shape=shape)
    assert (plan.weights, plan.gradients, plan.optimizer) == (4 * P_7B, 4 * P_7B, 8 * P_7B)
    assert plan.autocast_copies == 2 * P_7B  # the bf16 copy of every weight under autocast
    assert 121e9 < plan.weights + plan.gradients + plan.optimizer < 122e9  # the "~122 GB"
    per_layer = activation_bytes_per_token_layer(shape, 2)
    h, kv, i = 3584, 512, 18944
    assert per_layer == 16 * h + 2 * (7 * h + 4 * kv + 4 * i)
    assert plan.activations == pytest.approx(28 * TOKENS * per_layer + 3 * TOKENS * h * 4 + TOKENS * h * 2 + 2 * 2**28)
    assert plan.vllm == 0 and plan.reference == 0
    assert plan.total() == pytest.approx(
        sum((plan.weights, plan.gradients, plan.optimizer)) + 2 * P_7B + plan.activations
    )


def test_checkpointing_fsdp_offload_reference_and_vllm(shape):
    base = dict(tokens_per_micro_batch=TOKENS, shape=shape)
    full = plan_memory(QWEN_7B, **base)
    ckpt = plan_memory(QWEN_7B, gradient_checkpointing=True, **base)
    per_layer = activation_bytes_per_token_layer(shape, 2)
    assert full.activations - ckpt.activations == pytest.approx(
        27 * TOKENS * per_layer - 28 * TOKENS * 3584 * 4
    )  # every layer's activations but one, less the kept layer inputs
    fsdp = plan_memory(QWEN_7B, parallelism="fsdp", world_size=8, **base)
    assert fsdp.weights == 4 * P_7B / 8 and fsdp.optimizer == 8 * P_7B / 8
    assert fsdp.autocast_copies == 2 * (2 * shape.layer_params + shape.root_params)
    offload = plan_memory(QWEN_7B, parallelism="fsdp", world_size=8, cpu_offload=True, **base)
    assert offload.weights == offload.gradients == offload.optimizer == 0
    assert offload.autocast_copies == fsdp.autocast_copies
    extras = plan_memory(QWEN_7B, reference_model=True, vllm_gpu_memory_utilization=0.3, device_memory=80 * GIB, **base)
    assert extras.reference == 2 * P_7B and extras.vllm == 0.3 * 80 * GIB
    cpu = plan_memory(QWEN_7B, device="cpu", reference_model=True, **base)
    assert cpu.autocast_copies == 0 and cpu.reference == 4 * P_7B  # fp32 everywhere on the CPU
    assert "memory per device (estimate)" in extras.summary() and "of 80.0 GiB" in extras.summary()
    # N completion tokens instead of all T: the op's inputs [N, h] and its dX [N, h] (fp32 on the CPU) shrink;
    # its logit chunk and softmax stay at the workspace (4 N V > 256 MiB either way)
    scored = plan_memory(QWEN_7B, device="cpu", completion_tokens=1000, **base)
    assert cpu.activations - scored.activations == 2 * 4 * (TOKENS - 1000) * 3584
    few = plan_memory(QWEN_7B, device="cpu", completion_tokens=100, **base)
    assert scored.activations - few.activations == 2 * 4 * 900 * 3584 + 2 * (2**28 - 4 * 100 * 152064)
    with pytest.raises(ValueError, match="parallelism must be ddp or fsdp"):
        plan_memory(QWEN_7B, parallelism="zero3", **base)


def test_fit_warning_names_what_fits(shape):
    options = dict(tokens_per_micro_batch=TOKENS, shape=shape)
    assert fit_warning(QWEN_7B, device_memory=4000 * GIB, **options) is None
    warning = fit_warning(QWEN_7B, device_memory=141 * GIB, world_size=8, **options)
    assert warning.startswith("warning: memory per device (estimate)") and "\n" not in warning
    assert "--parallelism fsdp" in warning and "--gradient_checkpointing" in warning
    small = fit_warning(QWEN_7B, device_memory=200 * GIB, **options)  # ddp: weights+grads+adam+copies fit
    assert f"tokens per micro-batch (now {TOKENS})" in small
    nothing = fit_warning(QWEN_7B, device_memory=1 * GIB, **options)
    assert "no option tried fits" in nothing


def test_repeated_kv_counts_key_and_value_at_every_query_head(shape):
    base = dict(tokens_per_micro_batch=TOKENS, shape=shape)
    grouped, repeated = plan_memory(QWEN_7B, **base), plan_memory(QWEN_7B, repeated_kv=True, **base)
    h, kv, layers = 3584, 512, 28
    assert repeated.activations - grouped.activations == layers * TOKENS * 2 * (2 * h - 2 * kv)  # bf16 k and v
    ckpt = dict(base, gradient_checkpointing=True)
    one_layer = plan_memory(QWEN_7B, repeated_kv=True, **ckpt).activations - plan_memory(QWEN_7B, **ckpt).activations
    assert one_layer == TOKENS * 2 * (2 * h - 2 * kv)  # checkpointing keeps one layer's at a time


def test_worst_case_rows_and_run_options_count_golden_rows_on_top():
    from gcpo_fast.config import parse_config
    from gcpo_fast.models.memory import run_options, worst_case_rows

    argv = ["--per_device_train_batch_size", "16", "--num_generations", "8", "--max_prompt_length", "24"]
    gcpo, grpo = parse_config(argv), parse_config(argv + ["--loss_type", "grpo"])
    assert worst_case_rows(gcpo) == 18 and worst_case_rows(grpo) == 16  # gcpo appends one golden row per group
    options = run_options(gcpo, world_size=1, device="cuda", repeated_kv=True)
    assert options["tokens_per_micro_batch"] == 18 * (24 + 128) and options["completion_tokens"] == 18 * 128
    assert options["repeated_kv"] and options["bf16"] and options["device"] == "cuda"


def test_the_trainer_prints_the_worst_case_then_the_first_rounds_lengths(capsys):
    import re
    from types import SimpleNamespace

    import torch

    from gcpo_fast.config import parse_config
    from gcpo_fast.models.loading import DEFAULT_MODEL
    from gcpo_fast.packing import pack_rows
    from gcpo_fast.train import report_memory

    cpu = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    at_round_lengths = report_memory(parse_config([]), DEFAULT_MODEL, cpu)
    worst = capsys.readouterr().err
    # the shipped default: 64 rollouts and up to 8 golden rows a micro-batch, at the budgets
    assert worst.startswith("memory per device (estimate, worst case at these budgets: 72 rows x (256 + 128) tokens")
    at_round_lengths([pack_rows([[1, 2, 3]] * 5, [[4] * 10] * 5), pack_rows([[1, 2, 3]] * 6, [[4] * 20] * 6)])
    seen = capsys.readouterr().err
    assert "(estimate at the first round's lengths: 6 rows, 138 tokens, 120 scored)" in seen  # the largest one
    worst_gib, seen_gib = (float(re.search(r"\): ([\d.]+) GiB", text).group(1)) for text in (worst, seen))
    assert seen_gib < worst_gib and seen.rstrip().endswith(f"worst case {worst_gib:.2f} GiB")
    assert (
        report_memory(parse_config([]), DEFAULT_MODEL, SimpleNamespace(rank=1, world_size=2, device=cpu.device)) is None
    )
