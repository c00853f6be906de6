"""The sandbox against hostile calls (gcpo_fast/tools/sandbox.py): each bounded in time, the trainer (this process)
goes on after every one, and the call's error is its output. Needs bubblewrap (apt-get install bubblewrap; .ci/run
installs it); skipped without it outside CI."""

import os
import shutil
import signal
import socket
import threading
import time

import pytest

from gcpo_fast.tools.sandbox import Limits, Sandbox

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None and not os.environ.get("CI"), reason="bubblewrap (bwrap) is not installed"
)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout=2.0, memory_mb=512, max_output_bytes=1000, max_processes=16))


def run(sandbox, code, bound=10.0):
    start = time.monotonic()
    result = sandbox.run_python(code)
    assert time.monotonic() - start < bound
    assert os.getpid() and sandbox.run_python("print(1)").output == "1\n"  # the next call still runs
    return result


def test_a_call_runs_and_prints(sandbox):
    assert run(sandbox, "print(23*47)").output == "1081\n"


def test_a_user_tool_under_tmp_is_found(sandbox, tmp_path):
    # the call's /tmp is a fresh tmpfs: an import root below it (a checkout or a venv in /tmp) is bound on top
    (tmp_path / "tmp_tools.py").write_text("def add(a: int, b: int) -> int:\n    return a + b\n")
    tmp_path.chmod(0o755)  # readable as a checkout is (the call runs as a uid of its own)
    result = sandbox.call("tmp_tools", "add", {"a": 2, "b": 3}, roots=(str(tmp_path),))
    assert (result.status, result.output) == ("ok", "5\n")
    assert "No module named" in sandbox.call("tmp_tools", "add", {"a": 2, "b": 3}).output  # not bound: not there


def test_infinite_loop_is_killed_at_the_limit(sandbox):
    result = run(sandbox, "while True: pass")
    assert result.status == "timeout" and "TimeoutError" in result.output


def test_silent_sleep_is_killed_at_the_wall_clock(sandbox):
    start = time.monotonic()
    result = run(sandbox, "import time; time.sleep(600)")
    assert result.status == "timeout" and time.monotonic() - start < 4


def test_fork_bomb_stops_at_the_process_limit(sandbox):
    result = run(sandbox, "import os\nwhile True:\n    os.fork()")
    assert result.status in ("error", "timeout")
    assert "BlockingIOError" in result.output or result.status == "timeout"


def test_memory_bomb_gets_memory_error(sandbox):
    result = run(sandbox, "blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))")
    assert result.status == "error" and result.output.strip().endswith("MemoryError")


def test_100_mb_of_output_is_cut_and_marked(sandbox):
    result = run(sandbox, "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))")
    assert result.truncated and "[output truncated at 1000 bytes]" in result.output
    assert len(result.output) < 1100


def test_a_planted_file_and_the_trainers_environment_are_out_of_reach(sandbox, tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-contents")
    monkeypatch.setenv("GCPO_TEST_SECRET", "hunter2")
    result = run(sandbox, f"import os\nprint(os.environ.get('GCPO_TEST_SECRET'))\nprint(open({str(secret)!r}).read())")
    assert result.status == "error" and "FileNotFoundError" in result.output
    assert result.output.startswith("None\n") and "s3cr3t-contents" not in result.output
    home = run(sandbox, "import os\nprint(sorted(os.listdir(os.path.expanduser('~'))))")
    assert home.output == "[]\n"  # HOME is the call's own empty folder


def test_writing_outside_its_folder_fails(sandbox, tmp_path):
    target = tmp_path / "written.txt"
    result = run(sandbox, f"open({str(target)!r}, 'w').write('x')")
    assert result.status == "error" and not target.exists()
    system = run(sandbox, "open('/usr/evil', 'w')")
    assert system.status == "error" and not os.path.exists("/usr/evil")
    own = run(sandbox, "open('note.txt', 'w').write('kept'); print(open('note.txt').read())")
    assert own.output == "kept\n"  # its own working folder is writable


def test_no_connection_to_a_port_of_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    server.settimeout(3)
    thread = threading.Thread(target=lambda: accepted.append(_accept(server)))
    thread.start()
    sandbox = Sandbox(Limits(timeout=2.0))
    code = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    result = run(sandbox, code)
    thread.join()
    server.close()
    assert result.status == "error" and "connected" not in result.output and accepted == [None]


def _accept(server):
    try:
        return server.accept()
    except TimeoutError:
        return None


def test_killing_the_parent_leaves_the_trainer_alive(sandbox):
    result = run(sandbox, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)")
    assert result.status == "error"  # PermissionError: the parent it sees is the sandbox's own, and not its uid's
    for pid in (os.getpid(), os.getppid()):
        os.kill(pid, 0)  # this process and its parent are alive
    scan = run(sandbox, f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)")
    assert scan.status == "error" and "ProcessLookupError" in scan.output  # the trainer's pid is not in its namespace


def test_sys_exit_is_the_calls_error(sandbox):
    result = run(sandbox, "print('before')\nimport sys\nsys.exit(3)")
    assert result.status == "error" and result.output == "before\nSystemExit: 3\n"
    assert run(sandbox, "import sys; sys.exit(0)").status == "ok"


def test_binary_and_invalid_utf8_output_is_replaced(sandbox):
    result = run(sandbox, "import sys\nsys.stdout.buffer.write(bytes(range(256)) + b'\\xff\\xfe\\xc3')")
    assert result.status == "ok" and "\ufffd" in result.output and result.output.startswith("\x00\x01")


def test_the_whole_process_group_dies_at_the_limit(sandbox, tmp_path):
    code = "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    code += "import time; time.sleep(600)"
    before = _sleepers()
    assert run(sandbox, code).status == "timeout"
    time.sleep(0.5)
    assert _sleepers() == before


def _sleepers() -> int:
    """Processes on this machine running `time.sleep(600)`."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += b"time.sleep(600)" in open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            pass
    return count


def test_signals_of_the_trainer_are_its_own(sandbox):
    assert signal.getsignal(signal.SIGTERM) is not None and run(sandbox, "print(2)").output == "2\n"
