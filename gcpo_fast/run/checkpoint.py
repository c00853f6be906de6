"""Checkpoints that a crash cannot break and that resume a run exactly.

    from gcpo_fast.run.checkpoint import save_checkpoint, load_checkpoint, find_checkpoint

    save_checkpoint("runs/x", step, model, tokenizer, state, rank_state, config=cfg.to_dict(), save_total_limit=3,
                    model_state=policy.full_state_dict(),   # every rank calls it (gcpo_fast/distributed/parallel.py)
                    save_sharded=lambda folder: policy.save_optimizer(optimizer, folder))
    path = find_checkpoint("runs/x", "latest")        # the newest complete one, or a given checkpoint folder
    state, rank_state = load_checkpoint(path)          # also restores this rank's RNG states
    state, rank_state = load_checkpoint(path, reshards=True)   # FSDP: another number of ranks is allowed

    AutoModelForCausalLM.from_pretrained("runs/x/checkpoint-100")   # a checkpoint is a Hugging Face folder

Layout of output_dir/checkpoint-<step>/:
    config.json, generation_config.json, model.safetensors, tokenizer files   the model, as save_pretrained writes it
                          (--use_peft: adapter_config.json, adapter_model.safetensors: the adapter, PEFT's layout)
    trainer_state.pt      optimizer, scheduler, data-sampler cursor, step, counters (what all ranks share)
    rank_<rank>.pt        each rank's own: python, numpy, torch and CUDA RNG states, the unfinished rollout buffer
    optimizer/            with --parallelism fsdp: the sharded optimizer state (torch.distributed.checkpoint,
                          written by every rank through save_sharded; trainer_state.pt then has no optimizer)
    train_config.yaml     the run's options, for the record
    checkpoint.json       written last: the step, the number of ranks, and every file's size in bytes

Atomicity: everything is written into output_dir/.tmp-checkpoint-<step>, every file and the folder are
fsynced, and only then is the folder renamed to checkpoint-<step> (a rename within one file system is
atomic). A crash mid-write leaves a .tmp- folder, never a checkpoint-<step> that is incomplete, so
"latest" is always loadable; stale .tmp- folders are removed by the next save. Old checkpoints beyond
save_total_limit are renamed away before they are deleted, for the same reason. A checkpoint folder that is
a symbolic link (linked in from another disk) is never followed out of the run directory: pruning it or a
stale .tmp- link removes the link, not what it points at.

A full disk: a save that runs out of space removes its partial .tmp- folder (its space is what the user
needs back) and stops the run with one line (TrainingError) naming the intact newest checkpoint.

Validation: a disk can still lose or cut a file after the rename (a full disk on a network file system,
a copy that stopped, a hand edit). `find_checkpoint` checks a checkpoint before it is used: every file of
checkpoint.json present with its size, config.json readable, the safetensors headers and the .pt
archives whole. "latest" skips a damaged checkpoint for the newest complete one, saying which it skipped
and why; a checkpoint named explicitly must be whole or it is an error.
"""

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from transformers.utils import logging as hf_logging

from gcpo_fast.distributed.parallel import barrier, rank_and_world
from gcpo_fast.errors import TrainingError
from gcpo_fast.options import at_least, check_options, option

STATE_FILE = "trainer_state.pt"
MANIFEST = "checkpoint.json"
# a --use_peft checkpoint holds the adapter (gcpo_fast/models/lora.py), not the model
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
FULL_DISK_BYTES = 64 * 2**20  # less free space than this after a torch.save error: the disk filled up


