"""The training loop: rollouts -> rewards -> golden rows -> advantages -> packed fused-loss update.

    python -m gcpo_fast.train                                         # shipped model on the builtin math task (CPU ok)
    python -m gcpo_fast.train --help                                  # every option (gcpo_fast/config.py)
    python -m gcpo_fast.train --model ~/Qwen2.5-Math-1.5B --dataset train.jsonl --output_dir runs/q --max_steps 500
    python -m gcpo_fast.train --loss_type dapo --config dapo.yaml     # another method; options from a file
    python -m gcpo_fast.train --output_dir runs/q --resume            # continue from the latest checkpoint, exactly
    torchrun --nproc_per_node 8 -m gcpo_fast.train ...                # one process per GPU (DDP; gloo on CPUs)

One optimizer step (DESIGN.md, "The trainer: data flow of one step"):
1. When the buffer of prepared steps is empty, a generation round: the next prompts (per rank its own),
   G completions each with `generate` (rollout.py), rewards (+ DAPO's overlong penalty); DAPO's dynamic
   sampling or GPG's threshold may sample more prompts. Then GCPO: a group whose G rewards are all wrong
   gets its golden answer as a row (append or replace), tokenised after the same prompt ids. Advantages
   per group over the rows. The rows are shuffled and split into steps_per_generation micro-batches,
   gradient_accumulation_steps per optimizer step, the whole repeated num_iterations times. When the
   round is reused (more than one optimizer step or iteration), each micro-batch's old log-probs come
   from one forward-only fused pass now, golden rows included; otherwise old_logp is None (on-policy).
2. The step: forward + backward of its micro-batches with the fused loss, normalised by the step's global
   token (or row) count, gradient clipping, AdamW, scheduler (update.py).
3. Metrics to metrics.jsonl (TRL's names), rollouts to samples.jsonl, evaluation, checkpoint.

Metrics are means over ranks. Rollout statistics (reward*, frac_reward_zero_std, frac_reward_all_wrong,
completions/*) count every sampled rollout of the round and never a golden row; gcpo/* count the golden
rows of the groups kept; the update's (loss, entropy, clip_ratio/*) cover the rows trained on, golden rows
included. At the end, the held-out accuracy of the first and last evaluation (overall and per level) and
the paths of metrics.jsonl, samples.jsonl and the final checkpoint are printed.
"""
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from gcpo_fast import groups
from gcpo_fast.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from gcpo_fast.config import DEFAULT_MODEL, ConfigError, TrainConfig, parse_config
from gcpo_fast.data import PromptSampler
from gcpo_fast.eval import count_correct, level_summary, summarize
from gcpo_fast.logger import RunLogger
from gcpo_fast.packing import default_attn_implementation
from gcpo_fast.rewards import compute_rewards, load_reward_function, overlong_penalty, reward_function_name
from gcpo_fast.rollout import encode_completion, encode_prompts, eos_token_ids, generate
from gcpo_fast.sources import load_records
from gcpo_fast.update import PolicyLoss, autocast, behaviour_logprobs, build_optimizer, optimizer_step


# ---- processes -------------------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun (WORLD_SIZE > 1) joins the process group first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def _reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    keys = sorted(metrics)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {k: v / world for k, v in zip(keys, _reduce([metrics[k] for k in keys]))}


# ---- setup -----------------------------------------------------------------------------------------------

