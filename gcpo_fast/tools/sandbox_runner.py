"""The one program a sandboxed tool call runs (stdlib only; gcpo_fast/tools/sandbox.py starts it inside bubblewrap).

    python -I -S sandbox_runner.py < request.json       # {"kind": "python", "code": ...} or
                                                        # {"kind": "function", "module", "function", "arguments"}

It reads the request from stdin, puts the request's import path on sys.path, sets the resource limits, and when it
runs as root (a root trainer: no user namespace) drops to the request's unprivileged uid, which clears every
capability, before it runs anything of the request. What the call prints (stdout and stderr, one stream) is its
output; a raised exception ends it with status 1 and its last traceback line (ToRL keeps only that line), a
SystemExit with its own status (and the line `SystemExit: <status>` when that is not 0). A function's return value
is printed (strings as they are, the rest as JSON).
"""

import json
import os
import resource
import sys
import traceback


def set_limits(limits: dict) -> None:
    """Each limit caps this process and every process it starts (rlimits are inherited)."""
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def drop_privileges(uid: int) -> None:
    """Root inside the sandbox (no user namespace) becomes a uid of its own: no capability is left, the process
    limit counts this call's processes alone, and nothing outside the sandbox's own files is writable."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def run(request: dict) -> None:
    if request["kind"] == "python":
        exec(compile(request["code"], "<tool>", "exec"), {"__name__": "__main__"})
        return
    module = __import__(request["module"], fromlist=["_"])
    arguments = request["arguments"]
    if not isinstance(arguments, dict):
        raise TypeError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    result = getattr(module, request["function"])(**arguments)
    print(result if isinstance(result, str) else json.dumps(result, default=str))


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    sys.path[:0] = request["path"]
    set_limits(request["limits"])
    drop_privileges(request["uid"])
    sys.stdout.reconfigure(errors="backslashreplace")
    try:
        run(request)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # done: no interpreter teardown (a library's exit hooks) to wait for
    except SystemExit as e:  # its own status; a failing one says so, as an exception would
        if e.code not in (None, 0):
            sys.stdout.flush()
            print(f"SystemExit: {e.code}", file=sys.stderr)
        raise
    except BaseException as e:  # the call's own failure is its output, ToRL's last line of the traceback
        sys.stdout.flush()
        print(traceback.format_exception_only(type(e), e)[-1].rstrip(), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
