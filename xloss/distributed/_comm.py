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
    slice_sizes: Tensor  # (world,) every rank's slice size, in rank order
    slice_starts: Tensor  # (world,) every rank's first class: its vocab_start, or rank order


def all_reduce_max_and_sizes(
    local_max: Tensor, local_size: int, group, vocab_start: int | None = None
) -> GlobalMax:
    """Collective 1 (MAX): the row maxima, packed with a one-hot of this rank's slice size
    and of its ``vocab_start`` + 1 (0: not given, the slice follows rank order).

    After the MAX every rank holds all slice sizes and starts in rank order (the other
    ranks contribute 0), hence C and the exclusive prefix sum, without a host sync.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    rows = local_max.shape[0]
    packed = torch.zeros(rows + 2 * world, dtype=local_max.dtype, device=local_max.device)
    packed[:rows] = local_max
    packed[rows + rank] = local_size
    if vocab_start is not None:
        packed[rows + world + rank] = vocab_start + 1
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    sizes = packed[rows : rows + world].to(torch.int64)
    given_starts = packed[rows + world :].to(torch.int64)
    rank_order_starts = sizes.cumsum(0) - sizes
    return GlobalMax(
        row_max=packed[:rows],
        num_classes=packed[rows : rows + world].sum(),
        slice_start=rank_order_starts[rank],
        slice_sizes=sizes,
        slice_starts=torch.where(given_starts > 0, given_starts - 1, rank_order_starts),
    )


def check_slices_tile(global_max: GlobalMax) -> None:
    """The ranks' slices [start, start + size) must tile [0, C). Synchronises.

    Every rank holds the same sizes and starts after collective 1, so every rank reaches
    the same verdict and raises together (no rank is left waiting in a collective).
    """
    starts, sizes = global_max.slice_starts, global_max.slice_sizes
    order = torch.argsort(starts)
    ordered_starts, ordered_ends = starts[order], (starts + sizes)[order]
    tiles = bool(ordered_starts[0] == 0) and bool((ordered_starts[1:] == ordered_ends[:-1]).all())
    if not tiles:
        ends = (starts + sizes).tolist()
        slices = [(a, b) for a, b in zip(starts.tolist(), ends, strict=True)]
        raise ValueError(
            f"the ranks' vocabulary slices must tile [0, {int(sizes.sum())}) without gaps or "
            f"overlaps, got [vocab_start, vocab_start + V_r) per rank: {slices}; pass "
            "consistent `vocab_start` values, or None on every rank to take the slices in "
            "rank order"
        )


def all_reduce_sum(*stats: Tensor, group) -> tuple[Tensor, ...]:
    """Collective 2 (SUM): the per-row statistics stacked into one tensor, one all-reduce."""
    packed = torch.stack(stats)  # len(stats) x R
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed.unbind(0)


def all_reduce_argmax(local_max: Tensor, local_argmax: Tensor, row_max: Tensor, group) -> Tensor:
    """Collective 3 (MIN, side outputs only): the global argmax of each row.

    ``local_argmax`` (R,) holds global class indices (first index of the local max). The
    answer is the smallest of them among the ranks whose local max equals the global max
    ``row_max``, so ties resolve to the first index as ``torch.argmax`` does. A rank whose
    local max is NaN is a candidate too (``torch.argmax`` takes a NaN as the max).
    """
    is_max = (local_max == row_max) | local_max.isnan()
    candidate = torch.where(is_max, local_argmax, torch.iinfo(torch.int64).max)  # R
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate
