"""Tool output tokens are context, never trained (gcpo_fast/packing.py masks them, the fused op leaves them out):
the update's loss, gradient, entropy and KL equal the fp64 reference with the mask built by hand, and changing a
tool output changes the gradient only through attention."""

import torch
from policy_reference import METHODS, reference_policy_loss
from tiny_model import make_tiny_model

from gcpo_fast.engines.base import Rows
from gcpo_fast.kernels import IGNORE_INDEX, LossInputs, PolicyLossConfig, linear_policy_loss
from gcpo_fast.models.loading import load_causal_lm
from gcpo_fast.packing import forward_hidden, head_inputs, pack
from gcpo_fast.update import ModelWithLoss, step_normalizer

# three rows: (prompt ids, completion ids, the completion positions that are tool output)
ROWS = [
    ([5, 9, 14], [20, 21, 22, 23, 24, 25, 26, 27], range(2, 5)),
    ([7, 8], [30, 31, 32, 33, 34], range(1, 2)),  # one tool token
    ([11, 12, 13, 6], [40, 41, 42, 43, 44, 45, 46], [1, 2, 5]),  # two tool outputs
]


def rows_with_tools(rows=ROWS):
    prompts, completions, spans = zip(*rows)
    tool_mask = [[0 if j in span else 1 for j in range(len(c))] for c, span in zip(completions, spans)]
    return Rows(
        list(prompts), list(completions), [False] * len(rows), [""] * len(rows), tool_mask=tool_mask,
        advantages=torch.tensor([1.3, -0.7, 0.4][: len(rows)]),
    )  # fmt: skip


def hand_mask(rows=ROWS) -> torch.Tensor:
    return torch.tensor([j not in span for _, c, span in rows for j in range(len(c))])


def test_packing_masks_exactly_the_tool_tokens():
    packed = pack(rows_with_tools(), mask_truncated=False)
    targets = torch.tensor([t for _, c, _ in ROWS for t in c])
    assert torch.equal(packed.targets, targets.masked_fill(~hand_mask(), IGNORE_INDEX))
    assert packed.num_counted_tokens == int(hand_mask().sum())


def test_loss_gradient_entropy_and_kl_equal_the_fp64_reference_with_the_mask_by_hand(tmp_path, one_thread):
    model = load_causal_lm(make_tiny_model(tmp_path / "m"), device="cpu", dtype=torch.float32)
    packed = pack(rows_with_tools(), mask_truncated=False)
    n = packed.targets.numel()
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(n, generator=g) * 2 - 3.0
    ref = old + (torch.rand(n, generator=g) - 0.5) * 0.3
    for method in ("gcpo", "dapo"):
        switches = dict(METHODS[method], epsilon_low=0.2, epsilon_high=0.2, beta=0.05)
        config = PolicyLossConfig(**switches)
        scored = packed.__class__(**{**packed.__dict__, "old_logp": old, "ref_logp": ref})
        model.zero_grad()
        loss, stats = ModelWithLoss(model, config)(scored, step_normalizer([scored], config))
        loss.backward()
        fused = {name: p.grad.clone() for name, p in model.named_parameters()}

        model.zero_grad()
        hidden, weight, _ = head_inputs(forward_hidden(model, packed)[packed.completion_index], model)
        logq = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
        everything = torch.tensor([t for _, c, _ in ROWS for t in c])  # the tool tokens' targets too
        lp = logq.gather(1, everything[:, None])[:, 0]
        mask = hand_mask()
        expected = reference_policy_loss(
            lp, old.double(), ref.double(), packed.advantages.double(), packed.completion_cu_seqlens,
            level=switches["importance_sampling_level"], eps_low=0.2, eps_high=0.2, agg=switches["loss_agg_mode"],
            beta=0.05, mask=mask,
        )  # fmt: skip
        expected.backward()
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )
        entropy = -(logq.exp() * logq).sum(-1)
        torch.testing.assert_close(stats["entropy"].double(), entropy[mask].mean().detach(), rtol=1e-5, atol=1e-6)
        diff = (ref.double() - lp.detach())[mask]
        torch.testing.assert_close(stats["kl"].double(), (diff.exp() - diff - 1).mean(), rtol=1e-5, atol=1e-6)
        assert stats["num_tokens"].item() == mask.sum().item()


def test_changing_a_tool_output_changes_the_gradient_only_through_attention(tmp_path, one_thread):
    """Row: prompt, model tokens A, tool tokens T, model tokens B. With T replaced by T': A's log-probs are the
    same, T's are not counted, and the loss has no gradient at the states that predict T (no term of its own);
    what changes is B's log-probs, which attend to T, and T's input embeddings get a gradient through that."""
    model = load_causal_lm(make_tiny_model(tmp_path / "m"), device="cpu", dtype=torch.float32)
    config = PolicyLossConfig(**METHODS["grpo"])
    results = []
    for tool in ([50, 51, 52], [60, 61, 62]):
        rows = [([5, 9], [20, 21, 22, *tool, 30, 31, 32], range(3, 6))]
        packed = pack(rows_with_tools(rows), mask_truncated=False)
        captured = {}

        def keep(module, args, out, captured=captured):
            captured["emb"] = out

        handle = model.get_input_embeddings().register_forward_hook(keep)
        hidden = forward_hidden(model, packed)
        handle.remove()
        captured["emb"].retain_grad()
        states = hidden[packed.completion_index]
        states.retain_grad()
        h, weight, bias = head_inputs(states, model)
        inputs = LossInputs(packed.advantages, packed.completion_cu_seqlens)
        loss, stats = linear_policy_loss(h, weight, packed.targets, inputs, config, bias=bias, return_logp=True)
        loss.backward()
        results.append((stats["logp"].detach(), states.grad.clone(), captured["emb"].grad[0].clone()))
        model.zero_grad()
    (logp, state_grad, emb_grad), (logp2, _, _) = results
    assert torch.equal(logp[:3], logp2[:3])  # A: the same (causal: A never sees T)
    assert torch.all(logp[3:6] == 0) and torch.all(logp2[3:6] == 0)  # T: no log-prob, no term
    assert not torch.allclose(logp[6:], logp2[6:])  # B: changed, through attention to T
    assert torch.all(state_grad[3:6] == 0) and torch.any(state_grad[6:] != 0)
    tool_positions = slice(2 + 3, 2 + 6)  # the prompt's 2 tokens, then A's 3
    assert torch.any(emb_grad[tool_positions] != 0)  # T's inputs get a gradient: through attention alone
