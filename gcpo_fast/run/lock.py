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
still waits on the old one. Under torchrun only rank 0 (RANK) takes the lock; the other ranks write
nothing that another run could mix with. On a network file system flock is only as good as the server's
lock support (NFSv4 has it).
"""

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".run.lock"
_held: dict[Path, int] = {}  # run directory -> the open file descriptor holding its lock


class RunDirInUse(ValueError):
    """Another live process holds the run directory."""


def acquire(output_dir) -> None:
    """Lock output_dir for this process (rank 0 only; a no-op on other ranks and when already held here)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    folder = Path(output_dir).resolve()
    if folder in _held:
        return
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
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
