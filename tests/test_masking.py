"""The one mask builder: ignore_index, mask and lengths, and the relative-lengths rule."""

import math

import pytest
import torch

import xloss
from xloss._core.masking import build_mask, lengths_mask, relative_length_counts


def reference_relative_count(length: float, steps: int) -> int:
    """#{t in [0, steps) : t < length * steps - 1e-6}, counted one step at a time."""
    return sum(1 for t in range(steps) if t < length * steps - 1e-6)


@pytest.mark.parametrize(
    "length, steps, kept",
    [(0.9, 25, 23), (0.4, 10, 4), (0.5, 7, 4), (1.0, 13, 13), (1 / 3, 3, 1), (0.01, 5, 1)],
)
def test_relative_lengths_follow_speechbrain_rule(length, steps, kept):
    # 0.9 x 25 = 22.5: SpeechBrain keeps 23 frames; round-half-to-even kept 22
    assert reference_relative_count(length, steps) == kept
    counts = relative_length_counts(torch.tensor([length], dtype=torch.float64), steps)
    assert counts.tolist() == [kept]
    mask = lengths_mask(torch.tensor([length]), torch.Size((1, steps)))
    assert int(mask.sum()) == kept
    assert mask[0, :kept].all() and not mask[0, kept:].any()


def test_relative_lengths_grid_matches_reference():
    steps = 37
    lengths = torch.linspace(0.01, 1.0, 200, dtype=torch.float64)
    counts = relative_length_counts(lengths, steps)
    assert counts.tolist() == [reference_relative_count(float(v), steps) for v in lengths]


def test_cross_entropy_relative_lengths_keep_23_of_25_frames():
    logits = torch.randn(1, 4, 25, dtype=torch.float64)
    target = torch.randint(0, 4, (1, 25))
    loss = xloss.cross_entropy(logits, target, lengths=torch.tensor([0.9]), reduction="sum")
    per_position = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss, per_position[0, :23].sum())


def test_same_rule_in_core_and_speechbrain_adapter():
    from xloss.compat.speechbrain import nll_loss

    log_probs = torch.randn(3, 25, 5, dtype=torch.float64).log_softmax(-1)
    target = torch.randint(0, 5, (3, 25))
    length = torch.tensor([0.9, 0.5, 0.28], dtype=torch.float64)
    adapter = nll_loss(log_probs, target, length=length, reduction="sum")
    core = xloss.cross_entropy(
        log_probs, target, class_dim=-1, lengths=length, reduction="sum", ignore_index=None
    )
    torch.testing.assert_close(core, adapter)


@pytest.mark.parametrize(
    "lengths",
    [
        torch.tensor([math.nan, 0.5]),
        torch.tensor([0.5, math.inf]),
        torch.tensor([0.0, 0.5]),
        torch.tensor([1.5, 0.5]),
    ],
)
def test_bad_relative_lengths_raise(lengths):
    x, t = torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4))
    with pytest.raises(ValueError, match=r"`lengths` are relative and must lie in \(0, 1\]"):
        xloss.cross_entropy(x, t, lengths=lengths)
    with pytest.raises(ValueError, match="floating `lengths`"):
        xloss.binary_cross_entropy_with_logits(x, torch.rand(2, 3, 4), lengths=lengths)


@pytest.mark.parametrize("lengths", [[1, 2], (0.5, 1.0), 3])
def test_non_tensor_lengths_raise_type_error(lengths):
    x, t = torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4))
    with pytest.raises(TypeError, match="`lengths` must be a torch.Tensor, got"):
        xloss.cross_entropy(x, t, lengths=lengths)
    with pytest.raises(TypeError, match="`lengths` must be a torch.Tensor, got"):
        xloss.binary_cross_entropy_with_logits(x, torch.rand(2, 3, 4), lengths=lengths)
    with pytest.raises(TypeError, match="`lengths` must be a torch.Tensor, got"):
        build_mask(torch.Size((2, 4)), torch.device("cpu"), lengths=lengths)
