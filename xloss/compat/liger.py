"""Liger-Kernel's cross-entropy modules, without overwriting the caller's logits.

Upstream: ``liger_kernel.transformers.LigerCrossEntropyLoss(weight=None, ignore_index=-100,
lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
return_z_loss=False)``, ``forward(_input, target)``; and
``LigerFusedLinearCrossEntropyLoss(ce_weight=None, ...)``,
``forward(lin_weight, _input, target, bias=None)``, here over
:func:`xloss.linear_cross_entropy`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from xloss._core.validation import (
    check_class_weight,
    check_ignore_index,
    check_non_negative,
    check_positive_or_none,
    check_tensor,
    check_unit_interval,
    differs_from,
)
from xloss.functional.cross_entropy import cross_entropy
from xloss.functional.linear_cross_entropy import check_accum_dtype, linear_cross_entropy

LIGER_REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyOutput(NamedTuple):
    """What the Liger modules return when any ``return_*`` flag is set (Liger 0.8.x's type).

    Upstream's is a dataclass with these fields in this order; this one is a named tuple,
    so ``out.loss`` works as upstream and ``loss, z_loss, *_ = out`` unpacks. Fields not
    asked for are None.
    """

    loss: Tensor
    z_loss: Tensor | None = None  # the z part, detached (return_z_loss)
    token_accuracy: Tensor | None = None  # return_token_accuracy
    predicted_tokens: Tensor | None = None  # argmax per row, -1 at ignored rows


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}")
    return value


def _token_accuracy(stats, target: Tensor, ignore_index, reduction: str) -> Tensor:
    """Upstream's token accuracy: per row 1.0 / 0.0 for ``"none"`` (0 at ignored rows),
    else the mean over the non-ignored rows (0 when there is none)."""
    if reduction != "none":
        return stats.accuracy
    hits = stats.predicted == target.long()
    if ignore_index is not None:
        hits = hits & differs_from(target, ignore_index)
    return hits.to(stats.lse.dtype)


def _output(module, loss, z_loss, stats, target):
    """The loss alone, or a CrossEntropyOutput when a ``return_*`` flag is set."""
    if not (module.return_z_loss or module.return_token_accuracy or module.return_predicted_tokens):
        return loss
    accuracy = predicted = None
    if module.return_token_accuracy:
        accuracy = _token_accuracy(stats, target, module.ignore_index, module.reduction)
    if module.return_predicted_tokens:
        predicted = stats.predicted
    if z_loss is not None:
        z_loss = z_loss.detach()
    return CrossEntropyOutput(loss, z_loss if module.return_z_loss else None, accuracy, predicted)


def store_liger_settings(
    module: nn.Module,
    weight_name: str,
    weight: Tensor | None,
    *,
    ignore_index,
    lse_square_scale,
    label_smoothing,
    reduction,
    softcap,
    return_z_loss,
    return_token_accuracy=False,
    return_predicted_tokens=False,
) -> None:
    """Validate the settings both Liger modules share and store them on ``module``."""
    check_class_weight(weight, None, name=weight_name)
    check_ignore_index(ignore_index)
    if not isinstance(reduction, str) or reduction not in LIGER_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {LIGER_REDUCTIONS}, got {reduction!r}")
    _check_flag("return_z_loss", return_z_loss)
    module.return_token_accuracy = _check_flag("return_token_accuracy", return_token_accuracy)
    module.return_predicted_tokens = _check_flag("return_predicted_tokens", return_predicted_tokens)
    module.register_buffer(weight_name, weight)
    module.ignore_index = ignore_index
    module.lse_square_scale = check_non_negative("lse_square_scale", lse_square_scale)
    module.label_smoothing = check_unit_interval("label_smoothing", label_smoothing)
    module.reduction = reduction
    module.softcap = check_positive_or_none("softcap", softcap)
    module.return_z_loss = return_z_loss


class LigerCrossEntropyLoss(nn.Module):
    r"""Cross-entropy with z-loss and soft-capping, as Liger-Kernel's module.

    Upstream signature (Liger-Kernel 0.8.x): ``LigerCrossEntropyLoss(weight=None,
    ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean",
    softcap=None, return_z_loss=False, return_token_accuracy=False,
    return_predicted_tokens=False)``. With x the logits of a row (after ``softcap * tanh(x /
    softcap)`` when ``softcap`` is set), lse = logsumexp(x), V classes, eps the smoothing, w the
    class weights and s = ``lse_square_scale``, a row whose target y is not ``ignore_index`` has

    .. math::
        \ell = (1-\epsilon) w_y (\mathrm{lse} - x_y)
             + \frac{\epsilon}{V} \sum_c w_c (\mathrm{lse} - x_c),
        \qquad z = s\, \mathrm{lse}^2 .

    ``"mean"`` returns :math:`\sum \ell / \sum w_y + \sum z / n` over the n non-ignored rows
    (the z-loss is averaged over rows, not over weights, as upstream does); ``"sum"`` the
    sums; ``"none"`` the per-row :math:`\ell + z` (0 at ignored rows). When any
    ``return_*`` flag is set the result is a :class:`CrossEntropyOutput` ``(loss, z_loss,
    token_accuracy, predicted_tokens)`` as upstream's, fields not asked for None:
    ``z_loss`` the z part reduced the same way and detached (upstream returns it for
    logging; its gradient is dropped there too); ``token_accuracy`` the fraction of
    non-ignored rows whose argmax is the target (per row 1.0/0.0 for ``"none"``);
    ``predicted_tokens`` the argmax per row (-1 at ignored rows). Accuracy and predictions
    come from the same :func:`xloss.cross_entropy` call (``return_stats=True``) and carry
    no gradient.

    Computation: one :func:`xloss.cross_entropy` call with ``z_loss=lse_square_scale``
    (unweighted, xloss's row mean of the z term is upstream's). The z part on its own
    (for ``return_z_loss``, or with ``weight``, where upstream averages it over rows but
    the loss over weights) is a second :func:`xloss.cross_entropy` call with an all-zero
    probability target, whose only term is exactly :math:`s\,\mathrm{lse}^2`, and rows
    with ``target == ignore_index`` masked out: exact (no subtraction), one more pass over
    the logits, without autograd when it is only returned.

    Deliberate differences from upstream:

    - The caller's logits are not overwritten: upstream's Triton kernel stores the
      gradient into ``_input`` during forward, so ``_input`` holds gradients afterwards.
      Pass ``inplace_backward=True`` (keyword-only, an xloss extension) to get that memory
      saving on the CPU kernel path; see :func:`xloss.cross_entropy`.
    - Runs on any device (CPU included); no Triton.
    - Any number of leading axes: ``_input`` (..., V) with ``target`` (...).
    - Target indices are range-checked; errors are ValueError/TypeError, not ``assert``.
    - The output type is a named tuple (upstream: a dataclass): same fields, and it also
      unpacks.

    Args:
        weight: class weights (V,), or None.
        ignore_index: target value whose rows are dropped.
        lse_square_scale: s, the z-loss coefficient, >= 0.
        label_smoothing: eps in [0, 1].
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        softcap: cap of the logit soft-capping, > 0, or None.
        return_z_loss: also return the z-loss part.
        return_token_accuracy: also return the token accuracy.
        return_predicted_tokens: also return the argmax per row.
        inplace_backward: let the kernel write the gradient into ``_input`` (keyword-only).

    Shape:
        - _input: (BT, V) logits, or (..., V).
        - target: (BT) class indices, or (...).
        - output: scalar, or (BT) / (...) for ``"none"``; a :class:`CrossEntropyOutput`
          with any ``return_*`` flag.

    Example:
        >>> import torch
        >>> from xloss.compat.liger import LigerCrossEntropyLoss
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]])
        >>> target = torch.tensor([0, 2, -100])
        >>> loss_fn = LigerCrossEntropyLoss(lse_square_scale=1e-2, return_z_loss=True,
        ...                                 return_token_accuracy=True)
        >>> out = loss_fn(logits, target)
        >>> out.loss, out.z_loss, out.token_accuracy
        (tensor(0.2489), tensor(0.0735), tensor(1.))
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
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
        *,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        store_liger_settings(
            self,
            "weight",
            weight,
            ignore_index=ignore_index,
            lse_square_scale=lse_square_scale,
            label_smoothing=label_smoothing,
            reduction=reduction,
            softcap=softcap,
            return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy,
            return_predicted_tokens=return_predicted_tokens,
        )
        if not isinstance(inplace_backward, bool):
            raise TypeError(
                f"`inplace_backward` must be a bool, got {type(inplace_backward).__name__}"
            )
        if inplace_backward and weight is not None and self.lse_square_scale > 0.0:
            raise ValueError(
                "`inplace_backward=True` cannot be combined with `weight` and "
                "`lse_square_scale` > 0: the z-loss then needs a second pass over the logits "
                "that the in-place gradient would overwrite"
            )
        self.inplace_backward = inplace_backward

    def forward(self, _input: Tensor, target: Tensor) -> Tensor | CrossEntropyOutput:
        scale = self.lse_square_scale
        want_stats = self.return_token_accuracy or self.return_predicted_tokens
        # with class weights, upstream averages the z-loss over rows but the loss over weights
        separate_z = self.weight is not None and scale > 0.0
        z_loss = None
        if self.return_z_loss or separate_z:
            if scale == 0.0:
                z_loss = _input.new_zeros(() if self.reduction != "none" else target.shape)
            elif separate_z:
                z_loss = self._z_loss(_input, target)
            else:
                with torch.no_grad():  # only reported; it runs before an in-place backward
                    z_loss = self._z_loss(_input, target)
        loss = cross_entropy(
            _input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            class_dim=-1,
            z_loss=0.0 if separate_z else scale,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
            return_stats=want_stats,
        )
        stats = None
        if want_stats:
            stats, loss = loss, loss.loss
        if separate_z:
            loss = loss + z_loss
        return _output(self, loss, z_loss, stats, target)

    def _z_loss(self, _input: Tensor, target: Tensor) -> Tensor:
        """s * lse^2 per kept row, reduced: cross-entropy against an all-zero target."""
        check_tensor("target", target)
        kept = None if self.ignore_index is None else differs_from(target, self.ignore_index)
        return cross_entropy(
            _input,
            _input.new_zeros(()).expand(_input.shape),  # zero target: only z * lse^2 is left
            ignore_index=None,
            reduction=self.reduction,
            class_dim=-1,
            mask=kept,
            z_loss=self.lse_square_scale,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, lse_square_scale={self.lse_square_scale}, "
            f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
            f"softcap={self.softcap}, return_z_loss={self.return_z_loss}"
        )


