"""The generation server's command line (gcpo_fast/serve.py): its options, and the checks that run before the
model loads, each a one-line error and exit status 2.

    from gcpo_fast.serve_options import parse_args
    args = parse_args(["--model", "gcpo_fast/assets/default_model", "--engine", "hf"])   # args.api_key read too
"""

import argparse
import math
import socket

import torch

from gcpo_fast.cli import ArgumentParser
from gcpo_fast.engines.server_http import API_KEY_ENV, Limits, is_loopback, read_api_key

DTYPES = ("auto", "float32", "bfloat16", "float16", "float", "half")


def number(kind, low, high=math.inf, what="a number"):
    """An argparse type: `kind` within [low, high]."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m gcpo_fast.serve", description="The generation server (TRL's vllm-serve protocol)"
    )
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="vLLM or Hugging Face generate")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; another "
        "needs an API key)",
    )  # fmt: skip
    p.add_argument("--port", type=number(int, 1, 65535, "a TCP port (1-65535)"), default=8000)
    p.add_argument(
        "--api_key_file", default=None, help=f"file holding the API key clients must send (or ${API_KEY_ENV})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bf16 on CUDA, fp32 on the CPU (hf); vLLM's choice (vllm)"
    )
    p.add_argument(
        "--gpu_memory_utilization", type=number(float, 1e-6, 1.0, "a fraction in (0, 1]"), default=0.9,
        help="vllm: the fraction of the device it reserves",
    )  # fmt: skip
    p.add_argument(
        "--max_model_len", type=number(int, 1, what="a positive integer"), default=None,
        help="context length: every prompt + max_tokens must fit (default: the model's)",
    )  # fmt: skip
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument(
        "--num_threads", type=number(int, 1, what="a positive integer"), default=None,
        help="torch threads (hf; default: 1 on the CPU)",
    )  # fmt: skip
    p.add_argument(
        "--max_request_rows", type=number(int, 1, what="a positive integer"), default=4096,
        help="prompts x n of one /generate/",
    )  # fmt: skip
    p.add_argument(
        "--max_request_bytes", type=number(int, 1024, what="an integer >= 1024"), default=Limits.max_request_bytes,
        help="the largest request body",
    )  # fmt: skip
    p.add_argument(
        "--read_timeout", type=number(float, 0.1, 86400.0, "seconds in [0.1, 86400]"), default=Limits.read_timeout,
        help="seconds a client has to send a whole request, and to take its reply",
    )  # fmt: skip
    p.add_argument(
        "--max_connections", type=number(int, 1, 100000, "an integer in [1, 100000]"),
        default=Limits.max_connections, help="connections served at once; more get 503",
    )  # fmt: skip
    p.add_argument(
        "--exit_on_stdin_close", action="store_true",
        help="shut down when standard input closes (a launching process holds its other end)",
    )  # fmt: skip
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="1 only, for now")
    p.add_argument("--data_parallel_size", type=int, default=1, help="1 only, for now")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.num_threads is None:
        args.num_threads = torch.get_num_threads() if torch.cuda.is_available() else 1
    return args


def check_args(p: ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check: one engine per server, a host that resolves, the API key a reachable host needs
    (read here: args.api_key)."""
    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(args, name) != 1:
            p.fail(f"--{name} {getattr(args, name)} is not supported yet: one engine per server (run more servers)")
    try:
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        args.api_key = read_api_key(args.api_key_file)
    except socket.gaierror as e:
        p.fail(f"--host {args.host}: cannot resolve it ({e.strerror})")
    except ValueError as e:
        p.fail(str(e))
    if args.api_key is None and not is_loopback(args.host):
        p.fail(
            f"--host {args.host} is reachable from other machines, and anyone who reaches the server can replace "
            f"its weights: give an API key (--api_key_file FILE or ${API_KEY_ENV}), or listen on 127.0.0.1"
        )
