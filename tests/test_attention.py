"""Packed attention (gcpo_fast.models.attention): one decoder call over the packed stream == each row alone.

Tiny random Qwen2 and Llama models in fp64 (GQA: 4 query heads, 2 key/value heads; tied and untied head),
with and without gradient checkpointing, rows of very different lengths and a one-token prompt. The
reference runs each row alone through a copy of the model with transformers' sdpa attention. The
varlen_attn adapter runs here over CPU stand-ins with the signatures of torch 2.10, 2.11 and 2.12+ (a loop
of SDPA over cu_seqlens, honouring the window the way the real kernel does), so on a GPU only the kernel
differs; the real kernel is checked against per-row SDPA when CUDA is present, and whether it takes grouped
K/V as they are (torch 2.9-2.11, no enable_gqa).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gcpo_fast.models.attention import (
    PACKED_SDPA,
    AttentionChoiceError,
    make_packed_varlen_forward,
    register,
    resolve_attn_implementation,
    varlen_causal,
)
from gcpo_fast.models.loading import enable_checkpointing, is_checkpointing
from gcpo_fast.packing import forward_hidden, lm_head_weight, pack_rows

VOCAB = 97
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
SHAPES = [(1, 40), (23, 1), (3, 0), (1, 1), (60, 17), (7, 9)]  # (prompt, completion); a one-token prompt first


def qwen2_tied():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES, num_key_value_heads=2, tie_word_embeddings=True))


def llama_untied():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES, num_key_value_heads=2, tie_word_embeddings=False))


def rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        [torch.randint(0, VOCAB, (p,), generator=g).tolist() for p, _ in SHAPES],
        [torch.randint(0, VOCAB, (c,), generator=g).tolist() for _, c in SHAPES],
    )


def loss_of(hidden, model, packed):
    """A scalar that reaches every parameter: completion log-probs through the (tied or untied) head."""
    weight, _ = lm_head_weight(model)
    logp = (hidden[packed.completion_index] @ weight.T).log_softmax(-1)
    return logp.gather(1, packed.targets[:, None]).sum() + hidden.square().mean()


def per_row_reference(model, packed):
    """Hidden states [T, d] and parameter gradients of each row alone, transformers' sdpa, same weights."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")  # eager upcasts its softmax to fp32
    bounds = packed.cu_seqlens.tolist()
    hidden = torch.cat(
        [
            ref.get_decoder()(input_ids=packed.input_ids[:, a:b], use_cache=False).last_hidden_state[0]
            for a, b in zip(bounds, bounds[1:])
        ]
    )
    loss_of(hidden, ref, packed).backward()
    return hidden.detach(), [p.grad for p in ref.parameters()]


def count_layer_calls(model) -> list[int]:
    """A counter of forward calls per decoder layer (hooks stay on the model)."""
    calls = [0] * len(model.get_decoder().layers)
    for i, layer in enumerate(model.get_decoder().layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def check_packed_equals_per_row(model, attn_implementation, checkpointing):
    model = model.to(torch.float64).train()  # attention dropout is 0: train() only turns checkpointing on
    model.set_attn_implementation(attn_implementation)
    if checkpointing:
        enable_checkpointing(model)
    assert is_checkpointing(model) == checkpointing
    packed = pack_rows(*rows())
    want_hidden, want_grads = per_row_reference(model, packed)
    calls = count_layer_calls(model)
    hidden = forward_hidden(model, packed)
    assert calls == [1] * len(calls)  # one decoder call for the whole micro-batch
    loss_of(hidden, model, packed).backward()
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-10, atol=1e-10)
    for (name, p), want in zip(model.named_parameters(), want_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("make_model", [qwen2_tied, llama_untied])
def test_packed_sdpa_equals_per_row(make_model, checkpointing, one_thread):
    check_packed_equals_per_row(make_model(), PACKED_SDPA, checkpointing)


# ---- the varlen_attn adapter over CPU stand-ins of torch's signatures ------------------------------------------


def _standin_rows(query, key, value, cu_seq_q, causal, scale):
    """What varlen_attn computes: attention within each [cu[b], cu[b+1]) span, causal or not."""
    assert query.shape[1] == key.shape[1], "heads differ: the real kernel needs enable_gqa here"
    bounds = cu_seq_q.tolist()
    out = [
        F.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1) for x in (query, key, value)), is_causal=causal, scale=scale
        ).transpose(0, 1)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(out)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None):
    return _standin_rows(query, key, value, cu_seq_q, is_causal, scale)


