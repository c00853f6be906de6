"""The generation server: a rollout engine in a process of its own, behind HTTP (TRL's vllm-serve protocol).

    python -m gcpo_fast.serve --model Qwen/Qwen2.5-0.5B-Instruct --port 8000              # vLLM (the default)
    python -m gcpo_fast.serve --model gcpo_fast/assets/default_model --engine hf --port 8000   # HF generate
    python -m gcpo_fast.train --use_vllm --vllm_mode server --vllm_server_base_url http://127.0.0.1:8000 ...

Endpoints (JSON; a bad request is HTTP 400 with a one-line "error"):
- GET /health/ -> {"status": "ok"};  GET /get_world_size/ -> {"world_size": 1}
- GET /info/ -> {"eos_token_ids", "policy_version", "engine", "model", "device", "device_uuid"}
- POST /generate/ {prompts: [[token ids]...], n, temperature (0: greedy), top_p, top_k (-1 or 0: off),
  max_tokens, logprobs (0 or null), stop (strings that end a completion, kept)} -> {prompt_ids (per prompt),
  completion_ids, logprobs ([row][token][1]),
  truncated (per row), policy_version (the weights that sampled them)}. Completions are cut after their first
  EOS (kept); logprobs are the sampling log-probs (after temperature / top-k / top-p, vLLM's processed_logprobs).
- POST /init_communicator/ {host, port, world_size: 2, backend: "gloo"|"nccl"} hosts a weight group (see
  gcpo_fast/engines/weight_transport.py) for the client to join; a second call replaces the first client's group.
- POST /update_weights/ {version} receives the client's tensors one at a time and answers {"policy_version",
  "tensors", "staged"}. An idle engine loads them as they arrive. An engine that is generating (rounds sampled
  ahead of the trainer, --async_rollouts) keeps its version: the tensors are staged in host memory (one copy of
  the weights) and loaded as soon as the generation in flight ends, before any later one, so the trainer never
  waits for a generation to finish. POST /close_communicator/ drops the group.
Engine calls hold one lock: a generate and a weight load never interleave. SIGTERM / SIGINT close the engine.
The vllm engine is gcpo_fast.engines.vllm_engine.VLLMEngine (a world of one); the hf engine is HFEngine on a model of
its own (fp32 on the CPU, --dtype on CUDA, bf16 by default there), which reports its sampling log-probs too.
"""

import argparse
import json
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.engines.weight_transport import WeightGroup, device_uuid, host_store

GROUP_TIMEOUT_S = 1800.0  # a weight stream's every broadcast, and the wait for the client to join


class BadRequest(ValueError):
    """A request the server cannot serve: HTTP 400 with this message."""


class HFServeEngine(HFEngine):
    """HFEngine on a model of its own, reporting sampling log-probs; sync_weights copies tensors in by name."""

    def __init__(self, model_path: str, tokenizer, *, dtype: str, trust_remote_code: bool):
        from gcpo_fast.models.loading import load_causal_lm

        cuda = torch.cuda.is_available()
        torch_dtype = {"auto": torch.bfloat16 if cuda else torch.float32}.get(dtype) or getattr(torch, dtype)
        model = load_causal_lm(
            model_path, device=torch.device("cuda" if cuda else "cpu"), dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        super().__init__(model.eval().requires_grad_(False), tokenizer, sampling_logprobs=True)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]

    @torch.no_grad()
    def sync_weights(self, named_tensors) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                raise BadRequest(f"the model has no parameter {name!r}")
            if params[name].shape != tensor.shape:
                raise BadRequest(f"{name}: shape {list(tensor.shape)}, the model's is {list(params[name].shape)}")
            params[name].copy_(tensor)


