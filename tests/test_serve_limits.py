"""Every request to the generation server is bounded, and the server stops cleanly, on real server processes: the
model's context and the configured caps (400 / 413 in one line), malformed numbers and framing, slow clients cut
off, a cap on connections; SIGTERM during a generation (exit 0, the client told), and command-line mistakes
refused in one line before the model loads.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_serve_limits.py
"""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from server_process import KEY, ServerProcess, status_and_error

from gcpo_fast.distributed.parallel import free_port
from gcpo_fast.models.loading import DEFAULT_MODEL

AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
LIMITS = ["--read_timeout", "2", "--max_connections", "4", "--max_request_bytes", "65536", "--max_request_rows", "64"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(free_port(), *LIMITS, api_key=KEY, log=log) as server:
        yield server


def post(body: bytes, *headers: bytes) -> bytes:
    length = [f"Content-Length: {len(body)}\r\n".encode()] if not any(b"Length" in h for h in headers) else []
    return b"POST /generate/ HTTP/1.1\r\n" + AUTH + b"".join([*length, *headers]) + b"\r\n" + body


def generate(**fields) -> bytes:
    return post(json.dumps({"prompts": [[1, 2, 3]], **fields}).encode())


def test_requests_past_the_limits_are_refused_in_one_line(server):
    for request, status, reason in [
        (
            generate(max_tokens=10**9),
            400,
            "a prompt of 3 tokens \\+ max_tokens 1000000000 exceed this server's context of 512",
        ),
        (post(json.dumps({"prompts": [[5] * 600]}).encode()), 400, "a prompt of 600 tokens"),
        (generate(n=10**6), 413, "1000000 rows: this server takes at most 64 per request"),
        (post(json.dumps({"prompts": [[1]] * 65, "n": 1}).encode()), 413, "65 rows"),
        (
            post(b"{}", b"Content-Length: 9000000\r\n"),
            413,
            "the body is 9000000 bytes; this server takes at most 65536",
        ),
        (post(b"{}", b"Content-Length: 1000000000000\r\n"), 413, "at most 65536"),
        (post(b"{}", b"Content-Length: abc\r\n"), 400, "Content-Length must be one number of bytes, got abc"),
        (post(b"{}", b"Content-Length: -1\r\n"), 400, "got -1"),
        (post(b"{}", b"Content-Length: 2\r\n", b"Content-Length: 3\r\n"), 400, "one number of bytes, got 2, 3"),
        (post(b"{}", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 0\r\n"), 400, "Transfer-Encoding"),
        (b"POST /generate/ HTTP/1.1\r\n" + AUTH + b"\r\n", 411, "a POST needs a Content-Length"),
        (generate(temperature=float("nan")), 400, "the body holds NaN, which is not JSON"),
        (generate(temperature=float("inf")), 400, "the body holds Infinity"),
        (post(b'{"prompts": [[1]], "top_p": 1e999}'), 400, "top_p must be a finite number, got inf"),
        (post(b"[" * 30000 + b"]" * 30000), 400, "the body is not JSON"),
        (post(b"\xff\xfe{}"), 400, "the body is not JSON"),
        (generate(prompts=[[True, 2]]), 400, "every token id must be an int"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, ""),
        (b"\x00\x01 nonsense\r\n\r\n", 400, "^Bad "),
    ]:
        start = time.monotonic()
        code, error = status_and_error(server.raw(request, timeout=20))
        assert (code, "\n" in error) == (status, False), (request[:120], code, error)
        assert re.search(reason, error), (reason, error)
        assert time.monotonic() - start < 10
    assert server.request("POST", "/generate/", {"prompts": [[1, 2]], "max_tokens": 4}, key=KEY)[0] == 200


def test_slow_clients_are_cut_off_and_connections_capped(server):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as trickle:  # a byte every 0.3 s, forever
        with pytest.raises(OSError):  # the server closed the connection
            for byte in b"GET /info/ HTTP/1.1\r\n" + AUTH * 1000:
                trickle.send(bytes([byte]))
                time.sleep(0.3)
                assert time.monotonic() - start < 10, "still reading a trickling request"  # --read_timeout 2
    start = time.monotonic()
    half_sent = post(b'{"prompts": [[1, 2]]}', b"Content-Length: 100\r\n")
    assert status_and_error(server.raw(half_sent)) == (408, "the request took too long to arrive")
    assert time.monotonic() - start < 10
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]  # --max_connections 4
    try:
        time.sleep(0.5)
        assert status_and_error(server.raw(b"GET /health/ HTTP/1.1\r\n\r\n", timeout=5))[0] == 503
    finally:
        for connection in idle:
            connection.close()
    time.sleep(3)  # the server notices the closed connections
    assert server.request("GET", "/health/") == (200, {"status": "ok"})


def test_sigterm_during_a_generation_closes_cleanly(tmp_path):
    """On ::1 (a host the stdlib server could not bind before): a long generation is stopped at its next token,
    its client gets 503, and the server exits 0 in seconds."""
    with ServerProcess(free_port(), host="::1", log=tmp_path / "server.log") as server:
        replies = []
        long_one = {"prompts": [[1, 2, 3]], "n": 64, "max_tokens": 500, "temperature": 3.0}
        client = threading.Thread(target=lambda: replies.append(server.request("POST", "/generate/", long_one)))
        client.start()
        time.sleep(2)  # well into the generation
        assert server.process.poll() is None
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - start < 15
        client.join(10)
        assert replies == [(503, {"error": "the server is shutting down"})]
        assert "SIGTERM: closed" in server.log.read_text()


def test_command_line_mistakes_are_one_line_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, reason in [
            (["--port", str(port)], f"cannot listen on http://127.0.0.1:{port}: Address already in use"),
            (["--port", "70000"], "argument --port: 70000 is not a TCP port"),
            (["--dtype", "nonsense"], "argument --dtype: invalid choice: 'nonsense'"),
            (["--num_threads", "0"], "argument --num_threads: 0 is not a positive integer"),
            (["--host", "no.such.host.invalid"], "--host no.such.host.invalid: cannot resolve it"),
            (["--read_timeout", "nan"], "argument --read_timeout: nan is not seconds"),
        ]:
            cmd = [sys.executable, "-m", "gcpo_fast.serve", "--model", DEFAULT_MODEL, "--engine", "hf", *args]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert done.returncode == 2 and reason in done.stderr, (args, done.stderr[-2000:])
            assert len(done.stderr.splitlines()) == 1 and "Loading weights" not in done.stdout + done.stderr
