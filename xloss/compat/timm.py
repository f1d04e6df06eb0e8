"""timm's classification losses with the class axis last for every rank.

Upstream: ``timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)``,
``timm.loss.SoftTargetCrossEntropy()`` and ``timm.loss.BinaryCrossEntropy(smoothing=0.1,
target_threshold=None, weight=None, reduction="mean", sum_classes=False, pos_weight=None)``,
each with ``forward(x, target)``.
"""

from __future__ import annotations

import numbers

from torch import Tensor, nn

from xloss._core.validation import check_floating_input, check_tensor
from xloss.functional.cross_entropy import cross_entropy


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
