"""timm's classification losses with the class axis last for every rank.

Upstream: ``timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)``,
``timm.loss.SoftTargetCrossEntropy()`` and ``timm.loss.BinaryCrossEntropy(smoothing=0.1,
target_threshold=None, weight=None, reduction="mean", sum_classes=False, pos_weight=None,
smooth_dense=False)`` (timm 1.0.x), each with ``forward(x, target)``.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xloss._core.validation import (
    check_floating_input,
    check_index_target_range,
    check_tensor,
    shape_str,
)
from xloss.functional.binary import (
    binary_cross_entropy_with_logits,
    check_elementwise_weight,
    check_pos_weight,
    smooth_binary_target,
)
from xloss.functional.cross_entropy import cross_entropy

TIMM_REDUCTIONS = ("mean", "sum", "none")


def check_smoothing(smoothing) -> float:
    """timm's smoothing: a float in [0, 1) (1 would erase the target)."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real):
        raise TypeError(f"`smoothing` must be a float in [0, 1), got {type(smoothing).__name__}")
    smoothing = float(smoothing)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"`smoothing` must lie in [0, 1), got {smoothing}")
    return smoothing


class LabelSmoothingCrossEntropy(nn.Module):
    r"""Label-smoothed cross-entropy, as ``timm.loss.LabelSmoothingCrossEntropy``.

    Upstream signature: ``LabelSmoothingCrossEntropy(smoothing=0.1)``. With
    :math:`\log p = \mathrm{log\_softmax}(x)` over the last axis, C classes and eps the
    smoothing, each position has

    .. math::
        \ell = -(1-\epsilon) \log p_y - \frac{\epsilon}{C} \sum_c \log p_c,

    averaged over all positions. Computed by :func:`xloss.cross_entropy` with
    ``class_dim=-1`` and ``label_smoothing=smoothing``.

    Deliberate differences from upstream:

    - The class axis is the last axis for any rank: (B, T, C) logits with (B, T) targets
      work (upstream gathers with ``target.unsqueeze(1)``, which is the wrong axis beyond
      2-D and fails or mixes positions).
    - Target indices are range-checked; a bad ``smoothing`` raises ValueError, not an
      ``AssertionError``.

    Shape:
        - x: (N, C) or (N, ..., C) logits, class axis last.
        - target: (N) or (N, ...) class indices.
        - output: scalar.

    Example:
        >>> import torch
        >>> from xloss.compat.timm import LabelSmoothingCrossEntropy
        >>> loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
        >>> x = torch.tensor([[[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]])  # (B, T, C)
        >>> loss_fn(x, torch.tensor([[0, 2]]))
        tensor(0.3455)
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        self.smoothing = check_smoothing(smoothing)
        self.confidence = 1.0 - self.smoothing

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            x, target, ignore_index=None, label_smoothing=self.smoothing, class_dim=-1
        )

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"


class SoftTargetCrossEntropy(nn.Module):
    r"""Cross-entropy against probability targets, as ``timm.loss.SoftTargetCrossEntropy``.

    Upstream signature: ``SoftTargetCrossEntropy()``. Each position has
    :math:`\ell = -\sum_c t_c \log p_c` with :math:`\log p = \mathrm{log\_softmax}(x)` over
    the last axis, averaged over positions (mixup / cutmix targets need not be one-hot,
    nor sum to 1). Computed by :func:`xloss.cross_entropy` with probability targets and
    ``class_dim=-1``.

    Deliberate differences from upstream: integer targets of the input's shape are
    converted to floats (as upstream's arithmetic does); any other shape raises ValueError
    instead of broadcasting.

    Shape:
        - x: (N, C) or (N, ..., C) logits, class axis last.
        - target: the shape of ``x``.
        - output: scalar.

    Example:
        >>> import torch
        >>> from xloss.compat.timm import SoftTargetCrossEntropy
        >>> x = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
        >>> target = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
        >>> SoftTargetCrossEntropy()(x, target)
        tensor(0.4005)
    """

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        check_floating_input(x)
        check_tensor("target", target)
        if target.shape == x.shape and not target.is_floating_point():
            target = target.to(x.dtype)
        return cross_entropy(x, target, ignore_index=None, class_dim=-1)


class BinaryCrossEntropy(nn.Module):
    r"""BCE with one-hot from class indices, smoothing and thresholding (timm 1.0.x).

    Upstream signature: ``BinaryCrossEntropy(smoothing=0.1, target_threshold=None,
    weight=None, reduction="mean", sum_classes=False, pos_weight=None,
    smooth_dense=False)``. With :math:`\epsilon` the smoothing and C the classes (last axis
    of ``x``), the target y' is

    - class indices (the shape of ``x`` without its last axis): one-hot, smoothed to
      :math:`y' = y (1 - \epsilon) + \epsilon / C` (upstream's ``off_value = smoothing /
      C``, ``on_value = 1 - smoothing + off_value``);
    - dense targets (the shape of ``x``: mixup / cutmix / multi-label): taken as already
      soft, :math:`y' = y`; with ``smooth_dense=True`` moved toward 0.5,
      :math:`y' = y (1 - \epsilon) + \epsilon / 2`, upstream's rule.

    With ``target_threshold`` the target is then binarised, :math:`y' \leftarrow [y' >
    \mathrm{threshold}]`. Each element has

    .. math::
        \ell = -w \left[ p\, y' \log s(x) + (1 - y') \log(1 - s(x)) \right],

    with w = ``weight`` and p = ``pos_weight`` (per class, last axis), reduced by
    ``reduction``, or with ``sum_classes`` summed over the classes and averaged over the
    other axes (``reduction`` is then ignored, as upstream). Computed by
    :func:`xloss.binary_cross_entropy_with_logits`.

    Deliberate differences from upstream:

    - The class axis is the last axis for any rank: (B, T, C) logits with (B, T) class
      indices work (upstream builds a (B, C) one-hot and fails).
    - Targets must lie in [0, 1]; a bad ``smoothing`` raises ValueError, not an assert.

    Shape:
        - x: (N, C) or (N, ..., C) logits.
        - target: (N) or (N, ...) class indices, or dense targets of the shape of ``x``.
        - output: scalar, or the shape of ``x`` for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from xloss.compat.timm import BinaryCrossEntropy
        >>> x = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
        >>> BinaryCrossEntropy(smoothing=0.1)(x, torch.tensor([0, 1]))
        tensor(0.4499)
        >>> dense = torch.tensor([[0.6, 0.0, 0.4], [0.0, 1.0, 0.0]])
        >>> BinaryCrossEntropy(smoothing=0.1)(x, dense)  # dense targets as given
        tensor(0.4805)
        >>> BinaryCrossEntropy(smoothing=0.1, smooth_dense=True)(x, dense)
        tensor(0.5330)
    """

    def __init__(
        self,
        smoothing: float = 0.1,
        target_threshold: float | None = None,
        weight: Tensor | None = None,
        reduction: str = "mean",
        sum_classes: bool = False,
        pos_weight: Tensor | float | None = None,
        smooth_dense: bool = False,
    ) -> None:
        super().__init__()
        self.smoothing = check_smoothing(smoothing)
        if not isinstance(smooth_dense, bool):
            raise TypeError(f"`smooth_dense` must be True or False, got {smooth_dense!r}")
        self.smooth_dense = smooth_dense
        if target_threshold is not None and (
            isinstance(target_threshold, bool) or not isinstance(target_threshold, numbers.Real)
        ):
            raise TypeError(
                f"`target_threshold` must be a float or None, got {type(target_threshold).__name__}"
            )
        self.target_threshold = None if target_threshold is None else float(target_threshold)
        if not isinstance(reduction, str) or reduction not in TIMM_REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {TIMM_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.sum_classes = bool(sum_classes)
        check_elementwise_weight(weight, None)
        if pos_weight is not None and not isinstance(pos_weight, Tensor):
            if isinstance(pos_weight, bool) or not isinstance(pos_weight, numbers.Real):
                raise TypeError(
                    f"`pos_weight` must be a tensor, a float or None, "
                    f"got {type(pos_weight).__name__}"
                )
            pos_weight = torch.tensor(float(pos_weight))
        check_pos_weight(pos_weight, None)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        check_floating_input(x)
        check_tensor("target", target)
        if x.dim() == 0:
            raise ValueError("`x` must have a class axis (the last axis), got a 0-D tensor")
        num_classes = x.shape[-1]
        smoothing, rule = self.smoothing, "uniform"  # class indices: a/C
        if target.shape == x.shape:  # dense targets: as given, or toward 0.5 (a/2)
            smoothing, rule = (self.smoothing, "binary") if self.smooth_dense else (0.0, rule)
        else:
            if target.shape != x.shape[:-1] or target.is_floating_point():
                raise ValueError(
                    f"`target` must hold class indices of shape {shape_str(x.shape[:-1])} "
                    f"(integers) or dense targets of shape {shape_str(x.shape)}, "
                    f"got {shape_str(target.shape)} with dtype {target.dtype}"
                )
            check_index_target_range(target, num_classes, None, None)
            target = F.one_hot(target.long(), num_classes)
        if self.target_threshold is not None:
            smoothed = smooth_binary_target(target.to(x.dtype), smoothing, rule, num_classes)
            target, smoothing = smoothed > self.target_threshold, 0.0
        return binary_cross_entropy_with_logits(
            x,
            target,
            self.weight,
            pos_weight=self.pos_weight,
            reduction="sum" if self.sum_classes else self.reduction,
            label_smoothing=smoothing,
            smoothing_rule=rule,
            class_dim=-1,
            normalizer=x.numel() // num_classes if self.sum_classes else None,
        )

    def extra_repr(self) -> str:
        return (
            f"smoothing={self.smoothing}, target_threshold={self.target_threshold}, "
            f"reduction={self.reduction!r}, sum_classes={self.sum_classes}, "
            f"smooth_dense={self.smooth_dense}"
        )
