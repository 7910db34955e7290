"""Data parallelism for training: joining torchrun's process group, splitting the global batch, wrapping the
backbone in DDP, and keeping the replicated state (router biases) identical on every rank.

Every rank builds the same model from the same seed; the Engram tables are then row-sharded
(:func:`engram.parallel.shard_engram_tables`) and every other parameter is replicated under
``DistributedDataParallel``. Gradients are *summed* over ranks (not averaged): each rank's objective is its
share of the global-batch loss (its token-loss sum over the global token count), so the summed gradient is
the gradient of the global-batch mean whatever the split, uneven local batches included, and the tables'
gradients, which arrive at their owners summed by the all-to-all, need no rescaling.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engram.model.moe import MoE


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank ``rank`` of ``world_size`` (1: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first, then on the other ranks (e.g. to fill a cache they all read)."""
        if self.enabled and not self.is_main:
            dist.barrier()
        yield
        if self.enabled and self.is_main:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA (device ``local_rank``) where available, else the CPU; any other name as given, checked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) and pick this rank's device; without torchrun (``WORLD_SIZE`` unset or 1) nothing is joined.

    ``device="auto"`` takes ``cuda:LOCAL_RANK`` where CUDA is available (backend NCCL), else the CPU (gloo).
    A rank that cannot reach the others within ``timeout_s`` (one failed to start) raises ``RuntimeError``.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(), resolve_device(device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        except Exception as err:  # the store's timeout and connection errors have many types
            raise RuntimeError(
                f"rank {rank} of {world} could not join the {backend} process group at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {timeout_s:.0f} s: {err}. "
                "Did every rank start? Launch with `torchrun --nproc_per_node=N -m engram train ...`") from err
    return DistContext(rank, world, local_rank, backend), resolved


def finish_distributed() -> None:
    """Leave the process group cleanly once every rank is done (a barrier, then teardown): a rank tearing its
    connections down while a peer still finishes a collective can abort that peer."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_rows(batch_size: int, ctx: DistContext) -> slice:
    """This rank's sequences of a global batch: contiguous, the first ``batch_size % world_size`` ranks one more.

    Raises ``ValueError`` when some rank would get no sequence.
    """
    if batch_size < ctx.world_size:
        raise ValueError(f"a batch of {batch_size} sequences cannot feed {ctx.world_size} ranks: every rank needs "
                         "at least one sequence per micro-batch (raise --batch-size or lower --grad-accum)")
    base, extra = divmod(batch_size, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (ctx.rank < extra))


def _sum_hook(group, bucket):  # unannotated: DDP inspects the annotation, which postponed evaluation makes a string
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``model`` under DDP with summed gradients; row-sharded tables (``placement == "sharded"``) are left out.

    Buffers are not broadcast: the MoE load counters are per rank by design (see :func:`sync_router_load`).
    """
    if not ctx.enabled:
        return model
    sharded = [f"{name}.weight" for name, module in model.named_modules()
               if getattr(module, "placement", None) == "sharded"]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
    with warnings.catch_warnings():
        # torch >= 2.12 deprecates broadcast_buffers (2.11, on the GPU machine, lacks its replacement) and itself
        # advises keeping it for rank-local buffers.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          broadcast_buffers=False)
    wrapped.register_comm_hook(None, _sum_hook)
    return wrapped


def sync_router_load(model: nn.Module, ctx: DistContext) -> None:
    """Sum every MoE layer's expert-load counters over the ranks, so the balancing-bias update that follows
    sees the global batch's load and leaves the biases identical everywhere."""
    if not ctx.enabled:
        return
    for moe in model.modules():
        if isinstance(moe, MoE):
            dist.all_reduce(moe.load_accum)


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (fp64), returned to every rank."""
    if not ctx.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
