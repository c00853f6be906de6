"""The fp64 reference of the policy losses and the batches the kernel tests share (not a test module).

from policy_reference import LENGTHS, METHODS, check_against_reference, inputs_and_config, make_batch
loss, stats = policy_loss(logp, *inputs_and_config(adv, cu, old_logp=old, beta=0.1, **METHODS["dapo"]))
"""

import dataclasses
import itertools

import torch

from gcpo_fast.kernels import IGNORE_INDEX, LossInputs, PolicyLossConfig, linear_policy_loss, policy_loss

IGNORE = IGNORE_INDEX

# The kernels' switches of each method's loss (the trainer's recipes; GSPO's are GCPO's), for the tests
# that run every method: together they cover every ratio level and aggregation mode.
METHODS = {
    "gcpo": dict(
        importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4, loss_agg_mode="seq-mean-token-mean"
    ),
    "grpo": dict(
        importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, loss_agg_mode="seq-mean-token-mean"
    ),
    "dapo": dict(importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, loss_agg_mode="token-mean"),
    "dr_grpo": dict(
        importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, loss_agg_mode="seq-mean-token-sum-norm"
    ),
    "bnpo": dict(importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, loss_agg_mode="token-mean"),
    "gpg": dict(importance_sampling_level="none", epsilon_low=0.0, epsilon_high=0.0, loss_agg_mode="token-mean"),
}
INPUT_FIELDS = {f.name for f in dataclasses.fields(LossInputs)}


def inputs_and_config(advantages, cu_seqlens, **kw) -> tuple[LossInputs, PolicyLossConfig]:
    """(LossInputs, PolicyLossConfig) from one keyword set: each name goes to the one whose field it is."""
    inputs = LossInputs(advantages, cu_seqlens, **{k: v for k, v in kw.items() if k in INPUT_FIELDS})
    return inputs, PolicyLossConfig(**{k: v for k, v in kw.items() if k not in INPUT_FIELDS})


def reference_policy_loss(
    lp,
    old,
    ref,
    adv,
    cu,
    *,
    level,
    eps_low,
    eps_high,
    agg,
    delta=None,
    clip_c=None,
    beta=0.0,
    max_len=None,
    normalizer=None,
    mask=None,
    sampling_weight=None,
    shaped_rows=None,
    gamma=0.1,
):
    """Straight from docs/algorithms.md, one row at a time, differentiated by autograd.

    sampling_weight multiplies the policy term before the KL term is added (TRL 1.16's order). Rows
    with shaped_rows[i] take LUFFY's -A p / (p + gamma), p = exp(lp), per token and unclipped."""
    mask = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask
    old = lp.detach() if old is None else old
    B = cu.numel() - 1
    n_tok = mask.sum().clamp(min=1)
    total = lp.new_zeros(())
    for i in range(B):
        a, b = int(cu[i]), int(cu[i + 1])
        m = mask[a:b].to(lp.dtype)
        L = m.sum().clamp(min=1)
        A = adv[i]
        lr = (lp[a:b] - old[a:b]) * m
        if shaped_rows is not None and shaped_rows[i]:
            p = torch.exp(lp[a:b])
            l = -A * p / (p + gamma)
        elif level == "none":
            l = -A * lp[a:b]
        else:
            if level == "sequence":
                rho = torch.exp(torch.clamp(lr.sum() / L, -20, 20)).expand(b - a)
            else:
                rho = torch.exp(torch.clamp(lr, -20, 20))
            coef1 = rho if delta is None else torch.clamp(rho, max=delta)
            coef2 = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
            l = -torch.minimum(coef1 * A, coef2 * A)
            if clip_c is not None and A < 0:
                l = torch.minimum(l, -A * clip_c)
        if sampling_weight is not None:
            l = l * sampling_weight[a:b]
        if beta > 0:
            diff = (ref[a:b] - lp[a:b]) * m
            l = l + beta * (torch.exp(torch.clamp(diff, -20, 20)) - diff - 1)
        s = (l * m).sum()
        if agg == "token-mean":
            total = total + s / (n_tok if normalizer is None else normalizer)
        elif agg == "seq-mean-token-mean":
            total = total + s / L / (B if normalizer is None else normalizer)
        elif agg == "seq-mean-token-sum":
            total = total + s / (B if normalizer is None else normalizer)
        else:
            total = total + s / (max_len if normalizer is None else normalizer)
    return total