def prepare(cfg: TrainConfig) -> dict:
    """Everything that can fail on bad input, before any model is loaded: the data, the reward functions,
    the run directory and the checkpoint to resume. Raises ValueError / FileNotFoundError."""
    if cfg.model == DEFAULT_MODEL and not Path(DEFAULT_MODEL).is_dir():
        raise ValueError(f"the shipped model is missing from {DEFAULT_MODEL}: build it with "
                         "`python -m gcpo_fast.make_default_model`, or pass --model")
    golden = cfg.golden_answer != "off"
    columns = dict(prompt_column=cfg.prompt_column, golden_column=cfg.golden_column, answer_column=cfg.answer_column)
    records = load_records(cfg.dataset, split="train", num_problems=cfg.builtin_num_problems, seed=cfg.seed,
                           levels=cfg.builtin_levels,
                           require_golden=golden, **columns)
    eval_dataset = cfg.eval_dataset or ("builtin" if cfg.dataset == "builtin" else None)
    eval_records = None
    if cfg.eval_steps and eval_dataset:
        # the builtin held-out split covers the levels trained on (python -m gcpo_fast.eval scores any level)
        eval_records = load_records(eval_dataset, split="test", num_problems=cfg.eval_num_problems,
                                    levels=sorted(set(cfg.builtin_levels)), **columns)
        eval_records = eval_records[: cfg.eval_num_problems]
    funcs = [load_reward_function(spec) for spec in cfg.reward_funcs]
    resume = find_checkpoint(cfg.output_dir, cfg.resume) if cfg.resume else None
    if resume is None and list_checkpoints(cfg.output_dir):
        raise ValueError(f"output_dir {cfg.output_dir} already holds checkpoints: pass --resume to continue that "
                         "run, or choose another output_dir")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prompts = cfg.per_device_train_batch_size * cfg.steps_per_generation // cfg.num_generations
    if prompts * world > len(records):
        raise ValueError(f"a generation round takes {prompts} prompts x {world} processes, but the dataset has only "
                         f"{len(records)}")
    return dict(records=records, eval_records=eval_records, reward_funcs=funcs, resume=resume)


def load_model(path, device, cfg: TrainConfig):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=default_attn_implementation()).to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ---- a generation round ----------------------------------------------------------------------------------

