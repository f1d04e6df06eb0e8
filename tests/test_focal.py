"""sigmoid_focal_loss, asymmetric_loss, SigmoidFocalLoss and AsymmetricLoss."""

import math

import pytest
import torch
import torch.nn.functional as F
from elementwise_reference import (
    GRID_CASES,
    GRID_IDS,
    SHAPES,
    make_data,
    option_grid,
    reference_loss,
    sigmoid64,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import xloss
from xloss.ops.kernel import kernel_available

focal = xloss.sigmoid_focal_loss
asl = xloss.asymmetric_loss


def focal_reference(alpha, gamma):
    """RetinaNet's formula as torchvision writes it, in float64."""

    def pointwise(x, y, pos_weight):
        p = sigmoid64(x)
        ce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * (1 - p_t) ** gamma
        if alpha >= 0:
            loss = loss * (alpha * y + (1 - alpha) * (1 - y))
        return loss

    return pointwise


def asl_reference(gamma_pos, gamma_neg, clip):
    """ASL as in the paper: probability shifting p_m = max(p - m, 0) for negatives."""

    def pointwise(x, y, pos_weight):
        p = sigmoid64(x)
        p_m = (p - clip).clamp(min=0)
        positive = (1 - p) ** gamma_pos * torch.log(p)
        negative = p_m**gamma_neg * torch.log(1 - p_m)
        return -(y * positive + (1 - y) * negative)

    return pointwise


def assert_close64(actual, expected):
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


FOCAL_SETTINGS = [(0.25, 2.0), (-1.0, 0.5), (0.6, 0.0)]
ASL_SETTINGS = [(1.0, 4.0, 0.05), (0.0, 2.5, 0.0), (0.5, 0.0, 0.2)]


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize(("shape", "reduction"), GRID_CASES, ids=GRID_IDS)
def test_focal_matches_float64_reference_for_every_option_combination(shape, reduction):
    for index, (x, y, options) in enumerate(option_grid(shape, with_pos_weight=False)):
        alpha, gamma = FOCAL_SETTINGS[index % len(FOCAL_SETTINGS)]
        actual = focal(x, y, alpha=alpha, gamma=gamma, reduction=reduction, **options)
        expected = reference_loss(
            focal_reference(alpha, gamma), x, y, reduction=reduction, **options
        )
        assert_close64(actual, expected)


@pytest.mark.parametrize(("shape", "reduction"), GRID_CASES, ids=GRID_IDS)
def test_asl_matches_float64_reference_for_every_option_combination(shape, reduction):
    for index, (x, y, options) in enumerate(option_grid(shape, with_pos_weight=False)):
        gamma_pos, gamma_neg, clip = ASL_SETTINGS[index % len(ASL_SETTINGS)]
        settings_ = dict(gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)
        actual = asl(x, y, reduction=reduction, **settings_, **options)
        expected = reference_loss(
            asl_reference(gamma_pos, gamma_neg, clip), x, y, reduction=reduction, **options
        )
        assert_close64(actual, expected)


@pytest.mark.parametrize("alpha", [0.25, 0.9])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
def test_focal_default_options_match_reference(alpha, gamma):
    x, y = make_data((6, 5), seed=41)
    expected = reference_loss(focal_reference(alpha, gamma), x, y)
    assert_close64(focal(x, y, alpha=alpha, gamma=gamma), expected)


def test_focal_with_gamma_0_and_no_alpha_is_bce_for_every_option():
    for shape in SHAPES:
        for x, y, options in option_grid(shape, with_pos_weight=False, seed=5):
            for reduction in ["none", "mean", "sum"] + (["sample"] if len(shape) > 1 else []):
                got = focal(x, y, alpha=-1, gamma=0, reduction=reduction, **options)
                bce = xloss.binary_cross_entropy_with_logits(x, y, reduction=reduction, **options)
                assert_close64(got, bce)
    x, y = make_data((3, 4), seed=2)
    assert_close64(
        focal(x, y, alpha=-0.5, gamma=0, reduction="sum"),
        F.binary_cross_entropy_with_logits(x, y, reduction="sum"),
    )


def test_asl_with_zero_gammas_and_clip_is_bce_summed():
    for shape in SHAPES:
        for x, y, options in option_grid(shape, with_pos_weight=False, seed=9):
            got = asl(x, y, gamma_pos=0, gamma_neg=0, clip=0, reduction="sum", **options)
            bce = xloss.binary_cross_entropy_with_logits(x, y, reduction="sum", **options)
            assert_close64(got, bce)
    x, y = make_data((3, 4), seed=2)
    torch.testing.assert_close(
        asl(x, y, gamma_pos=0, gamma_neg=0, clip=0, reduction="sum"),
        F.binary_cross_entropy_with_logits(x, y, reduction="sum"),
    )


def test_asl_clip_discards_easy_negatives():
    clip = 0.05
    easy = math.log(0.04 / 0.96)  # p = 0.04 <= clip: no loss, no gradient
    x = torch.tensor([easy, 2.0], dtype=torch.float64, requires_grad=True)
    y = torch.zeros(2, dtype=torch.float64)
    loss = asl(x, y, clip=clip, gamma_neg=1.0, reduction="none")
    p_m = 1 / (1 + math.exp(-2.0)) - clip
    assert loss[0].item() == 0.0
    assert loss[1].item() == pytest.approx(-p_m * math.log(1 - p_m), rel=1e-12)
    loss.sum().backward()
    assert x.grad[0].item() == 0.0


# ---------------------------------------------------------------------------- gradients


def loss_functions():
    return {
        "focal": lambda x, y, **kw: focal(x, y, alpha=0.3, gamma=2.0, **kw),
        "focal_gamma_half": lambda x, y, **kw: focal(x, y, alpha=-1, gamma=0.5, **kw),
        "asl": lambda x, y, **kw: asl(x, y, **kw),
        "asl_no_clip": lambda x, y, **kw: asl(x, y, gamma_pos=0.5, gamma_neg=2.0, clip=0, **kw),
        "asl_gamma_half": lambda x, y, **kw: asl(x, y, gamma_neg=0.5, clip=0.1, **kw),
    }


@pytest.mark.parametrize("name", list(loss_functions()))
def test_gradcheck_float64(name):
    loss_fn = loss_functions()[name]
    x, y = make_data((3, 2, 4), seed=43, ignore=True)
    x.requires_grad_()
    weight = torch.rand(3, 2, 4, dtype=torch.float64) + 0.5
    mask = torch.rand(3, 2, 4) > 0.2

    def loss(logits):
        return loss_fn(logits, y, weight=weight, label_smoothing=0.1, ignore_index=-1, mask=mask)

    assert torch.autograd.gradcheck(loss, (x,))


@pytest.mark.parametrize("name", list(loss_functions()))
def test_gradient_matches_reference_autograd(name):
    # the reference formulas, differentiated by autograd in float64
    references = {
        "focal": focal_reference(0.3, 2.0),
        "focal_gamma_half": focal_reference(-1, 0.5),
        "asl": asl_reference(1.0, 4.0, 0.05),
        "asl_no_clip": asl_reference(0.5, 2.0, 0.0),
        "asl_gamma_half": asl_reference(1.0, 0.5, 0.1),
    }
    x, y = make_data((4, 5), seed=47)
    ours = x.clone().requires_grad_()
    theirs = x.clone().requires_grad_()
    loss_functions()[name](ours, y, reduction="sum").backward()
    references[name](theirs, y, None).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(loss_functions()))