@dataclass
class CheckpointConfig:
    """When a run saves, how many checkpoints it keeps, and where it resumes from."""

    _argument_group_name = "checkpoints"

    save_steps: int = option(100, "checkpoint every this many steps, and at the end (0: only at the end)")
    save_total_limit: int | None = option(None, "keep only the newest this-many checkpoints (default: all)")
    resume: str | None = option(
        None,
        "continue from the latest checkpoint in output_dir (flag alone) or from the given checkpoint folder",
        metavar="CHECKPOINT",
    )

    def __post_init__(self):
        check_options(self)
        at_least(self, 0, "save_steps")
        at_least(self, 1, "save_total_limit")


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """This process's RNG states, in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir) -> list[Path]:
    """The checkpoint-<step> folders of output_dir, oldest first (whole or not: see check_checkpoint)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.fullmatch(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_step(path) -> int | None:
    """The step a checkpoint was written at (from checkpoint.json, else the folder name), if known."""
    path = Path(path)
    try:
        return int(json.loads((path / MANIFEST).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = CHECKPOINT_RE.fullmatch(path.name)
        return int(m.group(1)) if m else None


def check_checkpoint(path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it looks whole (cheap: sizes and headers only)."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    if (path / MANIFEST).exists():
        try:
            files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is damaged"
        for name, size in files.items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if (path / name).stat().st_size != size:
                return f"{name} is {(path / name).stat().st_size} bytes, {size} were written"
    config = ADAPTER_CONFIG if (path / ADAPTER_CONFIG).is_file() else "config.json"  # --use_peft: the adapter's
    for name in (config, STATE_FILE, "rank_0.pt"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((path / config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{config} is not valid JSON"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    for file in weights:
        try:
            with safe_open(file, framework="pt"):  # reads the header; a cut file fails here
                pass
        except Exception as e:  # safetensors raises its own error types
            return f"{file.name} is damaged ({e})"
    for file in sorted(path.glob("*.pt")):
        try:
            with zipfile.ZipFile(file):  # torch.save's archive: a cut file has no central directory
                pass
        except (OSError, zipfile.BadZipFile):
            return f"{file.name} is damaged (not a whole torch.save archive)"
    return None


def find_checkpoint(output_dir, resume: str) -> Path:
    """The checkpoint --resume names: "latest" (the newest whole one in output_dir; damaged ones are skipped
    with a note on stderr) or a checkpoint folder (an error if it is damaged)."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint-<step> folder with {STATE_FILE} in {output_dir}")
        skipped = []
        for path in reversed(found):
            problem = check_checkpoint(path)
            if problem is None:
                for name, why in skipped:
                    print(f"--resume: skipped {name}: {why}", file=sys.stderr)
                return path
            skipped.append((path.name, problem))
        raise FileNotFoundError(
            f"--resume: no whole checkpoint in {output_dir}: " + "; ".join(f"{name}: {why}" for name, why in skipped)
        )
    path = Path(resume)
    if not (path / STATE_FILE).is_file() and not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})")
    problem = check_checkpoint(path)
    if problem is not None:
        raise ValueError(f"--resume {resume}: the checkpoint is damaged: {problem}")
    return path


def _write_manifest(folder: Path, step: int, world: int) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    text = json.dumps({"step": step, "world_size": world, "files": files}, indent=1)
    (folder / MANIFEST).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _no_progress_bars():
    """save_pretrained draws a "Writing model shards" bar: at every checkpoint, two more lines in a captured log."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    output_dir,
    step: int,
    model,
    tokenizer,
    state: dict,
    rank_state: dict,
    *,
    config: dict,
    save_total_limit: int | None = None,
    model_state: dict | None = None,
    save_sharded: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically (see the module docstring). Every rank calls it and writes its
    rank_state and RNG states, then calls save_sharded(folder), if given, to write its shards (FSDP's optimizer
    state) into the folder being written; rank 0 writes the model (model_state: its full state dict, default
    the model's own) and `state`, which all ranks share."""
    rank, world = rank_and_world()
    output_dir = Path(output_dir)
    tmp, final = output_dir / f".tmp-checkpoint-{step}", output_dir / f"checkpoint-{step}"
    if rank == 0:
        for stale in output_dir.glob(".tmp-checkpoint-*"):
            _remove(stale)
        tmp.mkdir(parents=True)
    barrier()
    try:
        torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{rank}.pt")
        if save_sharded is not None:
            save_sharded(tmp)
        barrier()
        if rank == 0:
            with _no_progress_bars():
                model.save_pretrained(tmp, state_dict=model_state)
            tokenizer.save_pretrained(tmp)
            torch.save({**state, "world_size": world}, tmp / STATE_FILE)
            (tmp / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            _write_manifest(tmp, step, world)
            _fsync_tree(tmp)
    except (OSError, RuntimeError) as e:
        if not _disk_full(e, output_dir):
            raise  # a crash: the partial folder stays, and the next save removes it
        shutil.rmtree(tmp, ignore_errors=True)  # on a full disk its space is what the user needs back
        newest = list_checkpoints(output_dir)
        raise TrainingError(
            f"checkpoint-{step}: no space left on device in {output_dir}; the partial checkpoint was removed"
            + (f", {newest[-1].name} is intact" if newest else "")
            + ": free some space and --resume"
        ) from None
    if rank == 0:
        if final.exists():  # the same step saved before (a resumed run): move the old one out of the way first
            old = output_dir / f".tmp-old-checkpoint-{step}"
            os.replace(final, old)
            _remove(old)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        if save_total_limit is not None:
            for path in list_checkpoints(output_dir)[:-save_total_limit]:
                doomed = output_dir / f".tmp-{path.name}"
                os.replace(path, doomed)
                _remove(doomed)
    barrier()
    return final


def _remove(path: Path) -> None:
    """Delete a folder of the run directory; a symbolic link (a checkpoint linked in from elsewhere) loses the
    link only: nothing outside the run directory is ever deleted."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def _disk_full(error: Exception, output_dir: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, or torch.save's own writer error (it reports a
    full disk as "unexpected pos ...") with no free space left."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    torch_writer = "inline_container" in str(error) or "PytorchStreamWriter" in str(error)
    return torch_writer and shutil.disk_usage(output_dir).free < FULL_DISK_BYTES


def load_checkpoint(path, *, reshards: bool = False) -> tuple[dict, dict]:
    """(shared state, this rank's state) of a checkpoint; restores this rank's RNG states as a side effect.
    A checkpoint of another number of processes is refused, unless `reshards` (FSDP: the model and optimizer
    load onto any number of ranks): then, with a warning, this rank's state is {} (the unfinished generation
    round is dropped, a new one starts at the data cursor) and the RNGs are seeded afresh from rank 0's."""
    path = Path(path)
    rank, world = rank_and_world()
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if state["world_size"] != world:
        if not reshards:
            raise ValueError(
                f"{path} was written by {state['world_size']} processes; resuming it with {world} would "
                "not continue the same run (each rank's data and RNG differ)"
            )
        if rank == 0:
            warnings.warn(
                f"{path} was written by {state['world_size']} processes and resumes with {world}: the model "
                "and optimizer reshard, but the unfinished generation round is dropped, and the batches and "
                "random streams from here on differ from those of an uninterrupted run",
                stacklevel=2,
            )
        set_rng_state(torch.load(path / "rank_0.pt", map_location="cpu", weights_only=True)["rng"])
        seed = random.getrandbits(31) + rank
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        return state, {}
    rank_state = torch.load(path / f"rank_{rank}.pt", map_location="cpu", weights_only=True)
    set_rng_state(rank_state.pop("rng"))
    return state, rank_state
