"""What the fused op receives under bf16 autocast: bf16 hidden states and lm_head weight, never fp32.

On CUDA, --bf16 runs the fp32 model under torch.autocast("cuda", bfloat16); Qwen2/Llama keep the residual
stream in fp32 there, so without a cast the op would get fp32 inputs (no tensor cores). The same code path
runs here under torch.autocast("cpu", bfloat16); a spy stands in for the op (the Triton interpreter's bf16
tl.dot is wrong on the CPU) and records the dtypes, then computes a loss from its inputs so that the
gradient's way back to the fp32 master weight is checked too.
"""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gcpo_fast import scoring, update
from gcpo_fast.kernels import PolicyLossConfig
from gcpo_fast.packing import forward_hidden, pack_rows

SIZES = dict(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
PROMPTS, COMPLETIONS = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]


def tiny_qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES, num_key_value_heads=2, tie_word_embeddings=True))


def spy(seen):
    def op(hidden, weight, targets, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        loss = (hidden.float() @ weight.float().T).logsumexp(-1).sum()
        return (loss, {}) if args else loss

    return op


def test_residual_stream_stays_fp32_under_cpu_autocast():
    # the premise: without head_inputs' cast the op would get fp32 hidden states
    model = tiny_qwen2()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert forward_hidden(model, pack_rows(PROMPTS, COMPLETIONS)).dtype == torch.float32


def test_policy_loss_gets_bf16_and_the_fp32_weight_its_gradient(monkeypatch, one_thread):
    seen = []
    monkeypatch.setattr(update, "linear_policy_loss", spy(seen))
    model = tiny_qwen2()
    module = update.ModelWithLoss(model, PolicyLossConfig())
    packed = pack_rows(PROMPTS, COMPLETIONS, advantages=torch.ones(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = module(packed, 5.0)
    loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    weight = model.get_output_embeddings().weight
    assert weight.dtype == torch.float32 and weight.grad.dtype == torch.float32 and weight.grad.abs().sum() > 0


def test_old_and_reference_logprobs_get_bf16(monkeypatch, one_thread):
    seen = []
    monkeypatch.setattr(scoring, "linear_logprobs", spy(seen))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scoring.score_logprobs(tiny_qwen2(), pack_rows(PROMPTS, COMPLETIONS), temperature=1.0, bf16=True)
    assert seen == [(torch.bfloat16, torch.bfloat16)]


def test_no_autocast_keeps_the_model_dtype(monkeypatch, one_thread):
    seen = []
    monkeypatch.setattr(scoring, "linear_logprobs", spy(seen))
    scoring.score_logprobs(tiny_qwen2(), pack_rows(PROMPTS, COMPLETIONS), temperature=1.0, bf16=False)
    assert seen == [(torch.float32, torch.float32)]
