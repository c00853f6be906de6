"""One optimizer step (gcpo_fast/update.py) on a tiny random model: its direction (the golden answer's log-prob
rises), an untied head trains, the micro-batch split does not change the step, the loss against a naive reference,
and the sampling-mismatch weight from the update's own forward."""

import copy
import dataclasses

import pytest
import torch
from tiny_model import make_tiny_model
from trainer_steps import logprobs, one_round, policy_of, rows_of, setup, sgd, split_steps, step

from gcpo_fast.data.prompts import encode_completion, encode_prompts
from gcpo_fast.distributed.parallel import parallelize
from gcpo_fast.engines.base import Rows
from gcpo_fast.packing import pack
from gcpo_fast.scoring import SamplingCorrection
from gcpo_fast.update import ModelWithLoss, build_optimizer, step_normalizer


def golden_logprob(model, tokenizer, cfg, record):
    mb = Rows(
        encode_prompts(tokenizer, [record["prompt"]], cfg.rollout.max_prompt_length),
        [encode_completion(tokenizer, record["golden"], cfg.rollout.max_completion_length)[0]],
        [False],
        [""],
        advantages=torch.zeros(1),
    )
    return logprobs(model, pack(mb, False), cfg).sum().item()


@pytest.mark.parametrize("golden", ["append", "replace", "off"])
def test_a_step_raises_the_golden_answers_logprob(files, golden):
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--reward_funcs", "tiny_model:zero_reward", "--golden_answer", golden
    )
    sampled, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    records = sampled.records
    before = [golden_logprob(model, tokenizer, cfg, r) for r in records]
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.run.max_steps)
    (micro_batches,) = split_steps(cfg, rows, model)
    metrics = step(policy_of(model, cfg), optimizer, scheduler, micro_batches, cfg)
    after = [golden_logprob(model, tokenizer, cfg, r) for r in records]
    if golden == "off":  # every group all wrong, no golden row: no signal, no change
        assert metrics["grad_norm"] == 0.0
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    else:
        assert metrics["grad_norm"] > 0
        assert all(a > b + 0.1 for a, b in zip(after, before)), (before, after)


def test_untied_lm_head_is_trained(tmp_path, files, one_thread):
    untied = (make_tiny_model(tmp_path / "untied", tied=False), files[1])
    cfg, model, tokenizer, sampler, funcs = setup(untied, "--reward_funcs", "tiny_model:zero_reward")
    head, embed = model.get_output_embeddings().weight.detach().clone(), model.get_input_embeddings().weight
    assert embed.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    sampled, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    before = golden_logprob(model, tokenizer, cfg, sampled.records[0])
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.run.max_steps)
    step(policy_of(model, cfg), optimizer, scheduler, split_steps(cfg, rows, model)[0], cfg)
    assert not torch.equal(head, model.get_output_embeddings().weight)
    assert golden_logprob(model, tokenizer, cfg, sampled.records[0]) > before


