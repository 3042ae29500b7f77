"""Data-parallel pieces: one collective that sums every layer's statistics, and local grad shards.

Under DDP each replica sees a different slice of the global batch, so TrAct's matrix must be built
from the Grams and row counts of all replicas; otherwise replicas drift apart. Under FSDP2 the
gradient is a DTensor sharded on dim 0 (output channels); right-multiplying by the n×n matrix is
row-local, so each rank preconditions its own rows with the synchronised matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .statistics import Stats
from .unfold import Geometry


def default_group_active(group: dist.ProcessGroup | None) -> bool:
    """Whether statistics should be summed: torch.distributed is up and the group has peers."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return bool(dist.get_world_size(group) > 1)


def all_reduce_stats(
    stats: list[Stats | None],
    geometries: list[Geometry],
    dtypes: list[torch.dtype],
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> list[Stats]:
    """Sum every layer's Gram and row count over ``group`` in one collective, without host reads.

    Everything travels in one float64 buffer (exact row counts, accurate sums). Rows kept for
    the Woodbury solve are turned into Grams first. The sums come back as Grams of dtype
    ``dtypes[k]`` (the layer's statistics dtype, which every rank chose alike), and their counts
    stay on the device (0-d tensors), so a rank that saw no rows still gets the global
    statistics, and every rank makes the same decisions afterwards (including raising the same
    error).
    """
    pieces: list[Tensor] = []
    for s, geo in zip(stats, geometries, strict=True):
        size = geo.groups * geo.n * geo.n
        if s is None:
            pieces += [torch.zeros(size + 1, dtype=torch.float64, device=device)]
            continue
        count = s.count if isinstance(s.count, Tensor) else torch.tensor(float(s.count))
        gram = s.to_gram().reshape(-1).to(device=device, dtype=torch.float64)
        pieces += [gram, count.reshape(1).to(device=device, dtype=torch.float64)]
    buffer = torch.cat(pieces)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    out: list[Stats] = []
    offset = 0
    for geo, dtype in zip(geometries, dtypes, strict=True):
        size = geo.groups * geo.n * geo.n
        gram = buffer[offset : offset + size].reshape(geo.groups, geo.n, geo.n).to(dtype)
        out.append(Stats(count=buffer[offset + size], gram=gram))
        offset += size + 1
    return out


def local_rows(grad: Tensor) -> tuple[Tensor, int]:
    """The locally held part of a gradient and the global index of its first row (dim 0).

    Plain tensors are held whole. A DTensor must be replicated or sharded on dim 0 only
    (FSDP2's layout); its local shard follows ``torch.chunk``'s split, which DTensor uses.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(grad, DTensor):
        return grad, 0
    placements = grad.placements
    shards = [(d, p) for d, p in enumerate(placements) if not isinstance(p, Replicate)]
    if len(shards) > 1 or any(not (isinstance(p, Shard) and p.dim == 0) for _, p in shards):
        raise NotImplementedError(
            f"TrAct supports first-layer gradients sharded on dim 0 only (FSDP2), got {placements}"
        )
    offset = 0
    for mesh_dim, _ in shards:
        size, world = grad.shape[0], grad.device_mesh.size(mesh_dim)
        chunk = -(-size // world)
        offset = min(chunk * grad.device_mesh.get_local_rank(mesh_dim), size)
    return grad.to_local(), offset
