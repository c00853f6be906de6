"""LoRA through PEFT (gcpo_fast/models/lora.py): one step equals a naive reference, the frozen head takes no gradient,
the merged weights a rollout engine gets, adapter checkpoints (PEFT's layout, exact resume, eval, merge), options."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_model import make_tiny_model, write_jsonl

from gcpo_fast.config import parse_config, resolve
from gcpo_fast.distributed.parallel import Policy
from gcpo_fast.errors import ConfigError
from gcpo_fast.kernels import PolicyLossConfig
from gcpo_fast.models.loading import load_causal_lm
from gcpo_fast.models.lora import PeftOptions, attach, merged_named_parameters
from gcpo_fast.packing import pack_rows
from gcpo_fast.train import train
from gcpo_fast.update import ModelWithLoss, OptimizerConfig, build_optimizer, optimizer_step

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("lora") / "model", tied=False)


def adapted(model_dir, **options):
    base = load_causal_lm(model_dir, device="cpu")
    return attach(base, PeftOptions(use_peft=True, lora_dropout=0.0, **options), base_path=model_dir)


def randomize_b(model, seed=0):
    """B starts at 0 (the adapted model is the base); a random B makes every merge and gradient non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def micro_batch(vocab):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (5, 3, 4)]
    completions = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (6, 2, 7)]
    return pack_rows(prompts, completions, advantages=torch.tensor([1.0, -0.5, 0.25]))


def naive_loss(model, mb):
    """GSPO-style sequence-level on-policy loss (ratio 1 carrying the gradient) from materialised fp64 logits,
    seq-mean-token-mean over rows, one decoder call per row."""
    bounds, cbounds = mb.cu_seqlens.tolist(), mb.completion_cu_seqlens.tolist()
    total = 0.0
    for r, (a, b) in enumerate(zip(bounds, bounds[1:])):
        logits = model(input_ids=mb.input_ids[:, a:b], position_ids=mb.position_ids[:, a:b]).logits[0].double()
        n = cbounds[r + 1] - cbounds[r]
        targets = mb.input_ids[0, b - n : b]
        logp = torch.log_softmax(logits[-n - 1 : -1], -1).gather(1, targets[:, None])[:, 0]
        ratio = torch.exp(logp.mean() - logp.mean().detach())
        total = total - ratio * mb.advantages[r]
    return total / len(cbounds[1:])


