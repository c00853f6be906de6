"""One run per run directory: an exclusive lock on output_dir/.run.lock while a trainer writes there.

    from gcpo_fast.run import lock

    lock.acquire("runs/x")   # RunDirInUse (a ValueError, one line naming the holder) if another run holds it
    ...                          # checkpoints, metrics.jsonl, samples.jsonl: this process's alone
    lock.release("runs/x")   # also implicit when the process ends, however it ends (kill -9 included)

Two trainers started into one folder would replace each other's checkpoints and interleave metrics.jsonl.
The lock is `fcntl.flock` on an open file: the kernel drops it when the process dies, so a lock left by a
crashed run is never in the way (its file stays, with the dead holder's line, and is taken over). The file
holds the holder's pid, host and start time, for the message the second run gets. The file is never
deleted, only emptied on release: deleting it would let a third process lock a new file while a second
still waits on the old one. It is opened without following a symbolic link (a link planted there would
have its target truncated); a lock that is a link (symbolic or hard), a folder or not writable is a one-line
RunDirInUse naming it. Every process that writes the run directory takes the lock: a single process always (whatever
RANK a stray environment holds), and under torchrun (WORLD_SIZE > 1) rank 0 for the job, whose other
ranks write only their own files of the checkpoints rank 0 writes. On a network file system flock is only
as good as the server's lock support (NFSv4 has it).
"""

import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

LOCK_NAME = ".run.lock"
_held: dict[Path, int] = {}  # run directory -> the open file descriptor holding its lock


class RunDirInUse(ValueError):
    """Another live process holds the run directory."""


def acquire(output_dir) -> None:
    """Lock output_dir for this process (a no-op on the ranks other than 0 of a torchrun job, and when already
    held here)."""
    if not holds_the_job_lock():
        return
    folder = Path(output_dir).resolve()
    if folder in _held:
        return
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        _refuse(
            output_dir, path, "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
        )
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a hard link's other name would be emptied too
        os.close(fd)
        _refuse(output_dir, path, "is not a plain file of its own (a hard link, a pipe, a device)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.read(fd, 4096))
        os.close(fd)
        raise RunDirInUse(
            f"output_dir {output_dir} is in use by another run ({holder}): wait for it to end, or choose "
            "another --output_dir"
        ) from None
    holder = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _held[folder] = fd


def _refuse(output_dir, path: Path, what: str):
    raise RunDirInUse(
        f"output_dir {output_dir}: the run lock {path} {what}; remove it (a run recreates it) or choose another "
        "--output_dir"
    ) from None


def holds_the_job_lock() -> bool:
    """Whether this process locks for its job: any single process, and rank 0 of a torchrun job (RANK alone,
    without WORLD_SIZE > 1, is a stray variable: this process still writes the run directory alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    return int(os.environ.get("RANK", "0")) == 0


def release(output_dir) -> None:
    """Give the lock of output_dir back (nothing if this process does not hold it)."""
    fd = _held.pop(Path(output_dir).resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing its line
        return "a process that is just starting"
