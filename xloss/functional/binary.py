"""Binary and multi-label cross-entropy from logits, and class-frequency weights.

Every element of the input is an independent binary prediction, so input and target have
the same shape (any shape, 0-D included) and nothing is broadcast between them. The class
axis only matters for ``pos_weight``, the ``"uniform"`` smoothing rule and the per-class
statistics (:func:`positive_rate`, :func:`multilabel_balance_weights`):

- 0-D input: one prediction; there is no class axis (C = 1) and ``class_dim`` is unused.
- 1-D input (C): one unbatched sample of C class scores; the class axis is axis 0, so
  ``class_dim`` must be 0 or -1.
- N-D input: the class axis is ``class_dim`` (default -1, the last axis: (N, C) or
  (B, T, C)); axis 0 is the sample axis for ``reduction="sample"`` and ``lengths``.

:func:`elementwise_loss` is the one code path shared with the focal and asymmetric losses
(:mod:`xloss.functional.focal`): it validates, builds the mask, smooths the target, applies
the element weights and reduces; each loss only supplies its per-element formula.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from xloss._core.masking import build_mask
from xloss._core.reduction import reduce_loss, safe_divide
from xloss._core.validation import (
    any_violation,
    check_floating_input,
    check_ignore_index,
    check_inplace_allowed,
    check_normalizer,
    check_reduction,
    check_tensor,
    check_unit_interval,
    normalize_dim,
    shape_str,
)
from xloss.functional.cross_entropy import compute_dtype, loss_dtype
from xloss.ops.fused_binary import (
    BCE,
    fused_binary_applies,
    fused_binary_loss,
    host_binary_applies,
)

SMOOTHING_RULES = ("binary", "uniform")

# (logits, smoothed target, pos_weight or None) -> per-element loss, all in the compute dtype
Pointwise = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


class FusedKind(NamedTuple):
    """Which loss the fused CPU kernel computes (:mod:`xloss.ops.fused_binary`)."""

    kind: int  # BCE, FOCAL, ASL_CLIP or ASL_NO_CLIP
    params: tuple[float, float, float] = (0.0, 0.0, 0.0)


def check_binary_settings(
    *,
    reduction,
    label_smoothing,
    smoothing_rule,
    ignore_index,
    normalizer=None,
    validate_args: bool = True,
) -> float:
    """Validate the options shared by BCE, focal and ASL; return ``label_smoothing``.

    ``normalizer`` is checked too (its value only with ``validate_args``, as it may sync).
    """
    check_reduction(reduction, normalizer)
    check_ignore_index(ignore_index)
    if not isinstance(smoothing_rule, str) or smoothing_rule not in SMOOTHING_RULES:
        raise ValueError(
            f"`smoothing_rule` must be one of {SMOOTHING_RULES}, got {smoothing_rule!r}"
        )
    label_smoothing = check_unit_interval("label_smoothing", label_smoothing)
    check_normalizer(normalizer, validate_args)
    return label_smoothing


def check_elementwise_weight(weight, shape: torch.Size | None) -> None:
    """Element weights: a floating tensor broadcastable to ``shape`` (any, when None)."""
    if weight is None:
        return
    check_tensor("weight", weight)
    if not weight.is_floating_point():
        raise TypeError(f"`weight` must be a floating-point tensor, got dtype {weight.dtype}")
    if shape is None:
        return
    try:
        broadcast = torch.broadcast_shapes(weight.shape, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"`weight` must broadcast to the input's shape {shape_str(shape)}, "
            f"got {shape_str(weight.shape)}"
        )


def check_pos_weight(pos_weight, num_classes: int | None) -> None:
    """A floating tensor with one value per class (C,) or a single value; any C when None."""
    if pos_weight is None:
        return
    check_tensor("pos_weight", pos_weight)
    if not pos_weight.is_floating_point():
        raise TypeError(
            f"`pos_weight` must be a floating-point tensor, got dtype {pos_weight.dtype}"
        )
    if pos_weight.dim() > 1:
        raise ValueError(
            "`pos_weight` must be 1-D, one value per class, "
            f"got shape {shape_str(pos_weight.shape)}"
        )
    if num_classes is not None and pos_weight.numel() not in (1, num_classes):
        raise ValueError(
            f"`pos_weight` must have shape ({num_classes},) (the size of the class axis) "
            f"or a single value, got {shape_str(pos_weight.shape)}"
        )


def elementwise_target(target, input: Tensor) -> Tensor:
    """Check that ``target`` has the input's shape; returns it on the input's device."""
    check_tensor("target", target)
    if target.is_complex():
        raise TypeError(f"`target` must be a real tensor, got dtype {target.dtype}")
    if target.shape != input.shape:
        raise ValueError(
            f"`target` must have the input's shape {shape_str(input.shape)} (binary losses "
            f"never broadcast), got {shape_str(target.shape)}"
        )
    return target.to(device=input.device)


def class_axis(ndim: int, class_dim: int) -> int | None:
    """The class axis of an ``ndim``-D input; None for 0-D input (one prediction, C = 1)."""
    if ndim == 0:
        return None
    return normalize_dim(class_dim, ndim)


def along_class_axis(values: Tensor, ndim: int, dim: int | None) -> Tensor:
    """Reshape a (C,) or one-value tensor to broadcast along axis ``dim`` of ``ndim`` axes."""
    if dim is None:
        return values.reshape(())
    return values.reshape((-1,) + (1,) * (ndim - 1 - dim))


def check_target_range(target: Tensor, ignore_index: int | None, keep: Tensor | None) -> None:
    """Kept targets must lie in [0, 1]; NaN is rejected too. Synchronises with the device."""
    bad = ~((target >= 0) & (target <= 1))
    if ignore_index is not None:
        bad &= target != ignore_index
    if keep is not None:
        bad &= keep
    hint = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
    if any_violation(bad, f"`target` must lie in [0, 1]{hint}"):
        value = float(target[bad].flatten()[0])
        raise ValueError(f"`target` must lie in [0, 1]{hint}, found {value}")


def smooth_binary_target(
    target: Tensor, label_smoothing: float, smoothing_rule: str, num_classes: int
) -> Tensor:
    """y(1-a) + a/2 ("binary") or y(1-a) + a/C ("uniform")."""
    if label_smoothing == 0.0:
        return target
    share = 2 if smoothing_rule == "binary" else num_classes
    return target * (1.0 - label_smoothing) + label_smoothing / share


def elementwise_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pointwise: Pointwise,
    *,
    pos_weight: Tensor | None = None,
    reduction: str,
    label_smoothing: float,
    smoothing_rule: str,
    ignore_index: int | None,
    mask: Tensor | None,
    lengths: Tensor | None,
    class_dim: int,
    normalizer: float | Tensor | None,
    validate_args: bool,
    fused: FusedKind | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """The shared path of the binary family: validate, mask, smooth, weight, reduce.

    ``pointwise(x, y', pos_weight)`` returns the unweighted per-element loss from logits
    ``x`` and smoothed targets ``y'`` in the compute dtype (fp32 for fp16/bf16 input).
    ``fused`` names the same loss for the fused CPU kernel, which serves fp32/fp16/bf16
    CPU input when no tensor but the input requires a gradient; the portable torch path
    (``pointwise``) serves the rest.
    """
    label_smoothing = check_binary_settings(
        reduction=reduction,
        label_smoothing=label_smoothing,
        smoothing_rule=smoothing_rule,
        ignore_index=ignore_index,
        normalizer=normalizer,
        validate_args=validate_args,
    )
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"`inplace_backward` must be a bool, got {type(inplace_backward).__name__}")
    if reduction == "none" and input.dtype != loss_dtype(input):
        # fp16/bf16 under autocast: the element losses come back in float32, as from
        # F.binary_cross_entropy_with_logits; the kernel would round each one to the half
        # dtype first (bf16: 3 significant digits). The gradient flows back through the cast.
        if inplace_backward:
            check_inplace_allowed(input)
        input = input.float()
    # The common eager CPU call (plain tensors, class axis last, no weight or mask)
    # skips the checks below: they all pass there, and the kernel checks the targets.
    fast = (
        fused is not None
        and weight is None
        and mask is None
        and lengths is None
        and ignore_index is None
        and normalizer is None
        and reduction != "sample"
        and not inplace_backward
        and host_binary_applies(input, target, pos_weight, class_dim)
    )
    if fast:
        dim, keep = input.dim() - 1, None
        num_classes = input.shape[-1]
    else:
        check_floating_input(input)
        if inplace_backward:
            check_inplace_allowed(input)
        target = elementwise_target(target, input)
        dim = class_axis(input.dim(), class_dim)
        num_classes = 1 if dim is None else input.shape[dim]
        check_elementwise_weight(weight, input.shape)
        check_pos_weight(pos_weight, num_classes)
        keep = build_mask(
            input.shape,
            input.device,
            index_target=target,
            ignore_index=ignore_index,
            mask=mask,
            lengths=lengths,
            validate_args=validate_args,
        )
    share = 2 if smoothing_rule == "binary" else num_classes
    if fast or (
        fused is not None and fused_binary_applies(input, target, weight, pos_weight, normalizer)
    ):
        reduced = fused_binary_loss(
            input,
            target,
            kind=fused.kind,
            params=fused.params,
            smoothing=(1.0 - label_smoothing, label_smoothing / share),
            weight=weight,
            pos_weight=pos_weight,
            keep=keep,
            dim=dim,
            reduction=reduction,
            normalizer=normalizer,
            batched=input.dim() > 1,
            validate_args=validate_args,  # the kernel checks the targets as it reads them
            ignore_index=ignore_index,
            inplace_backward=inplace_backward,
        )
        return reduced if input.dtype == torch.float32 else reduced.to(loss_dtype(input))

    device = input.device
    dtype = compute_dtype(input.dtype)
    target = target.to(dtype)
    if validate_args:
        check_target_range(target, ignore_index, keep)
    if keep is not None:
        target = torch.where(keep, target, 0.0)  # an in-range value; the loss is dropped below

    logits = input.to(dtype)
    smoothed = smooth_binary_target(target, label_smoothing, smoothing_rule, num_classes)
    if pos_weight is not None:
        pos_weight = along_class_axis(pos_weight.to(device=device, dtype=dtype), input.dim(), dim)
    loss = pointwise(logits, smoothed, pos_weight)
    if weight is not None:
        loss = loss * weight.to(device=device, dtype=dtype)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
    reduced = reduce_loss(
        loss, reduction, keep=keep, normalizer=normalizer, batched=input.dim() > 1
    )
    return reduced.to(loss_dtype(input))


def log_sigmoid(logits: Tensor) -> Tensor:
    """log s(x) = -softplus(-x), finite with a finite gradient for every finite x.

    Same values as ``F.logsigmoid``, but ``softplus`` is an ordinary element-wise kernel:
    on CPU ``F.logsigmoid`` hands even tiny tensors to the thread pool, and its wake-ups
    cost milliseconds per call (against microseconds for softplus) in this project's
    test runs on a loaded 2-core machine.
    The threshold 40 (above it softplus returns its input) keeps float64 accuracy:
    exp(-40) < 1e-17.
    """
    return -F.softplus(-logits, threshold=40.0)


def bce_pointwise(logits: Tensor, target: Tensor, pos_weight: Tensor | None) -> Tensor:
    """-[pw y log s(x) + (1-y) log(1-s(x))] from logits, stable for any x.

    Both log terms are evaluated, each without cancellation. PyTorch's fused kernel
    (about 3x faster here) computes (1-y) x + (1 + (pw-1) y) softplus(-x) instead, which
    cancels for soft targets at large |x|: at x = -10, y = 0.005 its fp32 result is off
    by 3e-6 relative (25 ulp), so xloss does not call it.
    """
    positive = log_sigmoid(logits) * target
    if pos_weight is not None:
        positive = positive * pos_weight
    return -(positive + log_sigmoid(-logits) * (1.0 - target))


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    smoothing_rule: str = "binary",
    ignore_index: int | None = None,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    class_dim: int = -1,
    normalizer: float | Tensor | None = None,
    validate_args: bool = True,
    inplace_backward: bool = False,
) -> Tensor:
    r"""Binary (multi-label) cross-entropy between logits and targets in [0, 1].

    With s the sigmoid, a the label smoothing, w the element weight (1 when not given)
    and p the positive weight of the element's class (1 when not given), each element's
    target is first smoothed,

    .. math::
        y' = y (1 - a) + a / 2 \quad (\texttt{"binary"}), \qquad
        y' = y (1 - a) + a / C \quad (\texttt{"uniform"}),

    and the loss of the element is

    .. math::
        \ell = -w \left[ p\, y' \log s(x) + (1 - y') \log (1 - s(x)) \right],

    computed from log s(x) = -softplus(-x) and log(1 - s(x)) = -softplus(x), so loss and
    gradient are finite for any finite logit. ``"binary"`` smoothing treats every element
    as its own two-class problem; ``"uniform"`` spreads a over the C classes of the class
    axis (the PaddleClas / timm rule). Smoothing applies to hard and soft targets alike.

    Elements whose target equals ``ignore_index`` (e.g. -1 for an unknown label), where
    ``mask`` is False, or past a sample's ``lengths`` along axis 1 are dropped: their loss
    is 0 and they count in no mean.

    Reductions: ``"none"`` returns the per-element loss (input's shape); ``"sum"`` its
    sum; ``"mean"`` the sum divided by the number of kept elements (``weight`` and
    ``pos_weight`` do not enter the denominator, as in PyTorch); ``"sample"`` the same mean
    per sample (axis 0), shape (N,). With ``normalizer`` the result is the sum divided by
    ``normalizer``. A batch with no kept element gives 0 with a zero gradient.

    Without smoothing, masks and ``ignore_index`` the result equals
    ``F.binary_cross_entropy_with_logits`` for every reduction it has.

    On CPU, fp32, fp16 and bf16 input runs through a fused numba kernel
    (:mod:`xloss.ops.fused_binary`) that computes the loss and writes the gradient in one
    pass over the elements, in fp32; fp64, other devices, and calls where ``target``,
    ``weight``, ``pos_weight`` or ``normalizer`` require a gradient use portable torch ops.
    Second-order gradients are available on the portable path only
    (``with xloss.backends.use("torch"):``); on the kernel path the second backward raises
    a RuntimeError that says so.

    Args:
        input: logits, floating point, any shape. fp16 and bf16 are computed in fp32 and
            the result is returned in the input's dtype (float32 under autocast, as
            ``F.binary_cross_entropy_with_logits``).
        target: the input's shape exactly (never broadcast), values in [0, 1] or equal to
            ``ignore_index``. Integer and bool targets are accepted and converted to the
            compute dtype (PyTorch rejects them).
        weight: element weights, broadcastable to the input's shape.
        pos_weight: weight of the positive term per class: shape (C,) along ``class_dim``,
            or a single value.
        reduction: ``"none"``, ``"mean"``, ``"sum"`` or ``"sample"``.
        label_smoothing: a in [0, 1].
        smoothing_rule: ``"binary"`` (a/2) or ``"uniform"`` (a/C).
        ignore_index: target value whose elements are dropped (compared as
            ``target == ignore_index``); None drops nothing.
        mask: bool, the input's shape; False drops an element.
        lengths: (N,) valid lengths along axis 1: integers, or floats in (0, 1] as
            relative lengths. Needs input with at least 2 dimensions.
        class_dim: the class axis (see the module docstring for 0-D and 1-D input); used
            by ``pos_weight`` and ``"uniform"`` smoothing only.
        normalizer: divide the summed loss by this number or one-element tensor.
        validate_args: check target values and lengths; these checks synchronise with the
            device, so they can be switched off.
        inplace_backward: write the gradient into the storage of ``input`` (no extra
            memory; ``input`` then holds the gradient, not the logits). The version counter
            of ``input`` is bumped, so autograd raises if another op saved it. Applies on
            the CPU kernel path when ``input`` is contiguous; otherwise the logits are
            copied first and ``input`` is left untouched. Like PyTorch's in-place ops it
            raises a RuntimeError, on every path, when ``input`` is a leaf that requires
            grad (an ``nn.Parameter``) or a view of one. A target outside [0, 1] raises
            before anything is written, so ``input`` keeps its logits: with
            ``validate_args=True`` the kernel first reads every target (one more read of
            the targets, in the same launch), then makes its one pass over the logits;
            ``validate_args=False`` skips that read.

    Shape:
        - input: (*), any shape: (), (C), (N, C), (N, C, d_1, ...) or (B, T, C).
        - target: (*), the input's shape.
        - output: a scalar; (*) for ``"none"``; (N) for ``"sample"``.

    Here C is the size of the class axis ``class_dim`` and N the size of axis 0.

    Example:
        >>> import torch, xloss
        >>> xloss.binary_cross_entropy_with_logits(
        ...     torch.tensor([-10.0, 2.0]), torch.tensor([0.0, 1.0]), label_smoothing=0.01)
        tensor(0.0935)
        >>> logits = torch.tensor([[1.5, -0.5, 0.0], [-2.0, 3.0, 1.0]])
        >>> labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])  # -1: unknown
        >>> xloss.binary_cross_entropy_with_logits(
        ...     logits, labels, pos_weight=torch.tensor([1.0, 2.0, 3.0]), ignore_index=-1)
        tensor(0.3679)
    """
    return elementwise_loss(
        input,
        target,
        weight,
        bce_pointwise,
        pos_weight=pos_weight,
        reduction=reduction,
        label_smoothing=label_smoothing,
        smoothing_rule=smoothing_rule,
        ignore_index=ignore_index,
        mask=mask,
        lengths=lengths,
        class_dim=class_dim,
        normalizer=normalizer,
        validate_args=validate_args,
        fused=FusedKind(BCE),
        inplace_backward=inplace_backward,
    )


def positive_rate(
    target: Tensor,
    *,
    class_dim: int = -1,
    ignore_index: int | None = None,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Positive rate r_c of each class of a label matrix, over the kept elements.

    .. math::
        r_c = \frac{\sum_{i \in K_c} y_{ic}}{|K_c|}

    where i runs over every axis but the class axis and K_c holds the kept elements of
    class c (not ``ignore_index``, ``mask`` True, inside ``lengths``). For hard labels
    this is the fraction of positives; soft labels count by their value. A class with no
    kept element gets 0.

    Args:
        target: labels in [0, 1] (or ``ignore_index``), any floating, integer or bool dtype.
        class_dim: the class axis (last by default); 1-D targets are one sample (C).
        ignore_index, mask, lengths, validate_args: as in
            :func:`binary_cross_entropy_with_logits`.

    Shape:
        - target: (*), with C along ``class_dim``; () counts as one class.
        - output: (C), floating (the target's dtype, or the default dtype for integer
          and bool targets).

    Example:
        >>> import torch, xloss
        >>> labels = torch.tensor([[1, 0, 1], [1, 0, -1], [0, 0, 1], [1, 1, 0]])
        >>> xloss.positive_rate(labels, ignore_index=-1)
        tensor([0.7500, 0.2500, 0.6667])
    """
    check_ignore_index(ignore_index)
    check_tensor("target", target)
    if target.is_complex():
        raise TypeError(f"`target` must be a real tensor, got dtype {target.dtype}")
    dtype = target.dtype if target.is_floating_point() else torch.get_default_dtype()
    labels = target.to(dtype)
    keep = build_mask(
        target.shape,
        target.device,
        index_target=labels,
        ignore_index=ignore_index,
        mask=mask,
        lengths=lengths,
        validate_args=validate_args,
    )
    if validate_args:
        check_target_range(labels, ignore_index, keep)
    dim = class_axis(target.dim(), class_dim)
    counts = torch.ones_like(labels) if keep is None else keep.to(dtype)
    if keep is not None:
        labels = torch.where(keep, labels, 0.0)
    if dim is None:
        return safe_divide(labels, counts).reshape(1)
    others = [axis for axis in range(target.dim()) if axis != dim]
    if not others:  # 1-D: each class has one element
        return safe_divide(labels, counts)
    return safe_divide(labels.sum(others), counts.sum(others))


