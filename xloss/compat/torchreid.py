"""Torchreid's label-smoothing cross-entropy, on whatever device the input lives.

Upstream: ``torchreid.losses.CrossEntropyLoss(num_classes, eps=0.1, use_gpu=True,
label_smooth=True)``, ``forward(inputs, targets)``.
"""

from __future__ import annotations

import numbers

from torch import Tensor, nn

from xloss._core.validation import check_floating_input, check_unit_interval, shape_str
from xloss.functional.cross_entropy import cross_entropy


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"`num_classes` must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1, got {num_classes}")
    return int(num_classes)


class CrossEntropyLoss(nn.Module):
    r"""Cross-entropy with label smoothing, as ``torchreid.losses.CrossEntropyLoss``.

    Upstream signature: ``CrossEntropyLoss(num_classes, eps=0.1, use_gpu=True,
    label_smooth=True)``. With K = ``num_classes``, eps the smoothing (0 when
    ``label_smooth=False``) and p = softmax(x) over the class axis, each sample has the
    smoothed target :math:`q = (1-\epsilon)\,\mathrm{onehot}(y) + \epsilon / K` and

    .. math::
        \ell = -\sum_k q_k \log p_k,

    averaged over the batch (upstream's ``(-q * log p).mean(0).sum()``). Computed by
    :func:`xloss.cross_entropy` with ``label_smoothing=eps``.

    Deliberate differences from upstream:

    - ``use_gpu`` is accepted and has no effect: the computation runs on the input's
      device, so a CPU-only machine works with the default ``use_gpu=True`` (upstream
      builds the one-hot on the CPU and calls ``.cuda()`` on it).
    - The input's class axis must have ``num_classes`` entries (ValueError otherwise);
      upstream silently smooths with ``eps / num_classes`` over a different class count.
    - Target indices are range-checked; inputs of shape (N, C, d_1, ...) are accepted too
      (class axis 1, mean over every position).

    Args:
        num_classes: K, the number of classes.
        eps: the label smoothing in [0, 1].
        use_gpu: ignored; kept for signature compatibility.
        label_smooth: if False, no smoothing (eps = 0).

    Shape:
        - inputs: (N, K) logits, or (N, K, d_1, ..., d_m).
        - targets: (N) class indices, or (N, d_1, ..., d_m).
        - output: scalar.

    Example:
        >>> import torch
        >>> from xloss.compat.torchreid import CrossEntropyLoss
        >>> criterion = CrossEntropyLoss(num_classes=3, eps=0.1)  # use_gpu=True, CPU input
        >>> criterion(torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]), torch.tensor([0, 2]))
        tensor(0.3455)
    """

    def __init__(
        self, num_classes: int, eps: float = 0.1, use_gpu: bool = True, label_smooth: bool = True
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        eps = check_unit_interval("eps", eps)
        self.eps = eps if label_smooth else 0.0
        self.use_gpu = use_gpu
        self.label_smooth = label_smooth

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        check_floating_input(inputs)
        if inputs.dim() < 2 or inputs.shape[1] != self.num_classes:
            raise ValueError(
                f"`inputs` must have shape (N, {self.num_classes}, ...) for "
                f"num_classes={self.num_classes}, got {shape_str(inputs.shape)}"
            )
        return cross_entropy(inputs, targets, ignore_index=None, label_smoothing=self.eps)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, eps={self.eps}"