def test_extreme_logits_fp32_are_finite(name):
    loss_fn = loss_functions()[name]
    x = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3])
    for smoothing in [0.0, 0.1]:
        x.grad = None
        loss = loss_fn(x, y, reduction="none", label_smoothing=smoothing)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()


def test_extreme_logit_values_are_right():
    x = torch.tensor([1e4, -1e4, 1e4, -1e4])
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    # confidently wrong: (1 - p_t) = 1, so focal = alpha_t * |x|
    got = focal(x, y, alpha=0.25, gamma=2.0, reduction="none")
    assert torch.equal(got, torch.tensor([0.75e4, 0.25e4, 0.0, 0.0]))
    # ASL: wrong positive costs |x|; wrong negative p_m = 1 - clip costs -log(clip)
    got = asl(x, y, gamma_pos=1.0, gamma_neg=4.0, clip=0.05, reduction="none")
    expected = torch.tensor([0.95**4 * -math.log(0.05), 1e4, 0.0, 0.0])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"]
)
@pytest.mark.parametrize("name", ["focal", "asl"])
def test_half_precision_inputs(dtype, tol, name):
    x, y = make_data((4, 3, 5), seed=53)
    x_half = x.to(dtype).requires_grad_()
    y_half = y.to(dtype)
    if name == "focal":
        loss = focal(x_half, y_half, label_smoothing=0.1)
        reference = focal_reference(0.25, 2.0)
    else:
        loss = asl(x_half, y_half, label_smoothing=0.1)
        reference = asl_reference(1.0, 4.0, 0.05)
    assert loss.dtype == dtype
    expected = reference_loss(reference, x_half.detach(), y_half, label_smoothing=0.1)
    assert loss.float().item() == pytest.approx(expected.item(), rel=tol)
    loss.backward()
    assert x_half.grad.dtype == dtype and torch.isfinite(x_half.grad.float()).all()


