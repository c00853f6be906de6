"""What `--resume` does with options that differ from the checkpoint's: apply them, or refuse the resume.

    from gcpo_fast.run import resume_policy

    fingerprint = resume_policy.check(cfg, checkpoint, records)   # in prepare(): ValueError naming each difference
    ...load the optimizer and scheduler state...
    resume_policy.apply(cfg.optim, optimizer, scheduler)          # the new learning rate / AdamW values take effect
    state["dataset_sha256"] = fingerprint                         # recorded in trainer_state.pt at every save

A checkpoint records the options it ran with (train_config.yaml), the sha256 of its training records
(`dataset_sha256` in trainer_state.pt: every record's columns, in order, as JSON) and, for a run that reads
--model again when it resumes (--use_peft: the frozen base and its tokenizer; beta > 0: the reference model),
the identity of --model's files (`base_model_identity`, base_identity: a hash of the config, generation config
and tokenizer files, of each weight file's name, size and first and last MiB, and of the start of every tensor).
A base whose files changed under the same path (replaced weights, another tokenizer, a hub id whose cached
snapshot moved) is refused like a changed option. On resume each option is
one of two kinds (every option of TrainConfig is in exactly one set; tests/test_resume_policy.py checks it):
- MAY_CHANGE: how the run is carried out, observed or stopped: the learning rate, its schedule and the other
  AdamW values, max_steps, logging, evaluation, save cadence, report_to, the rollout engine's settings, the
  teacher's sampling. The new value takes effect and is recorded. The optimizer state's saved hyperparameters
  would otherwise win over a new --learning_rate, so `apply` writes the configured values into the
  optimizer's param groups and the scheduler's base rates after the state is loaded (the schedule's shape,
  warm-up and max_steps come from the configuration already: the scheduler's lambdas are rebuilt from it).
- RUN_DEFINING: what the run optimises and on what: the model, the data (its content by hash; the path
  may change), rewards, G, sampling, batch geometry, seed, the loss and the method extras. A difference is
  refused in one line naming each option with both values: resuming would mix two runs in one history
  (and the unfinished round in the checkpoint was built with the old values). To change them, start a
  new run from the checkpoint: `--model runs/x/checkpoint-N` in a new --output_dir.
`parallelism` and the number of processes have their own checks (gcpo_fast/distributed/parallel.py, checkpoint.py).
So the train_config.yaml a resumed run writes always equals what ran. A checkpoint written before the
dataset hash was recorded is compared on its options only.
"""

import hashlib
import json
from pathlib import Path

import torch
import yaml

from gcpo_fast.run.checkpoint import STATE_FILE

RUN_DEFINING = {
    # model and data
    "model", "prompt_column", "golden_column", "answer_column", "builtin_num_problems", "builtin_levels",
    "reward_funcs", "reward_weights", "correct_reward",
    # LoRA: what trains
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "use_rslora",
    "use_dora",
    # generation
    "num_generations", "max_prompt_length", "max_completion_length", "temperature", "top_p", "top_k",
    "mask_truncated_completions",
    # the loss's view of the rollouts
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_clip_max",
    # batch geometry and randomness
    "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "num_iterations", "seed",
    # the loss and the method
    "loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "delta", "beta", "loss_agg_mode",
    "scale_rewards", "all_right_advantage", "golden_answer", "golden_objective", "golden_shaping_gamma",
    "dynamic_sampling", "overlong_buffer_len", "overlong_penalty_factor", "min_inverse_alpha", "golden_source",
    "golden_model",
    # tools: what the model may call and what a call can return into its context
    "tools", "max_tool_calling_iterations", "tool_max_output_bytes",
}  # fmt: skip
MAY_CHANGE = {
    "dataset", "dataset_config", "dataset_split", "eval_dataset", "trust_remote_code", "attn_implementation",
    "async_rollouts", "max_staleness", "weight_sync_steps",
    "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "vllm_max_model_length",
    "vllm_server_host", "vllm_server_port", "vllm_server_base_url", "vllm_group_port", "vllm_server_timeout",
    "vllm_server_api_key_file",
    "learning_rate", "lr_scheduler_type", "lr_scheduler_power", "warmup_ratio", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon",
    "max_grad_norm", "max_steps", "max_skipped_steps", "gradient_checkpointing", "bf16",
    "parallelism", "fsdp_cpu_offload",
    "max_num_gen_batches", "golden_cache", "golden_num_candidates", "golden_temperature",
    "golden_max_completion_length",
    "output_dir", "logging_steps", "save_steps", "save_total_limit", "eval_steps", "eval_num_problems",
    "eval_num_samples", "sample_steps", "num_samples_to_log", "report_to", "resume",
    "tool_timeout", "tool_memory_mb", "tool_workers",  # the sandbox's resources, as the machine's
}  # fmt: skip
PATH_OPTIONS = ("model", "golden_model")  # compared as the folders they name, not as spelled
BASE_IDENTITY = "base_model_identity"  # trainer_state.pt: what --model's files were, for a run that reads them again


