"""``nn.Module`` wrappers: each validates and stores its settings, then calls its functional.

Tensors a module holds (class weights, positive weights) are registered buffers, so
``.to(device)`` and ``.half()`` move them with the module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xloss._core.validation import check_class_dim, check_class_weight, check_flag
from xloss.functional.binary import (
    binary_cross_entropy_with_logits,
    check_binary_settings,
    check_elementwise_weight,
    check_pos_weight,
)
from xloss.functional.cross_entropy import check_cross_entropy_settings, cross_entropy
from xloss.functional.focal import (
    asymmetric_loss,
    check_asymmetric_settings,
    check_focal_settings,
    sigmoid_focal_loss,
)
from xloss.functional.linear_cross_entropy import (
    check_accum_dtype,
    check_chunk_size,
    linear_cross_entropy,
)


class CrossEntropyLoss(nn.Module):
    r"""Module form of :func:`xloss.cross_entropy`; see it for the formula.

    Settings are fixed at construction; per-batch tensors (``mask``, ``lengths``,
    ``normalizer``) are passed to ``forward``.

    Shape:
        - input: (C), (N, C) or (N, C, d_1, ..., d_K); the class axis is ``class_dim``.
        - target: the input's shape without the class axis (class indices) or the
          input's shape (probabilities).
        - output: scalar; the target's shape for ``"none"``; (N) for ``"sample"``.

    Example:
        >>> import torch, xloss
        >>> loss_fn = xloss.CrossEntropyLoss(label_smoothing=0.1, class_dim=-1)
        >>> logits = torch.zeros(2, 3, 4)  # (B, T, V)
        >>> target = torch.tensor([[1, 2, 0], [3, 3, -100]])
        >>> loss_fn(logits, target)
        tensor(1.3863)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        ignore_index: int | None = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        class_dim: int = 1,
        z_loss: float = 0.0,
        softcap: float | None = None,
        validate_args: bool = True,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        check_cross_entropy_settings(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            validate_args=validate_args,
        )
        check_class_dim(class_dim)
        check_flag("inplace_backward", inplace_backward)
        check_class_weight(weight, None)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.class_dim = class_dim
        self.z_loss = z_loss
        self.softcap = softcap
        self.validate_args = validate_args
        self.inplace_backward = inplace_backward

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        *,
        mask: Tensor | None = None,
        lengths: Tensor | None = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            class_dim=self.class_dim,
            mask=mask,
            lengths=lengths,
            z_loss=self.z_loss,
            softcap=self.softcap,
            normalizer=normalizer,
            validate_args=self.validate_args,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        settings = (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, class_dim={self.class_dim}"
        )
        # the settings that change the loss's value, when they are not the defaults
        if self.z_loss:
            settings += f", z_loss={self.z_loss}"
        if self.softcap is not None:
            settings += f", softcap={self.softcap}"
        if self.inplace_backward:
            settings += ", inplace_backward=True"
        return settings


class _ElementwiseLoss(nn.Module):
    """Settings shared by the binary family: element weight, smoothing, masking, reduction."""

    def __init__(
        self,
        weight: Tensor | None,
        *,
        reduction: str,
        label_smoothing: float,
        smoothing_rule: str,
        ignore_index: int | None,
        class_dim: int,
        validate_args: bool,
    ) -> None:
        super().__init__()
        check_binary_settings(
            reduction=reduction,
            label_smoothing=label_smoothing,
            smoothing_rule=smoothing_rule,
            ignore_index=ignore_index,
            validate_args=validate_args,
        )
        check_class_dim(class_dim)
        check_elementwise_weight(weight, None)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.smoothing_rule = smoothing_rule
        self.ignore_index = ignore_index
        self.class_dim = class_dim
        self.validate_args = validate_args

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"smoothing_rule={self.smoothing_rule!r}, ignore_index={self.ignore_index}, "
            f"class_dim={self.class_dim}"
        )


