"""``nn.Module`` wrappers: each validates and stores its settings, then calls its functional.

Tensors a module holds (class weights, positive weights) are registered buffers, so
``.to(device)`` and ``.half()`` move them with the module.
"""

from __future__ import annotations

from torch import Tensor, nn

from xloss._core.validation import check_class_weight
from xloss.functional.cross_entropy import check_cross_entropy_settings, cross_entropy


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
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, class_dim={self.class_dim}"
        )
