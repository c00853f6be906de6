"""RemoteEngine: a rollout engine whose model runs in a generation server (gcpo_fast/serve.py), over HTTP.

    engine = RemoteEngine("http://127.0.0.1:8000", tokenizer)            # waits up to timeout s for /health/
    rows = engine.generate(prompt_ids, 8, sampling)   # Rows with sampling_logp and policy_version per row
    engine.sync_weights(model.named_parameters(), version=step)   # streamed to the server one tensor at a time
    engine.close()

    engine = RemoteEngine("http://gpu-box:8000", tokenizer, api_key=read_api_key("key"))   # a guarded server

    engine = launch_server(model_path, tokenizer, engine="hf", log_path="run/generation_server.log")
    ...; engine.close()            # the trainer's own server, on 127.0.0.1 and a free port; close() stops it

It is an engine like the others (gcpo_fast/engines/base.py). generate() is thread-safe (each call is its own HTTP
request; the server runs one engine call at a time), so a background thread may sample while the main
thread syncs. With send_weights=False (every rank but 0 of a torchrun trainer) sync_weights consumes the
iterable (FSDP gathers each parameter on every rank) and sends nothing; under torch.distributed every rank
then meets at a barrier, so no rank samples before rank 0's update has landed. `version` is the policy
version last sent (or reported by the server): the trainer's optimizer step at the sync.

Failures are one line (TrainingError naming the URL): a server that dies, refuses (an HTTP error) or does
not answer. Every HTTP request has a timeout: request_timeout (default 1800 s: a long generation of a
large batch) for generate and weight updates, 10 s for the rest; every broadcast of the weight group has
request_timeout too. A server killed mid-update fails the stream at once (its sockets close); the rest of the
weights are still read (under FSDP every rank gathers each one), then the error is raised.

A server that went away and comes back (restarted under an --async_rollouts run: reconnect_timeout > 0) costs
a round, not the run: a generate that finds no server waits up to reconnect_timeout s for it and asks again,
and a sync that fails because the server restarted (its /info/ "instance" changed) is given up quietly: the
restarted server samples with its own weights, which its rows' policy_version says, so the trainer drops that
round and sends the weights again (gcpo_fast/async_rollouts.py). Without reconnect_timeout (synchronous runs,
whose rounds carry no such check, and the trainer's own server, which no one restarts) it stops the run.

An API key (the server's --api_key_file) goes with every request as `Authorization: Bearer <key>`.
launch_server makes one for the server it starts (handed over in its environment, never its command line),
starts it in a session of its own with --exit_on_stdin_close and keeps the pipe to its standard input: the
server ends with the trainer, whatever ends the trainer (kill -9 included).
"""

import http.client
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import torch.distributed as dist

from gcpo_fast.distributed.parallel import free_port
from gcpo_fast.engines.base import Rows, Sampling
from gcpo_fast.engines.server_http import API_KEY_ENV
from gcpo_fast.engines.weight_transport import WeightGroup, device_uuid, pick_backend
from gcpo_fast.errors import TrainingError

SHORT_TIMEOUT_S = 10.0  # health, info, communicator calls
SERVER_CLOSE_S = 45.0  # the server's shutdown grace (serve.SHUTDOWN_GRACE_S) and some


class ServerUnreachable(TrainingError):
    """No answer, or 503: the server is not there (refused, reset, closed mid-reply) or is going away."""