def reads_base_on_resume(cfg) -> bool:
    """Whether a resumed run reads --model's files again, not only the checkpoint's: the frozen base and the
    tokenizer of --use_peft, the reference model of beta > 0."""
    return cfg.lora.use_peft or cfg.method.beta > 0


def dataset_fingerprint(records: list[dict]) -> str:
    """sha256 of the training records (every column, in order)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def check(cfg, checkpoint, records: list[dict], base_identity: str | None = None) -> str:
    """The records' fingerprint; with a checkpoint, ValueError (one line) naming every run-defining option, the
    dataset content and the base model's files (gcpo_fast.models.identity.base_identity of --model, for
    a run that reads --model when it resumes) that differ from the checkpoint's."""
    fingerprint = dataset_fingerprint(records)
    if checkpoint is None:
        return fingerprint
    checkpoint = Path(checkpoint)
    try:
        recorded = yaml.safe_load((checkpoint / "train_config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        recorded = {}  # nothing to compare with (a checkpoint from before train_config.yaml)
    ours = cfg.to_dict()
    differences = [
        f"--{name} {_shown(ours[name])} (the checkpoint's: {_shown(recorded[name])})"
        for name in sorted(RUN_DEFINING)
        if name in recorded and _same(name, ours[name], recorded[name]) is False
    ]
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    if state.get("dataset_sha256") not in (None, fingerprint):
        differences.append(
            f"the dataset's content (sha256 {fingerprint[:12]}, the checkpoint's {state['dataset_sha256'][:12]})"
        )
    if base_identity is not None and state.get(BASE_IDENTITY) not in (None, base_identity):
        differences.append(
            f"the base model --model {cfg.model.model}: its config, tokenizer or weight files are not those the "
            f"checkpoint was trained on (identity {base_identity}, the checkpoint's {state[BASE_IDENTITY]})"
        )
    if differences:
        raise ValueError(
            f"--resume {checkpoint}: options that define the run differ from the checkpoint's: "
            + "; ".join(differences)
            + f". Resume with its values (see {checkpoint / 'train_config.yaml'}), or start a new run from it "
            "(--model CHECKPOINT in a new --output_dir)"
        )
    return fingerprint


def apply(cfg, optimizer, scheduler) -> None:
    """After the optimizer and scheduler states are loaded: the configured learning rate and AdamW values
    (cfg: gcpo_fast.update.OptimizerConfig) win over the saved ones (group 0 decays, group 1 does not:
    gcpo_fast/update.build_optimizer)."""
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    for i, (group, factor) in enumerate(zip(optimizer.param_groups, scheduler.lr_lambdas)):
        group["initial_lr"] = cfg.learning_rate
        group["lr"] = cfg.learning_rate * factor(scheduler.last_epoch)
        group["betas"], group["eps"] = (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _same(name: str, ours, theirs) -> bool:
    if name in PATH_OPTIONS and ours is not None and theirs is not None:
        return _folder(ours) == _folder(theirs)
    return ours == theirs


def _folder(path: str) -> str:
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)  # a hub id stays as written


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
