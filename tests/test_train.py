"""The trainer's stages on a tiny random model: rollouts, golden rows, the update's direction and its normaliser,
dynamic sampling (the command line and two processes: tests/test_train_processes.py)."""

import copy
import dataclasses

import pytest
import torch
from tiny_model import make_tiny_model, write_jsonl
from trainer_steps import logprobs, one_round, policy_of, rows_of, setup, sgd, split_steps, step
from transformers import AutoTokenizer

from gcpo_fast.config import parse_config
from gcpo_fast.packing import pack
from gcpo_fast.parallel import parallelize
from gcpo_fast.rollout import HFEngine, Rows, Sampling, encode_completion, encode_prompts
from gcpo_fast.scoring import SamplingCorrection
from gcpo_fast.sources import load_records
from gcpo_fast.update import ModelWithLoss, build_optimizer, step_normalizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), write_jsonl(root / "train.jsonl", n=12)


def test_generate_left_pads_cuts_at_eos_and_keeps_ids(files, one_thread):
    _, model, tokenizer, _, _ = setup(files)
    prompts = encode_prompts(tokenizer, ["What is 1 + 2?", "What is 12 + 7 and then some more words?"], 64)
    assert tokenizer.decode(prompts[0]) == "<|user|>What is 1 + 2?\n<|assistant|>"  # the chat template
    engine, greedy = HFEngine(model, tokenizer), Sampling(max_completion_length=6, greedy=True)
    batched = engine.generate(prompts, 2, greedy)
    alone = [engine.generate([p], 1, greedy).completion_ids[0] for p in prompts]
    assert batched.completion_ids == [alone[0], alone[0], alone[1], alone[1]]  # padding changes nothing
    assert batched.prompt_ids == [prompts[0], prompts[0], prompts[1], prompts[1]]
    torch.manual_seed(0)
    out = engine.generate(prompts, 8, Sampling(max_completion_length=6))
    eos = tokenizer.eos_token_id
    for ids, cut, text in zip(out.completion_ids, out.truncated, out.texts):
        assert (eos not in ids and len(ids) == 6) if cut else (ids[-1] == eos and eos not in ids[:-1])
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert (
        encode_prompts(tokenizer, ["What is 12 + 7?"], 3)[0]
        == encode_prompts(tokenizer, ["What is 12 + 7?"], 64)[0][-3:]
    )


