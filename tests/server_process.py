"""Helpers for the tests that run `python -m gcpo_fast.serve` as a real process and talk to it over raw HTTP.

with ServerProcess(port, "--read_timeout", "2", api_key=KEY, log=tmp_path / "server.log") as server:
    status, body = server.request("POST", "/generate/", {"prompts": [[1, 2]]}, key=KEY)
    server.raw(b"GET /health/ HTTP/1.1\\r\\n\\r\\n")       # the bytes the server answered
listening(server.process.pid)                              # {(address, port)} it listens on
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gcpo_fast.engines.server_http import API_KEY_ENV
from gcpo_fast.models.loading import DEFAULT_MODEL

KEY = "test-key-0123456789abcdef"


class ServerProcess:
    """The hf engine on the shipped model, on `host`:`port` (host None: the server's default), its output in the
    file `log`."""

    def __init__(self, port: int, *args: str, log: Path, host: str | None = None, api_key: str | None = None):
        self.port, self.host = port, host or "127.0.0.1"
        self.base_url = f"http://[{self.host}]:{port}" if ":" in self.host else f"http://{self.host}:{port}"
        self.log = Path(log)
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        env = {**env, "OMP_NUM_THREADS": "1", **({API_KEY_ENV: api_key} if api_key else {})}
        cmd = [sys.executable, "-m", "gcpo_fast.serve", "--model", DEFAULT_MODEL, "--engine", "hf"]
        cmd += [*(["--host", host] if host else []), "--port", str(port), *args]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def __enter__(self):
        self.wait_until_up()
        return self

    def __exit__(self, *_):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait_until_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.request("GET", "/health/")[0] != 200:
            assert self.process.poll() is None, f"the server exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.3)

    def request(self, method: str, path: str, body=None, key: str | None = None, timeout: float = 60):
        """(HTTP status, JSON body), or (0, error) when nothing answered."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except OSError as e:
            return 0, str(e)

    def raw(self, data: bytes, timeout: float = 30) -> bytes:
        """What the server sends back to these bytes, until it closes (or `timeout` s of silence)."""
        with socket.create_connection((self.host, self.port)) as s:
            s.sendall(data)
            s.settimeout(timeout)
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except TimeoutError:
                pass
            return out


def status_and_error(reply: bytes) -> tuple[int, str]:
    """The status code and the "error" of a raw HTTP reply (one JSON line)."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body)["error"]


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, words), int(port, 16)))
    return found


def this_machines_address() -> str | None:
    """An address of this machine that is not loopback (the source of its default route; no packet is sent), or
    None on a machine without one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address
