"""Sigmoid focal loss (RetinaNet) and asymmetric loss (ASL) from logits.

Both share the layout, masking, smoothing and reduction of
:func:`xloss.binary_cross_entropy_with_logits` through
:func:`xloss.functional.binary.elementwise_loss`; only the per-element formula differs.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from xloss._core.validation import check_non_negative, check_unit_interval
from xloss.functional.binary import FusedKind, elementwise_loss, log_sigmoid
from xloss.ops.fused_binary import ASL_CLIP, ASL_NO_CLIP, FOCAL


def check_focal_settings(*, alpha, gamma) -> tuple[float, float]:
    """``alpha`` in [0, 1] or negative (no alpha term); ``gamma`` >= 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(
            f"`alpha` must be a float in [0, 1], or negative to disable it, "
            f"got {type(alpha).__name__}"
        )
    alpha = float(alpha)
    if not alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"`alpha` must be <= 1 (negative disables it), got {alpha}")
    return alpha, check_non_negative("gamma", gamma)


def check_asymmetric_settings(*, gamma_pos, gamma_neg, clip) -> tuple[float, float, float]:
    """``gamma_pos``, ``gamma_neg`` >= 0; ``clip`` in [0, 1]."""
    return (
        check_non_negative("gamma_pos", gamma_pos),
        check_non_negative("gamma_neg", gamma_neg),
        check_unit_interval("clip", clip),
    )


def safe_power(base: Tensor, exponent: float) -> Tensor:
    """``base ** exponent`` for base >= 0 whose gradient stays finite at base = 0.

    ``pow`` has an infinite derivative at 0 for exponents below 1, and autograd's
    ``0 * inf`` is NaN even where the chain rule would multiply it by 0. At 0 the value is
    0 (1 for exponent 0) and the gradient is taken as 0.
    """
    if exponent == 0.0:
        return torch.ones_like(base)
    positive = base > 0
    return torch.where(positive, torch.where(positive, base, 1.0).pow(exponent), 0.0)


def focal_pointwise(alpha: float, gamma: float):
    """Per-element focal loss: alpha_t (1 - p_t)^gamma BCE(x, y)."""

    def pointwise(logits: Tensor, target: Tensor, pos_weight: Tensor | None) -> Tensor:
        log_p = log_sigmoid(logits)
        log_not_p = log_sigmoid(-logits)
        loss = -(target * log_p + (1.0 - target) * log_not_p)
        if gamma > 0.0:
            # 1 - p_t = y (1 - p) + (1 - y) p, without the cancellation of 1 - p_t
            miss = target * torch.sigmoid(-logits) + (1.0 - target) * torch.sigmoid(logits)
            loss = loss * safe_power(miss, gamma)
        if alpha >= 0.0:
            loss = loss * (alpha * target + (1.0 - alpha) * (1.0 - target))
        return loss

    return pointwise


def asymmetric_pointwise(gamma_pos: float, gamma_neg: float, clip: float):
    """Per-element ASL: -[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)], p_m = max(p-clip, 0)."""

    def pointwise(logits: Tensor, target: Tensor, pos_weight: Tensor | None) -> Tensor:
        log_p = log_sigmoid(logits)
        log_not_p = log_sigmoid(-logits)
        positive = log_p
        if gamma_pos > 0.0:
            positive = positive * torch.exp(gamma_pos * log_not_p)  # (1-p)^g+ log p
        if clip > 0.0:
            shifted = (torch.sigmoid(logits) - clip).clamp(min=0.0)  # p_m <= 1 - clip
            negative = torch.log1p(-shifted) * safe_power(shifted, gamma_neg)
        else:
            negative = log_not_p
            if gamma_neg > 0.0:
                negative = negative * torch.exp(gamma_neg * log_p)  # p^g- log(1-p)
        return -(target * positive + (1.0 - target) * negative)

    return pointwise


