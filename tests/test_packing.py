"""Packing layout, packed hidden states / log-probs equal to per-row unpacked ones, lm_head weights.

Tiny randomly initialised models (hidden 32, 2 layers, vocab 101), built in the test: nothing is downloaded.
"""

import pytest
import torch
from transformers import (
    Gemma2Config,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from gcpo_fast.packing import forward_hidden, lm_head_weight, pack_rows

VOCAB = 101
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def qwen2(tied=True):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES, num_key_value_heads=2, tie_word_embeddings=tied)).eval()


def llama_untied():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES, num_key_value_heads=2, tie_word_embeddings=False)).eval()


def phi_with_bias():
    torch.manual_seed(0)
    return PhiForCausalLM(PhiConfig(**SIZES)).eval()


def random_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (1, 3), (9, 0), (4, 12), (2, 1)]  # (prompt, completion) lengths; one empty completion
    return (
        [torch.randint(0, VOCAB, (p,), generator=g).tolist() for p, _ in shapes],
        [torch.randint(0, VOCAB, (c,), generator=g).tolist() for _, c in shapes],
    )


def test_pack_rows_layout():
    p = pack_rows([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]])
    assert p.input_ids.tolist() == [[5, 6, 7, 9, 10, 8, 11, 12, 13]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert p.cu_seqlens.tolist() == [0, 5, 9] and p.cu_seqlens.dtype == torch.int32 and p.max_seqlen == 5
    assert p.completion_index.tolist() == [2, 3, 5, 6, 7]  # the position before each completion token
    assert p.targets.tolist() == [9, 10, 11, 12, 13]
    assert p.completion_cu_seqlens.tolist() == [0, 2, 5] and p.completion_cu_seqlens.dtype == torch.int32
    assert p.num_rows == 2
    prompts, completions = random_rows()
    q = pack_rows(prompts, completions)
    assert torch.equal(q.input_ids[0, q.completion_index + 1], q.targets)  # each index predicts its target
    assert q.completion_cu_seqlens.diff().tolist() == [7, 3, 0, 12, 1]
    with pytest.raises(ValueError, match="row 1 has an empty prompt"):
        pack_rows([[1], []], [[2], [3]])


def test_cu_seqlens_match_transformers_varlen_kwargs():
    # the kwargs transformers derives from our position_ids for flash_attn_varlen_func are our own
    p = pack_rows(*random_rows())
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(p.position_ids)
    assert torch.equal(cu_q, p.cu_seqlens) and torch.equal(cu_k, p.cu_seqlens)
    assert int(max_q) == int(max_k) == p.max_seqlen


def reference_per_row(model, prompts, completions):
    """Each row alone through the full model (lm_head included): hidden states and completion log-probs."""
    hidden, logps = [], []
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion])
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden.append(out.hidden_states[-1][0])
        logp = out.logits[0].log_softmax(-1)  # position t predicts token t+1
        logps += [logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(completion)]
    return torch.cat(hidden), torch.stack(logps)


@pytest.mark.parametrize("make_model", [qwen2, llama_untied, phi_with_bias])
def test_packed_hidden_and_logprobs_equal_unpacked(make_model):
    model = make_model()
    prompts, completions = random_rows(seed=1)
    packed = pack_rows(prompts, completions)
    with torch.no_grad():
        hidden = forward_hidden(model, packed)
        ref_hidden, ref_logp = reference_per_row(model, prompts, completions)
    assert hidden.shape == (packed.input_ids.shape[1], 32)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    weight, bias = lm_head_weight(model)
    logits = hidden[packed.completion_index] @ weight.T + (0 if bias is None else bias)
    logp = logits.log_softmax(-1).gather(1, packed.targets[:, None])[:, 0]
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)


def test_forward_hidden_backward_matches_per_row():
    model = qwen2()
    prompts, completions = random_rows(seed=2)
    packed = pack_rows(prompts, completions)
    weight, _ = lm_head_weight(model)
    logp = (forward_hidden(model, packed)[packed.completion_index] @ weight.T).log_softmax(-1)
    logp.gather(1, packed.targets[:, None]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference_per_row(model, prompts, completions)[1].sum().backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_stream_is_read_as_independent_rows_by_transformers():
    # one sdpa forward over the whole stream: transformers turns packed position_ids into a
    # block-diagonal mask (only with use_cache=False); it must agree with the per-row path
    model = qwen2()
    packed = pack_rows(*random_rows(seed=3))
    with torch.no_grad():
        one_pass = model.model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
        torch.testing.assert_close(one_pass.last_hidden_state[0], forward_hidden(model, packed), rtol=1e-5, atol=1e-5)


def test_lm_head_weight_tied_untied_and_unsupported():
    tied = qwen2(tied=True)
    w, b = lm_head_weight(tied)
    assert w is tied.get_input_embeddings().weight and b is None
    untied = llama_untied()
    w, b = lm_head_weight(untied)
    assert w is untied.lm_head.weight and w is not untied.get_input_embeddings().weight and b is None
    phi = phi_with_bias()
    w, b = lm_head_weight(phi)
    assert b is phi.lm_head.bias and b.shape == (VOCAB,)
    gemma2 = Gemma2Config(**SIZES, num_key_value_heads=2, head_dim=8)  # final_logit_softcapping = 30
    model = torch.nn.Module()
    model.config = gemma2
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        lm_head_weight(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention varlen path needs CUDA")
def test_flash_varlen_matches_per_row_on_cuda():
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**SIZES, num_key_value_heads=2)
    flash = AutoModelForCausalLM.from_config(
        config, attn_implementation="flash_attention_2", dtype=torch.bfloat16
    ).cuda()
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    sdpa.load_state_dict(flash.state_dict())
    packed = pack_rows(*random_rows(seed=4), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(forward_hidden(flash, packed), forward_hidden(sdpa, packed), rtol=2e-2, atol=2e-2)
