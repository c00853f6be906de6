"""Parallelism: the process group, the policy as the update sees it (bare, DDP or FSDP2), reductions across ranks.

    from gcpo_fast.distributed import parallel

    dist = parallel.init_distributed()                 # Dist(rank, world_size, device); joins torchrun's group
    parallel.check_checkpoint(folder, "fsdp")          # --resume: the checkpoint's optimizer layout matches
    policy = parallel.parallelize(ModelWithLoss(model, loss_config), parallelism="fsdp")  # once
    optimizer = torch.optim.AdamW(policy.model.parameters())   # after parallelize: FSDP shards the parameters
    with policy.unsharded(): engine.generate(...)      # generation, evaluation, the old-logp pass: full weights
    loss, stats = policy.module(packed, loss_inputs)                # forward through the wrapper
    with policy.no_sync(last=False): loss.backward()   # DDP: gradients all-reduced on the last micro-batch only
    grad_norm = policy.clip_grad_norm(max_norm)        # the global norm, over every rank's shards
    parallel.all_reduce([tokens, rows])                # sums over ranks (a no-op in one process)
    parallel.reduce_over_ranks(metrics)                # metric dicts: means, extremes, sums over ranks
    state_dict = policy.full_state_dict()              # every rank calls it; what rank 0 saves
    policy.optimizer_state(optimizer), policy.save_optimizer(optimizer, folder)   # checkpoints (below)
    policy.load_optimizer(optimizer, checkpoint_folder, trainer_state)

Three layouts, each one class returned by `parallelize`, so the training loop never tests wrapper types:
- one process (no torchrun) and DDP (`--parallelism ddp`, the default, for models that fit one device
  with their optimizer): `Policy`. Every rank holds the whole model; the bare model's parameters are the
  full tensors (weight sync and checkpoints read them directly); the optimizer state is a plain state
  dict, saved inside trainer_state.pt.
- FSDP2 (`--parallelism fsdp`, `torch.distributed.fsdp.fully_shard`): `FSDPPolicy`. Parameters,
  gradients and AdamW state are sharded over the ranks (dim 0 of every tensor, as DTensors), so a rank
  holds 1/world of the 16 bytes a parameter of fp32 AdamW training costs. `fully_shard` goes on every
  decoder layer (the classes in the model's `_no_split_modules`), then on the ModelWithLoss as the root,
  which owns what is left: the embeddings, the final norm and the lm_head. On CUDA a
  MixedPrecisionPolicy all-gathers bf16 parameters for compute and reduces gradients in fp32 (the
  sharded master weights stay fp32; on the CPU everything is fp32); `--fsdp_cpu_offload` keeps the
  shards, gradients and optimizer on the host (CPUOffloadPolicy). In one process (no torchrun) FSDP
  runs as a world of one on a process group of its own: nothing is sharded, but CPU offload works, and
  a checkpoint of N ranks resumes there.

The fused loss on the sharded model. `linear_policy_loss` needs the lm_head weight as one plain [V, d]
tensor; a DTensor shard would break it. ModelWithLoss.forward runs the decoder and reads the weight
with `lm_head_weight` *inside the root module's forward*, and that is what makes it whole: the root's
forward pre-hook all-gathers the root's group (embeddings, norm, lm_head; tied or untied, a tied weight
is one parameter, gathered once) and registers the unsharded tensors on their modules, so
`get_output_embeddings().weight` is the full tensor until the root reshards, which it does after the
backward, not after the forward (FSDP keeps the root unsharded between forward and backward). The
decoder layers gather and free their own parameters in their own hooks. The weight's gradient flows
into the unsharded parameter like any other use, and FSDP reduce-scatters it with the root's group
in the backward. No [N, V] tensor appears: the weight is [V, d], the op chunks the vocabulary as it
does without FSDP. Mixed precision casts every forward input of a layer to bf16, but not the root's:
advantages, old and reference log-probs stay fp32 (cast_forward_inputs=False on the root).

FSDP's hooks gather a decoder layer's weights at each call of it and reduce-scatter its gradients after
each call's backward: both are collectives, so every rank must call each layer equally often, whatever
its number of rows: packing.forward_hidden calls the decoder once per micro-batch (packed attention).

Generation, evaluation and the old-logp pass call the bare model, not the root, so no hook would gather
the root's parameters, and each decoder layer would gather and free its weights at every new token.
`policy.unsharded()` gathers every group once, tells the layers to keep their weights until the context
ends, and reshards at the end: one all-gather per round of `generate` instead of one per token. Under
DDP and in one process it does nothing. FSDP's root is fixed at parallelize time (its lazy init runs
there), so a first call of the bare model (evaluation at step 0) cannot make a decoder layer a root.

Gradient accumulation: under DDP the all-reduce runs on the last micro-batch only (no_sync). Under FSDP
every micro-batch's backward reduce-scatters its gradients into the shards: syncing on the last only
would keep whole unsharded gradients alive across micro-batches, the memory FSDP is there to save.
Both average over ranks, so the step's normaliser (gcpo_fast/update.py) is the same.

Checkpoints (gcpo_fast/run/checkpoint.py): the model is always a Hugging Face folder written by rank 0 from
`full_state_dict()` (under FSDP every rank takes part in gathering each tensor, to the CPU of rank 0).
The optimizer state: one process and DDP put the whole state dict into trainer_state.pt
(`optimizer_state`, as every checkpoint so far); FSDP writes it with torch.distributed.checkpoint, each
rank its own shards, into checkpoint-<step>/optimizer/ (`save_optimizer`), and loads it resharded onto
any number of ranks (`load_optimizer`), its pickled .metadata read through an allowlist
(gcpo_fast/distributed/dcp_reader.py: a crafted checkpoint cannot run code).

Collectives run on the CPU with gloo and on the GPU with NCCL (with CPU offload, gloo too for the
CPU-resident gradients' norm): `reduce_device` decides where a reduction's tensors live, once.
"""

