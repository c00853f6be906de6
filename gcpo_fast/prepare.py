"""Before any model loads: the data, the reward functions, the run directory and the checkpoint to resume.

    from gcpo_fast.prepare import prepare
    prepared = prepare(cfg)       # one-line ValueError / FileNotFoundError on bad input; then Trainer(cfg, prepared)

Everything a user can get wrong about the data, the run directory or `--resume` fails here, in seconds,
before the minutes a model takes to load: records loaded and checked, golden answers present where the method
needs them, reward functions importable, the run directory writable and locked, the checkpoint whole and its
run-defining options unchanged (gcpo_fast/run/resume_policy.py; the base model's files too, for a run that reads
--model again: --use_peft, --beta > 0), enough prompts for a round on every rank.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from gcpo_fast.config import TrainConfig
from gcpo_fast.data.rewards import load_reward_function
from gcpo_fast.data.sources import load_records
from gcpo_fast.distributed import parallel
from gcpo_fast.golden.sources import check_dataset_answers, open_cache
from gcpo_fast.golden.teacher import GoldenCache
from gcpo_fast.models.identity import base_identity
from gcpo_fast.models.loading import check_model_folder
from gcpo_fast.run import lock, resume_policy
from gcpo_fast.run.checkpoint import check_checkpoint, checkpoint_step, find_checkpoint, list_checkpoints
from gcpo_fast.tools.formats import load_user_tool
from gcpo_fast.tools.sandbox import Sandbox
from gcpo_fast.tools.task import with_python_golden


@dataclass
class Prepared:
    """What `prepare` checked and loaded."""

    records: list[dict]  # the training prompts
    eval_records: list[dict] | None  # the held-out problems, or None: no evaluation
    reward_funcs: list
    resume: Path | None  # the checkpoint to continue from
    golden_cache: GoldenCache | None  # GCPO's teacher cache, when golden answers come from a teacher
    dataset_sha256: str  # the training records' fingerprint, recorded in every checkpoint (resume_policy)
    base_identity: str | None = None  # --model's files, when a resume reads them again (resume_policy)


def prepare(cfg: TrainConfig) -> Prepared:
    """Everything that can fail on bad input, before any model is loaded. Raises ValueError / FileNotFoundError."""
    check_output_dir(cfg.run.output_dir)
    lock.acquire(cfg.run.output_dir)  # one run per directory (released when fit ends, or when we exit)
    data = cfg.data
    records = load_records(
        data.dataset,
        split=data.dataset_split,
        dataset_config=data.dataset_config,
        num_problems=data.builtin_num_problems,
        seed=cfg.run.seed,
        levels=data.builtin_levels,
        **data.columns,
    )
    if cfg.tools.enabled and data.dataset == "builtin" and "python" in cfg.tools.tools:
        records = with_python_golden(records)  # the task's tool-enabled variant: golden answers call the tool
    check_dataset_answers(
        cfg.golden, records, dataset=data.dataset, golden_column=data.golden_column, loss_type=cfg.method.loss_type
    )
    eval_records = load_eval_records(cfg)
    funcs = [load_reward_function(spec) for spec in cfg.rewards.reward_funcs]
    resume = find_resume(cfg)
    # a checkpoint that holds an adapter (or a run with a reference model) needs the very base it trained on
    trust = cfg.model.trust_remote_code
    base = None
    if resume_policy.reads_base_on_resume(cfg):
        base = base_identity(check_model_folder(cfg.model.model, trust_remote_code=trust))
    dataset_sha256 = resume_policy.check(cfg, resume, records, base)  # a changed model, loss, data, G, ...
    golden_cache = open_cache(cfg.golden, cfg.run.output_dir, trust_remote_code=trust)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.prompts_per_round * world > len(records):
        raise ValueError(
            f"a generation round takes {cfg.prompts_per_round} prompts x {world} processes, but the dataset has "
            f"only {len(records)}"
        )
    if cfg.tools.enabled:  # the sandbox runs here, and each user tool imports and has a schema
        Sandbox(cfg.tools.limits)
        for spec in (t for t in cfg.tools.tools if t != "python"):
            load_user_tool(spec)
    # a causal decoder with weights and a tokenizer, or one line saying why not
    check_model_folder(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)
    return Prepared(records, eval_records, funcs, resume, golden_cache, dataset_sha256, base)


def load_eval_records(cfg: TrainConfig) -> list[dict] | None:
    """The held-out problems: --eval_dataset, else the builtin held-out split of the trained levels."""
    dataset = cfg.eval.eval_dataset or ("builtin" if cfg.data.dataset == "builtin" else None)
    if not cfg.eval.eval_steps or not dataset:
        return None
    n = cfg.eval.eval_num_problems
    levels = sorted(set(cfg.data.builtin_levels))  # python -m gcpo_fast.eval evaluates any level
    config = cfg.data.dataset_config
    return load_records(
        dataset, split="test", dataset_config=config, num_problems=n, levels=levels, **cfg.data.columns
    )[:n]


def find_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint --resume names, after refusing what would mix two runs' histories."""
    output_dir = cfg.run.output_dir
    resume = find_checkpoint(output_dir, cfg.checkpoint.resume) if cfg.checkpoint.resume else None
    if resume is None and list_checkpoints(output_dir):
        raise ValueError(
            f"output_dir {output_dir} already holds checkpoints: pass --resume to continue that run, or choose "
            "another output_dir"
        )
    if resume is None:
        return None
    parallel.check_checkpoint(resume, cfg.parallel.parallelism)
    # Rewinding: continuing an older checkpoint beside newer ones would interleave two histories (and a later
    # --resume would pick the newer, abandoned one), so that is refused, not guessed at.
    newer = [
        p.name
        for p in list_checkpoints(output_dir)
        if (checkpoint_step(p) or 0) > (checkpoint_step(resume) or 0) and check_checkpoint(p) is None
    ]
    if newer:
        raise ValueError(
            f"--resume {resume}: {output_dir} holds newer checkpoints ({', '.join(newer)}) of the run that went on; "
            "resume into a new --output_dir (the checkpoint is read from where it is), or move the newer "
            "checkpoints away"
        )
    return resume


def check_output_dir(output_dir: str) -> None:
    """Fail now, not after the model has loaded, if the run directory cannot be created or written."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output_dir {output_dir}: cannot write there ({e.strerror or e})") from None