def multilabel_balance_weights(
    target: Tensor,
    positive_rate: Tensor,
    *,
    class_dim: int = -1,
    ignore_index: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Class-frequency element weights: exp(1 - r_c) for positives, exp(r_c) for negatives.

    PaddleClas calls this ``weight_ratio`` (the "WF1" weighting of pedestrian-attribute
    recognition): rare positives weigh up to e, frequent negatives down to 1. For a target
    y in [0, 1] the weight is

    .. math::
        w = \exp\left( y (1 - r_c) + (1 - y)\, r_c \right),

    which is exp(1 - r_c) at y = 1 and exp(r_c) at y = 0 (soft labels interpolate in the
    exponent). Elements equal to ``ignore_index`` get weight 0. Pass the result as
    ``weight`` to :func:`binary_cross_entropy_with_logits` (or the focal and asymmetric
    losses); :func:`positive_rate` computes r_c from a label matrix.

    Args:
        target: labels in [0, 1] (or ``ignore_index``), any real dtype.
        positive_rate: r_c in [0, 1], shape (C,) along ``class_dim`` or a single value.
        class_dim: the class axis of ``target`` (last by default).
        ignore_index: target value whose weight is 0; None for none.
        validate_args: check that targets and rates lie in [0, 1] (synchronises).

    Shape:
        - target: (*), with C along ``class_dim``.
        - positive_rate: (C) or a single value.
        - output: (*), the target's shape, floating.

    Example:
        >>> import torch, xloss
        >>> labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
        >>> rate = xloss.positive_rate(labels)
        >>> rate
        tensor([0.5000, 0.0000])
        >>> xloss.multilabel_balance_weights(labels, rate)
        tensor([[1.6487, 1.0000],
                [1.6487, 1.0000]])
    """
    check_ignore_index(ignore_index)
    check_tensor("target", target)
    if target.is_complex():
        raise TypeError(f"`target` must be a real tensor, got dtype {target.dtype}")
    dim = class_axis(target.dim(), class_dim)
    num_classes = 1 if dim is None else target.shape[dim]
    check_tensor("positive_rate", positive_rate)
    if not positive_rate.is_floating_point():
        raise TypeError(
            f"`positive_rate` must be a floating-point tensor, got dtype {positive_rate.dtype}"
        )
    if positive_rate.dim() > 1 or positive_rate.numel() not in (1, num_classes):
        raise ValueError(
            f"`positive_rate` must have shape ({num_classes},) (the size of the class axis) "
            f"or a single value, got {shape_str(positive_rate.shape)}"
        )
    dtype = torch.promote_types(
        target.dtype if target.is_floating_point() else torch.get_default_dtype(),
        positive_rate.dtype,
    )
    labels = target.to(dtype)
    keep = None if ignore_index is None else labels != ignore_index
    if validate_args:
        check_target_range(labels, ignore_index, keep)
        if bool(~((positive_rate >= 0) & (positive_rate <= 1)).all()):
            raise ValueError(
                "`positive_rate` must lie in [0, 1], "
                f"got min {float(positive_rate.min())} and max {float(positive_rate.max())}"
            )
    rate = along_class_axis(positive_rate.to(device=target.device, dtype=dtype), target.dim(), dim)
    if keep is not None:
        labels = torch.where(keep, labels, 0.0)
    weights = torch.exp(labels * (1.0 - rate) + (1.0 - labels) * rate)
    if keep is not None:
        weights = torch.where(keep, weights, 0.0)
    return weights
