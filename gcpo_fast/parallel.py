"""Parallelism: the process group, the policy as the update sees it (bare or DDP-wrapped), reductions across ranks.

    from gcpo_fast import parallel

    dist = parallel.init_distributed()                 # Dist(rank, world_size, device); joins torchrun's group
    policy = parallel.parallelize(ModelWithLoss(model, loss_config, temperature))   # once, after loading
    loss, stats = policy.module(packed, advantages, old, ref, normalizer)   # forward through the wrapper
    with policy.no_sync(last=False): loss.backward()   # gradients all-reduced on the last micro-batch only
    parallel.all_reduce([tokens, rows])                # sums over ranks (a no-op in one process)
    parallel.mean_over_ranks(metrics)                  # metric dicts averaged over ranks
    state_dict = policy.full_state_dict()              # every rank calls it; what rank 0 saves

One process (no torchrun) and DDP are the two layouts today; each is one branch of `parallelize`, so the
training loop never tests wrapper types. Under DDP every rank holds the whole model: the bare model's
parameters are the full tensors (weight sync to a rollout engine and checkpoints read them directly).
Collectives run on the CPU with gloo and on the GPU with NCCL: `reduce_device` decides which, once.
"""
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """This process's place; under torchrun (WORLD_SIZE > 1) it joins the process group first
    (NCCL when CUDA is there, else gloo) and takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return Dist(rank, world, torch.device("cuda", local_rank))
    return Dist(rank, world, torch.device("cpu"))


def rank_and_world() -> tuple[int, int]:
    if torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def reduce_device() -> str:
    """Where a collective's tensors must live: NCCL reduces CUDA tensors only."""
    return "cuda" if torch_dist.get_backend() == "nccl" else "cpu"


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """values reduced element-wise over ranks ("sum", "min" or "max"), in float64; unchanged in one process."""
    if not torch_dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=reduce_device())
    torch_dist.all_reduce(t, op={"sum": torch_dist.ReduceOp.SUM, "min": torch_dist.ReduceOp.MIN,
                                 "max": torch_dist.ReduceOp.MAX}[op])
    return t.tolist()


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    keys = sorted(metrics)
    world = rank_and_world()[1]
    return {k: v / world for k, v in zip(keys, all_reduce([metrics[k] for k in keys]))}


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
    """The policy as the update sees it: `module` (what the forward goes through, so a wrapper's hooks run),
    `model` (the bare Hugging Face model, for generation, evaluation and saving)."""

    def __init__(self, model, module, ddp: bool):
        self.model, self.module, self._ddp = model, module, ddp

    def no_sync(self, last: bool):
        """Skip the gradient all-reduce on every micro-batch but the last of an optimizer step."""
        return self.module.no_sync() if self._ddp and not last else nullcontext()

    def named_parameters(self):
        """(name, full tensor) pairs of the bare model, one at a time (what a rollout engine's weight sync reads)."""
        return self.model.named_parameters()

    def full_state_dict(self) -> dict:
        """The whole model's state dict for saving; every rank calls it."""
        return self.model.state_dict()


def parallelize(module) -> Policy:
    """Wrap the model-and-loss module (gcpo_fast.update.ModelWithLoss: one module so that a wrapper's hooks
    see the whole forward) for training: as it is in one process, in DDP under torchrun."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        return Policy(module.model, DistributedDataParallel(module), ddp=True)
    return Policy(module.model, module, ddp=False)
