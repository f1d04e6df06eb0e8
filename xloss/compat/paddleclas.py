"""PaddleClas's multi-label losses, for PyTorch, with the target layouts fixed.

Upstream (``ppcls.loss``): ``MultiLabelLoss(epsilon=None, size_sum=False,
weight_ratio=False)`` and ``MultiLabelAsymmetricLoss(gamma_pos=1, gamma_neg=4, clip=0.05,
epsilon=1e-8, disable_focal_loss_grad=True, reduction="sum")``, each with
``forward(x, target)`` returning a dict ``{"MultiLabelLoss": loss}`` (resp.
``{"MultiLabelAsymmetricLoss": loss}``); ``x`` may be a dict holding ``"logits"``.

Shared conventions: a label of -1 marks an unknown attribute; it is dropped from the loss
and from every mean (xloss ``ignore_index=-1``).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xloss._core.validation import check_floating_input, check_non_negative, check_tensor, shape_str
from xloss.functional.binary import binary_cross_entropy_with_logits, multilabel_balance_weights
from xloss.functional.focal import asymmetric_loss, check_asymmetric_settings

UNKNOWN_LABEL = -1
ASL_REDUCTIONS = ("mean", "sum", "none")


def logits_of(x) -> Tensor:
    """PaddleClas passes either the logits or a dict holding them under ``"logits"``."""
    if isinstance(x, dict):
        if "logits" not in x:
            raise ValueError(f"`x` is a dict without a 'logits' entry, got keys {sorted(x)}")
        x = x["logits"]
    check_floating_input(x)
    if x.dim() != 2:
        raise ValueError(f"`x` must hold (B, C) logits, got shape {shape_str(x.shape)}")
    return x


def split_target(target, x: Tensor, with_ratio: bool) -> tuple[Tensor, Tensor | None]:
    """(B, C), (B, 1, C) or (B, 2, C) targets -> labels (B, C) and ratios (B, C) or None.

    (B,) integer class indices become one-hot labels.
    """
    check_tensor("target", target)
    batch, num_classes = x.shape
    if target.dim() == 3 and target.shape[0] == batch and target.shape[2] == num_classes:
        rows = target.shape[1]
        if with_ratio and rows == 2:
            return target[:, 0, :], target[:, 1, :]
        if not with_ratio and rows in (1, 2):
            return target[:, 0, :], None
    elif target.shape == x.shape and not with_ratio:
        return target, None
    elif target.shape == (batch,) and not with_ratio and not target.is_floating_point():
        return F.one_hot(target.long(), num_classes), None
    expected = (
        f"(B, 2, C) = ({batch}, 2, {num_classes}) (labels, then positive ratios)"
        if with_ratio
        else f"({batch}, {num_classes}), ({batch}, 1, {num_classes}) or ({batch},) indices"
    )
    raise ValueError(
        f"`target` must have shape {expected} for `x` of shape {shape_str(x.shape)}, "
        f"got {shape_str(target.shape)}"
    )


def dataset_positive_rate(ratio: Tensor) -> Tensor:
    """Upstream repeats the dataset's per-class positive ratios on every row; take one row."""
    rate = ratio[0].to(torch.promote_types(ratio.dtype, torch.float32))
    if not bool((ratio == ratio[0]).all()):
        raise ValueError(
            "the positive ratios in `target[:, 1, :]` must be the same on every row "
            "(the dataset's per-class positive rates)"
        )
    return rate