import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from gcpo_fast.errors import require
from gcpo_fast.options import check_options, option

PARALLELISMS = ("ddp", "fsdp")
OPTIMIZER_FOLDER = "optimizer"  # FSDP's sharded optimizer state inside checkpoint-<step>/


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device


@dataclass
class ParallelConfig:
    """How the processes of torchrun share the model."""

    _argument_group_name = "parallelism"

    parallelism: str = option(
        "ddp",
        "ddp (each process holds all of the model and its optimizer; small models) or fsdp (FSDP2: parameters, "
        "gradients and optimizer state sharded over the processes; one process is a world of one)",
        choices=PARALLELISMS,
    )
    fsdp_cpu_offload: bool = option(
        False,
        "with --parallelism fsdp on CUDA: keep the parameter shards, gradients and optimizer state in host memory",
    )

    def __post_init__(self):
        check_options(self)
        require(
            not self.fsdp_cpu_offload or self.parallelism == "fsdp",
            f"fsdp_cpu_offload needs --parallelism fsdp, got --parallelism {self.parallelism}",
        )
        require(
            not self.fsdp_cpu_offload or torch.cuda.is_available(),
            "fsdp_cpu_offload needs CUDA: on the CPU the shards already live in host memory",
        )


def init_distributed(cpu_offload: bool = False) -> Dist:
    """This process's place; under torchrun (WORLD_SIZE > 1) it joins the process group first
    (NCCL when CUDA is there, else gloo; cpu_offload: gloo beside NCCL for CPU tensors) and takes the
    GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(_backend(cpu_offload))
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return Dist(rank, world, torch.device("cuda", local_rank))
    return Dist(rank, world, torch.device("cpu"))


def _backend(cpu_offload: bool) -> str:
    if not torch.cuda.is_available():
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


def rank_and_world() -> tuple[int, int]:
    if torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def reduce_device() -> str:
    """Where a collective's tensors must live: NCCL reduces CUDA tensors only."""
    return "cuda" if "nccl" in torch_dist.get_backend_config() else "cpu"


def all_reduce(values: list[float], op: str = "sum", group=None) -> list[float]:
    """values reduced element-wise over ranks ("sum", "min" or "max"), in float64; unchanged in one process.
    group: a process group of its own (side_group), for a thread other than the training loop's."""
    if not torch_dist.is_initialized():
        return values
    device = "cpu" if group is not None else reduce_device()
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(
        t,
        op={"sum": torch_dist.ReduceOp.SUM, "min": torch_dist.ReduceOp.MIN, "max": torch_dist.ReduceOp.MAX}[op],
        group=group,
    )
    return t.tolist()


