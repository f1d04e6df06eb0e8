"""Module constructors validate every setting at construction, not in the first forward."""

import pytest
import torch

import xloss

MODULES = [
    xloss.CrossEntropyLoss,
    xloss.BCEWithLogitsLoss,
    xloss.SigmoidFocalLoss,
    xloss.AsymmetricLoss,
    xloss.LinearCrossEntropyLoss,
]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("value", [None, "yes", 1])
def test_validate_args_checked_at_construction(module, value):
    with pytest.raises(TypeError, match=f"`validate_args` must be True or False, got {value!r}"):
        module(validate_args=value)


@pytest.mark.parametrize("module", MODULES[:4])
@pytest.mark.parametrize("value", ["x", 1.0, True, None])
def test_class_dim_checked_at_construction(module, value):
    with pytest.raises(TypeError, match=f"`class_dim` must be an int, got {value!r}"):
        module(class_dim=value)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_inplace_backward_checked_at_construction(value):
    with pytest.raises(TypeError, match=f"`inplace_backward` must be True or False, got {value!r}"):
        xloss.CrossEntropyLoss(inplace_backward=value)


def test_valid_settings_still_construct_and_run():
    loss_fn = xloss.CrossEntropyLoss(class_dim=-1, validate_args=False, inplace_backward=False)
    x, t = torch.randn(2, 3, 5, dtype=torch.float64), torch.randint(0, 5, (2, 3))
    want = torch.nn.functional.cross_entropy(x.transpose(1, 2), t)
    torch.testing.assert_close(loss_fn(x, t), want)


def test_cross_entropy_module_repr_names_the_settings_that_change_the_loss():
    plain = xloss.nn.CrossEntropyLoss()
    assert "z_loss" not in repr(plain) and "softcap" not in repr(plain)
    tuned = xloss.nn.CrossEntropyLoss(z_loss=1e-4, softcap=30.0, inplace_backward=True)
    for part in ("z_loss=0.0001", "softcap=30.0", "inplace_backward=True", "reduction='mean'"):
        assert part in repr(tuned)