class RemoteEngine:
    asleep = False  # the server's memory is its own: nothing to free while the trainer updates

    def __init__(
        self,
        base_url: str,
        tokenizer,
        *,
        timeout: float = 240.0,
        request_timeout: float = 1800.0,
        group_port: int = 51216,
        send_weights: bool = True,
        process: subprocess.Popen | None = None,
        log_path: str | None = None,
        api_key: str | None = None,
        reconnect_timeout: float = 0.0,
    ):
        self.base_url, self.tokenizer = base_url.rstrip("/"), tokenizer
        self.request_timeout, self.group_port, self.send_weights = request_timeout, group_port, send_weights
        self.process, self.log_path, self.api_key = process, log_path, api_key
        self.reconnect_timeout = reconnect_timeout
        self.group: WeightGroup | None = None
        self.group_key: str | None = None  # the weight group this client formed (/init_communicator/'s key)
        self._version_lock = threading.Lock()
        wait_for_health(self.base_url, timeout, process, log_path)
        info = self._call("GET", "/info/")
        self.eos_ids: list[int] = info["eos_token_ids"]
        self.version: int = info["policy_version"]
        self.instance: str | None = info.get("instance")  # the server process the weight group belongs to
        self.backend = pick_backend(info["device_uuid"], device_uuid())

    # ---- HTTP ----

    def _call(self, method: str, path: str, payload: dict | None = None, timeout: float = SHORT_TIMEOUT_S) -> dict:
        url = self.base_url + path
        try:
            return request_json(method, url, payload, timeout, self.api_key)
        except urllib.error.HTTPError as e:
            hint = f" (the trainer sends --vllm_server_api_key_file's key, or ${API_KEY_ENV})" if e.code == 401 else ""
            error = ServerUnreachable if e.code == 503 else TrainingError  # 503: shutting down, or full
            raise error(f"generation server {url}: HTTP {e.code}: {_error_of(e)}{hint}") from None
        except (OSError, ValueError, http.client.HTTPException) as e:  # refused, reset, timed out, or not JSON
            gone = isinstance(e, (ConnectionError, http.client.HTTPException)) or isinstance(
                getattr(e, "reason", None), ConnectionError
            )
            error = ServerUnreachable if gone else TrainingError
            raise error(f"generation server {url}: {_gist(e)}{self._log_hint()}") from None

    def _log_hint(self) -> str:
        return f" (its log: {self.log_path})" if self.log_path else ""

    # ---- the engine ----

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling) -> Rows:
        """n completions of every prompt, prompt-major rows, with sampling log-probs and the policy version."""
        request = dict(
            prompts=prompt_ids,
            n=n,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0 if sampling.greedy else sampling.top_k,
            max_tokens=sampling.max_completion_length,
            logprobs=0,
            **({"stop": list(sampling.stop)} if sampling.stop else {}),
        )
        try:
            out = self._call("POST", "/generate/", request, self.request_timeout)
        except ServerUnreachable:
            if not self.reconnect_timeout:
                raise
            wait_for_health(self.base_url, self.reconnect_timeout, what="come back (/health/)")
            out = self._call("POST", "/generate/", request, self.request_timeout)  # its rows say its weights
        completions = out["completion_ids"]
        if len(completions) != n * len(prompt_ids):
            raise TrainingError(
                f"generation server {self.base_url}: {len(completions)} rows for {len(prompt_ids)} x {n}"
            )
        rows = [ids for ids in prompt_ids for _ in range(n)]
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        logp = [[token[0] for token in row] for row in out["logprobs"]]
        version = out["policy_version"]
        with self._version_lock:
            self.version = max(self.version, version)
        return Rows(rows, completions, out["truncated"], texts, logp, policy_version=[version] * len(rows))

    def sync_weights(self, named_tensors, version: int | None = None) -> None:
        """Send the weights (Hugging Face names) to the server, which records `version` (default: the last
        version + 1). send_weights=False: consume the iterable only. Then a barrier under torch.distributed."""
        version = self.version + 1 if version is None else version
        named_tensors = iter(named_tensors)
        try:
            if self.send_weights:
                self._send(named_tensors, version)
        except TrainingError:
            if not self._restarted():
                raise
        finally:
            for _ in named_tensors:  # what was not sent (every rank but 0, a failed stream): gathered all the same
                pass
        with self._version_lock:
            self.version = version
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def _send(self, named_tensors, version: int) -> None:
        group = self.group or self._connect()
        stop = threading.Event()
        with ThreadPoolExecutor(1, thread_name_prefix="update-weights") as pool:
            request = {"version": version, "key": self.group_key}  # refused if another trainer took the server since
            reply = pool.submit(self._call, "POST", "/update_weights/", request, self.request_timeout)
            reply.add_done_callback(lambda _: stop.set())  # the server answered before the end: stop sending
            try:
                group.send(named_tensors, stop)
            except (RuntimeError, ConnectionError) as e:
                self.group = None  # broken: the next sync forms a new one
                refusal = _refusal(reply)
                if refusal is not None:  # the server refused the update (and closed the group): its reason
                    raise refusal from None
                raise TrainingError(f"generation server {self.base_url}: weight stream failed: {_gist(e)}") from None
            try:
                reply.result()
            except TrainingError:
                self.group = None
                raise

    def _restarted(self) -> bool:
        """With reconnect_timeout: whether the server came back as another process than the one the weight group
        was formed with (TrainingError if it does not come back); the next sync then forms a new group."""
        if not self.reconnect_timeout:
            return False
        wait_for_health(self.base_url, self.reconnect_timeout, what="come back (/health/)")
        if self._call("GET", "/info/").get("instance") == self.instance:
            return False
        self.group = None
        print(
            f"generation server {self.base_url} restarted: the round it samples with its own weights is dropped "
            "and the weights are sent again",
            flush=True,
        )
        return True

    def _connect(self) -> WeightGroup:
        """Ask the server to host a weight group on group_port, then join it (replacing any earlier client's)."""
        backend = self.backend
        host = urlparse(self.base_url).hostname
        request = dict(host=host, port=self.group_port, world_size=2, backend=backend)  # TRL's fields
        reply = self._call("POST", "/init_communicator/", request)
        key, self.instance = reply["key"], reply.get("instance")
        self.group_key = key
        try:
            self.group = WeightGroup.join(host, self.group_port, key, backend=backend, timeout=self.request_timeout)
        except (RuntimeError, ConnectionError, TimeoutError) as e:
            raise TrainingError(
                f"generation server {self.base_url}: cannot join its weight group at {host}:{self.group_port}: "
                f"{_gist(e)}"
            ) from None
        return self.group

    def sleep(self) -> None:
        """Nothing to free here: the server's memory is not the trainer's."""

    def close(self) -> None:
        """Close the weight group; stop the server if this engine launched it (the end of its standard input:
        it finishes what it is answering, closes its engine and exits)."""
        if self.group is not None:
            self.group = None
            try:
                self._call("POST", "/close_communicator/")
            except TrainingError:
                pass  # a server already gone has nothing to close
        if self.process is not None:
            if self.process.stdin:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=SERVER_CLOSE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def request_json(method: str, url: str, payload: dict | None, timeout: float, api_key: str | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for_health(base_url: str, timeout: float, process=None, log_path=None, what: str = "answer /health/") -> None:
    """Poll GET /health/ until it answers (TRL's vllm_server_timeout); TrainingError after `timeout` s, or as
    soon as a launched server process exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            request_json("GET", base_url + "/health/", None, SHORT_TIMEOUT_S)
            return
        except (OSError, ValueError) as e:
            last = e
        if process is not None and process.poll() is not None:
            raise TrainingError(
                f"the generation server for {base_url} exited with status {process.returncode} before it served: "
                f"{_last_line(log_path)} (its log: {log_path})"
            )
        if time.monotonic() > deadline:
            raise TrainingError(f"generation server {base_url} did not {what} within {timeout:.0f} s ({_gist(last)})")
        time.sleep(0.2)


def launch_server(
    model_path,
    tokenizer,
    *,
    engine: str = "hf",
    timeout: float = 240.0,
    log_path: str | None = None,
    server_args: tuple[str, ...] = (),
    **engine_options,
) -> RemoteEngine:
    """Start `python -m gcpo_fast.serve` on 127.0.0.1 and a free port, with an API key of its own, wait for it,
    and return its RemoteEngine (whose close() stops it; its weight group on another free port unless group_port
    is given). The server's output goes to log_path (default: a temporary file), which an error names; it ends
    with this process (--exit_on_stdin_close), and it is in a session of its own, so that a terminal's Ctrl-C
    reaches the trainer alone, which then closes it."""
    port = free_port()
    engine_options.setdefault("group_port", free_port())
    if log_path is None:
        log_path = tempfile.NamedTemporaryFile(prefix="gcpo_serve_", suffix=".log", delete=False).name
    api_key = secrets.token_urlsafe(32)
    cmd = [sys.executable, "-m", "gcpo_fast.serve", "--model", str(model_path), "--engine", engine]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--exit_on_stdin_close", *server_args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, API_KEY_ENV: api_key},
            start_new_session=True,
        )  # fmt: skip
    try:
        return RemoteEngine(
            f"http://127.0.0.1:{port}", tokenizer, timeout=timeout, process=process, log_path=log_path,
            api_key=api_key, **engine_options,
        )  # fmt: skip
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise


def _refusal(reply) -> TrainingError | None:
    """The server's answer to an update whose stream failed, if it is an error and comes within SHORT_TIMEOUT_S."""
    try:
        error = reply.exception(timeout=SHORT_TIMEOUT_S)
    except TimeoutError:
        return None
    return error if isinstance(error, TrainingError) else None


def _error_of(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read())["error"]
    except (ValueError, KeyError, OSError):
        return error.reason


def _last_line(path) -> str:
    try:
        lines = [line for line in open(path).read().splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def _gist(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
