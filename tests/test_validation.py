"""Settings checks shared by every loss: non-finite values and non-tensor arguments raise."""

import math

import pytest
import torch

import xloss

NORMALIZER_RULE = "`normalizer` must be >= 0 and finite, and 0 or at least 1.2e-38"


def _ce_inputs():
    return torch.randn(4, 5), torch.randint(0, 5, (4,))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(softcap=math.inf), "`softcap` must be finite, got inf; use None to switch it off"),
        (dict(softcap=math.nan), "`softcap` must be > 0 or None, got nan"),
        (dict(z_loss=math.inf), "`z_loss` must be finite, got inf"),
        (dict(z_loss=math.nan), "`z_loss` must be >= 0, got nan"),
        (dict(normalizer=math.inf), NORMALIZER_RULE + r" \(float32's smallest normal\), got inf"),
        (dict(normalizer=math.nan), NORMALIZER_RULE),
        (dict(normalizer=torch.tensor(math.nan)), NORMALIZER_RULE),
        (dict(normalizer=torch.tensor(math.inf)), NORMALIZER_RULE),
        (dict(normalizer=torch.tensor(-1.0)), NORMALIZER_RULE),
        # positive, but 0 in float32, where 0 means "empty" (the loss was silently 0)
        (dict(normalizer=1e-50), NORMALIZER_RULE),
        (dict(normalizer=torch.tensor(1e-50, dtype=torch.float64)), NORMALIZER_RULE),
    ],
)
def test_non_finite_settings_raise(options, match):
    x, t = _ce_inputs()
    with pytest.raises(ValueError, match=match):
        xloss.cross_entropy(x, t, **options)
    if "normalizer" in options:
        with pytest.raises(ValueError, match=match):
            xloss.binary_cross_entropy_with_logits(x, torch.rand(4, 5), **options)
    else:
        with pytest.raises(ValueError, match=match):
            xloss.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), t, **options)


@pytest.mark.parametrize("name", ["gamma", "alpha"])
def test_focal_settings_reject_inf(name):
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=f"`{name}` must"):
        xloss.sigmoid_focal_loss(x, torch.rand(4, 5), **{name: math.inf})


def test_smallest_normal_normalizer_still_divides():
    x, t = _ce_inputs()
    got = xloss.cross_entropy(x.double(), t, reduction="sum", normalizer=2.0**-126)
    want = torch.nn.functional.cross_entropy(x.double(), t, reduction="sum") * 2.0**126
    torch.testing.assert_close(got, want)
    assert xloss.binary_cross_entropy_with_logits(x, torch.rand(4, 5), normalizer=0.0) == 0


def test_finite_normalizer_tensor_still_works():
    x, t = _ce_inputs()
    got = xloss.cross_entropy(x.double(), t, reduction="sum", normalizer=torch.tensor(3.0))
    want = torch.nn.functional.cross_entropy(x.double(), t, reduction="sum") / 3.0
    torch.testing.assert_close(got, want)


def test_validate_args_must_be_a_bool():
    x, t = _ce_inputs()
    with pytest.raises(TypeError, match="`validate_args` must be True or False, got None"):
        xloss.cross_entropy(x, t, validate_args=None)
    with pytest.raises(TypeError, match="`validate_args` must be True or False, got 'no'"):
        xloss.binary_cross_entropy_with_logits(x, torch.rand(4, 5), validate_args="no")


def test_non_tensor_bias_raises_type_error():
    hidden, weight, target = torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,))
    with pytest.raises(TypeError, match="`bias` must be a torch.Tensor, got list"):
        xloss.linear_cross_entropy(hidden, weight, target, [0.0] * 5)
