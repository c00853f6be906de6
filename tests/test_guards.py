"""What stops a run from destroying itself or dying with a traceback: non-finite steps are skipped and
counted, poisoned weights are never saved, rewinding is refused, and every user mistake after setup is one
line on stderr with exit status 1."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_model import make_tiny_model, write_jsonl
from transformers import AutoModelForCausalLM

from gcpo_fast.config import parse_config
from gcpo_fast.distributed.parallel import parallelize
from gcpo_fast.engines.base import Rows
from gcpo_fast.packing import pack
from gcpo_fast.prepare import prepare
from gcpo_fast.train import main, train
from gcpo_fast.update import ModelWithLoss, build_optimizer, optimizer_step


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    return make_tiny_model(root / "model"), write_jsonl(root / "train.jsonl", n=12)


def argv(files, out, *extra):
    model, data = files
    return [
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--num_generations",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--max_completion_length",
        "24",
        "--eval_steps",
        "0",
        "--learning_rate",
        "1e-2",
        *extra,
    ]


def one_line_error(capsys, argv_) -> str:
    """main's exit message (what Python prints as the last line on stderr); checks it is one line."""
    with pytest.raises(SystemExit) as e:
        main(argv_)
    message = str(e.value.code)
    assert message.startswith("python -m gcpo_fast.train: error: ") and "\n" not in message
    return message


def test_a_non_finite_step_is_skipped(files, one_thread):
    """NaN weights make the fused op's log-sum-exp non-finite: no optimizer or scheduler step, flagged."""
    cfg = parse_config(argv(files, "unused"))
    model = AutoModelForCausalLM.from_pretrained(files[0])
    policy = parallelize(ModelWithLoss(model, cfg.loss_config()))
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.run.max_steps)
    mb = pack(
        Rows([[1, 2, 3]] * 2, [[5, 6, 7], [8, 9]], [False, False], ["", ""], advantages=torch.tensor([1.0, -1.0])),
        False,
    )

    def step():
        return optimizer_step(policy, optimizer, scheduler, [mb], cfg.optim, cfg.loss_config(), cfg.model.bf16)

    assert step()["step_skipped"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.get_input_embeddings().weight[7, 0] = math.nan
    metrics = step()
    assert metrics["step_skipped"] == 1.0 and math.isnan(metrics["loss"])
    assert scheduler.last_epoch == 1 and optimizer.state_dict()["state"][0]["step"] == 1  # only the first step
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert sum(changed) == 1 and all(p.grad is None for p in model.parameters())  # just the NaN we planted


def test_runaway_weights_stop_the_run_without_a_poisoned_checkpoint(files, tmp_path, capsys, one_thread):
    """--learning_rate 1e30 with a checkpoint every step and only one kept: the run stops with one line, and
    what is left on disk is loadable and finite."""
    out = tmp_path / "run"
    message = one_line_error(
        capsys,
        argv(files, out, "--learning_rate", "1e30", "--max_steps", "6", "--save_steps", "1", "--save_total_limit", "1"),
    )
    assert "NaN or inf" in message
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints, "the first step's checkpoint was written"
    for path in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


def test_consecutive_skips_stop_the_run(files, tmp_path, capsys, monkeypatch):
    """Every step non-finite (a fused op that always overflows): skipped, counted, then a one-line stop after
    --max_skipped_steps, with a metrics line for each skipped step."""
    import gcpo_fast.update as update

    def overflow(*args, **kwargs):
        raise FloatingPointError("non-finite log-sum-exp at token 0: the logits (overflow) has non-finite values")

    monkeypatch.setattr(update, "linear_policy_loss", overflow)
    out = tmp_path / "run"
    message = one_line_error(capsys, argv(files, out, "--max_steps", "6", "--max_skipped_steps", "2"))
    assert "step 2: 2 steps in a row had a non-finite loss or gradient norm" in message
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["skipped_steps"]) for m in lines] == [(1, 1), (2, 2)]
    assert "warning: step 1: loss nan" in capsys.readouterr().err  # the warning names the step and the cause


def test_rewinding_is_refused_and_branching_works(files, tmp_path, one_thread):
    out = tmp_path / "run"
    train(parse_config(argv(files, out, "--max_steps", "4", "--save_steps", "2")))
    with pytest.raises(ValueError, match=r"holds newer checkpoints \(checkpoint-4\)"):
        prepare(parse_config(argv(files, out, "--max_steps", "3", "--resume", str(out / "checkpoint-2"))))
    branch = tmp_path / "branch"  # the same checkpoint continued in a new run directory
    train(parse_config(argv(files, branch, "--max_steps", "3", "--resume", str(out / "checkpoint-2"))))
    assert [p.name for p in branch.glob("checkpoint-*")] == ["checkpoint-3"]
    assert [json.loads(line)["step"] for line in (branch / "metrics.jsonl").read_text().splitlines()] == [3]


def test_errors_after_setup_are_one_line(files, tmp_path, capsys, one_thread):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "cannot write there" in one_line_error(capsys, argv(files, blocker / "run", "--max_steps", "1"))
    # chat-message prompts and a tokenizer without a chat template
    plain = make_tiny_model(tmp_path / "plain", chat_template=False)
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        rows=[
            {"prompt": [{"role": "user", "content": f"{i} + 1?"}], "solution": f"\\boxed{{{i + 1}}}"} for i in range(4)
        ],
    )
    message = one_line_error(capsys, argv((plain, chat), tmp_path / "chat", "--max_steps", "1"))
    assert "needs a tokenizer with a chat template" in message
    # DAPO's sampling cap
    message = one_line_error(
        capsys,
        argv(
            files,
            tmp_path / "dapo",
            "--loss_type",
            "dapo",
            "--max_steps",
            "1",
            "--reward_funcs",
            "tiny_model:zero_reward",
            "--max_num_gen_batches",
            "2",
        ),
    )
    assert "after 2 generation batches" in message and "--max_num_gen_batches" in message
    # resuming with another dataset
    out = tmp_path / "run"
    train(parse_config(argv(files, out, "--max_steps", "1")))
    other = write_jsonl(tmp_path / "other.jsonl", n=20)
    message = one_line_error(capsys, argv((files[0], other), out, "--max_steps", "2", "--resume"))
    assert "dataset" in message


def test_summary_ignores_stray_folders_and_unwritten_files(files, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    (out / "checkpoint-best").mkdir(parents=True)
    (out / "checkpoint-best" / "trainer_state.pt").write_bytes(b"")
    train(parse_config(argv(files, out, "--max_steps", "1", "--sample_steps", "0")))
    printed = capsys.readouterr().out
    assert f"model: {out / 'checkpoint-1'}" in printed and "samples.jsonl" not in printed
