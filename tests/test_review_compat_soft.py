"""Review: SpeechBrain relative lengths, checked against a float64 reference."""

import pytest
import torch

from xloss.compat.speechbrain import bce_loss, nll_loss


@pytest.mark.parametrize(
    "length",
    [
        torch.tensor([9, 5, 3]),  # frame counts, not relative lengths: kept every frame
        torch.tensor([1.0, 1.5, 0.5]),
        torch.tensor([1.0, -0.2, 0.5]),
        torch.tensor([1.0, float("nan"), 0.5]),  # raised an error about integer `lengths`
    ],
)
def test_speechbrain_length_outside_unit_interval_raises(length):
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 9, 4), -1)
    targets = torch.randint(0, 4, (3, 9))
    with pytest.raises(ValueError, match=r"relative lengths in \[0, 1\]"):
        nll_loss(log_probs, targets, length=length)
    with pytest.raises(ValueError, match=r"relative lengths in \[0, 1\]"):
        bce_loss(torch.randn(3, 9), torch.rand(3, 9).round(), length=length)
