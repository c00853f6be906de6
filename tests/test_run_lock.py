"""Finding 1 of issue 24: two trainers started into one --output_dir. The second is refused in one line naming
the holder (pid and host), and a lock left by a process that died is taken over."""

import os
import signal
import subprocess
import sys

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
