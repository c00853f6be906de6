"""The generation server: a rollout engine in a process of its own, behind HTTP (TRL's vllm-serve protocol).

    python -m gcpo_fast.serve --model Qwen/Qwen2.5-0.5B-Instruct --port 8000              # vLLM (the default)
    python -m gcpo_fast.serve --model gcpo_fast/assets/default_model --engine hf --port 8000   # HF generate
    python -m gcpo_fast.train --use_vllm --vllm_mode server --vllm_server_base_url http://127.0.0.1:8000 ...

    # reachable from other machines: only with an API key, which the trainer sends
    python -c 'import secrets; print(secrets.token_urlsafe())' > key && chmod 600 key
    python -m gcpo_fast.serve --model ... --host 0.0.0.0 --api_key_file key
    python -m gcpo_fast.train ... --vllm_server_base_url http://gpu-box:8000 --vllm_server_api_key_file key

Endpoints (JSON; a refusal is one line, {"error": ...}, HTTP 400 unless said otherwise):
- GET /health/ -> {"status": "ok"};  GET /get_world_size/ -> {"world_size": 1}
- GET /info/ -> {"eos_token_ids", "policy_version", "engine", "model", "device", "device_uuid", "max_model_len",
  "instance" (random per process: a client tells a restarted server by it)}
- POST /generate/ {prompts: [[token ids]...], n, temperature (0: greedy), top_p, top_k (-1 or 0: off),
  max_tokens, logprobs (0 or null), stop (strings that end a completion, kept)} -> {prompt_ids (per prompt),
  completion_ids, logprobs ([row][token][1]),
  truncated (per row), policy_version (the weights that sampled them)}. Completions are cut after their first
  EOS (kept); logprobs are the sampling log-probs (after temperature / top-k / top-p, vLLM's processed_logprobs).
  Every prompt + max_tokens must fit the context (--max_model_len; the model's own by default); prompts x n at
  most --max_request_rows (413); numbers finite; what the engine itself refuses (vLLM: temperature > 2) is 400.
- POST /init_communicator/ {port, world_size: 2, backend: "gloo"|"nccl"} hosts a weight group (see
  gcpo_fast/engines/weight_transport.py) for the client to join, its store on this server's --host and that port (TRL's
  `host` field is not read: nothing listens where the server was not told to); a second call replaces the first
  client's group, and its store too when the port differs (409 when that port cannot be bound).
  POST /close_communicator/ closes the group and its store.
- POST /update_weights/ {version, key (optional: the group's, from /init_communicator/)} receives the client's
  tensors into host memory (one copy of the weights, in the engine's dtype), never under the engine lock: a client
  that stalls mid-update stalls its own update only (up to GROUP_TIMEOUT_S a tensor), never a generation. Each
  header is checked against this server's model: a name it lacks, another shape, or a stream that misses some is
  refused by name, and nothing loads. An idle engine then loads them ({"staged": false}); a generating one
  (--async_rollouts) keeps its version until the generation in flight ends and loads them before the next
  ({"staged": true}). One update at a time per group (409). An update whose key names a group that a later
  /init_communicator/ replaced is refused, 409 "another trainer took this server", before anything is read: two
  trainers on one server fail with that line, not with gloo's.

Security. The server binds 127.0.0.1 by default. With an API key (--api_key_file FILE, or $GCPO_SERVE_API_KEY;
never a flag: the command line is visible to every user) every endpoint but /health/ wants `Authorization:
Bearer <key>` (vLLM's header), 401 otherwise; the key is never printed. Without one the server answers every
local user (said at start), and a --host that other machines reach is refused: anyone who reaches
/update_weights/ replaces the policy. HTTP is plain: across machines use a private network or an SSH tunnel.

Limits (gcpo_fast/engines/server_http.py): --max_request_bytes (413 before reading), --read_timeout for a whole request
to arrive (slow clients are cut off, 408), --max_connections open at once (503), Content-Length checked (400 /
411), JSON without NaN / Infinity. Why the stdlib http.server and not FastAPI + uvicorn (what TRL's vllm-serve and
vLLM run): this server makes one engine call at a time behind a lock, so an event loop buys nothing, and the two
limits a server on a network needs most are not in uvicorn: it has no deadline for a request to arrive (its
keep-alive timer restarts on every byte, so a trickling client holds its connection forever) and no body size
limit; both would have to be written against its private protocol classes. Here each is a few tested lines
(tests/test_serve_limits.py), and the trainer's own server (--async_rollouts) needs no dependency beyond torch.

Shutdown. SIGTERM / SIGINT (or, with --exit_on_stdin_close, the end of standard input: the trainer that launched
the server holds its other end, so the server ends with the trainer however that dies) stop accepting, stop the
HF engine's generation in flight at its next token (its client gets 503), wait up to SHUTDOWN_GRACE_S for the
requests being answered and the engine, close it and exit 0 (1 if the grace ran out). A second signal exits at
once. Mistakes in the command line (a port in use or out of range, a --dtype, --num_threads 0, a host that does
not resolve, a missing API key) are one line, exit status 2, before the model loads (gcpo_fast/serve_options.py).
The vllm engine is gcpo_fast.engines.vllm_engine.VLLMEngine (a world of one); the hf engine is HFEngine on a model of
its own (fp32 on the CPU, --dtype on CUDA, bf16 by default there), which reports its sampling log-probs too.
"""