class MultiLabelLoss(nn.Module):
    r"""Multi-label BCE with optional smoothing and class-frequency weights (PaddleClas).

    Upstream signature: ``MultiLabelLoss(epsilon=None, size_sum=False,
    weight_ratio=False)``. With s the sigmoid, C classes and e = ``epsilon``, each element
    has the smoothed label :math:`y' = y (1 - e) + e / C` and

    .. math::
        \ell = -w \left[ y' \log s(x) + (1 - y') \log(1 - s(x)) \right],

    w = 1, or with ``weight_ratio`` the class-frequency weight of
    :func:`xloss.multilabel_balance_weights`: :math:`e^{1 - r_c}` for positives and
    :math:`e^{r_c}` for negatives, r_c the positive ratio of class c. The result is the mean
    over elements, or with ``size_sum`` the sum over classes averaged over the batch.
    Computed by :func:`xloss.binary_cross_entropy_with_logits` with
    ``smoothing_rule="uniform"`` and ``ignore_index=-1``. Returns
    ``{"MultiLabelLoss": loss}``.

    Deliberate differences from upstream:

    - Targets (B, C) work (the current upstream indexes ``target[:, 0, :]`` and fails on
      them); (B, 1, C) and, with ``weight_ratio``, (B, 2, C) (labels, then the per-class
      positive ratios repeated on every row) work as upstream; (B,) integer class indices
      become one-hot labels.
    - Labels of -1 (unknown) are dropped from the mean (upstream zeroes their weight with
      ``weight_ratio`` but still counts them, and without ``weight_ratio`` computes a BCE
      against -1).
    - ``weight_ratio`` with (B, C) targets raises ValueError (there are no ratios), and
      ratios that differ between rows raise ValueError.
    - The class-frequency weight uses the unsmoothed label (upstream thresholds the
      smoothed label at 0.5, the same for every epsilon < 0.5).
    - ``epsilon`` of 0 or None means no smoothing; outside [0, 1) it raises ValueError
      (upstream silently disables smoothing).

    Shape:
        - x: (B, C) logits, or a dict with ``"logits"``.
        - target: (B, C), (B, 1, C), (B, 2, C) with ``weight_ratio``, or (B) indices.
        - output: ``{"MultiLabelLoss": scalar}``.

    Example:
        >>> import torch
        >>> from xloss.compat.paddleclas import MultiLabelLoss
        >>> logits = torch.tensor([[1.5, -0.5, 0.0], [-2.0, 3.0, 1.0]])
        >>> labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]])  # -1: unknown
        >>> MultiLabelLoss(epsilon=0.1)(logits, labels)
        {'MultiLabelLoss': tensor(0.3855)}
        >>> ratios = torch.tensor([0.5, 0.5, 0.9]).expand(2, 3)
        >>> MultiLabelLoss(size_sum=True, weight_ratio=True)(
        ...     {"logits": logits}, torch.stack([labels, ratios], dim=1))
        {'MultiLabelLoss': tensor(1.0846)}
    """

    def __init__(self, epsilon=None, size_sum: bool = False, weight_ratio: bool = False):
        super().__init__()
        if epsilon is not None:
            if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
                raise TypeError(
                    f"`epsilon` must be a float in [0, 1) or None, got {type(epsilon).__name__}"
                )
            if not 0.0 <= epsilon < 1.0:
                raise ValueError(f"`epsilon` must lie in [0, 1) or be None, got {epsilon}")
            epsilon = float(epsilon) if epsilon > 0 else None
        self.epsilon = epsilon
        self.size_sum = bool(size_sum)
        self.weight_ratio = bool(weight_ratio)

    def forward(self, x, target) -> dict[str, Tensor]:
        x = logits_of(x)
        labels, ratio = split_target(target, x, self.weight_ratio)
        labels = labels.to(device=x.device)
        weight = None
        if ratio is not None:
            hard = torch.where(labels == UNKNOWN_LABEL, labels, (labels > 0.5).to(labels.dtype))
            weight = multilabel_balance_weights(
                hard, dataset_positive_rate(ratio.to(x.device)), ignore_index=UNKNOWN_LABEL
            )
        loss = binary_cross_entropy_with_logits(
            x,
            labels,
            weight,
            reduction="sum" if self.size_sum else "mean",
            label_smoothing=self.epsilon or 0.0,
            smoothing_rule="uniform",
            ignore_index=UNKNOWN_LABEL,
            normalizer=x.shape[0] if self.size_sum else None,
        )
        return {"MultiLabelLoss": loss}

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, size_sum={self.size_sum}, weight_ratio={self.weight_ratio}"


