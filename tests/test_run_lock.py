"""Two trainers started into one --output_dir: the second is refused in one line naming the holder (pid and
host), and a lock left by a process that died is taken over. A lock planted as a link, a folder or a file the run
cannot write is one line (a link's target is never emptied), and a stray RANK never turns the lock off."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gcpo_fast.run import lock as run_lock


def test_a_second_run_into_a_held_directory_is_refused_by_name(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from gcpo_fast.run import lock; lock.acquire({str(out)!r}); print('held', flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [sys.executable, "-m", "gcpo_fast.train", "--output_dir", str(out), "--max_steps", "1"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert f"is in use by another run (pid {holder.pid} on " in lines[0]
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run_lock.acquire(out)  # the dead holder's lock is stale: taken over
    run_lock.release(out)


def test_a_symlinked_lock_is_refused_and_its_target_left_whole(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("a file the lock must not empty")
    out = tmp_path / "run"
    out.mkdir()
    (out / run_lock.LOCK_NAME).symlink_to(target)
    with pytest.raises(run_lock.RunDirInUse, match=r"the run lock .*\.run\.lock is a symbolic link; remove it"):
        run_lock.acquire(out)
    assert target.read_text() == "a file the lock must not empty"


def test_a_hard_linked_lock_is_refused_and_its_other_name_left_whole(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("another name of the same file")
    out = tmp_path / "run"
    out.mkdir()
    os.link(target, out / run_lock.LOCK_NAME)
    with pytest.raises(run_lock.RunDirInUse, match="is not a plain file of its own"):
        run_lock.acquire(out)
    assert target.read_text() == "another name of the same file"


def test_a_lock_that_is_a_folder_is_one_line(tmp_path):
    out = tmp_path / "run"
    (out / run_lock.LOCK_NAME).mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-m", "gcpo_fast.train", "--output_dir", str(out), "--max_steps", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "the run lock" in lines[0] and "cannot be opened (Is a directory)" in lines[0]


def test_a_lock_that_is_not_writable_is_one_line(tmp_path):
    folder = Path(tempfile.mkdtemp())  # (pytest's tmp_path is private to its user)
    try:
        folder.chmod(0o755)
        (folder / run_lock.LOCK_NAME).write_text("")
        (folder / run_lock.LOCK_NAME).chmod(0o444)
        message = acquire_as_another_user(folder) if os.geteuid() == 0 else error_of(run_lock.acquire, folder)
        assert "cannot be opened (Permission denied)" in message and "\n" not in message
    finally:
        shutil.rmtree(folder)


def error_of(function, *args) -> str:
    try:
        function(*args)
    except run_lock.RunDirInUse as e:
        return str(e)
    return "no error"


def acquire_as_another_user(folder: Path) -> str:
    """run_lock.acquire(folder) in a forked child that runs as nobody (root writes a read-only file)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, so nothing it cannot read is needed; it never returns into pytest
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, error_of(run_lock.acquire, folder).encode())
        except BaseException as e:  # reported to the parent, whatever it is
            os.write(write, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    os.waitpid(pid, 0)
    return message


def test_a_stray_rank_in_a_single_process_never_disables_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setenv("RANK", "1")  # left over in the environment; WORLD_SIZE is not set: a world of one
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run_lock.acquire(out)
    try:
        second = subprocess.run(
            [sys.executable, "-c", f"from gcpo_fast.run import lock; lock.acquire({str(out)!r})"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1 and f"is in use by another run (pid {os.getpid()} on " in second.stderr
    finally:
        run_lock.release(out)
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 of a torchrun job: rank 0 holds the lock for the job
    run_lock.acquire(out)
    assert out.resolve() not in run_lock._held