def make_batch(lengths, seed, spread=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    n = int(cu[-1])
    lp = -torch.rand(n, generator=g, dtype=dtype) * 3
    # old log-probs off by up to +-spread per token plus a per-row offset: ratios on both sides of the box
    row_shift = (torch.rand(len(lengths), generator=g, dtype=dtype) - 0.5) * spread
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    old = lp - row_shift[rows] - (torch.rand(n, generator=g, dtype=dtype) - 0.5) * spread
    ref = lp + (torch.rand(n, generator=g, dtype=dtype) - 0.5) * 0.4
    adv = torch.randn(len(lengths), generator=g, dtype=dtype)
    return lp, old, ref, adv, cu


LENGTHS = [5, 0, 13, 1, 7, 22]  # an empty row, a one-token row, odd sizes


def random_sampling_weight(n, seed):
    """Ratios around 1 with some exact zeros (masked by a *_mask mode), fp64."""
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.exp((torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 1.5)
    return torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.15, 0.0, w)


def check_against_reference(
    lengths, level, agg, on_policy, seed=0, eps=(0.1, 0.15), backend="torch", device="cpu", **kw
):
    """policy_loss on a make_batch batch against reference_policy_loss (loss and gradient); returns the stats.
    kw: LossInputs / PolicyLossConfig fields (mask, sampling_weight, beta, ...), golden (the shaped rows)
    and gamma."""
    lp, old, ref, adv, cu = make_batch(lengths, seed)
    mask = kw.pop("mask", None)
    sw = kw.pop("sampling_weight", None)
    golden, gamma = kw.pop("golden", None), kw.pop("gamma", 0.1)
    if golden is not None:
        kw.update(golden=golden.to(device), golden_objective="shaped", golden_shaping_gamma=gamma)
    lp32 = lp.float().to(device).requires_grad_()
    on = dict(device=device)
    loss, stats = policy_loss(
        lp32,
        *inputs_and_config(
            adv.float().to(**on),
            cu.to(**on),
            old_logp=None if on_policy else old.float().to(**on),
            importance_sampling_level=level,
            epsilon_low=eps[0],
            epsilon_high=eps[1],
            loss_agg_mode=agg,
            ref_logp=ref.float().to(**on),
            max_completion_length=30,
            mask=None if mask is None else mask.to(**on),
            backend=backend,
            sampling_weight=None if sw is None else sw.float().to(**on),
            **kw,
        ),
    )
    loss.backward()
    lp64 = lp.clone().requires_grad_()
    expected = reference_policy_loss(
        lp64,
        None if on_policy else old,
        ref,
        adv,
        cu,
        level=level,
        eps_low=eps[0],
        eps_high=eps[1],
        agg=agg,
        delta=kw.get("delta"),
        clip_c=kw.get("clip_ratio_c"),
        beta=kw.get("beta", 0.0),
        max_len=30,
        normalizer=kw.get("normalizer"),
        mask=mask,
        sampling_weight=None if sw is None else sw.float().double(),
        shaped_rows=golden,
        gamma=gamma,
    )
    expected.backward()
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp32.grad.double().cpu(), lp64.grad, rtol=1e-4, atol=1e-6)
    return {k: v.cpu() for k, v in stats.items()}


# The golden rows of LENGTHS' batch for the shaped objective: the empty row, a 13-token and a 7-token row.
GOLDEN = torch.tensor([False, True, True, False, True, False])


def reference_logprobs(h, W, b, t, T):
    """fp64 log-probs and entropies from the full [N, V] logits."""
    z = h.double() @ W.double().T
    if b is not None:
        z = z + b.double()
    logq = torch.log_softmax(z / T, dim=-1)
    valid = t != IGNORE
    logp = logq.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1) * valid
    ent = -(logq.exp() * logq).sum(-1) * valid
    return logp, ent


def make_inputs(n, d, v, lengths=None, seed=0, dtype=torch.float32, device="cpu", bias=True, ignore_frac=0.1):
    """Peaked logits (entropy ~0.3-2 nats) with targets drawn from the softmax, as in real rollouts."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(v, d, generator=g) / d**0.5
    h = torch.randn(n, d, generator=g) * 2.5
    b = torch.randn(v, generator=g) * 0.1 if bias else None
    probs = torch.softmax(h @ W.T + (0 if b is None else b), -1)
    t = torch.multinomial(probs, 1, generator=g).squeeze(1) if n else torch.zeros(0, dtype=torch.long)
    t[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    lengths = lengths or [n]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    adv = torch.randn(len(lengths), generator=g)
    to = dict(device=device)
    return (
        h.to(dtype=dtype, **to),
        W.to(dtype=dtype, **to),
        None if b is None else b.to(dtype=dtype, **to),
        t.to(**to),
        adv.to(**to),
        cu.to(**to),
    )


def fused_loss(
    hidden,
    weight,
    targets,
    old_logp,
    advantages,
    cu_seqlens,
    *,
    bias=None,
    compute_entropy=False,
    return_logp=False,
    **kw,
):
    """linear_policy_loss with kw split between LossInputs and PolicyLossConfig ."""
    inputs, config = inputs_and_config(advantages, cu_seqlens, old_logp=old_logp, **kw)
    return linear_policy_loss(
        hidden, weight, targets, inputs, config, bias=bias, compute_entropy=compute_entropy, return_logp=return_logp
    )