class BCEWithLogitsLoss(_ElementwiseLoss):
    r"""Module form of :func:`xloss.binary_cross_entropy_with_logits`; see it for the formula.

    ``weight`` (element weights) and ``pos_weight`` (per class) are buffers; per-batch
    tensors (``mask``, ``lengths``, ``normalizer``) are passed to ``forward``.

    Shape:
        - input: (*), any shape; the class axis is ``class_dim`` (last by default).
        - target: (*), the input's shape.
        - output: scalar; (*) for ``"none"``; (N) for ``"sample"``.

    Example:
        >>> import torch, xloss
        >>> loss_fn = xloss.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0]),
        ...                                   label_smoothing=0.1)
        >>> loss_fn(torch.tensor([[2.0, -1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor(0.5933)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        pos_weight: Tensor | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        smoothing_rule: str = "binary",
        ignore_index: int | None = None,
        class_dim: int = -1,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            weight,
            reduction=reduction,
            label_smoothing=label_smoothing,
            smoothing_rule=smoothing_rule,
            ignore_index=ignore_index,
            class_dim=class_dim,
            validate_args=validate_args,
        )
        check_pos_weight(pos_weight, None)
        self.register_buffer("pos_weight", pos_weight)

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        *,
        mask: Tensor | None = None,
        lengths: Tensor | None = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        return binary_cross_entropy_with_logits(
            input,
            target,
            self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            smoothing_rule=self.smoothing_rule,
            ignore_index=self.ignore_index,
            mask=mask,
            lengths=lengths,
            class_dim=self.class_dim,
            normalizer=normalizer,
            validate_args=self.validate_args,
        )


class SigmoidFocalLoss(_ElementwiseLoss):
    r"""Module form of :func:`xloss.sigmoid_focal_loss`; see it for the formula.

    Shape:
        - input: (*), any shape.
        - target: (*), the input's shape.
        - output: scalar; (*) for ``"none"``; (N) for ``"sample"``.

    Example:
        >>> import torch, xloss
        >>> loss_fn = xloss.SigmoidFocalLoss(alpha=0.25, gamma=2.0, reduction="sum")
        >>> loss_fn(torch.tensor([[3.0, -2.0]]), torch.tensor([[1.0, 1.0]]))
        tensor(0.4125)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        alpha: float = 0.25,
        gamma: float = 2.0,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        smoothing_rule: str = "binary",
        ignore_index: int | None = None,
        class_dim: int = -1,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            weight,
            reduction=reduction,
            label_smoothing=label_smoothing,
            smoothing_rule=smoothing_rule,
            ignore_index=ignore_index,
            class_dim=class_dim,
            validate_args=validate_args,
        )
        self.alpha, self.gamma = check_focal_settings(alpha=alpha, gamma=gamma)

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        *,
        mask: Tensor | None = None,
        lengths: Tensor | None = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        return sigmoid_focal_loss(
            input,
            target,
            self.weight,
            alpha=self.alpha,
            gamma=self.gamma,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            smoothing_rule=self.smoothing_rule,
            ignore_index=self.ignore_index,
            mask=mask,
            lengths=lengths,
            class_dim=self.class_dim,
            normalizer=normalizer,
            validate_args=self.validate_args,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, " + super().extra_repr()


class AsymmetricLoss(_ElementwiseLoss):
    r"""Module form of :func:`xloss.asymmetric_loss` (ASL); see it for the formula.

    Shape:
        - input: (*), any shape.
        - target: (*), the input's shape.
        - output: scalar; (*) for ``"none"``; (N) for ``"sample"``.

    Example:
        >>> import torch, xloss
        >>> loss_fn = xloss.AsymmetricLoss(gamma_pos=0.0, gamma_neg=4.0, clip=0.05)
        >>> loss_fn(torch.tensor([[3.0, -2.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
        tensor(0.0981)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        gamma_pos: float = 1.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        smoothing_rule: str = "binary",
        ignore_index: int | None = None,
        class_dim: int = -1,
        validate_args: bool = True,
    ) -> None:
        super().__init__(
            weight,
            reduction=reduction,
            label_smoothing=label_smoothing,
            smoothing_rule=smoothing_rule,
            ignore_index=ignore_index,
            class_dim=class_dim,
            validate_args=validate_args,
        )
        self.gamma_pos, self.gamma_neg, self.clip = check_asymmetric_settings(
            gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip
        )

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        *,
        mask: Tensor | None = None,
        lengths: Tensor | None = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        return asymmetric_loss(
            input,
            target,
            self.weight,
            gamma_pos=self.gamma_pos,
            gamma_neg=self.gamma_neg,
            clip=self.clip,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            smoothing_rule=self.smoothing_rule,
            ignore_index=self.ignore_index,
            mask=mask,
            lengths=lengths,
            class_dim=self.class_dim,
            normalizer=normalizer,
            validate_args=self.validate_args,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, "
            + super().extra_repr()
        )


class LinearCrossEntropyLoss(nn.Module):
    r"""Module form of :func:`xloss.linear_cross_entropy`; see it for the formula.

    The linear layer's ``weight`` (and ``bias``) are arguments of ``forward``, not
    parameters of this module, as in Liger-Kernel: the loss is applied to the output
    projection a model already owns (``forward(hidden, model.lm_head.weight, target)``).
    ``class_weight`` is a registered buffer. Per-batch tensors (``mask``, ``lengths``,
    ``normalizer``) are passed to ``forward``.

    Shape:
        - input: (N, H) or (B, T, H), H the hidden size.
        - weight: (V, H), V the number of classes; bias: (V).
        - target: (N) or (B, T) class indices.
        - output: scalar; the target's shape for ``"none"``; (B) for ``"sample"``.

    Example:
        >>> import torch, xloss
        >>> loss_fn = xloss.LinearCrossEntropyLoss(label_smoothing=0.1)
        >>> hidden = torch.zeros(2, 3, 4)  # (B, T, H)
        >>> weight = torch.zeros(5, 4)  # (V, H)
        >>> target = torch.tensor([[1, 2, 0], [3, 4, -100]])
        >>> loss_fn(hidden, weight, target)
        tensor(1.6094)
    """

    def __init__(
        self,
        class_weight: Tensor | None = None,
        *,
        ignore_index: int | None = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        validate_args: bool = True,
        accum_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_cross_entropy_settings(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            validate_args=validate_args,
        )
        check_chunk_size(chunk_size)
        check_accum_dtype(accum_dtype)
        check_class_weight(class_weight, None, name="class_weight")
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.validate_args = validate_args
        self.accum_dtype = accum_dtype

    def forward(
        self,
        input: Tensor,
        weight: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        lengths: Tensor | None = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        return linear_cross_entropy(
            input,
            weight,
            target,
            bias,
            class_weight=self.class_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            mask=mask,
            lengths=lengths,
            normalizer=normalizer,
            chunk_size=self.chunk_size,
            validate_args=self.validate_args,
            accum_dtype=self.accum_dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}"
        )
