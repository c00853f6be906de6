"""The sandbox: each tool call in a process of its own, isolated by bubblewrap, limited by rlimits, killed at its limit.

    from gcpo_fast.tools.sandbox import Limits, Sandbox

    sandbox = Sandbox(Limits(timeout=10.0))                      # raises ToolError if bubblewrap cannot run here
    result = sandbox.run_python("print(23*47)")                 # Result(output="1081\\n", status="ok")
    result = sandbox.call("my_pkg.tools", "add", {"a": 1, "b": 2}, roots=("/home/me/src",))

Install: `apt-get install bubblewrap` (Debian / Ubuntu; `bwrap` on PATH). Each call starts `bwrap` (never a thread of
the trainer, never its interpreter), which starts gcpo_fast/tools/sandbox_runner.py with the stdlib Python of this
installation, in a session of its own; the request goes in on stdin, the output (stdout and stderr, one stream)
comes back on a pipe. What each part stops:

- new mount namespace, nothing of the host but read-only /usr, /bin, /lib*, /sbin, the Python installation, its
  site-packages and, for a user tool, its module's import root: a planted file, the run directory, the home folder,
  other checkpoints are not there to read, and nothing outside the call's own folders can be written;
- a fresh working directory /sandbox (and /tmp), each a tmpfs of Limits.disk_mb, gone with the call, plus
  RLIMIT_FSIZE: a write bomb fills its own small tmpfs;
- --clearenv: none of the trainer's environment variables (tokens, paths) reach the call;
- new network namespace: only a loopback of its own, so no port of the host (127.0.0.1 included) or beyond answers;
- new PID namespace with --die-with-parent, and an unprivileged uid of its own for each call when the trainer runs as
  root (the runner drops to it, which clears every capability): it cannot see or signal the trainer or any host
  process, and RLIMIT_NPROC (Limits.max_processes) counts this call's processes alone: a fork bomb stops there;
- RLIMIT_AS (Limits.memory_mb) per process: a memory bomb gets MemoryError; RLIMIT_CPU and the wall clock
  (Limits.timeout): at the limit the whole process group is killed with SIGKILL, and with it the namespace;
- the output is read up to Limits.max_output_bytes; more is cut, marked, and the call stopped (100 MB of output never
  reaches the trainer's memory); bytes that are not UTF-8 are replaced, never an error.

What it does not stop: a kernel exploit (the calls share the host's kernel; no seccomp filter is installed), reading
the files that are bound in (the Python installation, site-packages, a user tool's import root), CPU time and
memory bandwidth taken from the trainer during the call (no cgroup: the limits are per process, so a fork bomb may
hold up to max_processes x memory_mb of address space until the timeout). When the trainer is not root, bubblewrap
runs in a user namespace with the trainer's own uid: RLIMIT_NPROC would count all of that user's processes, so it is
not set, and a fork bomb is stopped by the time limit alone.
"""

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from gcpo_fast.errors import TrainingError

RUNNER = Path(__file__).resolve().with_name("sandbox_runner.py")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
UID_RANGE = (1 << 20, 1 << 30)  # a fresh unprivileged uid per call, far from any real account's
STATUSES = ("ok", "error", "timeout")
WORKDIR, RUNNER_PATH = "/sandbox", "/.sandbox_runner.py"  # inside; chosen not to shadow a bound host path
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
ENV |= {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}  # no thread pools


class ToolError(TrainingError):
    """The sandbox cannot run here (bubblewrap missing or refused): one line saying why and what to install."""


@dataclass(frozen=True)
class Limits:
    """What one call may use (docs/training.md, "Tools")."""

    timeout: float = 10.0  # wall-clock seconds; the CPU limit is the next whole second
    memory_mb: int = 1024  # address space of each process
    max_output_bytes: int = 4096  # kept; the rest is cut and marked
    max_processes: int = 16  # processes and threads of the call (when the trainer is root)
    disk_mb: int = 16  # each of /work and /tmp


@dataclass(frozen=True)
class Result:
    """A call's output and how it ended: ok, error (it raised, exited non-zero, or the call was malformed) or
    timeout (the wall clock or the CPU limit)."""

    output: str
    status: str = "ok"
    truncated: bool = False


def python_paths() -> list[str]:
    """The import path of this installation's libraries: its standard library and site-packages (venv and base)."""
    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    found = [sysconfig.get_paths()[k] for k in keys]
    found += [sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})[k] for k in keys]
    return list(dict.fromkeys(os.path.realpath(p) for p in found if os.path.isdir(p)))


