"""The collectives of the vocab-parallel losses, kept in one place.

Every rank of a tensor-parallel group holds a contiguous slice of the vocabulary. Two
all-reduces per block of rows give each rank the global row statistics: a MAX that also
carries every rank's slice size (so the global vocabulary size and, when not given, the
slice offsets need no extra collective), and ONE packed SUM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor


def resolve_group(group):
    """The process group to use; raises if torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "the vocab-parallel losses need an initialised process group: call "
            "torch.distributed.init_process_group first (a 1-process group works too)"
        )
    return dist.group.WORLD if group is None else group


class GlobalMax(NamedTuple):
    row_max: Tensor  # (R,) max over the whole vocabulary
    num_classes: Tensor  # 0-dim, the global vocabulary size C
    slice_start: Tensor  # 0-dim, this rank's first class when slices follow rank order


def all_reduce_max_and_sizes(local_max: Tensor, local_size: int, group) -> GlobalMax:
    """Collective 1 (MAX): the row maxima, packed with a one-hot of this rank's slice size.

    After the MAX every rank holds all slice sizes in rank order (each is >= 1 and the
    other ranks contribute 0), hence C and the exclusive prefix sum, without a host sync.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    rows = local_max.shape[0]
    packed = torch.zeros(rows + world, dtype=local_max.dtype, device=local_max.device)
    packed[:rows] = local_max
    packed[rows + rank] = local_size
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    sizes = packed[rows:]
    return GlobalMax(
        row_max=packed[:rows],
        num_classes=sizes.sum(),
        slice_start=sizes[:rank].sum().to(torch.int64),
    )


def all_reduce_sum(*stats: Tensor, group) -> tuple[Tensor, ...]:
    """Collective 2 (SUM): the per-row statistics stacked into one tensor, one all-reduce."""
    packed = torch.stack(stats)  # len(stats) x R
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed.unbind(0)