# ---------------------------------------------------------------------------- properties


@st.composite
def cases(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    return (
        shape,
        draw(st.integers(0, 10_000)),
        draw(st.sampled_from([0.0, 0.1, 1.0])),
        draw(st.floats(0.0, 5.0)),
        draw(st.floats(0.0, 5.0)),
        draw(st.floats(0.0, 0.5)),
    )


@settings(max_examples=50, deadline=None)
@given(cases())
def test_property_focal_and_asl_lie_between_zero_and_bce(case):
    shape, seed, smoothing, gamma_a, gamma_b, clip = case
    x, y = make_data(shape, seed, ignore=True)
    options = dict(reduction="none", label_smoothing=smoothing, ignore_index=-1)
    bce = xloss.binary_cross_entropy_with_logits(x, y, **options)
    focal_loss = focal(x, y, alpha=-1, gamma=gamma_a, **options)
    asl_loss = asl(x, y, gamma_pos=gamma_a, gamma_neg=gamma_b, clip=clip, **options)
    slack = 1e-12
    assert (focal_loss >= 0).all() and (focal_loss <= bce + slack).all()
    assert (asl_loss >= -slack).all() and (asl_loss <= bce + slack).all()
    # a larger gamma focuses more: the loss does not grow
    focal_more = focal(x, y, alpha=-1, gamma=gamma_a + 1.0, **options)
    assert (focal_more <= focal_loss + slack).all()
    expected = reference_loss(
        focal_reference(-1, gamma_a),
        x,
        y,
        reduction="none",
        label_smoothing=smoothing,
        ignore_index=-1,
    )
    assert_close64(focal_loss, expected)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(alpha="0.25"), TypeError, "`alpha` must be a float"),
        (dict(alpha=True), TypeError, "`alpha` must be a float"),
        (dict(alpha=1.5), ValueError, r"`alpha` must be <= 1 \(negative disables it\), got 1.5"),
        (dict(alpha=float("nan")), ValueError, "`alpha` must be <= 1"),
        (dict(gamma=-1.0), ValueError, "`gamma` must be >= 0, got -1.0"),
        (dict(gamma=None), TypeError, "`gamma` must be a non-negative float"),
        (dict(reduction="avg"), ValueError, "`reduction` must be one of"),
        (dict(smoothing_rule="soft"), ValueError, "`smoothing_rule` must be one of"),
        (dict(weight=torch.ones(5)), ValueError, "`weight` must broadcast"),
        (dict(mask=torch.ones(2, 3)), TypeError, "`mask` must be a bool tensor"),
    ],
)
def test_focal_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        focal(torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)
    if "weight" not in kwargs and "mask" not in kwargs:
        with pytest.raises(error, match=match):
            xloss.SigmoidFocalLoss(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(gamma_pos=-0.5), ValueError, "`gamma_pos` must be >= 0"),
        (dict(gamma_neg="4"), TypeError, "`gamma_neg` must be a non-negative float"),
        (dict(gamma_neg=float("nan")), ValueError, "`gamma_neg` must be >= 0"),
        (dict(clip=1.5), ValueError, r"`clip` must lie in \[0, 1\], got 1.5"),
        (dict(clip=None), TypeError, "`clip` must be a float"),
        (dict(label_smoothing=2.0), ValueError, "`label_smoothing` must lie"),
        (dict(ignore_index=0.5), TypeError, "`ignore_index` must be an int"),
    ],
)
def test_asl_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        asl(torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)
    with pytest.raises(error, match=match):
        xloss.AsymmetricLoss(**kwargs)


@pytest.mark.parametrize("loss_fn", [focal, asl], ids=["focal", "asl"])
def test_shape_and_target_errors(loss_fn):
    with pytest.raises(ValueError, match=r"`target` must have the input's shape \(4,\)"):
        loss_fn(torch.zeros(4), torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\], found -2.0"):
        loss_fn(torch.zeros(2), torch.tensor([0.0, -2.0]))
    with pytest.raises(TypeError, match="`input` must be a floating-point tensor"):
        loss_fn(torch.zeros(2, dtype=torch.int64), torch.zeros(2))
    with pytest.raises(ValueError, match="reduction='sample' needs a batch axis"):
        loss_fn(torch.zeros(2), torch.zeros(2), reduction="sample")


# ---------------------------------------------------------------------------- modules