def varlen_2_11(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    assert window_size in ((-1, -1), (-1, 0))
    return _standin_rows(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


def varlen_2_12(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    if enable_gqa:
        groups = query.shape[1] // key.shape[1]
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    return varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)


STANDINS = {"2.10": varlen_2_10, "2.11": varlen_2_11, "2.12": varlen_2_12}


@pytest.mark.parametrize("version", sorted(STANDINS))
def test_varlen_adapter_is_causal_within_rows_with_gqa(version):
    torch.manual_seed(1)
    cu = torch.tensor([0, 1, 9, 12], dtype=torch.int32)
    q, k, v = torch.randn(12, 4, 8, dtype=torch.float64), *torch.randn(2, 12, 2, 8, dtype=torch.float64)
    got = varlen_causal(STANDINS[version], q, k, v, cu, 8, 0.3)
    kv = [x.repeat_interleave(2, dim=1) for x in (k, v)]
    want = _standin_rows(q, *kv, cu, causal=True, scale=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(want, _standin_rows(q, *kv, cu, causal=False, scale=0.3))  # the window matters


@pytest.mark.parametrize("version", sorted(STANDINS))  # 2.11: the GPU machine's torch (window, K/V repeated)
@pytest.mark.parametrize("make_model", [qwen2_tied, llama_untied])
def test_packed_varlen_model_equals_per_row(make_model, version, one_thread):
    name = f"packed_varlen_standin_{version}"
    register(name, make_packed_varlen_forward(STANDINS[version]))
    check_packed_equals_per_row(make_model(), name, checkpointing=version != "2.10")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real varlen_attn needs CUDA (sm80+)")
def test_real_varlen_attn_equals_per_row_sdpa_forward_and_backward():
    from gcpo_fast.models.attention import torch_varlen_attn

    if torch_varlen_attn() is None or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.9 and an sm80+ GPU")
    torch.manual_seed(2)
    cu = torch.tensor([0, 1, 300, 317, 1000], dtype=torch.int32, device="cuda")
    q = torch.randn(1000, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1000, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = varlen_causal(torch_varlen_attn(), q, k, v, cu, 683, 0.125)
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    qf, kf, vf = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _standin_rows(qf, *(x.repeat_interleave(4, dim=1) for x in (kf, vf)), cu, causal=True, scale=0.125)
    want = [ref, *torch.autograd.grad(ref, (qf, kf, vf), grad.double())]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real varlen_attn needs CUDA (sm80+)")
def test_does_the_real_varlen_kernel_take_grouped_kv():
    """torch 2.9-2.11's varlen_attn has no enable_gqa and hands K/V to FlashAttention-2 as they are: whether the
    kernel takes 8 query heads over 2 K/V heads and gives, forward and backward, what repeating them gives.
    The answer decides whether the trainer repeats K/V there (takes_grouped_kv); a skip says which it is."""
    from gcpo_fast.models.attention import _parameters, takes_grouped_kv, torch_varlen_attn

    varlen = torch_varlen_attn()
    if varlen is None or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.9 and an sm80+ GPU")
    if "enable_gqa" in _parameters(varlen):
        pytest.skip(f"torch {torch.__version__}: varlen_attn takes enable_gqa; nothing to probe")
    causal = {"window_size": (-1, 0)} if "window_size" in _parameters(varlen) else {"is_causal": True}
    torch.manual_seed(3)
    cu = torch.tensor([0, 1, 300, 317, 1000], dtype=torch.int32, device="cuda")
    q = torch.randn(1000, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1000, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    try:
        grouped = varlen(q, k, v, cu, cu, 683, 683, **causal)
    except RuntimeError as e:
        assert not takes_grouped_kv(varlen, q.device)
        pytest.skip(f"torch {torch.__version__}: FlashAttention-2 refuses grouped K/V ({str(e)[:120]}): repeated")
    grad = torch.randn_like(grouped)
    got = [grouped, *torch.autograd.grad(grouped, (q, k, v), grad)]
    repeated = varlen(q, *(x.repeat_interleave(4, dim=1) for x in (k, v)), cu, cu, 683, 683, **causal)
    want = [repeated, *torch.autograd.grad(repeated, (q, k, v), grad)]
    same = all(torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2) for g, w in zip(got, want))
    assert takes_grouped_kv(varlen, q.device) == same  # the trainer's probe agrees with this check
    assert same, f"torch {torch.__version__}: FlashAttention-2 runs grouped K/V but gives another answer"


def test_which_attention_keeps_kv_repeated():
    from gcpo_fast.models.attention import FLASH, PACKED_VARLEN, repeats_kv, torch_varlen_attn

    assert repeats_kv(PACKED_SDPA, "cpu") and not repeats_kv(FLASH, "cuda")
    if torch_varlen_attn() is not None:  # no GPU to probe here: repeated unless the signature takes enable_gqa
        from gcpo_fast.models.attention import _parameters

        assert repeats_kv(PACKED_VARLEN, "cpu") == ("enable_gqa" not in _parameters(torch_varlen_attn()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="packed_varlen runs on CUDA (sm80+) only")
def test_packed_varlen_model_under_bf16_autocast_matches_packed_sdpa():
    from gcpo_fast.models.attention import PACKED_VARLEN, torch_varlen_attn

    if torch_varlen_attn() is None or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.9 and an sm80+ GPU")
    model = qwen2_tied().cuda()  # fp32 weights under bf16 autocast, as --bf16 trains: q and k reach it in fp32
    packed = pack_rows(*rows(), device="cuda")
    out = {}
    for name in (PACKED_SDPA, PACKED_VARLEN):
        model.set_attn_implementation(name)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = forward_hidden(model, packed)
        loss_of(hidden.float(), model, packed).backward()
        out[name] = [hidden.float(), *(p.grad.clone() for p in model.parameters())]
    for got, want in zip(out[PACKED_VARLEN], out[PACKED_SDPA]):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


# ---- ordinary calls and the choice ------------------------------------------------------------------------------


def test_packed_names_are_plain_sdpa_without_row_spans():
    # generation and evaluation call the model with a padding mask and no spans: sdpa's result
    model = qwen2_tied().eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(PACKED_SDPA)
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_resolve_attn_implementation():
    assert resolve_attn_implementation(None, "cpu") == PACKED_SDPA
    assert resolve_attn_implementation(None, "cuda", bf16=False) == PACKED_SDPA  # fp32 never reaches a flash kernel
    assert resolve_attn_implementation("sdpa", "cpu") == PACKED_SDPA
    with pytest.raises(AttentionChoiceError, match="needs CUDA and --bf16"):
        resolve_attn_implementation("flash_attention_2", "cpu")
    with pytest.raises(AttentionChoiceError, match="needs CUDA and --bf16"):
        resolve_attn_implementation("packed_varlen", "cuda", bf16=False)
    with pytest.raises(AttentionChoiceError, match="choose one of"):
        resolve_attn_implementation("eager", "cpu")


def test_forward_hidden_refuses_an_unpacked_attention():
    model = qwen2_tied()
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="cannot run packed rows"):
        forward_hidden(model, pack_rows(*rows()))
