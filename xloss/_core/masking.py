"""One place where ``ignore_index``, ``mask`` and ``lengths`` become one bool mask.

The mask has the shape of the target (one entry per position that carries a loss);
True keeps a position. ``None`` means every position is kept, so callers can skip work.

Relative lengths (one rule for every loss and adapter): a floating length L in (0, 1]
keeps position t of a sequence of T steps when ``t < L * T - 1e-6``, i.e.
``ceil(L * T - 1e-6)`` positions, SpeechBrain's ``compute_masked_loss`` rule (0.9 of 25
steps keeps 23). The product is taken in the lengths' own floating dtype (float32 at
least), as SpeechBrain does, and the 1e-6 absorbs its rounding: 0.4 of 10 keeps 4.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xloss._core.validation import any_violation, check_tensor, differs_from, shape_str

RELATIVE_LENGTH_TOLERANCE = 1e-6


def relative_length_counts(lengths: Tensor, steps: int) -> Tensor:
    """Kept positions per sample for relative lengths: #{t < L * steps - 1e-6} (int64)."""
    lengths = lengths.to(torch.promote_types(lengths.dtype, torch.float32))
    scaled = lengths * steps - RELATIVE_LENGTH_TOLERANCE
    return torch.ceil(scaled).clamp(0, steps).long()


def lengths_mask(lengths: Tensor, shape: torch.Size, validate_args: bool = True) -> Tensor:
    """Bool mask of ``shape`` keeping positions ``t < length[n]`` along axis 1.

    Integer lengths count positions. Floating lengths are relative, in (0, 1]: position
    t is kept when ``t < length[n] * shape[1] - 1e-6`` (the module docstring's rule).
    """
    check_tensor("lengths", lengths)
    if len(shape) < 2:
        raise ValueError(
            "`lengths` needs a target with a sequence axis (axis 1), "
            f"got target shape {shape_str(shape)}"
        )
    if lengths.shape != (shape[0],):
        raise ValueError(
            f"`lengths` must have shape ({shape[0]},), one length per sample, "
            f"got {shape_str(lengths.shape)}"
        )
    steps = shape[1]
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"`lengths` must hold integers or floats, got dtype {lengths.dtype}")
    if lengths.is_floating_point():
        # written so that NaN fails it: `not (0 < L <= 1)`
        in_range = (lengths > 0) & (lengths <= 1)
        if validate_args and any_violation(~in_range, "floating `lengths` must lie in (0, 1]"):
            raise ValueError(
                "floating `lengths` are relative and must lie in (0, 1], got "
                f"{[float(v) for v in lengths.flatten()[:8]]} (NaN and inf are rejected too)"
            )
        counts = relative_length_counts(lengths, steps)
    else:
        out_of_range = (lengths < 0) | (lengths > steps)
        if validate_args and any_violation(out_of_range, f"`lengths` must lie in [0, {steps}]"):
            raise ValueError(
                f"integer `lengths` must lie in [0, {steps}] (the size of target axis 1), "
                f"got min {int(lengths.min())} and max {int(lengths.max())}"
            )
        counts = lengths
    positions = torch.arange(steps, device=lengths.device)
    keep = positions.unsqueeze(0) < counts.unsqueeze(1)  # N x T
    return keep.reshape(keep.shape + (1,) * (len(shape) - 2)).expand(shape)


def build_mask(
    shape: torch.Size,
    device: torch.device,
    *,
    index_target: Tensor | None = None,
    ignore_index: int | None = None,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    validate_args: bool = True,
) -> Tensor | None:
    """Combine the three ways of dropping positions; None when nothing is dropped."""
    keep = None
    if index_target is not None and ignore_index is not None:
        keep = differs_from(index_target, ignore_index)
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"`mask` must be a bool tensor, got dtype {mask.dtype}")
        if mask.shape != shape:
            raise ValueError(
                f"`mask` must have the target's shape {shape_str(shape)}, "
                f"got {shape_str(mask.shape)}"
            )
        mask = mask.to(device)
        keep = mask if keep is None else keep & mask
    if lengths is not None:
        check_tensor("lengths", lengths)
        by_length = lengths_mask(lengths.to(device), shape, validate_args)
        keep = by_length if keep is None else keep & by_length
    return keep