def test_one_lora_step_equals_the_naive_reference(model_dir):
    """One AdamW step through ModelWithLoss (fused op, frozen head) moves every adapter as SGD on the naive
    materialised loss's gradient would under the same AdamW; base weights and lm_head do not move."""
    model = adapted(model_dir)
    randomize_b(model)
    reference = copy.deepcopy(model)
    vocab = model.config.vocab_size
    mb = micro_batch(vocab)
    loss_config = PolicyLossConfig(importance_sampling_level="sequence", loss_agg_mode="seq-mean-token-mean")
    # adam_epsilon 1 >> |g|: the first AdamW step is lr * g / (|g| + 1), linear in g, so the updates compare the
    # gradients' scale too (at epsilon 1e-8 it is lr * sign(g) for all but the tiniest entries)
    optim = OptimizerConfig(learning_rate=1e-2, max_grad_norm=0.0, adam_epsilon=1.0)
    optimizer, scheduler = build_optimizer(model, optim, max_steps=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the lm_head and the base are frozen
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)  # only the adapters

    # the gradients first, then the step
    ModelWithLoss(model, loss_config)(mb, float(mb.num_rows))[0].backward()
    naive_loss(reference, mb).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if name in trainable:
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)

    policy = Policy(model, ModelWithLoss(model, loss_config), torch.device("cpu"), ddp=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer_step(policy, optimizer, scheduler, [mb], optim, loss_config, bf16=False)

    ref_opt, _ = build_optimizer(reference, optim, max_steps=1)
    naive_loss(reference, mb).backward()
    ref_opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if name in trainable:
            assert not torch.equal(p, before[name]), name
            torch.testing.assert_close(
                p - before[name], q - before[name], rtol=1e-3, atol=1e-7, msg=name
            )  # updates ~1e-4, fp32 gradients agree to ~1e-4
        else:
            assert torch.equal(p, before[name]), name


def test_frozen_head_gets_no_gradient_and_modules_to_save_trains_it(model_dir):
    for to_save, head_trains in ((None, False), (["lm_head"], True)):
        model = adapted(model_dir, lora_modules_to_save=to_save)
        mb = micro_batch(model.config.vocab_size)
        loss, _ = ModelWithLoss(model, PolicyLossConfig())(mb, 3.0)
        loss.backward()
        head = model.get_output_embeddings().weight
        assert head.requires_grad is head_trains
        assert (head.grad is not None) is head_trains
        assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_merged_names_and_values_are_the_merged_model(model_dir):
    """What a rollout engine receives: the base model's parameter names, each adapted weight merged (as PEFT's
    merge_and_unload gives it), the module to save's trained copy; the adapted model itself is left bit-exact."""
    plain = load_causal_lm(model_dir, device="cpu")
    for options in ({}, {"lora_modules_to_save": ["lm_head"]}, {"use_dora": True}, {"use_rslora": True}):
        model = adapted(model_dir, **options)
        randomize_b(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(1.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        merged = copy.deepcopy(model).merge_and_unload()
        got = dict(merged_named_parameters(model))
        assert list(got) == [n for n, _ in plain.named_parameters()], options
        for name, p in merged.named_parameters():
            torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(
            got["model.layers.0.self_attn.q_proj.weight"], plain.model.layers[0].self_attn.q_proj.weight
        )
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), name


def test_gradient_checkpointing_with_adapters(model_dir):
    model = attach(
        load_causal_lm(model_dir, device="cpu", gradient_checkpointing=True),
        PeftOptions(use_peft=True, lora_dropout=0.0),
        base_path=model_dir,
    )
    randomize_b(model)
    plain = copy.deepcopy(model)
    plain.base_model.model.gradient_checkpointing_disable()
    mb = micro_batch(model.config.vocab_size)
    for m in (model, plain):
        m.train()
        ModelWithLoss(m, PolicyLossConfig())(mb, 3.0)[0].backward()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_options(model_dir):
    cfg = parse_config(["--use_peft", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj"])
    assert (cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.lora.lora_target_modules) == (8, 32, ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="lora_r must be >= 1"):
        parse_config(["--use_peft", "--lora_r", "0"])
    base = load_causal_lm(model_dir, device="cpu")
    bad = PeftOptions(use_peft=True, lora_target_modules=["qproj"])
    with pytest.raises(ConfigError, match="lora_target_modules qproj: no such linear module; the model's linear"):
        attach(base, bad, base_path=model_dir)
    cfg = parse_config(["--use_peft", "--parallelism", "fsdp"])
    cfg.vllm.use_vllm = True  # (its own check wants vLLM installed)
    with pytest.raises(ConfigError, match="--use_peft with --use_vllm needs --parallelism ddp"):
        resolve(cfg)
    model = attach(base, PeftOptions(use_peft=True, lora_target_modules=["all-linear"]), base_path=model_dir)
    adapted_names = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted_names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_peft_missing_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # what an install without the extra sees
    with pytest.raises(ConfigError, match=r'--use_peft needs PEFT: pip install -e "\.\[lora\]"'):
        parse_config(["--use_peft"])
    parse_config([])  # without --use_peft nothing imports it


def run_config(tmp_path, output_dir, *extra):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, n=12)
        make_tiny_model(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--dataset", str(data), "--output_dir", str(output_dir)]
    args += ["--num_generations", "2", "--per_device_train_batch_size", "4", "--steps_per_generation", "3"]
    args += ["--max_completion_length", "24", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "5e-2"]
    args += ["--eval_steps", "0", "--use_peft", "--lora_r", "4", "--lora_dropout", "0.1"]
    return parse_config(args + list(extra))


def test_kill_and_resume_is_exact_and_the_checkpoint_is_a_peft_adapter(tmp_path, capsys):
    whole = tmp_path / "whole"
    train(run_config(tmp_path, whole))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    train(run_config(tmp_path, resumed, "--resume"))
    a, b = (load_file(run / "checkpoint-4" / "adapter_model.safetensors") for run in (whole, resumed))
    mid = load_file(whole / "checkpoint-2" / "adapter_model.safetensors")
    assert set(a) == set(b) and all("lora_" in k for k in a)
    assert any(not torch.equal(a[k], mid[k]) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # PEFT loads it on its base, as the run's model
    checkpoint = whole / "checkpoint-4"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "model").resolve()
    )
    loaded = peft.PeftModel.from_pretrained(load_causal_lm(tmp_path / "model", device="cpu"), str(checkpoint))
    assert torch.equal(dict(loaded.named_parameters())[_lora_name(loaded)], a[_saved_name(_lora_name(loaded))])

    from gcpo_fast.eval import main as eval_main
    from gcpo_fast.models.lora import main as lora_main

    capsys.readouterr()
    eval_main(["--model", str(checkpoint), "--eval_num_problems", "4", "--max_completion_length", "8"])
    assert json.loads(capsys.readouterr().out)["num_problems"] == 4
    out = tmp_path / "merged"
    lora_main(["merge", "--adapter", str(checkpoint), "--out", str(out)])
    merged = load_causal_lm(out, device="cpu")
    expected = dict(merged_named_parameters(loaded))
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-6, msg=name)


def _lora_name(model):
    return next(n for n, _ in model.named_parameters() if "lora_A" in n)


def _saved_name(name):
    return name.replace(".default", "")


def test_a_full_fine_tuning_checkpoint_is_not_resumed_with_adapters(tmp_path):
    run = tmp_path / "run"
    cfg = run_config(tmp_path, run, "--max_steps", "2")
    cfg.lora.use_peft = False
    train(cfg)
    with pytest.raises(ValueError, match="--use_peft True .the checkpoint's: False"):
        train(run_config(tmp_path, run, "--max_steps", "3", "--resume"))


@pytest.mark.parametrize(
    "backend, old_logp",
    [("torch", False), ("torch", True), ("triton", False), ("triton", True)],
    ids=["torch-gradient-in-forward", "torch-recompute", "triton-on-policy", "triton-off-policy"],
)
def test_the_fused_op_does_no_dW_work_for_a_frozen_head(backend, old_logp):
    """A weight that needs no gradient gets none, and the op spends exactly the dW GEMM's 2NVd FLOPs less
    (every matrix product torch runs, in-place and out= forms included, counted over forward and backward; the
    Triton kernels' own products are the same in both runs), on both backends and both backward paths (torch:
    sequence-level off-policy rows longer than a chunk take the recompute path)."""
    from gcpo_fast.kernels import LossInputs, linear_policy_loss

    n, d, v = 24, 16, 96
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    old = torch.randn(n, generator=g) * 0.01 - 4.0 if old_logp else None
    inputs = LossInputs(torch.tensor([1.0, -1.0]), cu, old_logp=old)
    config = PolicyLossConfig(importance_sampling_level="sequence", backend=backend, workspace_bytes=4 * v * 4)

    def flops(weight_trains):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_trains)
        with GemmFlops() as counter:
            loss, _ = linear_policy_loss(h, w, targets, inputs, config)
            loss.backward()
        assert h.grad is not None and (w.grad is not None) is weight_trains
        return counter.flops, h.grad

    full, dx_full = flops(True)
    frozen, dx_frozen = flops(False)
    assert full - frozen == 2 * n * v * d
    torch.testing.assert_close(dx_frozen, dx_full, rtol=0, atol=0)


class GemmFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """2 m k n for every aten mm / addmm call (any overload: addmm_, mm.out), from its operands' shapes."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def test_fsdp_on_two_ranks_trains_the_adapters_and_resumes_exactly(tmp_path):
    """FSDP2 on 2 gloo ranks with adapters (frozen base shards beside trained adapters): the adapters move, the
    checkpoint is PEFT's adapter with the sharded optimizer state, kill-and-resume gives the same adapters, and DDP
    reaches the same adapters in the same steps."""
    from test_fsdp import _train_worker, run_args, spawn

    from gcpo_fast.distributed.parallel import OPTIMIZER_FOLDER

    torch.set_num_threads(1)
    model = make_tiny_model(tmp_path / "model", tied=False)
    data = write_jsonl(tmp_path / "train.jsonl", n=12)
    lora = ["--use_peft", "--lora_r", "4", "--lora_dropout", "0", "--learning_rate", "5e-2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    spawn(_train_worker, 2, [run_args(model, data, whole, 4, *lora)])
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    spawn(_train_worker, 2, [run_args(model, data, resumed, 4, *lora, "--resume")])
    assert (whole / "checkpoint-2" / OPTIMIZER_FOLDER / ".metadata").is_file()
    a, b = (load_file(run / "checkpoint-4" / "adapter_model.safetensors") for run in (whole, resumed))
    mid = load_file(whole / "checkpoint-2" / "adapter_model.safetensors")
    assert all("lora_" in k for k in a) and any(not torch.equal(a[k], mid[k]) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the same 2 steps under DDP (replicated adapters, all-reduced gradients) reach the same adapters
    ddp = tmp_path / "ddp"
    spawn(_train_worker, 2, [run_args(model, data, ddp, 2, *lora, "--parallelism", "ddp")])
    c = load_file(ddp / "checkpoint-2" / "adapter_model.safetensors")
    for k in mid:
        torch.testing.assert_close(c[k], mid[k], rtol=0, atol=1e-5, msg=k)