def test_plain_text_prompts_without_a_chat_template(tmp_path, one_thread):
    path = make_tiny_model(tmp_path / "model", chat_template=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert encode_prompts(tokenizer, ["What is 1 + 2?"], 64)[0] == tokenizer("What is 1 + 2?").input_ids
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        encode_prompts(tokenizer, [[{"role": "user", "content": "hi"}]], 64)


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_golden_rows_for_all_wrong_groups(files, mode):
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--reward_funcs", "tiny_model:zero_reward", "--golden_answer", mode
    )
    sampled, rows, metrics, samples = one_round(cfg, model, tokenizer, sampler, funcs)
    P, G = 2, 4
    size = G + 1 if mode == "append" else G
    assert len(rows.completion_ids) == P * size
    assert metrics["gcpo/golden_rows"] == P and metrics["gcpo/frac_all_wrong"] == 1.0
    assert metrics["reward"] == 0.0  # golden rows stay out of the rollout statistics
    for p, record in enumerate(sampled.records):
        golden = rows.completion_ids[p * size + size - 1]
        ids, _ = encode_completion(tokenizer, record["golden"], cfg.rollout.max_completion_length)
        assert (
            golden == ids == tokenizer(record["golden"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        )
        assert rows.prompt_ids[p * size + size - 1] == sampled.rows.prompt_ids[p * G]  # the rollouts' own prompt ids
        assert rows.completion_ids[p * size] == sampled.rows.completion_ids[p * G]
        adv = rows.advantages[p * size : (p + 1) * size]
        assert adv[-1] > 0 and (adv[:-1] < 0).all()
    assert [s["golden"] for s in samples] == [False, True, False, True]
    assert metrics["gcpo/golden_truncated"] == 0
    short = encode_completion(tokenizer, "\\boxed{2}", 64)
    assert short == (tokenizer("\\boxed{2}", add_special_tokens=False).input_ids + [tokenizer.eos_token_id], False)


def test_golden_answers_that_do_not_fit_are_not_used(files, one_thread):
    """A golden answer cut to the budget would lose its \\boxed{} answer yet train as correct: it is dropped,
    counted and warned about, and samples.jsonl never shows a golden row that was not trained on."""
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--reward_funcs", "tiny_model:zero_reward", "--max_completion_length", "8"
    )
    with pytest.warns(UserWarning, match="golden answers longer than max_completion_length=8"):
        sampled, rows, metrics, samples = one_round(cfg, model, tokenizer, sampler, funcs)
    assert len(rows) == 2 * 4 and metrics["gcpo/golden_rows"] == 0 and metrics["gcpo/golden_truncated"] == 2
    assert not any(s["golden"] for s in samples) and rows.advantages.abs().max() == 0


def test_conversational_prompts(tmp_path, files, one_thread):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"What is {i} + 1?"}],
            "solution": f"\\boxed{{{i + 1}}}",
        }
        for i in range(4)
    ]
    cfg, model, tokenizer, sampler, funcs = setup((files[0], write_jsonl(tmp_path / "chat.jsonl", rows=rows)))
    sampled, rows, metrics, samples = one_round(cfg, model, tokenizer, sampler, funcs)
    assert tokenizer.decode(sampled.rows.prompt_ids[0]).startswith("<|system|>Add.\n<|user|>What is ")
    assert samples[0]["prompt"].startswith("What is ") and metrics["rewards/accuracy_reward/mean"] >= 0


def test_builtin_dataset():
    train = load_records("builtin", split="train", num_problems=50, seed=1)
    test = load_records("builtin", split="test", num_problems=50)
    assert len(train) == len(test) == 50
    assert len({r["prompt"] for r in test}) == 50  # evaluation never counts a problem twice
    assert all(r["golden"] == r["solution"] and r["golden"].endswith(f"\\boxed{{{r['answer']}}}") for r in train)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


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
        if golden and cfg.method.golden_objective == "shaped":  # LUFFY: p / (p + gamma), behaviour probability 1
            ratio = lp.exp() / (lp.exp() + cfg.method.golden_shaping_gamma)
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


def test_masked_truncated_rows_have_no_targets():
    mb = Rows([[1, 2], [3]], [[4, 5, 6], [7, 8]], [True, False], ["", ""], advantages=torch.zeros(2))
    assert pack(mb, True).targets.tolist() == [-100, -100, -100, 7, 8]
    assert pack(mb, False).targets.tolist() == [4, 5, 6, 7, 8]
    assert pack(mb, True).num_counted_tokens == 2


def test_old_logprobs_only_when_a_round_is_reused(files, one_thread):
    cfg, model, tokenizer, sampler, funcs = setup(files)
    _, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    assert all(mb.old_logp is None for step in split_steps(cfg, rows, model) for mb in step)
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--per_device_train_batch_size", "4", "--steps_per_generation", "2"
    )
    _, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    steps = split_steps(cfg, rows, model)
    assert len(steps) == 2 and all(len(s) == 1 for s in steps)
    for (mb,) in steps:  # teacher-forced log-probs of the behaviour policy, golden rows included
        assert mb.old_logp.shape == (mb.targets.numel(),)
        torch.testing.assert_close(mb.old_logp, logprobs(model, mb, cfg))
    assert len(split_steps(parse_config(["--num_iterations", "3"]), rows, model)) == 3