def test_modules_equal_functionals_and_move_buffers():
    x, y = make_data((2, 3, 4), seed=59, ignore=True)
    weight = torch.rand(4) + 0.5
    lengths = torch.tensor([3, 1])
    focal_module = xloss.SigmoidFocalLoss(
        weight, alpha=0.4, gamma=1.5, label_smoothing=0.1, ignore_index=-1, reduction="sample"
    ).double()
    asl_module = xloss.AsymmetricLoss(
        weight,
        gamma_pos=0.5,
        gamma_neg=3.0,
        clip=0.1,
        smoothing_rule="uniform",
        label_smoothing=0.2,
        ignore_index=-1,
        reduction="sum",
    ).double()
    assert focal_module.weight.dtype == torch.float64
    assert "weight" in dict(asl_module.named_buffers())
    expected_focal = focal(
        x,
        y,
        weight.double(),
        alpha=0.4,
        gamma=1.5,
        label_smoothing=0.1,
        ignore_index=-1,
        reduction="sample",
        lengths=lengths,
    )
    assert_close64(focal_module(x, y, lengths=lengths), expected_focal)
    expected_asl = asl(
        x,
        y,
        weight.double(),
        gamma_pos=0.5,
        gamma_neg=3.0,
        clip=0.1,
        smoothing_rule="uniform",
        label_smoothing=0.2,
        ignore_index=-1,
        reduction="sum",
        normalizer=5,
    )
    assert_close64(asl_module(x, y, normalizer=5), expected_asl)
    assert "gamma=1.5" in repr(focal_module) and "clip=0.1" in repr(asl_module)


def _sweep_reference(name, settings):
    """float64 element loss of focal / ASL in softplus form (no log(1 - p) cancellation),
    for autograd; a power with exponent 0 is left out (its derivative is 0 * inf at p = 1)."""
    softplus = F.softplus

    def power(base, exponent):
        return base**exponent if exponent > 0 else torch.ones_like(base)

    def loss(x, y):
        if name == "focal":
            alpha, gamma = settings
            ce = y * softplus(-x) + (1 - y) * softplus(x)
            miss = y * torch.sigmoid(-x) + (1 - y) * torch.sigmoid(x)
            return (alpha * y + (1 - alpha) * (1 - y)) * power(miss, gamma) * ce
        gamma_pos, gamma_neg, clip = settings
        positive = power(torch.sigmoid(-x), gamma_pos) * softplus(-x)
        if clip == 0:
            negative = power(torch.sigmoid(x), gamma_neg) * softplus(x)
        else:
            shifted = (torch.sigmoid(x) - clip).clamp(min=0)
            negative = -power(shifted, gamma_neg) * torch.log1p(-shifted)
        return y * positive + (1 - y) * negative

    return loss


@pytest.mark.skipif(not kernel_available(), reason="the numba kernel is unavailable")
@pytest.mark.parametrize(
    ("name", "settings"),
    [("focal", (0.25, 0.0)), ("focal", (0.25, 2.0)), ("focal", (0.6, 50.0)),
     ("asl", (0.0, 0.0, 0.0)), ("asl", (1.0, 4.0, 0.05)), ("asl", (20.0, 40.0, 0.0))],
)  # fmt: skip
def test_sweep_of_logits_matches_float64_with_gradients(name, settings):
    """The kernel's shared polynomial exp under focal and ASL: over a sweep of logits
    (-100..100, around the exp's flush at 86, and finite extremes up to 3e38) the loss and
    the gradient equal float64, gamma 0 and large gammas included. A confidently right
    logit of 3e38 once gave a NaN gradient: ce * gamma overflowed to inf before the factor
    s (1 - s) = 0. A NaN logit gives a NaN loss."""
    extremes = torch.tensor([86.0, 86.5, 87.5, 88.8, 1e4, 1e30, 2e38, 3e38])
    x = torch.cat([torch.linspace(-100.0, 100.0, 2001), extremes, -extremes])
    call = focal if name == "focal" else asl
    keywords = ("alpha", "gamma") if name == "focal" else ("gamma_pos", "gamma_neg", "clip")
    options = dict(zip(keywords, settings, strict=True))
    reference = _sweep_reference(name, settings)
    for target in [0.0, 1.0]:
        y = torch.full_like(x, target)
        logits = x.clone().requires_grad_()
        loss = call(logits, y, reduction="none", **options)
        loss.sum().backward()
        x64 = x.double().requires_grad_()
        expected = reference(x64, y.double())
        expected.sum().backward()
        assert torch.isfinite(logits.grad).all()
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
        nan_loss = call(torch.tensor([float("nan"), 0.0]), y[:2], reduction="none", **options)
        assert nan_loss[0].isnan() and nan_loss[1].isfinite()
