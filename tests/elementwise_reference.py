"""Float64 reference pipeline for the binary family, written for the tests (no xloss code).

A loss is given as a per-element formula ``pointwise(x, y, pos_weight_full)`` on float64
tensors; :func:`reference_loss` adds smoothing, weights, masking and the reductions the
slow, obvious way, and :func:`option_grid` enumerates the option combinations.
"""

from __future__ import annotations

import itertools

import torch

SHAPES = [(), (5,), (3, 4), (2, 3, 5), (2, 3, 2, 3)]
SMOOTHINGS = [(0.0, "binary"), (0.1, "binary"), (0.2, "uniform")]
# (shape, reduction) pairs; "sample" needs a batch axis, so not for 0-D and 1-D input
GRID_CASES = [
    (shape, reduction)
    for shape in SHAPES
    for reduction in ["none", "mean", "sum", "sample"]
    if reduction != "sample" or len(shape) > 1
]
GRID_IDS = [f"{shape}-{reduction}" for shape, reduction in GRID_CASES]


def sigmoid64(x):
    return 1.0 / (1.0 + torch.exp(-x.double()))


def class_axis_of(shape, class_dim):
    return None if len(shape) == 0 else class_dim % len(shape)


def full_along_axis(values, shape, dim):
    """Tensor of ``shape`` whose entries are values[c], c the index along ``dim``."""
    out = torch.empty(shape, dtype=torch.float64)
    if dim is None:
        out.fill_(float(values.reshape(-1)[0]))
        return out
    for c in range(shape[dim]):
        out.select(dim, c).fill_(float(values.reshape(-1)[c if values.numel() > 1 else 0]))
    return out


def reference_loss(
    pointwise,
    x,
    y,
    *,
    weight=None,
    pos_weight=None,
    label_smoothing=0.0,
    smoothing_rule="binary",
    class_dim=-1,
    ignore_index=None,
    mask=None,
    lengths=None,
    reduction="mean",
    normalizer=None,
):
    x = x.double()
    y = y.double()
    shape = tuple(x.shape)
    keep = torch.ones(shape, dtype=torch.bool)
    if ignore_index is not None:
        keep &= y != ignore_index
    if mask is not None:
        keep &= mask
    if lengths is not None:
        for n, length in enumerate(lengths.tolist()):
            keep[n, int(length) :] = False
    dim = class_axis_of(shape, class_dim)
    num_classes = 1 if dim is None else shape[dim]
    share = 2 if smoothing_rule == "binary" else num_classes
    smoothed = y * (1 - label_smoothing) + label_smoothing / share
    pw = None if pos_weight is None else full_along_axis(pos_weight, shape, dim)
    loss = pointwise(x, smoothed, pw)
    if weight is not None:
        loss = loss * weight.double()
    loss = torch.where(keep, loss, torch.zeros((), dtype=torch.float64))
    if normalizer is not None:
        return loss.sum() / float(normalizer)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        kept = int(keep.sum())
        return loss.sum() / kept if kept else torch.zeros((), dtype=torch.float64)
    rows = []
    for n in range(shape[0]):
        kept = int(keep[n].sum())
        rows.append(loss[n].sum() / kept if kept else torch.zeros((), dtype=torch.float64))
    return torch.stack(rows)


def make_data(shape, seed, *, ignore=False, dtype=torch.float64):
    """Logits of moderate size and a mix of hard and soft targets (-1 marks unknown)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    soft = torch.rand(shape, generator=gen, dtype=torch.float64)
    hard = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5
    y = torch.where(hard, soft.round(), soft)
    if ignore:
        y = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.2, -1.0, y)
    return x, y.to(dtype)


def option_grid(shape, *, with_pos_weight, seed=0):
    """Every combination of smoothing, weight, pos_weight, ignore_index, mask, class_dim.

    Yields (x, y, options) where options are keyword arguments for both xloss and
    :func:`reference_loss`.
    """
    gen = torch.Generator().manual_seed(seed + 1000)
    class_dims = [-1] if len(shape) == 0 else [-1, 0]
    weight_kinds = ["none", "full", "broadcast"]
    pos_weights = [False, True] if with_pos_weight else [False]
    grid = itertools.product(SMOOTHINGS, weight_kinds, pos_weights, [None, -1], [False, True])
    for index, ((smoothing, rule), weight_kind, use_pw, ignore_index, use_mask) in enumerate(grid):
        for class_dim in class_dims:
            x, y = make_data(shape, seed + index, ignore=ignore_index is not None)
            options = dict(
                label_smoothing=smoothing,
                smoothing_rule=rule,
                ignore_index=ignore_index,
                class_dim=class_dim,
            )
            if weight_kind == "full":
                options["weight"] = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
            elif weight_kind == "broadcast" and len(shape) > 0:
                options["weight"] = torch.rand(shape[-1], generator=gen, dtype=torch.float64)
            if use_pw:
                dim = class_axis_of(shape, class_dim)
                size = 1 if dim is None else shape[dim]
                options["pos_weight"] = torch.rand(size, generator=gen, dtype=torch.float64) * 3
            if use_mask:
                options["mask"] = torch.rand(shape, generator=gen) > 0.3
            yield x, y, options
