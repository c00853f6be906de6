"""The generation server's HTTP layer: the stdlib's ThreadingHTTPServer with the limits a server that changes a
policy needs (gcpo_fast/serve.py says why this and not FastAPI + uvicorn).

    limits = Limits(max_request_bytes=64 << 20, read_timeout=60.0, max_connections=64)
    httpd = bind_server("127.0.0.1", 8000, routes, limits, api_key=read_api_key(None))   # OSError: port in use
    httpd.serve_forever()       # each route: handler(body dict) -> reply dict, or raise RequestError

What a request meets, in order (each refusal is one JSON line, {"error": ...}, and none echoes a secret):
- more than max_connections connections at once: 503, closed at once (no thread is started for it);
- read_timeout seconds to send the whole request (request line, headers, body) from when the server starts
  waiting for it, whatever the pace (a client trickling a byte a second is cut off as one that sends nothing):
  408 and closed; the same time to take the reply;
- an unknown path: 404; with an API key, every endpoint but GET /health/ wants `Authorization: Bearer <key>`
  (vLLM's --api-key header): 401 otherwise, compared in constant time;
- the body: Content-Length only (no chunked bodies), ASCII digits: 400 otherwise, 411 on a POST without one,
  413 past max_request_bytes (refused before a byte of it is read); a JSON object, with no NaN or Infinity
  (json.loads would take them): 400;
- POST /generate/ (parse_generate): TRL's fields, finite numbers, every prompt + max_tokens within the model's
  context (400), prompts x n within the server's --max_request_rows (413), token ids within the vocabulary.
A refused request whose body was not read closes its connection, so that its bytes are never read as a
request. The API key comes from a file (--api_key_file) or the environment (GCPO_SERVE_API_KEY), never from
the command line, where every user of the machine sees it (ps).
"""

import contextlib
import hmac
import io
import ipaddress
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gcpo_fast.engines.base import Sampling

API_KEY_ENV = "GCPO_SERVE_API_KEY"
MIN_API_KEY_CHARS = 16  # a key shorter than this is a password, not a secret
ERROR_CHARS = 400  # an error line is cut to this length
OPEN_ROUTES = {("GET", "/health/")}  # what answers without the API key (health checks)


