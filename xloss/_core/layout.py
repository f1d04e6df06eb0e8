"""Where the class axis is, and how targets line up with the logits.

Multi-class losses move the class axis last and see the logits as rows of C values:
``(N, C, d1, ...)`` with ``class_dim=1`` becomes rows ``(N * d1 * ..., C)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from xloss._core.validation import normalize_dim, shape_str


class ClassLayout(NamedTuple):
    logits: Tensor  # input with the class axis moved last
    class_dim: int  # non-negative axis of `input`
    num_classes: int
    target_shape: torch.Size  # input's shape without the class axis
    soft: bool  # True: probability targets of the input's shape
    batched: bool  # False for a single unbatched sample, input (C,)


def class_layout(input: Tensor, target: Tensor, class_dim: int) -> ClassLayout:
    """Check ``target`` against ``input`` and move the class axis last.

    A 1-D input is one unbatched sample whose only axis holds the classes, so the default
    ``class_dim=1`` means axis 0 there, as in PyTorch. Class-index targets have the input's
    shape without the class axis and an integer dtype; probability targets have the input's
    shape and a floating dtype.
    """
    if input.dim() == 0:
        raise ValueError("`input` must have a class axis, got a 0-dimensional tensor")
    if input.dim() == 1 and class_dim == 1:
        class_dim = 0  # PyTorch's convention: (C) is one unbatched sample, (N, C) has C at 1
    dim = normalize_dim(class_dim, input.dim())
    num_classes = input.shape[dim]
    target_shape = input.shape[:dim] + input.shape[dim + 1 :]
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            "`target` must hold integer class indices or floating class probabilities, "
            f"got dtype {target.dtype}"
        )
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"probability `target` must have the input's shape {shape_str(input.shape)}, "
                f"got {shape_str(target.shape)} (class indices must be integers)"
            )
        soft = True
    else:
        if target.shape != target_shape:
            raise ValueError(
                f"`target` must have shape {shape_str(target_shape)} for `input` of shape "
                f"{shape_str(input.shape)} with class_dim={class_dim}, "
                f"got {shape_str(target.shape)}"
            )
        soft = False
    if num_classes == 0:
        raise ValueError(f"`input` has no classes: size 0 along class_dim={class_dim}")
    return ClassLayout(
        logits=input.movedim(dim, -1),
        class_dim=dim,
        num_classes=num_classes,
        target_shape=target_shape,
        soft=soft,
        batched=input.dim() > 1,
    )