def side_group():
    """A gloo process group over every rank for collectives issued from another thread (the rollout producer's):
    collectives of two threads on one group could interleave differently on each rank. None in one process.
    Every rank must call it, in the same order."""
    return torch_dist.new_group(backend="gloo") if torch_dist.is_initialized() else None


# Per-rank counts whose total over ranks is the figure (the rest of the metrics are means, extremes or the same
# on every rank).
SUMMED_METRICS = (
    "tokens",
    "gcpo/golden_rows",
    "gcpo/golden_truncated",
    "gcpo/golden_from_teacher",
    "gcpo/golden_cache_hits",
    "gcpo/teacher_no_correct",
    "gcpo/teacher_errors",
    "gcpo/golden_tool_mismatch",
    "tools/errors",
    "tools/timeouts",
)


def metric_reduction(name: str) -> str:
    """How a metric combines over ranks: a minimum as the minimum ("/min", "_min", "min_length"), a maximum as the
    maximum, a count in SUMMED_METRICS as the sum, anything else as the mean."""
    if name.endswith(("/min", "_min", "min_length")):
        return "min"
    if name.endswith(("/max", "_max", "max_length")):
        return "max"
    return "sum" if name in SUMMED_METRICS else "mean"


def reduce_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Every rank's metrics as one dict (sorted by name, floats), each reduced by its kind (metric_reduction)."""
    keys = sorted(metrics)
    kinds = {k: metric_reduction(k) for k in keys}
    world = rank_and_world()[1]
    reduced = {}
    for op in ("sum", "min", "max"):  # a mean is a sum divided by the world size
        names = [k for k in keys if kinds[k] == op or (op == "sum" and kinds[k] == "mean")]
        if names:
            reduced.update(zip(names, all_reduce([metrics[k] for k in names], op)))
    return {k: reduced[k] / world if kinds[k] == "mean" else float(reduced[k]) for k in keys}


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in one process."""
    if not torch_dist.is_initialized():
        return [obj]
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


class Policy:
    """The policy as the update sees it, in one process or under DDP: `module` (what the forward goes through,
    so a wrapper's hooks run), `model` (the bare Hugging Face model, for generation, evaluation and saving),
    `device` (where the update's batches go)."""

    reshards = False  # a checkpoint of another world size is refused: each rank's data and RNG would differ

    def __init__(self, model, module, device: torch.device, ddp: bool):
        self.model, self.module, self.device, self._ddp = model, module, device, ddp

    def no_sync(self, last: bool):
        """Skip the gradient all-reduce on every micro-batch but the last of an optimizer step."""
        return self.module.no_sync() if self._ddp and not last else nullcontext()

    def unsharded(self):
        """Nothing to gather: every rank holds the whole model."""
        return nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients' global norm to max_norm; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()

    def named_parameters(self):
        """(name, full tensor) pairs of the bare model, one at a time (what a rollout engine's weight sync reads)."""
        return self.model.named_parameters()

    def full_state_dict(self) -> dict:
        """The whole model's state dict for saving; every rank calls it."""
        return self.model.state_dict()

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's part of trainer_state.pt: its whole state dict (the same on every rank)."""
        return {"optimizer": optimizer.state_dict()}

    def save_optimizer(self, optimizer, folder) -> None:
        """Nothing beside trainer_state.pt (optimizer_state holds it all)."""

    def load_optimizer(self, optimizer, folder, state: dict) -> None:
        """Restore the optimizer from a checkpoint: `state` is its trainer_state.pt."""
        check_checkpoint(folder, "ddp")
        optimizer.load_state_dict(state["optimizer"])


class FSDPPolicy:
    """The policy sharded by FSDP2 (see the module docstring): the same methods as Policy."""

    reshards = True  # the model and optimizer load onto any number of ranks

    def __init__(self, model, module, device: torch.device, layers: list):
        self.model, self.module, self.device = model, module, device
        self._layers = layers

    def no_sync(self, last: bool):
        """Nothing: every micro-batch reduce-scatters its gradients into the shards (module docstring)."""
        return nullcontext()

    @contextmanager
    def unsharded(self):
        """Every parameter gathered whole, once, for calls of the bare model (generate, the old-logp pass);
        resharded at the end. Every rank enters it (the gathers are collectives)."""
        for group in (self.module, *self._layers):
            group.unshard()
        for layer in self._layers:
            layer.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for layer in self._layers:
                layer.set_reshard_after_forward(True, recurse=False)
            for group in (self.module, *self._layers):
                group.reshard()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients' global norm (over every rank's shards) to max_norm; returns it before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return _full(norm).item()

    @torch.no_grad()
    def named_parameters(self):
        """(name, full tensor) pairs, gathered one parameter at a time; every rank iterates (each is a collective)."""
        for name, param in self.model.named_parameters():
            yield name, _full(param)

    def full_state_dict(self) -> dict:
        """The whole model's state dict, gathered tensor by tensor to the CPU of rank 0 (other ranks get {});
        every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, optimizer) -> dict:
        """Nothing in trainer_state.pt: save_optimizer writes the shards."""
        return {}

    def save_optimizer(self, optimizer, folder) -> None:
        """Each rank writes its shards of the optimizer state to folder/optimizer (torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save(get_optimizer_state_dict(self.model, optimizer), checkpoint_id=Path(folder) / OPTIMIZER_FOLDER)

    def load_optimizer(self, optimizer, folder, state: dict) -> None:
        """Read folder/optimizer into this rank's shards, whatever the number of ranks that wrote it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from gcpo_fast.distributed.dcp_reader import SafeFileSystemReader

        check_checkpoint(folder, "fsdp")
        reader = SafeFileSystemReader(Path(folder) / OPTIMIZER_FOLDER)
        reader.read_metadata()  # the pickle through the allowlist first: a refusal is one line, not dcp's wrapping
        target = get_optimizer_state_dict(self.model, optimizer)  # this rank's shards, to be filled in place
        dcp.load(target, storage_reader=reader)
        set_optimizer_state_dict(self.model, optimizer, target)


def check_checkpoint(folder, parallelism: str) -> None:
    """Raise ValueError unless the checkpoint's optimizer state has the layout `parallelism` reads: sharded in
    folder/optimizer (fsdp) or inside trainer_state.pt (ddp, one process)."""
    written = "fsdp" if (Path(folder) / OPTIMIZER_FOLDER).is_dir() else "ddp"
    if written != parallelism:
        raise ValueError(
            f"--resume {folder}: written with --parallelism {written} (optimizer state "
            f"{'sharded in ' + OPTIMIZER_FOLDER + '/' if written == 'fsdp' else 'in trainer_state.pt'}); "
            f"resume it with --parallelism {written}"
        )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def parallelize(module, parallelism: str = "ddp", *, cpu_offload: bool = False, bf16: bool = True):
    """Wrap the model-and-loss module (gcpo_fast.update.ModelWithLoss: one module so that a wrapper's hooks
    see the whole forward) for training. "ddp": as it is in one process, in DDP under torchrun. "fsdp":
    sharded by FSDP2 (any number of processes, one included); cpu_offload and bf16 (mixed precision,
    CUDA only) apply to it. Returns a Policy or an FSDPPolicy (the same methods)."""
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism must be one of {', '.join(PARALLELISMS)}, got {parallelism!r}")
    device = next(module.parameters()).device
    if parallelism == "fsdp":
        return _fully_shard(module, device, cpu_offload, bf16)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        return Policy(module.model, DistributedDataParallel(module), device, ddp=True)
    return Policy(module.model, module, device, ddp=False)


def _fully_shard(module, device: torch.device, cpu_offload: bool, bf16: bool) -> FSDPPolicy:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    model = module.model
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"--parallelism fsdp: {type(model).__name__} names no decoder layer classes "
            "(_no_split_modules), so there is nothing to shard layer by layer"
        )
    if not torch_dist.is_initialized():  # one process: a world of one, on a process group of its own
        torch_dist.init_process_group(_backend(cpu_offload), store=torch_dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    compute = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 and device.type == "cuda" else {}
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(**compute), offload_policy=offload)
    # the root's inputs (advantages, old and reference log-probs) stay fp32: see the module docstring
    fully_shard(
        module, mesh=mesh, mp_policy=MixedPrecisionPolicy(**compute, cast_forward_inputs=False), offload_policy=offload
    )
    # FSDP picks its root at the first forward it sees; generation calls the bare model (a decoder layer
    # first), so settle the root now. There is no public call for this lazy init in torch 2.13.
    module._get_fsdp_state()._lazy_init()
    return FSDPPolicy(model, module, device, layers)


def free_port() -> int:
    """A TCP port free on the loopback address now (a rendezvous, a server), as the OS hands it out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
