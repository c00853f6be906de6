"""Weights from a trainer to a generation server, one tensor at a time, over a process group of their own.

    # the server (rank 0) hosts the rendezvous store; each client connection is a group under its own key
    store = host_store("127.0.0.1", 51216, timeout=60.0)        # listens on that address only
    server = WeightGroup.host(store, "client-1", backend="gloo", timeout=600.0, address="127.0.0.1")  # at once
    client = WeightGroup.join("127.0.0.1", 51216, "client-1", backend="gloo", timeout=1800.0)  # until both are in
    client.send(model.named_parameters())              # the iterable is consumed lazily, tensor by tensor
    for name, tensor in server.receive(): ...          # yields each tensor as it arrives, until the end mark

The group is a ProcessGroupGloo (ProcessGroupNCCL when both sides are on CUDA) built directly on a prefix of
the server's TCPStore, so it never touches torch.distributed's default group (a torchrun trainer has one
already), and a second client (a restarted trainer) forms a new group under a new key on the same store and
port while the old group, whose peer is gone, is dropped. Nothing listens on an address it was not given: the
store on the socket host_store binds (a TCPStore alone listens on every interface), gloo's connections on the
server's address (the client's: the one that reaches the server). A store closes once no group of it is left.
The group forms within CONNECT_TIMEOUT_S (the client joins right after the server hosts it); `timeout` then
bounds each broadcast.
Each tensor travels as two broadcasts from the client: a fixed-size header (the JSON of its name, dtype and
shape, zero-padded; an empty header ends the stream) and the tensor itself. Every operation has the group's
timeout; a peer that dies mid-stream fails the other side's broadcast at once (its socket closes).
"""

import json
import socket
import threading
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

HEADER_BYTES = 4096  # a parameter's JSON header (name, dtype, shape) must fit
CONNECT_TIMEOUT_S = 60.0  # the client's wait for the server's store, and for the group to form
SERVER, CLIENT = 0, 1  # ranks; the client is the source of every broadcast
DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)}