def sigmoid_focal_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
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
    r"""Sigmoid focal loss (Lin et al., RetinaNet) from logits.

    With p = s(x) the sigmoid of the logit and y' the smoothed target (as in
    :func:`xloss.binary_cross_entropy_with_logits`),

    .. math::
        p_t = p\, y' + (1 - p)(1 - y'), \qquad
        \alpha_t = \alpha y' + (1 - \alpha)(1 - y'),

    .. math::
        \ell = w\, \alpha_t (1 - p_t)^\gamma\, \mathrm{BCE}(x, y'),

    with w the element weight. A negative ``alpha`` drops the alpha_t factor, so
    ``gamma=0, alpha=-1`` is exactly binary cross-entropy. 1 - p_t is computed as
    y'(1 - p) + (1 - y') p and BCE from log s(x) = -softplus(-x), so logits of any size
    give finite losses and gradients. The gradient flows through the modulating factor.

    The default reduction is ``"mean"`` like the rest of xloss;
    ``torchvision.ops.sigmoid_focal_loss`` defaults to ``"none"``, and detection code
    usually takes ``"sum"`` divided by the number of positive anchors: use
    ``reduction="sum"`` with ``normalizer=num_positives``. Masking, ``ignore_index``,
    smoothing and the reductions are those of
    :func:`xloss.binary_cross_entropy_with_logits`.

    Args:
        input: logits, floating point, any shape (fp16/bf16 computed in fp32).
        target: the input's shape, values in [0, 1] or equal to ``ignore_index``.
        weight: element weights, broadcastable to the input's shape.
        alpha: weight of positives in [0, 1]; negative disables the alpha term.
        gamma: focusing exponent, >= 0.
        reduction, label_smoothing, smoothing_rule, ignore_index, mask, lengths,
            class_dim, normalizer, validate_args, inplace_backward: as in
            :func:`xloss.binary_cross_entropy_with_logits` (the same fused CPU kernel
            serves fp32, fp16 and bf16 input).

    Shape:
        - input: (*), any shape.
        - target: (*), the input's shape.
        - output: a scalar; (*) for ``"none"``; (N) for ``"sample"``.

    Example:
        >>> import torch, xloss
        >>> logits = torch.tensor([[3.0, -2.0, 0.5], [-1.0, 4.0, -3.0]])
        >>> labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        >>> xloss.sigmoid_focal_loss(logits, labels)
        tensor(0.0059)
        >>> xloss.sigmoid_focal_loss(logits, labels, alpha=-1, gamma=0)  # plain BCE
        tensor(0.1716)
    """
    alpha, gamma = check_focal_settings(alpha=alpha, gamma=gamma)
    return elementwise_loss(
        input,
        target,
        weight,
        focal_pointwise(alpha, gamma),
        fused=FusedKind(FOCAL, (alpha, 1.0 - alpha, gamma) if alpha >= 0 else (1.0, 1.0, gamma)),
        inplace_backward=inplace_backward,
        reduction=reduction,
        label_smoothing=label_smoothing,
        smoothing_rule=smoothing_rule,
        ignore_index=ignore_index,
        mask=mask,
        lengths=lengths,
        class_dim=class_dim,
        normalizer=normalizer,
        validate_args=validate_args,
    )


def asymmetric_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    gamma_pos: float = 1.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
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
    r"""Asymmetric loss for multi-label classification (ASL, Ridnik et al. 2021).

    With p = s(x), y' the smoothed target and the shifted probability
    p_m = max(p - clip, 0) of the negatives,

    .. math::
        L_+ = (1 - p)^{\gamma_+} \log p, \qquad
        L_- = p_m^{\gamma_-} \log(1 - p_m), \qquad
        \ell = -w \left[ y' L_+ + (1 - y') L_- \right],

    with w the element weight. The shift discards easy negatives (p <= clip) entirely;
    ``gamma_neg > gamma_pos`` down-weights the many easy negatives of multi-label data.
    With ``gamma_pos = gamma_neg = clip = 0`` this is binary cross-entropy.

    Numerics: log p = -softplus(-x); with ``clip=0``, log(1 - p) = -softplus(x) and
    p^gamma_neg = exp(gamma_neg * log p); with ``clip > 0``,
    log(1 - p_m) = ``log1p(-p_m)``, finite because 1 - p_m >= clip. Unlike the upstream
    code, no probability is clamped to an eps before the log. The gradient flows through
    the focusing weights (upstream's ``disable_torch_grad_focal_loss=False``).

    Reduction: the paper's code returns the sum over all elements; xloss defaults to
    ``"mean"`` (over kept elements) like its other losses; pass ``reduction="sum"`` for
    the upstream value. Masking, ``ignore_index``, smoothing and the reductions are those
    of :func:`xloss.binary_cross_entropy_with_logits`.

    Args:
        input: logits, floating point, any shape (fp16/bf16 computed in fp32).
        target: the input's shape, values in [0, 1] or equal to ``ignore_index``.
        weight: element weights, broadcastable to the input's shape.
        gamma_pos: focusing exponent of positives, >= 0.
        gamma_neg: focusing exponent of negatives, >= 0.
        clip: probability margin m in [0, 1] subtracted from p for negatives.
        reduction, label_smoothing, smoothing_rule, ignore_index, mask, lengths,
            class_dim, normalizer, validate_args, inplace_backward: as in
            :func:`xloss.binary_cross_entropy_with_logits` (the same fused CPU kernel
            serves fp32, fp16 and bf16 input).

    Shape:
        - input: (*), any shape.
        - target: (*), the input's shape.
        - output: a scalar; (*) for ``"none"``; (N) for ``"sample"``.

    Example:
        >>> import torch, xloss
        >>> logits = torch.tensor([[3.0, -2.0, 0.5], [-1.0, 4.0, -3.0]])
        >>> labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        >>> xloss.asymmetric_loss(logits, labels, reduction="sum")
        tensor(0.1822)
    """
    gamma_pos, gamma_neg, clip = check_asymmetric_settings(
        gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip
    )
    return elementwise_loss(
        input,
        target,
        weight,
        asymmetric_pointwise(gamma_pos, gamma_neg, clip),
        fused=FusedKind(ASL_CLIP if clip > 0 else ASL_NO_CLIP, (gamma_pos, gamma_neg, clip)),
        inplace_backward=inplace_backward,
        reduction=reduction,
        label_smoothing=label_smoothing,
        smoothing_rule=smoothing_rule,
        ignore_index=ignore_index,
        mask=mask,
        lengths=lengths,
        class_dim=class_dim,
        normalizer=normalizer,
        validate_args=validate_args,
    )
