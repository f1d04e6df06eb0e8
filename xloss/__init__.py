"""xloss: classification losses for PyTorch, right on every shape, mask and dtype."""

from xloss import backends  # noqa: F401  (xloss.backends.use, ...)
from xloss.functional import (
    CrossEntropyStats,
    asymmetric_loss,
    binary_cross_entropy_with_logits,
    cross_entropy,
    linear_cross_entropy,
    multilabel_balance_weights,
    positive_rate,
    sigmoid_focal_loss,
)
from xloss.nn import (
    AsymmetricLoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    LinearCrossEntropyLoss,
    SigmoidFocalLoss,
)
from xloss.ops.kernel import release_buffers

__version__ = "0.1.0"


def __getattr__(name: str):
    # `xloss.distributed` is imported on first use: about 12 ms of `import xloss` that a
    # single-process script, and every DataLoader worker, does not need
    if name == "distributed":
        import importlib

        return importlib.import_module("xloss.distributed")
    raise AttributeError(f"module 'xloss' has no attribute {name!r}")

__all__ = [
    "AsymmetricLoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "LinearCrossEntropyLoss",
    "SigmoidFocalLoss",
    "asymmetric_loss",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "multilabel_balance_weights",
    "positive_rate",
    "release_buffers",
    "sigmoid_focal_loss",
]
