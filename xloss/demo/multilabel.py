"""Multi-label classification: which of the seven display segments does a digit light up?

The images are scikit-learn's bundled 8x8 handwritten digits (``load_digits``, stored inside
the package). Each image gets seven binary labels, the segments a-g of the digit on a
seven-segment display, so one image has 2 to 7 positive labels and the labels are unevenly
frequent (segment e is lit for 4 digits of 10, segment c for 9). A small MLP is trained
with :func:`xloss.binary_cross_entropy_with_logits`, label smoothing and the
class-frequency weights of :func:`xloss.multilabel_balance_weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import xloss
from xloss.demo.metrics import expected_calibration_error, f1_scores, mean_average_precision

SEGMENT_NAMES = ("a", "b", "c", "d", "e", "f", "g")
#   aaa
#  f   b
#   ggg
#  e   c
#   ddd
SEGMENTS = torch.tensor(
    [  # a  b  c  d  e  f  g
        [1, 1, 1, 1, 1, 1, 0],  # 0
        [0, 1, 1, 0, 0, 0, 0],  # 1
        [1, 1, 0, 1, 1, 0, 1],  # 2
        [1, 1, 1, 1, 0, 0, 1],  # 3
        [0, 1, 1, 0, 0, 1, 1],  # 4
        [1, 0, 1, 1, 0, 1, 1],  # 5
        [1, 0, 1, 1, 1, 1, 1],  # 6
        [1, 1, 1, 0, 0, 0, 0],  # 7
        [1, 1, 1, 1, 1, 1, 1],  # 8
        [1, 1, 1, 1, 0, 1, 1],  # 9
    ],
    dtype=torch.float32,
)


@dataclass
class MultiLabelConfig:
    hidden: int = 64
    epochs: int = 150  # full-batch steps
    lr: float = 1e-2
    weight_decay: float = 1e-4
    train_share: float = 0.5


@dataclass
class MultiLabelData:
    train_x: Tensor  # N x 64 pixels in [0, 1]
    train_y: Tensor  # N x 7 segments, 0/1 floats
    test_x: Tensor
    test_y: Tensor


@dataclass
class MultiLabelResult:
    label_smoothing: float
    train_loss: list[float] = field(default_factory=list)
    mean_ap: float = math.nan
    f1_micro: float = math.nan
    f1_macro: float = math.nan
    ece: float = math.nan


def load_digit_segments(config: MultiLabelConfig, seed: int = 0) -> MultiLabelData:
    """The digits as 64 pixels in [0, 1] and their seven-segment labels, split by seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = SEGMENTS[torch.tensor(digits.target)]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    cut = int(config.train_share * len(images))
    train, test = order[:cut], order[cut:]
    return MultiLabelData(images[train], labels[train], images[test], labels[test])


def make_loss(logits: Tensor, target: Tensor, weight: Tensor, label_smoothing: float) -> Tensor:
    """Binary CE with per-element balance weights and (binary-rule) label smoothing."""
    return xloss.binary_cross_entropy_with_logits(
        logits, target, weight, label_smoothing=label_smoothing
    )


def train_multilabel(
    data: MultiLabelData,
    config: MultiLabelConfig,
    label_smoothing: float,
    seed: int = 0,
    progress: bool = False,
) -> MultiLabelResult:
    """Full-batch AdamW from the same seed; evaluate on the held-out images."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    num_labels = data.train_y.shape[1]
    model = nn.Sequential(
        nn.Linear(data.train_x.shape[1], config.hidden),
        nn.ReLU(),
        nn.Linear(config.hidden, num_labels),
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    rate = xloss.positive_rate(data.train_y)
    weight = xloss.multilabel_balance_weights(data.train_y, rate)  # N x 7
    result = MultiLabelResult(label_smoothing=label_smoothing)
    steps = tqdm(
        range(config.epochs),
        desc=f"multi-label eps={label_smoothing:g}",
        disable=not progress,
        leave=False,
    )
    for _ in steps:
        loss = make_loss(model(data.train_x), data.train_y, weight, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.train_loss.append(loss.item())

    with torch.no_grad():
        probability = torch.sigmoid(model(data.test_x))
    result.mean_ap = mean_average_precision(probability, data.test_y)
    result.f1_micro, result.f1_macro = f1_scores(probability, data.test_y, threshold=0.5)
    # Calibration of every yes/no decision: confidence max(p, 1-p), correct if on the right side.
    decision_confidence = torch.maximum(probability, 1 - probability).flatten()
    decision_correct = ((probability >= 0.5) == data.test_y.bool()).flatten()
    result.ece = expected_calibration_error(decision_confidence, decision_correct, bins=15)
    return result