class MultiLabelAsymmetricLoss(nn.Module):
    r"""Asymmetric loss (ASL, Ben-Baruch et al.) as PaddleClas's module.

    Upstream signature: ``MultiLabelAsymmetricLoss(gamma_pos=1, gamma_neg=4, clip=0.05,
    epsilon=1e-8, disable_focal_loss_grad=True, reduction="sum")``. With p = s(x) and the
    shifted probability :math:`p_m = \max(p - \mathrm{clip}, 0)` of the negatives,

    .. math::
        \ell = -\left[ y (1 - p)^{\gamma_+} \log p
               + (1 - y)\, p_m^{\gamma_-} \log(1 - p_m) \right],

    reduced by ``"sum"`` (default), ``"mean"`` or ``"none"``. Hard labels (0 or 1) are
    computed by :func:`xloss.asymmetric_loss` with ``ignore_index=-1``. Returns
    ``{"MultiLabelAsymmetricLoss": loss}``.

    Soft labels t in (0, 1) follow upstream exactly: it mixes the probabilities before
    the log,

    .. math::
        p_t = \min(1 - p + \mathrm{clip}, 1)(1 - t) + p\, t, \qquad
        \ell = -\log(\max(p_t, \mathrm{epsilon}))\,
               (1 - p_t)^{\gamma_+ t + \gamma_- (1 - t)}

    (no clip term when ``clip`` is 0 or None). At t = 0 or 1 this is the formula above
    (up to upstream's epsilon clamp); :func:`xloss.asymmetric_loss` keeps its own rule for
    soft targets.

    ``disable_focal_loss_grad=True`` (upstream's default) treats the focusing factors
    :math:`(1-p)^{\gamma_+}` and :math:`p_m^{\gamma_-}` as constants in the backward pass.
    xloss's ``asymmetric_loss`` lets the gradient flow through them, so the adapter gets
    the factors from xloss itself, without gradient, as the element-wise ratio of the
    focused loss to the unfocused one (``gamma_pos = gamma_neg = 0``), and passes them as
    element weights to the unfocused loss. The value is unchanged (up to rounding), the
    gradient is upstream's; this costs two extra forward passes without autograd.

    Deliberate differences from upstream:

    - ``epsilon`` is accepted and not used: log p is computed as ``logsigmoid(x)``, finite
      for every logit, so nothing is clamped (upstream's ``clip(min=epsilon)`` also zeroes
      the gradient of positives whose p < epsilon).
    - Labels of -1 (unknown) are dropped, from ``"mean"`` too; targets (B, 1, C) work as
      (B, C).
    - ``clip=None`` means 0, as upstream; a negative ``clip`` or gamma raises ValueError.

    Shape:
        - x: (B, C) logits, or a dict with ``"logits"``.
        - target: (B, C) or (B, 1, C) labels in [0, 1] (or -1).
        - output: ``{"MultiLabelAsymmetricLoss": loss}``, loss a scalar, or (B, C) for
          ``"none"``.

    Example:
        >>> import torch
        >>> from xloss.compat.paddleclas import MultiLabelAsymmetricLoss
        >>> logits = torch.tensor([[3.0, -2.0, 0.5], [-1.0, 4.0, -3.0]])
        >>> labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        >>> MultiLabelAsymmetricLoss()(logits, labels)
        {'MultiLabelAsymmetricLoss': tensor(0.1822)}
    """

    def __init__(
        self,
        gamma_pos: float = 1,
        gamma_neg: float = 4,
        clip: float | None = 0.05,
        epsilon: float = 1e-8,
        disable_focal_loss_grad: bool = True,
        reduction: str = "sum",
    ) -> None:
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip = check_asymmetric_settings(
            gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=0.0 if clip is None else clip
        )
        self.epsilon = check_non_negative("epsilon", epsilon)
        self.disable_focal_loss_grad = bool(disable_focal_loss_grad)
        if not isinstance(reduction, str) or reduction not in ASL_REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {ASL_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, x, target) -> dict[str, Tensor]:
        x = logits_of(x)
        labels, _ = split_target(target, x, with_ratio=False)
        labels = labels.to(device=x.device)
        soft = (labels > 0) & (labels < 1) if labels.is_floating_point() else None
        if soft is not None and bool(soft.any()):
            return {"MultiLabelAsymmetricLoss": self._with_soft_labels(x, labels, soft)}
        return {"MultiLabelAsymmetricLoss": self._hard_loss(x, labels, self.reduction)}

    def _with_soft_labels(self, x: Tensor, labels: Tensor, soft: Tensor) -> Tensor:
        """Upstream's mixed-probability loss on soft labels, xloss's on hard ones."""
        hard_labels = torch.where(soft, UNKNOWN_LABEL, labels)  # soft ones dropped here
        hard = self._hard_loss(x, hard_labels, "none")
        # hard and dropped positions see t = 0.5 in the soft branch: finite, and unused
        soft_labels = torch.where(soft, labels, 0.5)
        loss = torch.where(soft, self._upstream_soft_loss(x, soft_labels), hard)
        if self.reduction == "none":
            return loss.to(x.dtype)
        kept = labels != UNKNOWN_LABEL
        total = loss.sum()
        if self.reduction == "mean":
            total = total / kept.sum().clamp(min=1)
        return total.to(x.dtype)

    def _upstream_soft_loss(self, x: Tensor, t: Tensor) -> Tensor:
        """-log(max(p_t, epsilon)) (1 - p_t)^(gamma_pos t + gamma_neg (1 - t)), element-wise."""
        compute = torch.promote_types(x.dtype, torch.float32)
        t = t.to(compute)
        p = torch.sigmoid(x.to(compute))
        negative = 1.0 - p
        if self.clip > 0.0:
            negative = (negative + self.clip).clamp(max=1.0)
        p_t = negative * (1.0 - t) + p * t
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.disable_focal_loss_grad):
            weight = (1.0 - p_t).pow(self.gamma_pos * t + self.gamma_neg * (1.0 - t))
        return -torch.log(p_t.clamp(min=self.epsilon)) * weight

    def _hard_loss(self, x: Tensor, labels: Tensor, reduction: str) -> Tensor:
        """ASL on labels in {0, 1, -1} through xloss.asymmetric_loss."""
        options = dict(clip=self.clip, ignore_index=UNKNOWN_LABEL)
        focusing = self.gamma_pos > 0.0 or self.gamma_neg > 0.0
        if not (self.disable_focal_loss_grad and focusing):
            loss = asymmetric_loss(
                x,
                labels,
                gamma_pos=self.gamma_pos,
                gamma_neg=self.gamma_neg,
                reduction=reduction,
                **options,
            )
            return loss
        with torch.no_grad():
            logits = x.detach().to(torch.promote_types(x.dtype, torch.float32))
            focused = asymmetric_loss(
                logits,
                labels,
                gamma_pos=self.gamma_pos,
                gamma_neg=self.gamma_neg,
                reduction="none",
                **options,
            )
            plain = asymmetric_loss(
                logits, labels, gamma_pos=0.0, gamma_neg=0.0, reduction="none", **options
            )
            # the focusing factor of each element; 0 where both losses are 0
            factor = torch.where(plain > 0, focused / torch.where(plain > 0, plain, 1.0), 0.0)
        loss = asymmetric_loss(
            x, labels, factor, gamma_pos=0.0, gamma_neg=0.0, reduction=reduction, **options
        )
        return loss

    def extra_repr(self) -> str:
        return (
            f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, "
            f"disable_focal_loss_grad={self.disable_focal_loss_grad}, "
            f"reduction={self.reduction!r}"
        )
