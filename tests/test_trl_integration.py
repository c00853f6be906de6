"""FusedGRPOTrainer (gcpo_fast.integrations.trl) against TRL's own GRPOTrainer, on a tiny Qwen2 built here.

    python -m pytest -q tests/test_trl_integration.py          # about two minutes on one core (DDP: one)

Each comparison trains the same seeded model twice, once with trl.GRPOTrainer and once with the subclass,
and asserts identical rollouts (so every update before the last generation agreed too) and equal loss
and gradient norm (1e-5 relative), entropy and clip ratios at every step.
Nothing is downloaded: the dataset is a list of prompts in memory, the reward a function of the text.
Skipped when trl is not installed (the "test" extra installs it).
"""

import gc
import os

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402 (trl's dependency)
from tiny_model import make_tokenizer, problem  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from gcpo_fast.distributed.parallel import free_port  # noqa: E402
from gcpo_fast.integrations.trl import (  # noqa: E402
    FusedGRPOTrainer,
    SelfCheckError,
    check_trl_version,
    unsupported_option,
)
from gcpo_fast.models.loading import is_checkpointing  # noqa: E402

TOKENIZER = make_tokenizer(chat_template=False)
METRICS = (
    "loss",
    "grad_norm",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
)
# On-policy: two optimizer steps of two micro-batches, each step generating afresh, so the second step's
# rollouts come from the updated model. Off-policy: one generation batch reused for 4 steps (two passes of
# two steps: steps_per_generation 4 > gradient_accumulation_steps 2), so ratios move and clipping acts;
# the fifth step generates from the model the four updates made.
POLICY = {"on": dict(max_steps=2), "off": dict(max_steps=5, steps_per_generation=4, num_iterations=2, delta=1.15)}


def length_reward(completions, **columns):
    """A reward that differs within a group: the completion's length in characters, mod 3."""
    return [float(len(c) % 3) for c in completions]


def tiny_model():
    config = Qwen2Config(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def make_config(tmp_path, **over):
    # exponential_decay_length_penalty raises the end-of-sequence logit at sampling time, so completions end
    # at varied lengths and some are truncated (masked by mask_truncated_completions): rows of unequal length,
    # and empty ones.
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=2,
        max_completion_length=8,
        learning_rate=1e-2,
        temperature=0.7,
        mask_truncated_completions=True,
        epsilon=0.1,
        beta=0.0,
        generation_kwargs={"exponential_decay_length_penalty": (1, 2.0)},
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    options.update(over)
    return trl.GRPOConfig(**options)


def recording(trainer_class):
    """trainer_class, also keeping each generation batch's completion ids (in trainer.rollouts)."""

    class Recording(trainer_class):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.rollouts.append((out["completion_ids"].clone(), out["completion_mask"].clone()))
            return out

    return Recording


def train(trainer_class, tmp_path, eval_prompts=0, trainer_kwargs=None, **config):
    prompts = [problem(i)["prompt"] for i in range(8)]
    eval_data = Dataset.from_dict({"prompt": prompts[:eval_prompts]}) if eval_prompts else None
    trainer = recording(trainer_class)(
        model=tiny_model(),
        reward_funcs=length_reward,
        args=make_config(tmp_path, **config),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        eval_dataset=eval_data,
        processing_class=TOKENIZER,
        **(trainer_kwargs or {}),
    )
    trainer.rollouts = []
    trainer.train()
    return trainer


def step_logs(trainer):
    return [{k: log[k] for k in METRICS if k in log} for log in trainer.state.log_history if "loss" in log]


def assert_same_training(stock, fused):
    """stock and fused: trainers, or (rollouts, step_logs) pairs of them."""
    (rollouts_a, logs_a), (rollouts_b, logs_b) = (
        (t.rollouts, step_logs(t)) if hasattr(t, "rollouts") else t for t in (stock, fused)
    )
    assert len(rollouts_a) == len(rollouts_b) >= 2
    for (ids_a, mask_a), (ids_b, mask_b) in zip(rollouts_a, rollouts_b):
        assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
    assert len(logs_a) == len(logs_b) >= 2
    for step, (a, b) in enumerate(zip(logs_a, logs_b)):
        assert a.keys() == b.keys() == set(METRICS), step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (step, a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (step, a, b)
        assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5), (step, a, b)
        for name in METRICS[3:]:
            assert b[name] == pytest.approx(a[name], abs=1e-6, nan_ok=True), (step, name, a, b)


@pytest.mark.parametrize("policy", ["on", "off"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_fused_trainer_matches_stock_trl(tmp_path, loss_type, level, policy):
    options = dict(loss_type=loss_type, importance_sampling_level=level, **POLICY[policy])
    stock = train(trl.GRPOTrainer, tmp_path / "stock", **options)
    fused = train(FusedGRPOTrainer, tmp_path / "fused", **options)
    assert_same_training(stock, fused)
    lengths = torch.cat([mask.sum(1) for _, mask in stock.rollouts])
    assert (lengths == 0).any() and len(set(lengths.tolist())) >= 3  # masked truncated rows, unequal lengths
    clipped = sum(log["clip_ratio/region_mean"] for log in step_logs(stock))
    assert clipped == 0 if policy == "on" else clipped > 0  # off-policy: the clip acted


def test_gradient_checkpointing_matches_stock_trl(tmp_path, one_thread):
    options = dict(loss_type="grpo", importance_sampling_level="sequence", gradient_checkpointing=True, **POLICY["off"])
    stock = train(trl.GRPOTrainer, tmp_path / "stock", **options)
    fused = train(FusedGRPOTrainer, tmp_path / "fused", **options)
    assert is_checkpointing(fused.model)
    assert_same_training(stock, fused)


def _ddp_worker(rank, world, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    try:
        runs = {}
        for name, trainer_class in (("stock", trl.GRPOTrainer), ("fused", FusedGRPOTrainer)):
            trainer = train(trainer_class, out / name, loss_type="dapo", **POLICY["off"])
            assert trainer.accelerator.num_processes == world
            runs[name] = dict(
                rollouts=trainer.rollouts,
                logs=step_logs(trainer),
                weights=[p.detach().clone() for p in trainer.model.parameters()],
            )
        torch.save(runs, out / f"rank{rank}.pt")
        # DDP's reducers hold the process group: drop them and meet every rank before it goes, or gloo's destructor
        # can wait on a peer that has already left (seen once: a hang in ~ProcessGroupGloo at exit)
        del trainer
        gc.collect()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_cpu_processes_under_ddp(tmp_path, one_thread):
    """dapo divides by num_items_in_batch / world; the fused forward goes through DDP's wrapper, so the
    ranks' gradients are averaged and their weights stay equal."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_ddp_worker, args=(2, port, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["stock"]["rollouts"][0][0], ranks[1]["stock"]["rollouts"][0][0])  # own prompts
    for runs in ranks:
        assert_same_training(
            (runs["stock"]["rollouts"], runs["stock"]["logs"]), (runs["fused"]["rollouts"], runs["fused"]["logs"])
        )
    for a, b in zip(ranks[0]["fused"]["weights"], ranks[1]["fused"]["weights"]):
        assert torch.equal(a, b)  # DDP kept the ranks in step


def test_evaluation_loss_matches_stock_trl(tmp_path, one_thread):
    """Evaluation divides differently (no accumulation, dapo's generation batch not split)."""
    options = dict(loss_type="dapo", max_steps=1, steps_per_generation=4, eval_strategy="no")
    losses = []
    for trainer_class in (trl.GRPOTrainer, FusedGRPOTrainer):
        trainer = train(trainer_class, tmp_path / trainer_class.__name__, eval_prompts=4, **options)
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[0] != 0 and losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)


def test_self_check_runs_every_k_steps_and_leaves_only_our_metrics(tmp_path, one_thread):
    checked, metric_lists = [], []

    class Counting(FusedGRPOTrainer):
        def self_check(self, model, inputs, loss, mode):
            checked.append(self.state.global_step)
            super().self_check(model, inputs, loss, mode)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                metric_lists.append(len(self._metrics["train"]["entropy"]))
            super().log(logs, *args, **kwargs)

    stock = train(trl.GRPOTrainer, tmp_path / "stock", loss_type="bnpo", max_steps=5)
    fused = train(Counting, tmp_path / "fused", loss_type="bnpo", max_steps=5, trainer_kwargs={"self_check_every": 2})
    assert checked == [0, 2, 4]
    assert metric_lists == [2] * 5  # one entry per micro-batch: TRL's own loss in the check logged nothing
    assert_same_training(stock, fused)


class PreTrl110Dapo(FusedGRPOTrainer):
    """A deliberately wrong divisor: dapo as TRL 1.0-1.9 divided (num_items_in_batch / world, with no
    rescaling to one accumulation window), which is off by gradient_accumulation_steps / steps_per_generation."""

    def divisor(self, mask, inputs, mode):
        return "token-mean", inputs["num_items_in_batch"].float() / self.accelerator.num_processes


class ForgetsAccumulation(FusedGRPOTrainer):
    """A deliberately wrong divisor: grpo without the accumulation steps. Its loss of normalised advantages
    is ~0 either way, so only the unit-advantage probe of the self-check can see the factor."""

    def divisor(self, mask, inputs, mode):
        return "seq-mean-token-mean", mask.shape[0]


@pytest.mark.parametrize("trainer_class, loss_type", [(PreTrl110Dapo, "dapo"), (ForgetsAccumulation, "grpo")])
def test_self_check_catches_a_wrong_divisor(tmp_path, trainer_class, loss_type):
    with pytest.raises(SelfCheckError, match=f"loss_type={loss_type}.*relative error"):
        train(trainer_class, tmp_path, loss_type=loss_type, steps_per_generation=4)


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(beta=0.04), "beta=0.04"),
        (dict(loss_type="cispo"), "loss_type='cispo'"),
        (dict(loss_type="luspo", importance_sampling_level="sequence"), "loss_type='luspo'"),
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
        (dict(entropy_coef=0.01), "entropy_coef=0.01"),
        (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold=0.5"),
    ],
)
def test_unsupported_option_raises_naming_it(tmp_path, option, match):
    args = make_config(tmp_path, **option)
    with pytest.raises(ValueError, match=f"FusedGRPOTrainer: {match}"):
        FusedGRPOTrainer(
            model=tiny_model(),
            reward_funcs=length_reward,
            args=args,
            processing_class=TOKENIZER,
            train_dataset=Dataset.from_dict({"prompt": ["What is 1 + 1?"] * 4}),
        )


def test_vllm_correction_and_transformed_logits_are_refused(tmp_path):
    args = make_config(tmp_path)
    assert unsupported_option(args, tiny_model()) is None
    args.use_vllm, args.vllm_importance_sampling_correction = True, True  # the trainer would need vLLM installed
    assert unsupported_option(args, tiny_model()).startswith("vllm_importance_sampling_correction=True")
    args.vllm_importance_sampling_correction = False
    assert unsupported_option(args, tiny_model()) is None
    model = tiny_model()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in unsupported_option(make_config(tmp_path), model)


@pytest.mark.parametrize(
    "version, supported",
    [("1.9.2", False), ("1.10.0", True), ("1.16.0", True), ("1.16.3", True), ("1.17.0", False), ("2.0.0", False)],
)
def test_trl_version_range(version, supported):
    if supported:
        check_trl_version(version)
    else:
        with pytest.raises(ImportError, match=rf"supports trl 1\.10\.x to 1\.16\.x, installed: trl {version}"):
            check_trl_version(version)