def build_engine(args, tokenizer):
    if args.engine == "hf":
        torch.set_num_threads(args.num_threads)
        return HFServeEngine(args.model, tokenizer, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    from gcpo_fast.engines.vllm_engine import VLLMEngine

    return VLLMEngine(
        args.model, tokenizer, seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip


class GenerationServer:
    """The engine, the version of its weights, and the weight group of the current client."""

    def __init__(self, engine, *, name: str, model: str, vocab_size: int):
        self.engine, self.name, self.model, self.vocab_size = engine, name, model, vocab_size
        self.lock = threading.Lock()  # engine calls: generate, weight loads
        self.staged_lock = threading.Lock()
        self.staged: tuple[list, int] | None = None  # (tensors, version) received while the engine generated
        self.group_lock = threading.Lock()  # the current weight group
        self.group: WeightGroup | None = None
        self.store, self.store_address, self.connections = None, None, 0  # the rendezvous store, hosted once
        self.version = 0

    def info(self) -> dict:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return dict(
            eos_token_ids=self.engine.eos_ids, policy_version=self.version, engine=self.name, model=self.model,
            device=device, device_uuid=device_uuid(),
        )  # fmt: skip

    def generate(self, request: dict) -> dict:
        prompts, n, sampling = parse_generate(request, self.vocab_size)
        with self.lock:
            self._load_staged()
            rows = self.engine.generate(prompts, n, sampling)
            version = self.version
        return dict(
            prompt_ids=prompts,
            completion_ids=rows.completion_ids,
            logprobs=[[[p] for p in row] for row in rows.sampling_logp],
            truncated=rows.truncated,
            policy_version=version,
        )

    def init_communicator(self, request: dict) -> dict:
        host, port = field(request, "host", str), field(request, "port", int)
        if field(request, "world_size", int) != 2:
            raise BadRequest("world_size must be 2 (this server and one client)")
        backend = request.get("backend", "gloo")
        if backend not in ("gloo", "nccl") or (backend == "nccl" and not torch.cuda.is_available()):
            raise BadRequest(f"backend {backend!r}: use gloo, or nccl when the server is on CUDA")
        with self.group_lock:
            if self.store is None or self.store_address != (host, port):
                self.store, self.store_address = host_store(host, port, timeout=GROUP_TIMEOUT_S), (host, port)
            self.connections += 1
            key = f"client-{self.connections}"  # a new group replaces the previous client's (a restarted trainer)
            self.group = WeightGroup.host(self.store, key, backend=backend, timeout=GROUP_TIMEOUT_S)
        return {"message": f"waiting for the client on port {port} ({backend})", "key": key}

    def close_communicator(self) -> dict:
        with self.group_lock:
            self.group = None
        return {"message": "closed"}

    def update_weights(self, request: dict) -> dict:
        version = field(request, "version", int)
        with self.group_lock:
            group = self.group
        if group is None:
            raise BadRequest("no weight group: call /init_communicator/ first")
        group.wait_ready()
        if self.lock.acquire(blocking=False):  # idle: straight into the engine, one tensor at a time
            try:
                self._load_staged()  # an older staged update would otherwise land after this one
                count = self._load(group.receive(), version)
            finally:
                self.lock.release()
            return {"policy_version": version, "tensors": count, "staged": False}
        staged = [(name, tensor.cpu()) for name, tensor in group.receive()]
        with self.staged_lock:
            self.staged = (staged, version)  # a newer whole update replaces one not yet loaded
        threading.Thread(target=self._load_staged_when_idle, daemon=True).start()
        return {"policy_version": version, "tensors": len(staged), "staged": True}

    def _load(self, received, version: int) -> int:
        """Feed the engine (the lock held); the number of tensors."""
        count = 0

        def counted():
            nonlocal count
            for item in received:
                count += 1
                yield item

        stream = counted()
        try:
            self.engine.sync_weights(stream)
        finally:
            for _ in stream:  # what the engine left (it stopped on an error): keep the client's stream in step
                pass
        self.version = version
        return count

    def _load_staged(self) -> None:
        """Load the staged update, if any (the lock held)."""
        with self.staged_lock:
            staged, self.staged = self.staged, None
        if staged is not None:
            self._load(iter(staged[0]), staged[1])

    def _load_staged_when_idle(self) -> None:
        with self.lock:
            self._load_staged()


def field(request: dict, name: str, kind: type, default=None):
    value = request.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"{name} must be {kind.__name__}, got {value!r}")
    return value


GENERATE_FIELDS = {"prompts", "n", "temperature", "top_p", "top_k", "max_tokens", "logprobs", "repetition_penalty"}
GENERATE_FIELDS |= {"min_p", "images", "structured_outputs_regex", "generation_kwargs"}  # TRL's, at their defaults
GENERATE_FIELDS |= {"stop"}  # vLLM's name: strings that end a completion (a tool call's end), kept in it


def parse_generate(request: dict, vocab_size: int) -> tuple[list[list[int]], int, Sampling]:
    unknown = sorted(set(request) - GENERATE_FIELDS)
    if unknown:
        raise BadRequest(f"unknown fields {unknown}")
    unsupported = [
        k for k, default in (("repetition_penalty", 1.0), ("min_p", 0.0)) if request.get(k, default) != default
    ] + [k for k in ("images", "structured_outputs_regex", "generation_kwargs") if request.get(k)]
    if unsupported:
        raise BadRequest(f"not supported by this server: {unsupported}")
    prompts = request.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts):
        raise BadRequest("prompts must be a non-empty list of non-empty token-id lists")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for p in prompts for t in p):
        raise BadRequest(f"prompts: every token id must be an int in [0, {vocab_size})")
    n, max_tokens = field(request, "n", int, 1), field(request, "max_tokens", int, 16)
    temperature, top_p = field(request, "temperature", float, 1.0), field(request, "top_p", float, 1.0)
    top_k = field(request, "top_k", int, -1)
    if request.get("logprobs", 0) not in (0, None):
        raise BadRequest("logprobs: only 0 (the sampled token's log-prob) is supported")
    if n < 1 or max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or top_k < -1:
        raise BadRequest("n and max_tokens must be >= 1, temperature >= 0, top_p in (0, 1], top_k >= -1")
    stop = request.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a list of non-empty strings")
    greedy = temperature == 0
    sampling = Sampling(max_tokens, 1.0 if greedy else temperature, top_p, max(top_k, 0), greedy, tuple(stop))
    return prompts, n, sampling