class WeightGroup:
    """One side of a two-process weight stream."""

    def __init__(self, store: dist.Store, rank: int, backend: str, timeout: float, address: str | None = None):
        self.store, self.rank, self.backend, self.address = store, rank, backend, address
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.timeout = timedelta(seconds=timeout)
        self.group = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.busy = threading.Lock()  # one stream at a time over a group

    @classmethod
    def host(
        cls, store: dist.TCPStore, key: str, *, backend: str, timeout: float, address: str | None = None
    ) -> "WeightGroup":
        """The server's side, on its store (host_store): the group forms in a thread as soon as the client
        joins under the same key (wait_ready() waits for it). address: where gloo listens (None: the address
        of this machine's hostname, for a server bound to every interface)."""
        side = cls(dist.PrefixStore(key, store), SERVER, backend, timeout, address)
        threading.Thread(target=side._form, daemon=True, name="weight-group").start()
        return side

    @classmethod
    def join(cls, host: str, port: int, key: str, *, backend: str, timeout: float) -> "WeightGroup":
        """The client's side: connect to the server's store and form the group (blocks until both are in)."""
        # the server's store listens already (the server answered /init_communicator/): a short connect timeout
        connect = timedelta(seconds=min(timeout, CONNECT_TIMEOUT_S))
        store = dist.TCPStore(host, port, None, is_master=False, timeout=connect)
        side = cls(dist.PrefixStore(key, store), CLIENT, backend, timeout, address=local_address_towards(host, port))
        side._form()
        side.wait_ready()
        return side

    def _form(self) -> None:
        try:
            if self.backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = self.timeout
                self.group = dist.ProcessGroupNCCL(self.store, self.rank, 2, options)
            else:
                # the options torch.distributed's own tests use to pick gloo's address; the timeout here bounds
                # the forming only: every broadcast passes its own
                options = dist.ProcessGroupGloo._Options()
                options._timeout = timedelta(seconds=min(self.timeout.total_seconds(), CONNECT_TIMEOUT_S))
                options._devices = [
                    dist.ProcessGroupGloo.create_device(hostname=self.address)
                    if self.address
                    else dist.ProcessGroupGloo.create_default_device()
                ]
                self.group = dist.ProcessGroupGloo(self.store, self.rank, 2, options)
        except Exception as e:  # surfaced by wait_ready, in the thread that asks
            self.error = _gist(e)  # not the exception: its traceback would hold this side, and the store, alive
        finally:
            self.store = None  # the group keeps what it needs of it; a group that did not form lets it close
            self.ready.set()

    def wait_ready(self) -> None:
        if not self.ready.wait(CONNECT_TIMEOUT_S + 5):
            raise TimeoutError(f"the weight group's peer did not join within {CONNECT_TIMEOUT_S:.0f} s")
        if self.error is not None:
            raise ConnectionError(f"the weight group could not form: {self.error}")

    def _cast(self, tensor: torch.Tensor) -> None:
        group = self.group
        if group is None:
            raise ConnectionError("the weight group was closed")
        options = dist.BroadcastOptions()
        options.rootRank = CLIENT
        options.timeout = self.timeout
        group.broadcast([tensor], options).wait()

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], stop: threading.Event | None = None) -> int:
        """Stream every (name, tensor), then the end mark; the number sent. `stop`, when set between two
        tensors (the server refused the update), ends the stream early with a ConnectionError."""
        count = 0
        for name, tensor in named_tensors:
            if stop is not None and stop.is_set():
                raise ConnectionError("the server ended the update")
            tensor = tensor.detach()
            if str(tensor.dtype) not in DTYPES:
                raise ValueError(f"{name}: dtype {tensor.dtype} cannot be sent (one of {', '.join(DTYPES)})")
            self._cast(_header({"name": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}, self.device))
            self._cast(tensor.to(self.device).contiguous())
            count += 1
        self._cast(_header(None, self.device))
        return count

    def receive(self, accept=None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) as each arrives, until the client's end mark. accept(name, shape), when given, sees each
        header before its tensor is allocated (it raises to refuse one: a hostile shape costs no memory); a
        header that is not one this module writes is a ValueError."""
        while True:
            header = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.device)
            self._cast(header)
            meta = _parse(header)
            if meta is None:
                return
            if accept is not None:
                accept(meta["name"], tuple(meta["shape"]))
            tensor = torch.empty(meta["shape"], dtype=DTYPES[meta["dtype"]], device=self.device)
            self._cast(tensor)
            yield meta["name"], tensor

    def close(self) -> None:
        """Drop the group: its sockets close with it, at once or when a broadcast in flight ends."""
        self.group = self.store = None


def device_uuid() -> str | None:
    """This process's CUDA device's UUID, None without CUDA."""
    return (
        str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid) if torch.cuda.is_available() else None
    )


def pick_backend(server_uuid: str | None, client_uuid: str | None) -> str:
    """NCCL when both sides are on CUDA devices, and not on the same one (NCCL refuses two ranks on one
    device); gloo otherwise."""
    return "nccl" if None not in (server_uuid, client_uuid) and server_uuid != client_uuid else "gloo"


def host_store(host: str, port: int, *, timeout: float) -> dist.TCPStore:
    """The server's rendezvous store, listening on host:port only, for every client to come; OSError if that
    address cannot be bound (a port in use)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # an earlier store's connections in TIME_WAIT
        listener.bind(address)
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return dist.TCPStore(
        host, port, None, is_master=True, timeout=timedelta(seconds=timeout), wait_for_workers=False,
        master_listen_fd=listener.detach(),  # the store owns the socket from here, and closes it
    )  # fmt: skip


def local_address_towards(host: str, port: int) -> str:
    """This machine's address on the route to host (127.0.0.1 for a server on loopback): no packet is sent."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        return probe.getsockname()[0]


def _header(meta: dict | None, device) -> torch.Tensor:
    data = b"" if meta is None else json.dumps(meta).encode()
    if len(data) > HEADER_BYTES:
        raise ValueError(f"parameter name too long to send ({len(data)} bytes of header > {HEADER_BYTES})")
    padded = bytearray(data) + bytearray(HEADER_BYTES - len(data))
    return torch.frombuffer(padded, dtype=torch.uint8).clone().to(device)


def _parse(header: torch.Tensor) -> dict | None:
    """A tensor's header (None: the end mark); ValueError unless it has a name, a dtype we send and a shape."""
    data = bytes(header.cpu().tolist()).rstrip(b"\0")
    if not data:
        return None
    try:
        meta = json.loads(data)
        ok = isinstance(meta["name"], str) and meta["dtype"] in DTYPES
        ok = ok and isinstance(meta["shape"], list) and all(type(d) is int and d >= 0 for d in meta["shape"])
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise ValueError(f"a tensor header that is not one this stream writes: {_gist(data[:100])}")
    return meta


def _gist(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
