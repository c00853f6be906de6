"""The trainer end to end on a tiny random model: rollouts, golden rows, the update's direction and its
normaliser, dynamic sampling, the command line, and two CPU processes under DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import make_tiny_model, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from gcpo_fast.config import parse_config
from gcpo_fast.data import PromptSampler
from gcpo_fast.packing import pack
from gcpo_fast.parallel import parallelize
from gcpo_fast.rewards import load_reward_function
from gcpo_fast.rollout import HFEngine, Rows, Sampling, encode_completion, encode_prompts
from gcpo_fast.rounds import (
    RoundContext,
    ScoringOptions,
    build_rows,
    pack_micro_batches,
    sample_groups,
    score_micro_batches,
)
from gcpo_fast.scoring import score_logprobs
from gcpo_fast.sources import load_records
from gcpo_fast.timing import PhaseTimer
from gcpo_fast.update import ModelWithLoss, build_optimizer, optimizer_step, step_normalizer

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), write_jsonl(root / "train.jsonl", n=12)


def setup(files, *argv):
    model_dir, data = files
    cfg = parse_config(
        [
            "--model",
            str(model_dir),
            "--dataset",
            str(data),
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--max_completion_length",
            "24",
            "--learning_rate",
            "1e-2",
            "--lr_scheduler_type",
            "constant",
            "--max_grad_norm",
            "0",
            *argv,
        ]
    )
    torch.manual_seed(0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    records = load_records(cfg.data.dataset, require_golden=cfg.method.golden_answer != "off")
    sampler = PromptSampler(records, cfg.prompts_per_round, seed=cfg.run.seed)
    return cfg, model, tokenizer, sampler, [load_reward_function(f) for f in cfg.rewards.reward_funcs]


def sgd(model):
    """Plain SGD for tests that compare gradients through weights (Adam's first step is lr * sign(grad),
    blind to how gradients are scaled)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def policy_of(model, cfg):
    return parallelize(ModelWithLoss(model, cfg.loss_config()))


def step(policy, optimizer, scheduler, micro_batches, cfg):
    return optimizer_step(policy, optimizer, scheduler, micro_batches, cfg.optim, cfg.loss_config(), cfg.model.bf16)


def one_round(cfg, model, tokenizer, sampler, funcs):
    ctx = RoundContext.of(cfg, HFEngine(model, tokenizer), tokenizer, funcs)
    sampled, metrics = sample_groups(ctx, sampler)
    rows, samples = build_rows(ctx, sampled, metrics, None, cfg.golden.golden_source)
    return sampled, rows, metrics, samples


def split_steps(cfg, rows, model):
    """The round's optimizer steps as the trainer prepares them: shuffled, packed once, scored."""
    micro_batches = pack_micro_batches(rows, cfg.batch, cfg.rollout.mask_truncated_completions)
    options = ScoringOptions(cfg.batch.reused, cfg.rollout.temperature, cfg.model.bf16, correction=False)
    score_micro_batches(micro_batches, model, None, options, PhaseTimer(), {})
    return cfg.batch.optimizer_steps(micro_batches)


def rows_of(mb):
    """(prompt ids, completion ids, advantage, golden) of each row of a packed micro-batch."""
    ids, bounds, spans = mb.input_ids[0].tolist(), mb.cu_seqlens.tolist(), mb.completion_cu_seqlens.tolist()
    for i in range(mb.num_rows):
        row, n = ids[bounds[i] : bounds[i + 1]], spans[i + 1] - spans[i]
        yield row[: len(row) - n], row[len(row) - n :], mb.advantages[i], bool(mb.golden[i])


def logprobs(model, mb, cfg):
    return score_logprobs(model, mb, cfg.rollout.temperature, cfg.model.bf16)


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
        "--golden_shaping_gamma",
        "0.3",
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