class RequestError(Exception):
    """A request the server refuses: HTTP `status` with this one-line message."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 64 << 20
    read_timeout: float = 60.0
    max_connections: int = 64


def read_api_key(path: str | None, option: str = "--api_key_file") -> str | None:
    """The API key from the file at `path` (given by `option`), else from $GCPO_SERVE_API_KEY, else None;
    ValueError (one line, without the key) for a file that cannot be read, or a key that is empty or too short."""
    source, key = (f"{option} {path}", None) if path else (API_KEY_ENV, os.environ.get(API_KEY_ENV))
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{source}: cannot read the API key ({getattr(e, 'strerror', None) or e})") from None
    if key is None:
        return None
    key = key.strip()
    if len(key) < MIN_API_KEY_CHARS or any(c.isspace() for c in key):
        raise ValueError(
            f"{source}: the API key must be one word of at least {MIN_API_KEY_CHARS} characters, "
            f"e.g. python -c 'import secrets; print(secrets.token_urlsafe())'"
        )
    return key


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one (127.0.0.0/8, ::1): only this machine reaches
    a server bound there."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _refuse_constant(name: str):
    raise RequestError(f"the body holds {name}, which is not JSON (use a finite number)")


def parse_json_object(data: bytes) -> dict:
    """The body as a JSON object; RequestError (400) otherwise, NaN and Infinity included."""
    try:
        body = json.loads(data or b"{}", parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"the body is not JSON: {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def field(request: dict, name: str, kind: type, default=None):
    value = request.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RequestError(f"{name} must be {kind.__name__}, got {str(value)[:40]!r}")
    if kind is float and not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value}")
    return value


GENERATE_FIELDS = {"prompts", "n", "temperature", "top_p", "top_k", "max_tokens", "logprobs", "repetition_penalty"}
GENERATE_FIELDS |= {"min_p", "images", "structured_outputs_regex", "generation_kwargs"}  # TRL's, at their defaults
GENERATE_FIELDS |= {"stop"}  # vLLM's name: strings that end a completion (a tool call's end), kept in it


def parse_generate(
    request: dict, vocab_size: int, context: int | None, max_rows: int
) -> tuple[list[list[int]], int, Sampling]:
    unknown = sorted(set(request) - GENERATE_FIELDS)
    if unknown:
        raise RequestError(f"unknown fields {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    unsupported = [
        k for k, default in (("repetition_penalty", 1.0), ("min_p", 0.0)) if request.get(k, default) != default
    ] + [k for k in ("images", "structured_outputs_regex", "generation_kwargs") if request.get(k)]
    if unsupported:
        raise RequestError(f"not supported by this server: {unsupported}")
    prompts = request.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts):
        raise RequestError("prompts must be a non-empty list of non-empty token-id lists")
    n, max_tokens = field(request, "n", int, 1), field(request, "max_tokens", int, 16)
    temperature, top_p = field(request, "temperature", float, 1.0), field(request, "top_p", float, 1.0)
    top_k = field(request, "top_k", int, -1)
    if request.get("logprobs", 0) not in (0, None):
        raise RequestError("logprobs: only 0 (the sampled token's log-prob) is supported")
    if n < 1 or max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or top_k < -1:
        raise RequestError("n and max_tokens must be >= 1, temperature >= 0, top_p in (0, 1], top_k >= -1")
    if len(prompts) * n > max_rows:
        raise RequestError(
            f"{len(prompts)} prompts x n {n} = {len(prompts) * n} rows: this server takes at most {max_rows} per "
            "request (its --max_request_rows)",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    longest = max(len(p) for p in prompts)
    if context is not None and longest + max_tokens > context:
        raise RequestError(
            f"a prompt of {longest} tokens + max_tokens {max_tokens} exceed this server's context of {context} "
            "tokens (its --max_model_len)"
        )
    if not all(type(t) is int and 0 <= t < vocab_size for p in prompts for t in p):
        raise RequestError(f"prompts: every token id must be an int in [0, {vocab_size})")
    stop = request.get("stop") or []
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop):
        raise RequestError("stop must be a list of at most 16 non-empty strings of at most 64 characters")
    greedy = temperature == 0
    sampling = Sampling(max_tokens, 1.0 if greedy else temperature, top_p, max(top_k, 0), greedy, tuple(stop))
    return prompts, n, sampling


class _DeadlineReader(io.RawIOBase):
    """The connection's bytes, each read given only the time left before the handler's deadline."""

    def __init__(self, connection: socket.socket, handler: "_Handler"):
        self.connection, self.handler = connection, handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self.connection.settimeout(left)
        return self.connection.recv_into(buffer)


class InFlight:
    """Requests being answered: shutdown waits for them (bounded)."""

    def __init__(self):
        self.count, self.changed = 0, threading.Condition()

    def __enter__(self):
        with self.changed:
            self.count += 1

    def __exit__(self, *_):
        with self.changed:
            self.count -= 1
            self.changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count == 0, timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "BoundedHTTPServer"

    def setup(self):
        super().setup()
        self.rfile.close()  # the stdlib's reader; ours gives each read only the time left
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))
        self.deadline = time.monotonic() + self.server.limits.read_timeout

    def handle_one_request(self):
        self.deadline = time.monotonic() + self.server.limits.read_timeout  # for this request, from now
        super().handle_one_request()  # a request line or headers past the deadline: closed (the stdlib's)

    def do_GET(self):
        self.serve("GET")

    def do_POST(self):
        self.serve("POST")

    def serve(self, method: str):
        path = self.path if self.path.endswith("/") else self.path + "/"
        route = self.server.routes.get((method, path))
        try:
            body = self.receive(method, path, route)
        except RequestError as e:
            self.close_connection = True  # its body may be unread
            self.reply(e.status, {"error": one_line(e)})
            return
        if body is None:  # the client left mid-request: nobody to answer
            return
        drain, handler = route
        with self.server.in_flight if drain else contextlib.nullcontext():  # the reply too, an error's included
            try:
                self.reply(HTTPStatus.OK, handler(body))
            except RequestError as e:
                self.reply(e.status, {"error": one_line(e)})
            except Exception as e:  # the engine or the weight stream failed: one line to the client, the trace here
                self.log_error("%s %s failed: %s", method, path, one_line(repr(e)))
                self.reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {one_line(e)}"})

    def receive(self, method: str, path: str, route) -> dict | None:
        """The request's body, checked (RequestError otherwise); None if the client left before its end."""
        if route is None:
            raise RequestError(f"no endpoint {method} {one_line(self.path)[:100]}", HTTPStatus.NOT_FOUND)
        if (method, path) not in OPEN_ROUTES:
            self.check_api_key()
        try:
            data = self.read_body(method)
        except TimeoutError:
            self.close_connection = True
            raise RequestError("the request took too long to arrive", HTTPStatus.REQUEST_TIMEOUT) from None
        except ConnectionError:
            self.close_connection = True
            return None
        return parse_json_object(data)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own refusals (a malformed request line or headers, an unknown method) as one JSON line."""
        self.close_connection = True
        self.request_version = self.protocol_version  # a line it could not parse is no HTTP/0.9: a status line too
        self.reply(HTTPStatus(code), {"error": one_line(message or HTTPStatus(code).phrase)})

    def check_api_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode()):
            self.close_connection = True  # its body, if any, is left unread
            raise RequestError(
                "missing or wrong API key: send the server's key as 'Authorization: Bearer <key>'",
                HTTPStatus.UNAUTHORIZED,
            )

    def read_body(self, method: str) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError("Transfer-Encoding is not supported: send the body with a Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            if method == "POST":
                self.close_connection = True
                raise RequestError("a POST needs a Content-Length", HTTPStatus.LENGTH_REQUIRED)
            return b""
        if len(set(lengths)) != 1 or not re.fullmatch(r"[0-9]+", lengths[0]):
            self.close_connection = True
            raise RequestError(f"Content-Length must be one number of bytes, got {one_line(', '.join(lengths))[:60]}")
        limit = self.server.limits.max_request_bytes
        length = int(lengths[0]) if len(lengths[0]) <= 20 else limit + 1  # more digits than any limit has
        if length > limit:
            self.close_connection = True
            raise RequestError(
                f"the body is {length} bytes; this server takes at most {limit} (its --max_request_bytes)",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        data = self.rfile.read(length)
        if len(data) < length:  # the client closed before the end
            raise ConnectionResetError("the client closed the connection mid-request")
        return data

    def reply(self, status: HTTPStatus, payload: dict):
        data = json.dumps(payload).encode()
        self.connection.settimeout(self.server.limits.read_timeout)  # a client that does not read its reply
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", "Bearer")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away: nobody to tell
            self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002 (the base class's name); quiet for health polls
        if "/health/" not in str(getattr(self, "path", "")):
            line = format % args
            if self.server.api_key:  # a client that put the key where it does not belong (a URL) is not echoed
                line = line.replace(self.server.api_key, "<API key>")
            super().log_message("%s", line)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most limits.max_connections of them; the rest get 503 at once."""

    daemon_threads = True

    def __init__(self, address, family, routes, limits: Limits, api_key: str | None):
        self.address_family = family
        self.routes, self.limits, self.api_key = routes, limits, api_key
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        self.in_flight = InFlight()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            _refuse_busy(request, self.limits.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _refuse_busy(connection: socket.socket, limit: int) -> None:
    data = json.dumps({"error": f"the server has {limit} connections open, its --max_connections: try again"})
    head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    try:
        connection.setblocking(False)  # never wait on a client here: this is the accepting thread
        connection.send((head + "Connection: close\r\n\r\n" + data).encode())
    except OSError:
        pass


Route = tuple[bool, Callable[[dict], dict]]  # (shutdown waits for it, handler)


def bind_server(
    host: str, port: int, routes: dict[tuple[str, str], Route], limits: Limits, api_key: str | None
) -> BoundedHTTPServer:
    """The server bound to host:port (IPv4 or IPv6, as host resolves) and listening, not yet serving; OSError
    when the address cannot be bound."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return BoundedHTTPServer((host, port), family, routes, limits, api_key)
