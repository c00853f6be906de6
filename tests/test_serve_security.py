"""The generation server's doors, on real server processes: where it listens (its HTTP side and its weight
group's store, one store at a time), the API key on every endpoint but /health/, a reachable address refused
without one before the model loads, and the trainer sending the key.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_serve_security.py
"""

import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from server_process import KEY, ServerProcess, listening, this_machines_address

from gcpo_fast.config import parse_config
from gcpo_fast.distributed.parallel import free_port
from gcpo_fast.engines import weight_transport
from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.remote import RemoteEngine
from gcpo_fast.engines.server_http import API_KEY_ENV
from gcpo_fast.engines.weight_transport import WeightGroup, _header, host_store
from gcpo_fast.errors import ConfigError, TrainingError
from gcpo_fast.models.loading import DEFAULT_MODEL
from gcpo_fast.serve_options import parse_args

STATE_CHANGING = [
    ("POST", "/generate/", {"prompts": [[1, 2]], "max_tokens": 2}),
    ("POST", "/init_communicator/", {"host": "127.0.0.1", "port": 1, "world_size": 2}),
    ("POST", "/update_weights/", {"version": 999}),
    ("POST", "/close_communicator/", {}),
    ("GET", "/info/", None),
    ("GET", "/get_world_size/", None),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(free_port(), api_key=KEY, log=log) as server:  # no --host: the default
        yield server


def wait_for(condition, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_the_server_listens_on_loopback_by_default(server):
    assert parse_args(["--model", "m"]).host == "127.0.0.1"
    addresses = listening(server.process.pid)
    assert (("127.0.0.1", server.port)) in addresses
    assert all(ipaddress.ip_address(a).is_loopback for a, _ in addresses), addresses
    outside = this_machines_address()
    if outside:  # this machine's other address does not reach it
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((outside, server.port), timeout=5)
    shown = subprocess.run([sys.executable, "-m", "gcpo_fast.serve", "--help"], capture_output=True, text=True)
    assert "(default: 127.0.0.1, this machine only" in " ".join(shown.stdout.split())


def test_an_api_key_guards_every_endpoint_but_health(server):
    assert server.request("GET", "/health/") == (200, {"status": "ok"})
    for method, path, body in STATE_CHANGING:
        for key in (None, "wrong", KEY + "x", KEY[:-1]):
            status, reply = server.request(method, path, body, key=key)
            assert status == 401 and "missing or wrong API key" in reply["error"], (path, key, reply)
    assert server.request("POST", "/generate/", STATE_CHANGING[0][2], key=KEY)[0] == 200
    status, info = server.request("GET", "/info/", key=KEY)
    assert status == 200 and info["policy_version"] == 0 and KEY not in str(info)
    # refused before the body is read: a huge announced body costs nothing
    head = b"POST /update_weights/ HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n"
    assert server.raw(head, timeout=10).startswith(b"HTTP/1.1 401")
    assert server.request("GET", f"/info/?key={KEY}")[0] == 404  # a key put in a URL is not logged either
    assert KEY not in server.log.read_text()


def test_the_weight_group_listens_where_the_server_does_one_store_at_a_time(server, tokenizer, hf):
    first_port, second_port = free_port(), free_port()
    first = RemoteEngine(server.base_url, tokenizer, api_key=KEY, group_port=first_port)
    first.sync_weights(hf.named_parameters(), version=1)
    addresses = listening(server.process.pid)
    assert ("127.0.0.1", first_port) in addresses
    # the store, and gloo's own listening sockets: all on the server's address
    assert all(ipaddress.ip_address(a).is_loopback for a, _ in addresses), addresses
    second = RemoteEngine(server.base_url, tokenizer, api_key=KEY, group_port=second_port)
    second.sync_weights(hf.named_parameters(), version=2)
    ports = lambda: {port for _, port in listening(server.process.pid)}  # noqa: E731
    assert second_port in ports()
    assert wait_for(lambda: first_port not in ports()), "the first client's store still listens"
    second.close()  # /close_communicator/: the group and its store
    assert wait_for(lambda: second_port not in ports()), "the store outlived /close_communicator/"
    assert ports() == {server.port}


def run_serve(*args, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != API_KEY_ENV}, **(env or {})}
    cmd = [sys.executable, "-m", "gcpo_fast.serve", "--model", DEFAULT_MODEL, "--engine", "hf", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_a_reachable_host_without_a_key_is_refused_before_the_model_loads(tmp_path):
    for args, env, reason in [
        (("--host", "0.0.0.0"), None, "--host 0.0.0.0 is reachable from other machines"),
        (("--host", "0.0.0.0"), {API_KEY_ENV: ""}, "the API key must be one word of at least 16 characters"),
        (("--api_key_file", str(tmp_path / "none")), None, "cannot read the API key"),
    ]:
        done = run_serve(*args, "--port", str(free_port()), env=env)
        assert done.returncode == 2 and reason in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Loading weights" not in done.stdout + done.stderr
    short = tmp_path / "short"
    short.write_text("hunter2\n")
    done = run_serve("--api_key_file", str(short), "--port", str(free_port()))
    assert done.returncode == 2 and "at least 16 characters" in done.stderr and "hunter2" not in done.stderr


def test_the_trainer_sends_the_key(server, tokenizer, tmp_path):
    with pytest.raises(
        TrainingError, match=r"/info/: HTTP 401: missing or wrong API key.* --vllm_server_api_key_file"
    ) as error:
        RemoteEngine(server.base_url, tokenizer)
    assert "\n" not in str(error.value)
    engine = RemoteEngine(server.base_url, tokenizer, api_key=KEY)
    assert len(engine.generate([[1, 2]], 2, Sampling(max_completion_length=4))) == 2
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    server_mode = ["--use_vllm", "--vllm_mode", "server"]
    assert parse_config([*server_mode, "--vllm_server_api_key_file", str(key_file)]).vllm.server_api_key() == KEY
    key_file.write_text("short")
    with pytest.raises(ConfigError, match="--vllm_server_api_key_file .*: the API key must be one word of at least 16"):
        parse_config([*server_mode, "--vllm_server_api_key_file", str(key_file)])


def test_a_hostile_tensor_header_costs_no_memory(server):
    """A client with the key that announces a 4 TB tensor under a parameter's name is refused from the header,
    before anything is allocated."""
    port, version = free_port(), server.request("GET", "/info/", key=KEY)[1]["policy_version"]
    status, reply = server.request("POST", "/init_communicator/", {"port": port, "world_size": 2}, key=KEY)
    assert status == 200, reply
    group = WeightGroup.join("127.0.0.1", port, reply["key"], backend="gloo", timeout=30)
    answers = []
    update = {"version": 5}
    updating = threading.Thread(
        target=lambda: answers.append(server.request("POST", "/update_weights/", update, key=KEY))
    )
    updating.start()
    group._cast(_header({"name": "model.norm.weight", "dtype": "torch.float32", "shape": [10**6, 10**6]}, "cpu"))
    updating.join(30)
    assert answers and answers[0][0] == 400, answers
    assert "has 'model.norm.weight' of shape [128], not [1000000, 1000000]" in answers[0][1]["error"]
    assert server.request("GET", "/info/", key=KEY)[1]["policy_version"] == version


def test_a_group_whose_client_never_came_closes_its_sockets(monkeypatch):
    """Its store and gloo's listening socket close once the server lets go of the group (no garbage collection)."""
    monkeypatch.setattr(weight_transport, "CONNECT_TIMEOUT_S", 2)
    before, port = listening(os.getpid()), free_port()
    store = host_store("127.0.0.1", port, timeout=2)  # as the server holds it
    group = WeightGroup.host(store, "k", backend="gloo", timeout=600, address="127.0.0.1")
    time.sleep(0.5)
    assert len(listening(os.getpid()) - before) == 2  # the store and gloo's own
    group.close()  # replaced by another client's, or /close_communicator/: the server lets go of both
    del store
    with pytest.raises(ConnectionError, match="the weight group could not form: wait timeout"):
        group.wait_ready()
    assert listening(os.getpid()) == before
