"""The trainer as a user runs it: `python -m gcpo_fast.train` as a command, and two CPU processes under DDP."""

import json
import os
import subprocess
import sys

import torch
from tiny_model import child_env
from trainer_steps import policy_of, setup, sgd, step
from transformers import AutoModelForCausalLM, AutoTokenizer

from gcpo_fast.config import parse_config
from gcpo_fast.distributed.parallel import free_port
from gcpo_fast.engines.base import Rows
from gcpo_fast.packing import pack
from gcpo_fast.run import curves


def test_command_line_run(tmp_path, files):
    model_dir, data = files
    out = tmp_path / "run"
    env = child_env()
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
        "frac_reward_all_right",
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
    # a quiet terminal: one line per evaluation (steps 0, 2, 3), none per step; the picture named at the end
    printed = done.stdout.splitlines()
    evaluations = [line.split(":")[0] for line in printed if line.startswith("step ") and "held-out" in line]
    assert evaluations == ["step 0", "step 2", "step 3"]
    assert not [line for line in printed if line.startswith("step 1:")]
    if curves.available():  # the plot extra (matplotlib): the picture, named at the end; else one line saying how
        assert f"curves: {out / 'curves.png'}" in printed and (out / "curves.png").stat().st_size > 0
    else:
        assert curves.MISSING in printed and not (out / "curves.png").exists()
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
    from gcpo_fast.distributed.parallel import init_distributed
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
        torch.distributed.barrier()  # every rank done before the group goes (rank 0 hosts the store)
    finally:
        torch.distributed.destroy_process_group()


def test_two_cpu_processes(tmp_path, files, one_thread):
    import torch.multiprocessing as mp

    port = free_port()
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