import os
import signal
import sys
import threading
import uuid
from http import HTTPStatus

import torch

from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.engines.server_http import (
    Limits,
    RequestError,
    bind_server,
    field,
    one_line,
    parse_generate,
)
from gcpo_fast.engines.weight_transport import CONNECT_TIMEOUT_S, WeightGroup, device_uuid, host_store
from gcpo_fast.serve_options import parse_args

GROUP_TIMEOUT_S = 600.0  # each broadcast of a weight stream (a tensor of GBs over a slow link fits)
SHUTDOWN_GRACE_S = 30.0  # SIGTERM: the longest wait for the requests being answered
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class ShuttingDown(Exception):
    """Raised inside the HF engine's forward once the server stops: its generation ends there."""


class HFServeEngine(HFEngine):
    """HFEngine on a model of its own, reporting sampling log-probs; its generation stops when `stopping` is set."""

    def __init__(self, model_path: str, tokenizer, *, dtype: str, trust_remote_code: bool, stopping: threading.Event):
        from gcpo_fast.models.loading import load_causal_lm

        cuda = torch.cuda.is_available()
        torch_dtype = {"auto": torch.bfloat16 if cuda else torch.float32}.get(dtype) or getattr(torch, dtype)
        model = load_causal_lm(
            model_path, device=torch.device("cuda" if cuda else "cpu"), dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        super().__init__(model.eval().requires_grad_(False), tokenizer, sampling_logprobs=True)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.dtype = torch_dtype
        model.register_forward_pre_hook(lambda *_: self._stop_if(stopping))

    @staticmethod
    def _stop_if(stopping: threading.Event) -> None:
        if stopping.is_set():
            raise ShuttingDown()

    @torch.no_grad()
    def sync_weights(self, named_tensors) -> None:
        params = dict(self.model.named_parameters())  # the names and shapes were checked on arrival
        for name, tensor in named_tensors:
            params[name].copy_(tensor)


def build_engine(args, tokenizer, stopping: threading.Event):
    """(the engine, its context length, the dtype it holds its weights in, the errors by which it refuses a
    request's parameters)."""
    if args.engine == "hf":
        torch.set_num_threads(args.num_threads)
        engine = HFServeEngine(
            args.model, tokenizer, dtype=args.dtype, trust_remote_code=args.trust_remote_code, stopping=stopping
        )
        config = engine.model.config.get_text_config()
        context = args.max_model_len or getattr(config, "max_position_embeddings", None)
        return engine, context, engine.dtype, (ValueError,)
    from vllm.exceptions import VLLMClientError  # vLLM's request errors (its temperature <= 2, say)

    from gcpo_fast.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        args.model, tokenizer, seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    model_config = engine.llm.llm_engine.model_config
    return engine, model_config.max_model_len, model_config.dtype, (ValueError, VLLMClientError)


def model_parameters(model_path: str, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the folder's Hugging Face model (built on the meta device: no memory), which is
    what a trainer of that model sends, whatever layout the engine keeps (vLLM fuses some of them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gcpo_fast.models.loading import check_model_folder

    folder = check_model_folder(model_path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


class GenerationServer:
    """The engine, the version of its weights, and the weight group of the current client."""

    def __init__(self, engine, *, name: str, model: str, vocab_size: int, context: int | None, max_rows: int,
                 parameters: dict, dtype: torch.dtype, client_errors: tuple, bind_host: str,
                 stopping: threading.Event):  # fmt: skip
        self.engine, self.name, self.model, self.vocab_size = engine, name, model, vocab_size
        self.context, self.max_rows, self.parameters, self.dtype = context, max_rows, parameters, dtype
        self.client_errors, self.bind_host, self.stopping = client_errors, bind_host, stopping
        self.lock = threading.Lock()  # engine calls: generate, weight loads
        self.staged_lock = threading.Lock()
        self.staged: tuple[list, int] | None = None  # (tensors, version) received while the engine generated
        self.group_lock = threading.Lock()  # the current weight group and its store
        self.group: WeightGroup | None = None
        self.group_key: str | None = None  # the newest client's (its updates carry it; an older client's are refused)
        self.store, self.connections = None, 0  # one rendezvous store at a time
        self.version = 0
        self.instance = uuid.uuid4().hex

    def info(self) -> dict:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return dict(
            eos_token_ids=self.engine.eos_ids, policy_version=self.version, engine=self.name, model=self.model,
            device=device, device_uuid=device_uuid(), max_model_len=self.context, instance=self.instance,
        )  # fmt: skip

    def generate(self, request: dict) -> dict:
        prompts, n, sampling = parse_generate(request, self.vocab_size, self.context, self.max_rows)
        try:
            with self.lock:
                if self.stopping.is_set():
                    raise ShuttingDown()
                self._load_staged()
                rows = self.engine.generate(prompts, n, sampling)
                version = self.version
        except ShuttingDown:
            raise RequestError("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE) from None
        except self.client_errors as e:  # the engine's own bounds: the request's fault
            raise RequestError(f"the {self.name} engine refuses the request: {one_line(e)}") from None
        return dict(
            prompt_ids=prompts,
            completion_ids=rows.completion_ids,
            logprobs=[[[p] for p in row] for row in rows.sampling_logp],
            truncated=rows.truncated,
            policy_version=version,
        )

    def init_communicator(self, request: dict) -> dict:
        port = field(request, "port", int)
        if not 0 < port < 65536:
            raise RequestError(f"port must be a TCP port (1-65535), got {port}")
        if field(request, "world_size", int) != 2:
            raise RequestError("world_size must be 2 (this server and one client)")
        backend = request.get("backend", "gloo")
        if backend not in ("gloo", "nccl") or (backend == "nccl" and not torch.cuda.is_available()):
            raise RequestError(f"backend {str(backend)[:20]!r}: use gloo, or nccl when the server is on CUDA")
        with self.group_lock:
            self._close_group()  # a new client (a restarted trainer) replaces the previous one
            if self.store is None or self.store.port != port:
                self.store = None  # the previous store closes once no group of it is left
                try:
                    self.store = host_store(self.bind_host, port, timeout=CONNECT_TIMEOUT_S)
                except OSError as e:
                    raise RequestError(
                        f"cannot host the weight group on {self.bind_host}:{port}: {e.strerror or e}",
                        HTTPStatus.CONFLICT,
                    ) from None
            self.connections += 1
            key = f"client-{self.connections}"
            address = None if self.bind_host in WILDCARD_HOSTS else self.bind_host
            self.group = WeightGroup.host(self.store, key, backend=backend, timeout=GROUP_TIMEOUT_S, address=address)
            self.group_key = key
        return {"message": f"waiting for the client on port {port} ({backend})", "key": key, "instance": self.instance}

    def close_communicator(self) -> dict:
        with self.group_lock:
            self._close_group()
            self.store = None
        return {"message": "closed"}

    def _close_group(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def update_weights(self, request: dict) -> dict:
        version = field(request, "version", int)
        with self.group_lock:
            group, key = self.group, self.group_key
        sender = request.get("key")  # the group this client formed (ours always send it; TRL's never do)
        if sender is not None and sender != key:
            raise RequestError(
                "another trainer took this server: its /init_communicator/ replaced this client's weight group "
                "(one trainer sends weights to a server; a restarted trainer takes it over)",
                HTTPStatus.CONFLICT,
            )
        if group is None:
            raise RequestError("no weight group: call /init_communicator/ first")
        if not group.busy.acquire(blocking=False):
            raise RequestError("an update is already streaming over this weight group", HTTPStatus.CONFLICT)
        try:
            group.wait_ready()
            tensors = self._receive(group)
        except BaseException:
            with self.group_lock:  # out of step with its client: the client's next sync forms a new group
                if self.group is group:
                    self._close_group()
            group.close()
            raise
        finally:
            group.busy.release()
        with self.staged_lock:
            self.staged = (tensors, version)  # a newer whole update replaces one not yet loaded
        if self.lock.acquire(blocking=False):  # idle: into the engine now
            try:
                self._load_staged()
            finally:
                self.lock.release()
            return {"policy_version": version, "tensors": len(tensors), "staged": False}
        threading.Thread(target=self._load_staged_when_idle, daemon=True).start()
        return {"policy_version": version, "tensors": len(tensors), "staged": True}

    def _receive(self, group: WeightGroup) -> list:
        """The client's whole stream in host memory, in the engine's dtype; RequestError naming what does not
        match this server's parameters (names and shapes, refused from a tensor's header, before its bytes)."""
        received = {}

        def accept(name: str, shape: tuple) -> None:
            expected = self.parameters.get(name)
            if expected is None or shape != expected or name in received:
                why = "has no parameter" if expected is None else "was sent twice" if name in received else "has"
                shapes = f" of shape {list(expected)}, not {list(shape)}" if why == "has" else ""
                raise RequestError(f"{self._mismatch()}: this server's model {why} {name[:200]!r}{shapes}")

        try:
            for name, tensor in group.receive(accept):
                received[name] = tensor.to("cpu", self.dtype if tensor.is_floating_point() else tensor.dtype)
        except ValueError as e:  # a header this protocol does not write
            raise RequestError(str(e)) from None
        missing = [name for name in self.parameters if name not in received]
        if missing:
            raise RequestError(
                f"{self._mismatch()}: it lacks {len(missing)} of this server's {len(self.parameters)} parameters "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
        return list(received.items())

    def _mismatch(self) -> str:
        return f"the update does not match this server's model ({self.model}; another model than the trainer's?)"

    def _load_staged(self) -> None:
        """Load the staged update, if any (the lock held)."""
        with self.staged_lock:
            staged, self.staged = self.staged, None
        if staged is not None:
            self.engine.sync_weights(iter(staged[0]))
            self.version = staged[1]

    def _load_staged_when_idle(self) -> None:
        with self.lock:
            self._load_staged()

    def close(self, in_flight, grace: float) -> bool:
        """After the HTTP server stopped: wait up to `grace` s for the requests being answered (serve_http's
        InFlight) and the engine, then close the engine; False if the grace ran out (the engine left as it is)."""
        self.stopping.set()
        if not (in_flight.wait_idle(grace) and self.lock.acquire(timeout=grace)):
            return False
        self.engine.close()
        return True


def routes(server: GenerationServer) -> dict:
    """(method, path) -> (whether shutdown waits for it, handler). A stalled weight stream is not waited for."""
    return {
        ("GET", "/health/"): (True, lambda _: {"status": "ok"}),
        ("GET", "/get_world_size/"): (True, lambda _: {"world_size": 1}),
        ("GET", "/info/"): (True, lambda _: server.info()),
        ("POST", "/generate/"): (True, server.generate),
        ("POST", "/init_communicator/"): (True, server.init_communicator),
        ("POST", "/update_weights/"): (False, server.update_weights),
        ("POST", "/close_communicator/"): (True, lambda _: server.close_communicator()),
    }


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def watch_stdin(stop) -> None:
    """Call stop("standard input closed") once standard input ends (its writer exited, however it died)."""

    def read_to_end():
        while os.read(sys.stdin.fileno(), 4096):
            pass
        stop("standard input closed")

    threading.Thread(target=read_to_end, daemon=True, name="stdin-watch").start()


def main(argv=None) -> int:
    args = parse_args(argv)  # a mistake: one line, exit status 2, before anything loads
    prog = "gcpo_fast.serve"
    limits = Limits(args.max_request_bytes, args.read_timeout, args.max_connections)
    try:  # the port first, so that a port in use is said before the model loads
        httpd = bind_server(args.host, args.port, {}, limits, args.api_key)
    except OSError as e:
        print(f"{prog}: error: cannot listen on {url(args.host, args.port)}: {e.strerror or e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    stopping = threading.Event()
    try:
        from gcpo_fast.models.loading import load_tokenizer

        tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        parameters = model_parameters(args.model, args.trust_remote_code)
        engine, context, dtype, client_errors = build_engine(args, tokenizer, stopping)
    except (OSError, ValueError, ImportError) as e:
        print(f"{prog}: cannot load {args.model}: {' '.join(str(e).split())[:400]}", file=sys.stderr)
        return 1
    vocab = getattr(engine, "vocab_size", None) or len(tokenizer)
    server = GenerationServer(
        engine, name=args.engine, model=args.model, vocab_size=vocab, context=context, max_rows=args.max_request_rows,
        parameters=parameters, dtype=dtype, client_errors=client_errors, bind_host=args.host, stopping=stopping,
    )  # fmt: skip
    httpd.routes = routes(server)
    reason = []

    def stop(why: str) -> None:
        if not reason:
            reason.append(why)
            stopping.set()  # the HF engine's generation in flight ends at its next token
            threading.Thread(target=httpd.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    def on_signal(signum, _frame) -> None:
        if reason:  # a second signal: at once
            os._exit(128 + signum)
        stop(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    if args.exit_on_stdin_close:
        watch_stdin(stop)
    guard = "an API key guards it" if args.api_key else "no API key: every user of this machine may change its weights"
    print(f"{prog}: {args.engine} engine for {args.model} on {url(args.host, args.port)} ({guard})", flush=True)
    httpd.serve_forever()
    httpd.server_close()
    closed = server.close(httpd.in_flight, SHUTDOWN_GRACE_S)
    print(f"{prog}: {reason[0]}: " + ("closed" if closed else f"requests still running after {SHUTDOWN_GRACE_S:.0f} s"))
    return 0 if closed else 1


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # not sys.exit: a thread may still be inside a native call (a weight stream waiting on its peer), which the
    # interpreter's teardown would abort (exit status -6)
    os._exit(status)
