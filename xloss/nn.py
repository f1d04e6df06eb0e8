"""``nn.Module`` wrappers: each validates and stores its settings, then calls its functional.

Tensors a module holds (class weights, positive weights) are registered buffers, so
``.to(device)`` and ``.half()`` move them with the module.
"""

from __future__ import annotations

from torch import Tensor, nn

from xloss._core.validation import check_class_weight
from xloss.functional.cross_entropy import check_cross_entropy_settings, cross_entropy
from xloss.functional.linear_cross_entropy import check_chunk_size, linear_cross_entropy


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
    ) -> None:
        super().__init__()
        check_cross_entropy_settings(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        check_class_weight(weight, None)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.class_dim = class_dim
        self.z_loss = z_loss
        self.softcap = softcap
        self.validate_args = validate_args

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
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, class_dim={self.class_dim}"
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
    ) -> None:
        super().__init__()
        check_cross_entropy_settings(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        check_chunk_size(chunk_size)
        check_class_weight(class_weight, None, name="class_weight")
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.validate_args = validate_args

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
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}"
        )