def test_micro_batch_split_does_not_change_the_step(files, one_thread):
    """One optimizer step over the same rows gives the same weights as one micro-batch or as two: the
    token-mean normaliser counts the whole step (and truncated rows drop out of it when masked)."""
    results = []
    for gas in ("1", "2"):
        cfg, model, tokenizer, sampler, funcs = setup(
            files,
            "--loss_type",
            "dapo",
            "--dynamic_sampling",
            "false",
            "--mask_truncated_completions",
            "--per_device_train_batch_size",
            str(8 // int(gas)),
            "--gradient_accumulation_steps",
            gas,
        )
        torch.manual_seed(1)
        _, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
        rows.advantages = torch.linspace(-1, 1, len(rows.advantages))
        rows.truncated = [i == 0 for i in range(len(rows.truncated))]  # one row masked out
        torch.manual_seed(2)
        (micro_batches,) = split_steps(cfg, rows, model)
        assert len(micro_batches) == int(gas)
        tokens = sum(len(c) for c, t in zip(rows.completion_ids, rows.truncated) if not t)
        assert step_normalizer(micro_batches, cfg.loss_config()) == tokens
        initial = [p.detach().clone() for p in model.parameters()]
        optimizer, scheduler = sgd(model)
        step(policy_of(model, cfg), optimizer, scheduler, micro_batches, cfg)
        results.append([p.detach().clone() for p in model.parameters()])
        assert any(not torch.equal(a, b) for a, b in zip(initial, results[-1]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def naive_loss(model, micro_batches, cfg):
    """The loss of one optimizer step the plain way (docs/algorithms.md): each row through the full model, [L, V]
    logits, on-policy ratios exp(lp - lp.detach()) (1 in value, carrying the gradient), no clipping, the
    aggregation over every row of the step at once."""
    terms, lengths = [], []
    for p, c, a, golden in (row for mb in micro_batches for row in rows_of(mb)):
        logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1] / cfg.rollout.temperature
        lp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(c)[:, None])[:, 0]
        if golden and cfg.golden.golden_objective == "shaped":  # LUFFY: p / (p + gamma), behaviour probability 1
            ratio = lp.exp() / (lp.exp() + cfg.golden.golden_shaping_gamma)
        elif cfg.method.importance_sampling_level == "sequence":
            ratio = torch.exp((lp - lp.detach()).mean()).expand_as(lp)
        else:
            ratio = torch.exp(lp - lp.detach())
        terms.append(-a * ratio)
        lengths.append(len(c))
    B, L = len(terms), cfg.rollout.max_completion_length
    return {
        "seq-mean-token-mean": sum(t.mean() for t in terms) / B,
        "token-mean": sum(t.sum() for t in terms) / sum(lengths),
        "seq-mean-token-sum-norm": sum(t.sum() for t in terms) / (B * L),
    }[cfg.method.loss_agg_mode]


@pytest.mark.parametrize(
    "loss_type, objective",
    [
        ("gcpo", "policy_ratio"),
        ("grpo", "policy_ratio"),
        ("dapo", "policy_ratio"),
        ("dr_grpo", "policy_ratio"),
        ("gcpo", "shaped"),
    ],
)
def test_update_matches_a_naive_reference(files, loss_type, objective):
    cfg, model, tokenizer, sampler, funcs = setup(
        files,
        "--loss_type",
        loss_type,
        "--dynamic_sampling",
        "false",
        "--reward_funcs",
        "tiny_model:zero_reward",
        "--temperature",
        "0.7",
        "--gradient_accumulation_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--golden_objective",
        objective,
        *(["--golden_shaping_gamma", "0.3"] if objective == "shaped" else []),  # (ignored by the other objective)
    )
    _, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    rows.advantages = torch.randn(len(rows.advantages))
    assert any(rows.golden) == (loss_type == "gcpo")  # every group all wrong: golden rows under GCPO
    (micro_batches,) = split_steps(cfg, rows, model)
    assert len(micro_batches) == 2
    naive_loss(model, micro_batches, cfg).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    optimizer, scheduler = sgd(model)  # lr 1: the step is minus the gradient
    step(policy_of(model, cfg), optimizer, scheduler, micro_batches, cfg)
    for b, a, g in zip(before, model.parameters(), expected):
        torch.testing.assert_close(b - a.detach(), g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["sequence_mask", "token_truncate"])
def test_a_correction_weight_from_the_updates_own_forward_equals_one_from_old_logprobs(files, one_thread, mode):
    """Rows an engine sampled elsewhere: the update is the one place their sampling weight is computed. Trained
    once, it takes the log-probs of its own forward (no second decoder pass); given a reused round's old log-probs
    (a separate forward-only pass, the same weights), it takes those: the same step and sampling/* metrics."""
    cfg, model, tokenizer, sampler, funcs = setup(files)  # the correction below is built with `mode`
    torch.manual_seed(1)
    _, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    (micro_batches,) = split_steps(cfg, rows, model)
    (packed,) = micro_batches
    sampled = ~packed.golden.repeat_interleave(packed.completion_cu_seqlens.diff().long())
    noise = 0.3 * torch.randn(packed.targets.shape, generator=torch.Generator().manual_seed(3))
    engine_logp = torch.where(sampled, logprobs(model, packed, cfg) + noise, 0.0)  # another engine's
    packed = dataclasses.replace(packed, engine_logp=engine_logp)
    correction = SamplingCorrection(mode, None, 3.0)
    results = []
    for own_forward in (True, False):
        trained = copy.deepcopy(model)
        batch = packed if own_forward else dataclasses.replace(packed, old_logp=logprobs(trained, packed, cfg))
        policy = parallelize(ModelWithLoss(trained, cfg.loss_config(), correction))
        metrics = step(policy, *sgd(trained), [batch], cfg)
        results.append(([p.detach() for p in trained.parameters()], metrics))
    (own_weights, own_metrics), (old_weights, old_metrics) = results
    for a, b in zip(own_weights, old_weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert own_metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(0.3 * 0.8, rel=0.25)
    for name in ("loss", "sampling/sampling_logp_difference/mean", "sampling/importance_sampling_ratio/min"):
        assert own_metrics[name] == pytest.approx(old_metrics[name], rel=1e-5, abs=1e-7), name
    uncorrected = copy.deepcopy(model)  # and the weight matters: without it the step differs
    step(parallelize(ModelWithLoss(uncorrected, cfg.loss_config())), *sgd(uncorrected), [packed], cfg)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(uncorrected.parameters(), own_weights))