def sample_groups(cfg: TrainConfig, model, tokenizer, sampler, reward_funcs) -> tuple[dict, dict]:
    """Generate and score groups until the round is full; returns (the groups to train on, rollout metrics).
    DAPO keeps only groups with varied rewards until it has a round's worth; GPG samples whole extra
    batches until valid rows / rows >= min_inverse_alpha. Every rank draws as many batches as the others."""
    G, P = cfg.num_generations, cfg.per_device_train_batch_size * cfg.steps_per_generation // cfg.num_generations
    seen = dict(records=[], prompt_ids=[], completion_ids=[], truncated=[], texts=[], rewards=[], per_func=[])
    for num_batches in itertools.count(1):
        batch = next(sampler)
        prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in batch], cfg.max_prompt_length)
        with autocast(cfg, model.device):
            out = generate(model, tokenizer, prompt_ids, G, max_completion_length=cfg.max_completion_length,
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        rows = [r for r in batch for _ in range(G)]
        # TRL: conversational prompts get their completions as assistant messages
        completions = [t if isinstance(r["prompt"], str) else [{"role": "assistant", "content": t}]
                       for r, t in zip(rows, out.texts)]
        rewards, per_func = compute_rewards(reward_funcs, [r["prompt"] for r in rows], completions, rows,
                                            cfg.reward_weights, completion_ids=out.completion_ids)
        if cfg.overlong_buffer_len:
            rewards += torch.tensor(overlong_penalty([len(c) for c in out.completion_ids], cfg.max_completion_length,
                                                     cfg.overlong_buffer_len, cfg.overlong_penalty_factor))
        for key, value in (("records", batch), ("prompt_ids", prompt_ids), ("completion_ids", out.completion_ids),
                           ("truncated", out.truncated), ("texts", out.texts)):
            seen[key] += value
        seen["rewards"].append(rewards.view(-1, G))
        seen["per_func"].append(per_func)
        grid = torch.cat(seen["rewards"])
        if cfg.dynamic_sampling:
            kept = int(groups.dapo_filter(grid).sum())
            if groups.dapo_sampling_done(int(_reduce([kept], dist.ReduceOp.MIN)[0]), P, num_batches,
                                         cfg.max_num_gen_batches):
                break
        elif cfg.min_inverse_alpha > 0:
            zero = groups.zero_std_groups(grid.flatten(), groups.grid_group_index(*grid.shape))
            done = groups.gpg_sampling_done(int((~zero).sum()) * G, grid.numel(), cfg.min_inverse_alpha)
            if _reduce([float(done)], dist.ReduceOp.MIN)[0] or 0 < cfg.max_num_gen_batches <= num_batches:
                break
        else:
            break
    keep = torch.arange(grid.shape[0])
    if cfg.dynamic_sampling:
        keep = groups.dapo_filter(grid).nonzero().flatten()[:P]  # trim the surplus, as verl does
    per_func = torch.cat(seen["per_func"])
    lengths = torch.tensor([len(c) for c in seen["completion_ids"]], dtype=torch.float)
    metrics = {
        "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(seen["truncated"]) / len(seen["truncated"]),
        "num_gen_batches": num_batches,
        # every sampled group, kept or not (gcpo/frac_all_wrong counts the kept ones: none under DAPO's filter)
        "frac_reward_all_wrong": groups.all_wrong_groups(grid, cfg.correct_reward).float().mean().item(),
        **{f"rewards/{reward_function_name(f)}/mean": per_func[:, j].nanmean().nan_to_num().item()
           for j, f in enumerate(reward_funcs)},
    }
    return dict(seen, grid=grid, keep=keep), metrics


def build_rows(cfg: TrainConfig, tokenizer, sampled: dict, metrics: dict) -> tuple[dict, list[dict]]:
    """Golden rows and advantages over the kept groups: (rows, a few samples for samples.jsonl).
    rows = prompt_ids, completion_ids, truncated (lists) and advantages ([N] tensor), group by group."""
    G, keep, grid = cfg.num_generations, sampled["keep"].tolist(), sampled["grid"]
    records = [sampled["records"][p] for p in keep]
    g = groups.add_golden_rows(grid[keep], [r["golden"] is not None for r in records], mode=cfg.golden_answer,
                               correct_reward=cfg.correct_reward)
    if cfg.loss_type == "gpg":
        advantages, alpha = groups.gpg_advantages(g.rewards, g.group_index, cfg.scale_rewards)
        metrics["gpg/alpha"] = alpha
    else:
        advantages = groups.group_advantages(g.rewards, g.group_index, cfg.scale_rewards)
    metrics.update(groups.group_metrics(grid, g))  # reward stats: every sampled rollout; gcpo/*: the kept groups
    rows = dict(prompt_ids=[], completion_ids=[], truncated=[], advantages=advantages)
    samples = []
    for k, (p, r) in enumerate(zip(g.group_index.tolist(), g.rollout_index.tolist())):
        record, prompt_ids = records[p], sampled["prompt_ids"][keep[p]]
        if g.is_golden[k]:
            ids, cut = encode_completion(tokenizer, record["golden"], cfg.max_completion_length)
            text = record["golden"]
        else:
            row = keep[p] * G + r % G
            ids, cut, text = sampled["completion_ids"][row], sampled["truncated"][row], sampled["texts"][row]
        rows["prompt_ids"].append(prompt_ids)
        rows["completion_ids"].append(ids)
        rows["truncated"].append(cut)
        if p < cfg.num_samples_to_log and (g.is_golden[k] or r % G == 0):  # first rollout + golden row per group
            prompt = record["prompt"] if isinstance(record["prompt"], str) else record["prompt"][-1]["content"]
            samples.append(dict(prompt=prompt, completion=text, answer=record["answer"], golden=bool(g.is_golden[k]),
                                reward=g.rewards[k].item(), advantage=advantages[k].item(), truncated=cut))
    return rows, samples


def split_steps(cfg: TrainConfig, rows: dict, model, ref_model) -> list[list[dict]]:
    """Shuffle the rows into steps_per_generation micro-batches, gradient_accumulation_steps per optimizer step,
    with old log-probs when the round is reused and reference log-probs when beta > 0; repeated
    num_iterations times."""
    reused = cfg.steps_per_generation > cfg.gradient_accumulation_steps or cfg.num_iterations > 1
    order = torch.randperm(len(rows["completion_ids"]))
    micro_batches = []
    for index in torch.tensor_split(order, cfg.steps_per_generation):
        idx = index.tolist()
        mb = {k: [rows[k][i] for i in idx] for k in ("prompt_ids", "completion_ids", "truncated")}
        mb["advantages"] = rows["advantages"][index]
        mb["old_logp"] = behaviour_logprobs(model, mb, cfg).cpu() if reused else None
        mb["ref_logp"] = behaviour_logprobs(ref_model, mb, cfg).cpu() if ref_model is not None else None
        micro_batches.append(mb)
    gas = cfg.gradient_accumulation_steps
    steps = [micro_batches[i : i + gas] for i in range(0, len(micro_batches), gas)]
    return steps * cfg.num_iterations


# ---- the loop --------------------------------------------------------------------------------------------

def evaluate(cfg: TrainConfig, model, tokenizer, records: list[dict]) -> dict[str, float]:
    """eval/mean@k, eval/pass@j (and per level, when records have one) on the held-out records, each rank
    scoring its share."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with autocast(cfg, model.device):
        correct = count_correct(model, tokenizer, records[rank::world], num_samples=cfg.eval_num_samples,
                                max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length,
                                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed)
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, correct)
        correct = [c for part in gathered for c in part]
        records = [r for i in range(world) for r in records[i::world]]  # the gathered order
    return {**summarize(correct, cfg.eval_num_samples), "eval/num_problems": len(correct),
            **level_summary(records, correct, cfg.eval_num_samples)}


def train(cfg: TrainConfig, prepared: dict | None = None) -> Path:
    """Run training as configured; returns the output directory. prepared: prepare(cfg), if already done."""
    rank, world, device = init_distributed()
    prepared = prepared or prepare(cfg)
    resume = prepared["resume"]
    set_seed(cfg.seed + rank)
    model_path = resume or cfg.model
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = load_model(model_path, device, cfg)
    eos_token_ids(model, tokenizer)  # fail now, not after the first round, if nothing can end a completion
    # beta > 0: the reference is the initial policy, also when resuming
    ref_model = load_model(cfg.model, device, cfg).eval().requires_grad_(False) if cfg.beta > 0 else None
    module = PolicyLoss(model, cfg)
    if world > 1:
        module = DistributedDataParallel(module)
    optimizer, scheduler = build_optimizer(model, cfg)
    sampler = PromptSampler(prepared["records"], cfg.per_device_train_batch_size * cfg.steps_per_generation //
                            cfg.num_generations, seed=cfg.seed, rank=rank, world_size=world)
    step, num_tokens, buffer, round_metrics, samples = 0, 0.0, [], {}, []
    if resume:
        state, rank_state = load_checkpoint(resume)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        step, num_tokens = state["step"], state["num_tokens"]
        buffer, round_metrics = rank_state["buffer"], rank_state["round_metrics"]
    log = RunLogger(cfg.output_dir, report_to=cfg.report_to, config=cfg.to_dict(), logging_steps=cfg.logging_steps,
                    resume_step=step if resume else None) if rank == 0 else None
    eval_records = prepared["eval_records"]
    if eval_records and step == 0:
        eval_metrics = evaluate(cfg, model, tokenizer, eval_records)
        if log:
            log.metrics(0, eval_metrics)

    def checkpoint():
        save_checkpoint(cfg.output_dir, step, model, tokenizer,
                        dict(step=step, num_tokens=num_tokens, optimizer=optimizer.state_dict(),
                             scheduler=scheduler.state_dict(), sampler=sampler.state_dict()),
                        dict(buffer=buffer, round_metrics=round_metrics), config=cfg.to_dict(),
                        save_total_limit=cfg.save_total_limit)

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    model.train()
    while step < cfg.max_steps:
        start = time.perf_counter()
        if not buffer:
            sampled, round_metrics = sample_groups(cfg, model, tokenizer, sampler, prepared["reward_funcs"])
            rows, samples = build_rows(cfg, tokenizer, sampled, round_metrics)
            buffer = split_steps(cfg, rows, model, ref_model)
        micro_batches = buffer.pop(0)
        metrics = optimizer_step(module, optimizer, scheduler, micro_batches, cfg)
        step += 1
        tokens = sum(len(p) + len(c) for mb in micro_batches for p, c in zip(mb["prompt_ids"], mb["completion_ids"]))
        metrics = mean_over_ranks({**round_metrics, **metrics, "tokens": tokens})
        metrics["step_time"] = time.perf_counter() - start
        num_tokens += metrics["tokens"] * world
        metrics["tokens_per_second"] = metrics.pop("tokens") * world / metrics["step_time"]
        metrics["num_tokens"] = num_tokens
        if eval_records and (step % cfg.eval_steps == 0 or step == cfg.max_steps):
            metrics.update(evaluate(cfg, model, tokenizer, eval_records))
        if log:
            log.metrics(step, metrics)
            if cfg.sample_steps and step % cfg.sample_steps == 0 and samples:
                log.samples(step, samples)  # each round's samples once, at the first sample step since it ran
                samples = []
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{metrics['loss']:.4f}")
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
            checkpoint()
    bar.close()
    if log:
        log.close()
        print(log.summary(), flush=True)
    return Path(cfg.output_dir)


def main(argv=None) -> None:
    try:
        cfg = parse_config(argv)
        prepared = prepare(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"python -m gcpo_fast.train: error: {e}")
    train(cfg, prepared)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