def test_command_line_run(tmp_path, files):
    model_dir, data = files
    out = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "gcpo_fast.train",
        "--model",
        str(model_dir),
        "--dataset",
        str(data),
        "--max_steps",
        "3",
        "--output_dir",
        str(out),
        "--num_generations",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--max_completion_length",
        "8",
        "--sample_steps",
        "2",
        "--eval_dataset",
        str(data),
        "--eval_steps",
        "2",
        "--eval_num_problems",
        "3",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    assert set(lines[0]) == {"step", "eval/mean@1", "eval/pass@1", "eval/num_problems", "timing/eval"}
    assert lines[0]["eval/num_problems"] == 3
    for name in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "frac_reward_all_wrong",
        "completions/mean_length",
        "completions/clipped_ratio",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "loss",
        "grad_norm",
        "learning_rate",
        "step_time",
        "tokens_per_second",
        "rewards/accuracy_reward/mean",
        "gcpo/golden_rows",
        "gcpo/frac_all_wrong",
        "gcpo/golden_truncated",
        "skipped_steps",
        "timing/generate",
        "timing/reward",
        "timing/update",
    ):
        assert all(name in m for m in lines[1:]), name
    # the engine gets the new weights before it samples again (a no-op for Hugging Face generate, still timed)
    assert ["timing/weight_sync" in m for m in lines[1:]] == [False, True, True]
    # per-phase wall times: eval and checkpoint only where they ran, the first step's own (warm-up included)
    assert [("timing/eval" in m, "timing/checkpoint" in m) for m in lines[1:]] == [
        (False, False),
        (True, False),
        (True, True),
    ]
    assert all(0 < m["timing/update"] < m["step_time"] for m in lines[1:])
    assert "eval/mean@1" in lines[2] and "eval/mean@1" in lines[3] and "eval/mean@1" not in lines[1]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {s["step"] for s in samples} == {2}
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-3"]
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    assert model.num_parameters() > 0
    # the closing summary: where the files went and held-out accuracy at the first and last evaluation
    assert str(out / "metrics.jsonl") in done.stdout and str(out / "checkpoint-3") in done.stdout
    first, last = lines[0]["eval/mean@1"], lines[3]["eval/mean@1"]
    assert f"held-out mean@1 on 3 problems: {first:.3f} at step 0 -> {last:.3f} at step 3" in done.stdout
    assert (
        "s in phases: " in done.stdout
        and f"step 1 took {lines[1]['step_time']:.2f} s (warm-up included)" in done.stdout
    )
    AutoTokenizer.from_pretrained(out / "checkpoint-3")

    bad = subprocess.run(
        cmd[:3] + ["--model", "/nonexistent", "--dataset", str(tmp_path / "none.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "none.jsonl: no such file or directory" in bad.stderr


def _ddp_worker(rank, world, port, files, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from gcpo_fast.parallel import init_distributed
    from gcpo_fast.train import train

    init_distributed()
    try:
        # 1. one step of two ranks equals one step of one process over both ranks' rows (token-mean normaliser)
        cfg, model, _, _, _ = setup(files, "--loss_type", "dapo", "--dynamic_sampling", "false")
        g = torch.Generator().manual_seed(rank)
        rows = Rows(
            [[1, 2, 3]] * (rank + 2),
            [torch.randint(5, 50, (n,), generator=g).tolist() for n in range(3 + rank, 5 + 2 * rank)],
            [False] * (rank + 2),
            [""] * (rank + 2),
            advantages=torch.randn(rank + 2, generator=g),
        )
        mb = pack(rows, mask_truncated=False)
        policy = policy_of(model, cfg)
        assert isinstance(policy.module, torch.nn.parallel.DistributedDataParallel)
        optimizer, scheduler = sgd(model)
        step(policy, optimizer, scheduler, [mb], cfg)
        torch.save({"mb": mb, "weights": [p.detach() for p in model.parameters()]}, out.parent / f"step_rank{rank}.pt")
        # 2. a short training run: each rank its prompts, rank 0 writes
        cfg = parse_config(
            [
                "--model",
                str(files[0]),
                "--dataset",
                str(files[1]),
                "--output_dir",
                str(out),
                "--num_generations",
                "2",
                "--per_device_train_batch_size",
                "4",
                "--max_completion_length",
                "8",
                "--max_steps",
                "2",
                "--eval_dataset",
                str(files[1]),
                "--eval_steps",
                "2",
                "--eval_num_problems",
                "3",
            ]
        )
        train(cfg)
    finally:
        torch.distributed.destroy_process_group()


def test_two_cpu_processes(tmp_path, files, one_thread):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, files, tmp_path / "run"), nprocs=2, join=True)

    ranks = [torch.load(tmp_path / f"step_rank{r}.pt", weights_only=True) for r in (0, 1)]
    cfg, model, _, _, _ = setup(
        files,
        "--loss_type",
        "dapo",
        "--dynamic_sampling",
        "false",
        "--gradient_accumulation_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
    )
    optimizer, scheduler = sgd(model)
    step(policy_of(model, cfg), optimizer, scheduler, [ranks[0]["mb"], ranks[1]["mb"]], cfg)
    for a, b, c in zip(ranks[0]["weights"], ranks[1]["weights"], model.parameters()):
        assert torch.equal(a, b)  # DDP kept the ranks in step
        torch.testing.assert_close(a, c.detach(), rtol=0, atol=1e-6)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]  # rank 0 alone writes: one line per step
    state = torch.load(tmp_path / "run" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["sampler"]["index"] == 2 * 2 * 2  # 2 rounds x 2 prompts x 2 ranks
    assert {p.name for p in (tmp_path / "run" / "checkpoint-2").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
