"""The trainer's pieces driven one at a time, as the trainer drives them (tests/test_train*.py, test_fsdp.py).

cfg, model, tokenizer, sampler, funcs = setup(files, "--loss_type", "dapo")
sampled, rows, metrics, samples = one_round(cfg, model, tokenizer, sampler, funcs)
(micro_batches,) = split_steps(cfg, rows, model)            # packed once, scored
metrics = step(policy_of(model, cfg), *sgd(model), micro_batches, cfg)
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gcpo_fast.config import parse_config
from gcpo_fast.data.files import PromptSampler
from gcpo_fast.data.rewards import load_reward_function
from gcpo_fast.data.sources import load_records
from gcpo_fast.distributed.parallel import parallelize
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.rounds import (
    RoundContext,
    ScoringOptions,
    build_rows,
    pack_micro_batches,
    sample_groups,
    score_micro_batches,
)
from gcpo_fast.run.timing import PhaseTimer
from gcpo_fast.scoring import score_logprobs
from gcpo_fast.train import Trainer
from gcpo_fast.update import ModelWithLoss, optimizer_step


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
    records = load_records(cfg.data.dataset, require_golden=cfg.golden.golden_answer != "off")
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
    rows, samples, row_metrics = build_rows(ctx, sampled)
    return sampled, rows, {**metrics, **row_metrics}, samples


def split_steps(cfg, rows, model):
    """The round's optimizer steps as the trainer prepares them: shuffled, packed once, scored."""
    micro_batches = pack_micro_batches(rows, cfg.batch, cfg.rollout.mask_truncated_completions)
    options = ScoringOptions(cfg.batch.reused, cfg.rollout.temperature, cfg.model.bf16)
    return cfg.batch.optimizer_steps(score_micro_batches(micro_batches, model, None, options, PhaseTimer()))


def rows_of(mb):
    """(prompt ids, completion ids, advantage, golden) of each row of a packed micro-batch."""
    ids, bounds, spans = mb.input_ids[0].tolist(), mb.cu_seqlens.tolist(), mb.completion_cu_seqlens.tolist()
    for i in range(mb.num_rows):
        row, n = ids[bounds[i] : bounds[i + 1]], spans[i + 1] - spans[i]
        yield row[: len(row) - n], row[len(row) - n :], mb.advantages[i], bool(mb.golden[i])


def logprobs(model, mb, cfg):
    return score_logprobs(model, mb, cfg.rollout.temperature, cfg.model.bf16)


def row_logprobs_fp64(model, packed, temperature: float) -> torch.Tensor:
    """Each row's completion log-probs from its own unpacked fp64 forward, in packed order [N]."""
    model = copy.deepcopy(model).double().eval()
    out = []
    with torch.no_grad():
        for b in range(packed.num_rows):
            s, e = packed.cu_seqlens[b].item(), packed.cu_seqlens[b + 1].item()
            c0, c1 = packed.completion_cu_seqlens[b].item(), packed.completion_cu_seqlens[b + 1].item()
            ids = packed.input_ids[0, s:e]
            logits = model(ids[None]).logits[0].double() / temperature
            positions = packed.completion_index[c0:c1] - s
            targets = ids[positions + 1]
            out.append(torch.log_softmax(logits[positions], -1).gather(-1, targets[:, None])[:, 0])
    return torch.cat(out)


def check_policy_lag(argv: list[str]) -> None:
    """--async_rollouts (argv: the run's options) against an fp64 reference: round 0 is sampled by the trainer's
    own weights (staleness 0: the engine's log-probs are the trainer's up to rounding), round 1 by the weights
    before step 1 (staleness 1): its logged sampling_logp_difference is the gap between the two policies,
    computed from each policy's fp64 forward of every row alone."""
    options = ["--max_steps", "3", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_ratio", "0"]
    cfg = parse_config([*argv, *options])  # no warm-up: step 1 must move the policy
    trainer = Trainer(cfg)
    try:
        trainer.resync_engine()
        before = copy.deepcopy(trainer.model)
        trainer.producer.start()
        first = trainer.train_step()
        assert first["async/staleness"] == 0
        assert first["sampling/sampling_logp_difference/max"] < 1e-3
        after = copy.deepcopy(trainer.model)
        trainer.generate_round()  # round 1, sampled while step 1 trained
        ((packed,),) = trainer.state.buffer
        metrics = trainer.train_step()  # its weight comes from this step's own forward (gcpo_fast/update.py)
    finally:
        trainer.producer.stop()
        trainer.engine.close()
        trainer.producer.close()
    assert metrics["async/staleness"] == 1
    sampled = (~packed.golden).repeat_interleave(packed.completion_cu_seqlens.diff().long())
    old, new = row_logprobs_fp64(before, packed, 1.0), row_logprobs_fp64(after, packed, 1.0)
    torch.testing.assert_close(packed.engine_logp[sampled].double(), old[sampled], atol=1e-3, rtol=0)
    gap = (new - old)[sampled].abs()
    assert gap.mean() > 0.05  # a large step: the lag is far above the engines' rounding
    assert metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(gap.mean().item(), rel=1e-3, abs=1e-4)
    assert metrics["sampling/sampling_logp_difference/max"] == pytest.approx(gap.max().item(), rel=1e-3, abs=1e-4)
