"""torch.distributed helpers for sharding work across torchrun ranks; no-ops without torchrun.

``torchrun --nproc-per-node N ...`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init`
then joins the process group (NCCL when the work runs on CUDA, gloo on the CPU) and returns this
process' :class:`Context`. Run as a plain process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``), every
helper is a no-op: rank 0 of a world of 1.

Work is split by :func:`my_items`: item ``i`` belongs to rank ``i % world_size``, so the split
depends only on the item numbers and the world size, never on timing.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from influx.errors import InfluxRuntimeError, InfluxValueError

# Long enough for rank 0 to train a model while the other ranks wait at a barrier.
DEFAULT_TIMEOUT = datetime.timedelta(hours=6)

__all__ = [
    "Context",
    "all_errors",
    "barrier",
    "finalize",
    "init",
    "my_items",
    "rank_and_world",
]


@dataclass(frozen=True)
class Context:
    """This process' place in the job: ``rank`` of ``world_size``; ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group with more than one rank is running."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InfluxValueError(
            f"${name} must be an integer (set by torchrun); got {value!r}"
        ) from None


def launched() -> Context:
    """The rank, world size and local rank torchrun set in the environment (1 process if unset)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise InfluxValueError(
            f"$RANK={rank} and $WORLD_SIZE={world_size} are inconsistent: launch with torchrun"
        )
    return Context(rank, world_size, local_rank)


def init(device_type: str = "cpu", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Context:
    """Join torchrun's process group (``nccl`` for ``device_type='cuda'``, else ``gloo``).

    Without torchrun (world size 1) nothing is initialized. Calling it again is harmless.
    """
    context = launched()
    if context.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return context
    if not dist.is_available():
        raise InfluxRuntimeError(
            "torch.distributed is not available in this torch build; run without torchrun"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(context.local_rank)
    dist.init_process_group(backend=backend, timeout=timeout)
    return context


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_errors(error: str | None) -> list[str]:
    """Share each rank's error (or None) with every rank; return the errors, rank order.

    Every rank calls it at the same point, so a rank that failed does not leave the others
    waiting at a later barrier: they all learn of the failure and stop.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [error] if error is not None else []
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    return [e for e in gathered if e is not None]


def my_items(items: Sequence[int], context: Context) -> list[int]:
    """The items of ``items`` this rank handles: item ``i`` goes to rank ``i % world_size``."""
    return [item for item in items if item % context.world_size == context.rank]


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` as given, or, when neither is, the process group's (0 and 1
    without one). Ranks given by hand split work without a process group (each writes its own
    output, merged afterwards)."""
    if rank is None and world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise InfluxValueError("give both rank and world_size, or neither")
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise InfluxValueError(
            f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}"
        )
    return rank, world_size


def finalize() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