class LigerFusedLinearCrossEntropyLoss(nn.Module):
    r"""Linear layer + cross-entropy without the logits in memory, as Liger-Kernel's module.

    Upstream signature (Liger-Kernel 0.8.x): ``LigerFusedLinearCrossEntropyLoss(ce_weight=None,
    ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean",
    softcap=None, return_z_loss=False, accum_dtype=None, use_token_scaling=False,
    return_token_accuracy=False, return_predicted_tokens=False)``, ``forward(lin_weight, _input,
    target, bias=None)``. The loss is that of :class:`LigerCrossEntropyLoss` on the logits
    ``_input @ lin_weight.T + bias`` (with ``ce_weight`` as the class weights), computed by
    :func:`xloss.linear_cross_entropy` in row chunks, so the (BT, V) logits never exist.

    Computation: one :func:`xloss.linear_cross_entropy` pass with ``z_loss`` when no
    ``ce_weight`` is given (the z-loss is then averaged over rows, as upstream). When the
    z part is needed on its own (``return_z_loss``, or ``ce_weight`` with
    ``lse_square_scale > 0``, where upstream averages the z-loss over rows but the loss
    over weights), it is the difference of two unweighted, unsmoothed passes with and
    without ``z_loss`` (exact up to rounding; without autograd when it is only returned).

    The ``return_*`` flags give a :class:`CrossEntropyOutput` as for
    :class:`LigerCrossEntropyLoss`; accuracy and predicted tokens come from the row
    kernel's pass over each chunk of logits (``return_stats=True``), never from stored
    logits. ``accum_dtype`` is the dtype the weight and bias gradients are summed in
    over the chunks (None: fp32), as upstream.

    Deliberate differences from upstream: runs on any device without Triton; ``_input``
    may have any leading axes, (..., H); errors are ValueError/TypeError, not ``assert``;
    ``use_token_scaling=True`` raises ValueError (not supported); the output type is a
    named tuple (upstream: a dataclass) with the same fields.

    Shape:
        - lin_weight: (V, H); bias: (V).
        - _input: (BT, H) or (B, T, H).
        - target: (BT) or (B, T) class indices.
        - output: scalar, or the target's shape for ``"none"``; a
          :class:`CrossEntropyOutput` with any ``return_*`` flag.

    Example:
        >>> import torch
        >>> from xloss.compat.liger import LigerFusedLinearCrossEntropyLoss
        >>> hidden = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
        >>> lin_weight = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, -1.0]])
        >>> target = torch.tensor([0, 2, -100])
        >>> loss_fn = LigerFusedLinearCrossEntropyLoss(lse_square_scale=1e-2, return_z_loss=True)
        >>> out = loss_fn(lin_weight, hidden, target)
        >>> out.loss, out.z_loss, out.token_accuracy
        (tensor(0.3754), tensor(0.0184), None)
    """

    def __init__(
        self,
        ce_weight: Tensor | None = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
        accum_dtype: torch.dtype | None = None,
        use_token_scaling: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
    ) -> None:
        super().__init__()
        store_liger_settings(
            self,
            "ce_weight",
            ce_weight,
            ignore_index=ignore_index,
            lse_square_scale=lse_square_scale,
            label_smoothing=label_smoothing,
            reduction=reduction,
            softcap=softcap,
            return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy,
            return_predicted_tokens=return_predicted_tokens,
        )
        check_accum_dtype(accum_dtype)
        self.accum_dtype = accum_dtype
        if _check_flag("use_token_scaling", use_token_scaling):
            raise ValueError(
                "`use_token_scaling=True` (upstream scales each token's loss by its detached "
                "predicted probability) is not supported by xloss's adapter; weight the "
                "per-token loss yourself: reduction='none', then multiply by "
                "exp(-loss).detach() without smoothing or z-loss"
            )
        self.use_token_scaling = False

    def forward(
        self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> Tensor | CrossEntropyOutput:
        options = dict(
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            softcap=self.softcap,
            accum_dtype=self.accum_dtype,
        )
        scale = self.lse_square_scale
        separate_z = self.ce_weight is not None and scale > 0.0
        want_stats = self.return_token_accuracy or self.return_predicted_tokens
        loss = linear_cross_entropy(
            _input,
            lin_weight,
            target,
            bias,
            class_weight=self.ce_weight,
            label_smoothing=self.label_smoothing,
            z_loss=0.0 if separate_z else scale,
            return_stats=want_stats,
            **options,
        )
        stats = None
        if want_stats:
            stats, loss = loss, loss.loss
        if not (separate_z or self.return_z_loss):
            return _output(self, loss, None, stats, target)
        if scale == 0.0:
            return _output(self, loss, torch.zeros_like(loss), stats, target)

        def z_part() -> Tensor:
            with_z = linear_cross_entropy(_input, lin_weight, target, bias, z_loss=scale, **options)
            return with_z - linear_cross_entropy(_input, lin_weight, target, bias, **options)

        if separate_z:
            z_loss = z_part()
            loss = loss + z_loss
        else:
            with torch.no_grad():
                z_loss = z_part()
        return _output(self, loss, z_loss, stats, target)

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, lse_square_scale={self.lse_square_scale}, "
            f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
            f"softcap={self.softcap}, return_z_loss={self.return_z_loss}"
        )
