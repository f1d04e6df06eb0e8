"""Liger-Kernel's cross-entropy module, without overwriting the caller's logits.

Upstream: ``liger_kernel.transformers.LigerCrossEntropyLoss(weight=None, ignore_index=-100,
lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
return_z_loss=False)``, ``forward(_input, target)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xloss._core.validation import (
    check_class_weight,
    check_ignore_index,
    check_non_negative,
    check_positive_or_none,
    check_tensor,
    check_unit_interval,
)
from xloss.functional.cross_entropy import cross_entropy

LIGER_REDUCTIONS = ("mean", "sum", "none")


class LigerCrossEntropyLoss(nn.Module):
    r"""Cross-entropy with z-loss and soft-capping, as Liger-Kernel's module.

    Upstream signature: ``LigerCrossEntropyLoss(weight=None, ignore_index=-100,
    lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
    return_z_loss=False)``. With x the logits of a row (after ``softcap * tanh(x / softcap)``
    when ``softcap`` is set), lse = logsumexp(x), V classes, eps the smoothing, w the class
    weights and s = ``lse_square_scale``, a row whose target y is not ``ignore_index`` has

    .. math::
        \ell = (1-\epsilon) w_y (\mathrm{lse} - x_y)
             + \frac{\epsilon}{V} \sum_c w_c (\mathrm{lse} - x_c),
        \qquad z = s\, \mathrm{lse}^2 .

    ``"mean"`` returns :math:`\sum \ell / \sum w_y + \sum z / n` over the n non-ignored rows
    (the z-loss is averaged over rows, not over weights, as upstream does); ``"sum"`` the
    sums; ``"none"`` the per-row :math:`\ell + z` (0 at ignored rows). With
    ``return_z_loss=True`` the result is ``(loss, z_loss)``, ``z_loss`` being the z part
    reduced the same way and detached (upstream returns it for logging; its gradient is
    dropped there too).

    Computation: the loss is :func:`xloss.cross_entropy`; when ``lse_square_scale > 0`` or
    ``return_z_loss`` is set, the z part is a second :func:`xloss.cross_entropy` call with an
    all-zero probability target, whose only term is exactly :math:`s\,\mathrm{lse}^2`, and
    rows with ``target == ignore_index`` masked out. This is exact (no subtraction) and
    costs one more pass over the logits.

    Deliberate differences from upstream:

    - The caller's logits are never overwritten: upstream's Triton kernel stores the
      gradient into ``_input`` during forward, so ``_input`` holds gradients afterwards.
    - Runs on any device (CPU included); no Triton.
    - Any number of leading axes: ``_input`` (..., V) with ``target`` (...).
    - A batch where every row is ignored gives 0 with a zero gradient.
    - Target indices are range-checked; errors are ValueError/TypeError, not ``assert``.
    - ``return_token_accuracy`` (newer upstream versions) is not supported.

    Args:
        weight: class weights (V,), or None.
        ignore_index: target value whose rows are dropped.
        lse_square_scale: s, the z-loss coefficient, >= 0.
        label_smoothing: eps in [0, 1].
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        softcap: cap of the logit soft-capping, > 0, or None.
        return_z_loss: also return the z-loss part.

    Shape:
        - _input: (BT, V) logits, or (..., V).
        - target: (BT) class indices, or (...).
        - output: scalar, or (BT) / (...) for ``"none"``; a pair with ``return_z_loss``.

    Example:
        >>> import torch
        >>> from xloss.compat.liger import LigerCrossEntropyLoss
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]])
        >>> target = torch.tensor([0, 2, -100])
        >>> loss_fn = LigerCrossEntropyLoss(lse_square_scale=1e-2, return_z_loss=True)
        >>> loss, z_loss = loss_fn(logits, target)
        >>> loss, z_loss
        (tensor(0.2489), tensor(0.0735))
        >>> logits  # untouched, unlike upstream
        tensor([[ 2.0000,  0.5000, -1.0000],
                [ 0.1000,  0.2000,  3.0000],
                [ 1.0000,  1.0000,  1.0000]])
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
    ) -> None:
        super().__init__()
        check_class_weight(weight, None)
        check_ignore_index(ignore_index)
        if not isinstance(reduction, str) or reduction not in LIGER_REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {LIGER_REDUCTIONS}, got {reduction!r}")
        if not isinstance(return_z_loss, bool):
            raise TypeError(f"`return_z_loss` must be a bool, got {type(return_z_loss).__name__}")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.lse_square_scale = check_non_negative("lse_square_scale", lse_square_scale)
        self.label_smoothing = check_unit_interval("label_smoothing", label_smoothing)
        self.reduction = reduction
        self.softcap = check_positive_or_none("softcap", softcap)
        self.return_z_loss = return_z_loss

    def forward(self, _input: Tensor, target: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        loss = cross_entropy(
            _input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            class_dim=-1,
            softcap=self.softcap,
        )
        if self.lse_square_scale == 0.0:
            return (loss, torch.zeros_like(loss)) if self.return_z_loss else loss
        check_tensor("target", target)
        kept = None if self.ignore_index is None else target != self.ignore_index
        z_loss = cross_entropy(
            _input,
            _input.new_zeros(()).expand(_input.shape),  # zero target: only z * lse^2 is left
            ignore_index=None,
            reduction=self.reduction,
            class_dim=-1,
            mask=kept,
            z_loss=self.lse_square_scale,
            softcap=self.softcap,
        )
        loss = loss + z_loss
        return (loss, z_loss.detach()) if self.return_z_loss else loss

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, lse_square_scale={self.lse_square_scale}, "
            f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
            f"softcap={self.softcap}, return_z_loss={self.return_z_loss}"
        )
