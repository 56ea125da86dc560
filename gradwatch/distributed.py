"""torch.distributed support: sharded (FSDP2 / DTensor) parameters and rank roles.

Under DDP every rank holds the same all-reduced gradients and the same weights, so the
parameter statistics are computed locally and are already the global ones. Under FSDP2
(``torch.distributed.fsdp.fully_shard``) each rank holds a shard (a ``DTensor``) of every
parameter and of its gradient: a norm of the local shard is not the norm of the parameter.
``ShardReduce`` turns the per-layer *partial* sums of squares of the local shards into the
global ones with one all-reduce (and maxima with one MAX all-reduce). These collectives are
issued on the device stream, like the all-reduces of the sharded training step itself;
nothing here reads a value on the host.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    dt = _dtensor_type()
    if dt is not None and isinstance(t, dt):
        return t.to_local()
    return t


class ShardReduce:
    """Sums / maxima of per-layer partial statistics across the ranks of a 1-D device mesh."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def sum_(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def max_(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t


def shard_reducer(params: Sequence[Tensor]) -> ShardReduce | None:
    """A ``ShardReduce`` over the mesh of the first sharded parameter, or None if none is.

    Only 1-D meshes (plain FSDP2) are summed over; a parameter replicated along another
    mesh dimension (HSDP) would be counted once per replica.
    """
    dt = _dtensor_type()
    if dt is None:
        return None
    for p in params:
        if isinstance(p, dt):
            mesh = p.device_mesh
            group = mesh.get_group() if mesh.ndim == 1 else None
            return ShardReduce(group)
    return None


def is_writer_rank() -> bool:
    """Rank 0 of the default group writes TensorBoard and warns; without a group, we do."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1