def test_dapo_dynamic_sampling_keeps_groups_with_varied_rewards(files, one_thread):
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--loss_type", "dapo", "--reward_funcs", "tiny_model:even_answer_reward", "--overlong_buffer_len", "0"
    )
    sampled, rows, metrics, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    even = [int(r["answer"]) % 2 == 0 for r in sampled.records]
    assert sampled.keep == [p for p, e in enumerate(even) if e][:2]  # the first two with a signal
    assert sum(even[:-2]) < 2 <= sum(even)  # no more batches than needed (2 prompts per batch)
    assert metrics["num_gen_batches"] == len(even) // 2
    assert len(rows.completion_ids) == 8 and rows.advantages.abs().min() > 0
    cfg, model, tokenizer, sampler, funcs = setup(
        files, "--loss_type", "dapo", "--reward_funcs", "tiny_model:zero_reward", "--max_num_gen_batches", "3"
    )
    with pytest.raises(RuntimeError, match="after 3 generation batches"):
        one_round(cfg, model, tokenizer, sampler, funcs)


def test_gpg_samples_more_until_enough_rows_are_valid(files, one_thread):
    cfg, model, tokenizer, sampler, funcs = setup(
        files,
        "--loss_type",
        "gpg",
        "--reward_funcs",
        "tiny_model:even_answer_reward",
        "--min_inverse_alpha",
        "0.99",
        "--max_num_gen_batches",
        "2",
    )
    sampled, rows, metrics, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    even = [int(r["answer"]) % 2 == 0 for r in sampled.records]
    # stops when every group is valid or after 2 batches; keeps every group (2 prompts x 4 rows per batch)
    assert metrics["num_gen_batches"] == (1 if all(even[:2]) else 2) == len(even) // 2
    assert len(rows.completion_ids) == 4 * len(even)
    assert metrics["gpg/alpha"] == pytest.approx(len(even) / sum(even))  # B / (B - M) in rows


@pytest.mark.parametrize("mode", ["sequence_mask", "token_truncate"])
def test_a_correction_weight_from_the_updates_own_forward_equals_a_separate_pass(files, one_thread, mode):
    """Rows an engine sampled elsewhere, trained once: the update takes the sampling weight from its own forward's
    log-probs (no second decoder pass), which must give the step and the sampling/* metrics of a weight computed
    beforehand from a separate forward-only pass, as a reused round does."""
    cfg, model, tokenizer, sampler, funcs = setup(files)  # the correction below is built with `mode`
    torch.manual_seed(1)
    _, rows, _, _ = one_round(cfg, model, tokenizer, sampler, funcs)
    (micro_batches,) = split_steps(cfg, rows, model)
    (packed,) = micro_batches
    sampled = ~packed.golden.repeat_interleave(packed.completion_cu_seqlens.diff().long())
    noise = 0.3 * torch.randn(packed.targets.shape, generator=torch.Generator().manual_seed(3))
    packed.engine_logp = torch.where(sampled, logprobs(model, packed, cfg) + noise, 0.0)  # another engine's
    correction = SamplingCorrection(mode, None, 3.0)
    results = []
    for deferred in (True, False):
        trained = copy.deepcopy(model)
        batch = dataclasses.replace(packed)
        if not deferred:
            batch.sampling_weight, _ = correction.weight(batch, logprobs(trained, batch, cfg))
        policy = parallelize(ModelWithLoss(trained, cfg.loss_config(), correction))
        metrics = step(policy, *sgd(trained), [batch], cfg)
        results.append(([p.detach() for p in trained.parameters()], metrics))
    (deferred_weights, deferred_metrics), (separate_weights, separate_metrics) = results
    for a, b in zip(deferred_weights, separate_weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert deferred_metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(0.3 * 0.8, rel=0.25)
    assert not any(name.startswith("sampling/") for name in separate_metrics)  # computed beforehand instead
    assert deferred_metrics["loss"] == pytest.approx(separate_metrics["loss"], rel=1e-5)
    uncorrected = copy.deepcopy(model)  # and the weight matters: without it the step differs
    step(parallelize(ModelWithLoss(uncorrected, cfg.loss_config())), *sgd(uncorrected), [packed], cfg)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(uncorrected.parameters(), deferred_weights))
