"""xloss: classification losses for PyTorch, right on every shape, mask and dtype."""

from xloss.functional import cross_entropy, linear_cross_entropy
from xloss.nn import CrossEntropyLoss, LinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "cross_entropy",
    "linear_cross_entropy",
]