class Sandbox:
    """Runs calls in bubblewrap (module docstring). Thread-safe: each call is a process of its own."""

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None:
            raise ToolError(
                "tools run in a bubblewrap sandbox, and bwrap is not on PATH: install it (apt-get install bubblewrap)"
            )
        self.python = os.path.realpath(sys.executable)
        self.root = os.geteuid() == 0
        self.library = python_paths()
        result = self.run_python("print('ready')")
        if result.output != "ready\n":
            raise ToolError(f"the bubblewrap sandbox does not run here: {result.output.strip()[:300]}")

    def run_python(self, code: str) -> Result:
        """Run Python source as a script; its output is what it prints."""
        return self._run({"kind": "python", "code": code}, ())

    def call(self, module: str, function: str, arguments, roots: tuple[str, ...] = ()) -> Result:
        """Call module.function(**arguments) (arguments: the JSON the model wrote); its output is the return value.
        roots: the import roots of the module, bound read-only."""
        request = {"kind": "function", "module": module, "function": function, "arguments": arguments}
        return self._run(request, roots)

    # ---- one call ----

    def _run(self, request: dict, roots: tuple[str, ...]) -> Result:
        limits = self.limits
        uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])  # not the seeded RNGs: runs stay exact
        request |= {"path": [*roots, *self.library], "limits": self._rlimits(), "uid": uid}
        process = subprocess.Popen(
            self._command(roots),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed whole at the limit
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        try:
            process.stdin.write(json.dumps(request).encode())
            process.stdin.close()
        except BrokenPipeError:
            pass  # it died at once: its output says why
        deadline = time.monotonic() + limits.timeout
        output, cut = _read_capped(process.stdout, limits.max_output_bytes, deadline)
        timed_out = not cut and not _wait(process, deadline)
        if cut or timed_out:
            _kill_group(process)
        process.stdout.close()
        text = output.decode("utf-8", errors="replace")
        cpu_limit = process.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
        if timed_out or cpu_limit:
            return Result(text + f"\nTimeoutError: the call ran past its limit of {limits.timeout:g} s", "timeout")
        if cut:
            return Result(text + f"\n[output truncated at {limits.max_output_bytes} bytes]", "ok", truncated=True)
        return Result(text, "ok" if process.returncode == 0 else "error")

    def _rlimits(self) -> dict[str, int]:
        limits = self.limits
        out = {
            "RLIMIT_CPU": math.ceil(limits.timeout) + 1,
            "RLIMIT_AS": limits.memory_mb << 20,
            "RLIMIT_FSIZE": limits.disk_mb << 20,
            "RLIMIT_CORE": 0,
            "RLIMIT_NOFILE": 256,
        }
        if self.root:  # the call's own uid: the count is this call's processes (module docstring)
            out["RLIMIT_NPROC"] = limits.max_processes
        return out

    def _command(self, roots: tuple[str, ...]) -> list[str]:
        """bwrap's arguments: namespaces, the call's tmpfs folders, the read-only binds (with world-readable parent
        folders), a clear environment, then the runner."""
        cmd = [self.bwrap, "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-net"]
        cmd += ["--unshare-uts", "--unshare-cgroup-try"]
        if self.root:  # no user namespace: the runner needs these two to drop to its uid, and nothing else
            cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            cmd += ["--unshare-user"]
        for name in SYSTEM_DIRS:  # /bin -> usr/bin on merged-/usr systems: the ELF loader's path must resolve
            cmd += ["--symlink", os.readlink(name), name] if os.path.islink(name) else []
        size = str(self.limits.disk_mb << 20)
        cmd += ["--proc", "/proc", "--dev", "/dev"]
        cmd += ["--perms", "1777", "--size", size, "--tmpfs", WORKDIR, "--perms", "1777", "--size", size, "--tmpfs"]
        cmd += ["/tmp"]
        # the binds after the tmpfs folders: a tool's import root or a venv under /tmp stays visible on top of them
        real = [p for p in SYSTEM_DIRS if not os.path.islink(p)]
        cmd += _binds([*real, os.path.dirname(os.path.dirname(self.python)), *self.library, *roots])
        cmd += ["--ro-bind", str(RUNNER), RUNNER_PATH, "--chdir", WORKDIR, "--clearenv"]
        for name, value in ENV.items():
            cmd += ["--setenv", name, value]
        return [*cmd, "--", self.python, "-I", "-S", RUNNER_PATH]


def _binds(paths: list[str]) -> list[str]:
    """--ro-bind each existing path at its own place (its real path), outermost first; a path inside one already
    bound is visible already. Parent folders are made 0755, so the unprivileged uid can reach the binds."""
    args, bound, made = [], [], set()
    for path in sorted({os.path.realpath(p) for p in paths if os.path.exists(p)}, key=lambda p: (p.count("/"), p)):
        if any(path == b or path.startswith(b + "/") for b in bound):
            continue
        for parent in reversed(Path(path).parents[:-1]):  # /a, /a/b for /a/b/c (not "/")
            if str(parent) not in made and not any(str(parent).startswith(b + "/") for b in bound):
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        args += ["--ro-bind", path, path]
        bound.append(path)
    return args


def _read_capped(stream, cap: int, deadline: float) -> tuple[bytes, bool]:
    """Up to cap bytes of the stream until it closes or the deadline passes; (bytes, whether more came)."""
    out = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(stream.fileno(), 1 << 16)
            if not chunk:
                break
            room = cap - len(out)
            out += chunk[:room]
            if len(chunk) > room:
                return bytes(out), True
    return bytes(out), False


def _wait(process: subprocess.Popen, deadline: float) -> bool:
    """Whether the process ended by the deadline."""
    try:
        process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        return True
    except subprocess.TimeoutExpired:
        return False


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the call's process group (bwrap and its monitor); the sandboxed processes die with them
    (--die-with-parent, and the PID namespace ends with its first process)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