def make_handler(server: GenerationServer):
    routes = {
        ("GET", "/health/"): lambda _: {"status": "ok"},
        ("GET", "/get_world_size/"): lambda _: {"world_size": 1},
        ("GET", "/info/"): lambda _: server.info(),
        ("POST", "/generate/"): server.generate,
        ("POST", "/init_communicator/"): server.init_communicator,
        ("POST", "/update_weights/"): server.update_weights,
        ("POST", "/close_communicator/"): lambda _: server.close_communicator(),
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.serve("GET")

        def do_POST(self):
            self.serve("POST")

        def serve(self, method: str):
            route = routes.get((method, self.path if self.path.endswith("/") else self.path + "/"))
            try:
                if route is None:
                    raise LookupError(f"no endpoint {method} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if method == "POST" else {}
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                self.reply(HTTPStatus.OK, route(body))
            except LookupError as e:
                self.reply(HTTPStatus.NOT_FOUND, {"error": str(e)})
            except (BadRequest, json.JSONDecodeError) as e:
                self.reply(HTTPStatus.BAD_REQUEST, {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # the engine or the weight stream failed: one line to the client, the trace here
                self.log_error("%s %s failed: %r", method, self.path, e)
                self.reply(
                    HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
                )

        def reply(self, status: HTTPStatus, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # noqa: A002 (the base class's name); quiet for health polls
            if "/health/" not in self.path:
                super().log_message(format, *args)

    return Handler


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gcpo_fast.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="vLLM (default) or Hugging Face generate")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on the CPU (hf); vLLM's choice (vllm)")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vllm: the fraction it reserves")
    p.add_argument("--max_model_len", type=int, default=None, help="vllm: context length")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--num_threads", type=int, default=None, help="torch threads (hf; default: 1 on the CPU)")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="1 only, for now")
    p.add_argument("--data_parallel_size", type=int, default=1, help="1 only, for now")
    args = p.parse_args(argv)
    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(args, name) != 1:
            p.error(f"--{name} {getattr(args, name)} is not supported yet: one engine per server (run more servers)")
    if args.num_threads is None:
        args.num_threads = torch.get_num_threads() if torch.cuda.is_available() else 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        from gcpo_fast.models.loading import load_tokenizer

        tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        engine = build_engine(args, tokenizer)
    except (OSError, ValueError, ImportError) as e:
        print(f"gcpo_fast.serve: cannot load {args.model}: {' '.join(str(e).split())[:400]}", file=sys.stderr)
        return 1
    vocab = getattr(engine, "vocab_size", None) or len(tokenizer)
    server = GenerationServer(engine, name=args.engine, model=args.model, vocab_size=vocab)
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(server))
    httpd.daemon_threads = True

    def stop(signum, _frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"gcpo_fast.serve: {args.engine} engine for {args.model} on http://{args.host}:{args.port}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
