"""BCE with logits, positive_rate, multilabel_balance_weights and BCEWithLogitsLoss."""

import math

import pytest
import torch
import torch.nn.functional as F
from elementwise_reference import (
    GRID_CASES,
    GRID_IDS,
    make_data,
    option_grid,
    reference_loss,
    sigmoid64,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import xloss

bce = xloss.binary_cross_entropy_with_logits


def bce_reference(x, y, pos_weight):
    p = sigmoid64(x)
    positive = y * torch.log(p)
    if pos_weight is not None:
        positive = positive * pos_weight
    return -(positive + (1 - y) * torch.log(1 - p))


def assert_close64(actual, expected):
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize(("shape", "reduction"), GRID_CASES, ids=GRID_IDS)
def test_matches_float64_reference_for_every_option_combination(shape, reduction):
    checked = 0
    for x, y, options in option_grid(shape, with_pos_weight=True):
        actual = bce(x, y, reduction=reduction, **options)
        expected = reference_loss(bce_reference, x, y, reduction=reduction, **options)
        assert_close64(actual, expected)
        checked += 1
    assert checked == (72 if len(shape) == 0 else 144)


def test_issue_example_1d_with_smoothing_equals_formula():
    loss = bce(torch.tensor([-10.0, 2.0]), torch.tensor([0.0, 1.0]), label_smoothing=0.01)
    y = [0.005, 0.995]
    expected = 0.0
    for logit, target in zip([-10.0, 2.0], y, strict=True):
        p = 1 / (1 + math.exp(-logit))
        expected -= target * math.log(p) + (1 - target) * math.log(1 - p)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)


def test_fp32_soft_targets_at_large_logits_are_accurate():
    # (1-y) x + softplus(-x), PyTorch's arrangement, cancels here; the loss must not
    x = torch.tensor([-30.0, -10.0, 10.0, 30.0, -1e4])
    y = torch.tensor([0.005, 0.3, 0.7, 0.995, 0.001])
    x64, y64 = x.double(), y.double()
    # -log s(x) = log(1 + e^-x) and -log(1 - s(x)) = log(1 + e^x), exact in float64 here
    expected = y64 * torch.log1p(torch.exp(-x64)) + (1 - y64) * torch.log1p(torch.exp(x64))
    expected[-1] = y64[-1] * 1e4  # e^1e4 overflows; the loss is y |x| to double precision
    actual = bce(x, y, reduction="none")
    torch.testing.assert_close(actual.double(), expected, rtol=5e-7, atol=0)


def test_uniform_rule_uses_size_of_class_axis():
    x = torch.ones(2, 4, dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    uniform = bce(x, y, label_smoothing=0.2, smoothing_rule="uniform", reduction="none")
    assert_close64(uniform, bce(x, y * 0.8 + 0.05, reduction="none"))  # a / C = 0.2 / 4
    along_rows = bce(
        x, y, label_smoothing=0.2, smoothing_rule="uniform", class_dim=0, reduction="none"
    )
    assert_close64(along_rows, bce(x, y * 0.8 + 0.1, reduction="none"))  # 0.2 / 2 rows


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_with_weight_and_pos_weight(shape, reduction, dtype):
    x, y = make_data(shape, seed=3, dtype=dtype)
    tol = {} if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    weights = [None, torch.rand(shape[-1], dtype=dtype) + 0.5, torch.rand(shape, dtype=dtype)]
    pos_weights = [None, torch.rand(shape[-1], dtype=dtype) * 3]
    for weight in weights:
        for pos_weight in pos_weights:
            ours = bce(x, y, weight, pos_weight=pos_weight, reduction=reduction)
            theirs = F.binary_cross_entropy_with_logits(
                x, y, weight, pos_weight=pos_weight, reduction=reduction
            )
            torch.testing.assert_close(ours, theirs, **tol)


def test_gradient_matches_torch():
    x, y = make_data((4, 6), seed=5)
    pos_weight = torch.rand(6, dtype=torch.float64) + 0.5
    ours_x = x.clone().requires_grad_()
    theirs_x = x.clone().requires_grad_()
    bce(ours_x, y, pos_weight=pos_weight).backward()
    F.binary_cross_entropy_with_logits(theirs_x, y, pos_weight=pos_weight).backward()
    torch.testing.assert_close(ours_x.grad, theirs_x.grad)


def test_mean_divides_by_kept_elements_and_empty_batch_gives_zero():
    x = torch.tensor([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)
    per_element = bce_reference(x, y.clamp(min=0), None)
    kept = y != -1
    expected = per_element[kept].sum() / 4
    assert_close64(bce(x, y, ignore_index=-1), expected)

    x = x.clone().requires_grad_()
    loss = bce(x, torch.full_like(y, -1.0), ignore_index=-1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    loss = bce(x, y, mask=torch.zeros_like(y, dtype=torch.bool), reduction="sample")
    assert torch.equal(loss, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("given_lengths", "counts"),
    [
        (torch.tensor([5, 2, 0]), torch.tensor([5, 2, 0])),
        # relative: t < L * 5 - 1e-6 keeps 2 steps for 0.4 and 3 for 0.5 (2.5 -> 3)
        (torch.tensor([1.0, 0.4, 0.5]), torch.tensor([5, 2, 3])),
    ],
    ids=["integer", "relative"],
)
def test_lengths_equal_a_hand_built_mask(given_lengths, counts):
    x, y = make_data((3, 5, 4), seed=7)
    for reduction in ["none", "mean", "sum", "sample"]:
        actual = bce(x, y, lengths=given_lengths, reduction=reduction, label_smoothing=0.1)
        expected = reference_loss(
            bce_reference, x, y, lengths=counts, reduction=reduction, label_smoothing=0.1
        )
        assert_close64(actual, expected)


def test_normalizer_divides_the_sum():
    x, y = make_data((2, 3, 4), seed=8)
    mask = torch.rand(2, 3, 4) > 0.5
    for normalizer in [7, torch.tensor(7.0)]:
        actual = bce(x, y, mask=mask, normalizer=normalizer, reduction="sum")
        expected = reference_loss(bce_reference, x, y, mask=mask, normalizer=7)
        assert_close64(actual, expected)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_and_bool_targets_are_converted(dtype):
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4, 3))
    expected = bce(x, y.double(), pos_weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    actual = bce(x, y.to(dtype), pos_weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert_close64(actual, expected)


def test_integer_target_with_ignore_index():
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([[1, 0, -1], [0, -1, 1]])
    keep = y != -1
    expected = bce_reference(x, y.clamp(min=0).double(), None)[keep].mean()
    assert_close64(bce(x, y, ignore_index=-1), expected)


def test_zero_dim_input_is_one_prediction():
    x = torch.tensor(1.5, dtype=torch.float64)
    y = torch.tensor(1.0, dtype=torch.float64)
    loss = bce(x, y, pos_weight=torch.tensor([2.0], dtype=torch.float64), label_smoothing=0.2)
    p = 1 / (1 + math.exp(-1.5))
    expected = -(2 * 0.9 * math.log(p) + 0.1 * math.log(1 - p))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 2)], ids=str)
def test_gradcheck_float64(shape):
    x, y = make_data(shape, seed=11, ignore=True)
    x.requires_grad_()
    weight = torch.rand(shape, dtype=torch.float64) + 0.5
    pos_weight = torch.rand(shape[-1], dtype=torch.float64) + 0.5
    mask = torch.rand(shape) > 0.2

    def loss(logits, target):
        return bce(
            logits,
            target,
            weight,
            pos_weight=pos_weight,
            label_smoothing=0.1,
            ignore_index=-1,
            mask=mask,
            validate_args=False,  # soft target values move during gradcheck
        )

    soft_target = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (x, y))
    assert torch.autograd.gradcheck(loss, (x, soft_target))
    assert torch.autograd.gradgradcheck(loss, (x, y))


def test_extreme_logits_fp32_give_finite_exact_values_and_gradients():
    x = torch.tensor([1e4, -1e4, 1e4, -1e4], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss = bce(x, y, reduction="none", pos_weight=torch.tensor([2.0, 2.0, 2.0, 2.0]))
    assert torch.equal(loss.detach(), torch.tensor([1e4, 2e4, 0.0, 0.0]))
    loss.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, -2.0, 0.0, 0.0]))
    smoothed = bce(x, y, label_smoothing=0.1, smoothing_rule="uniform", reduction="sum")
    assert torch.isfinite(smoothed)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)], ids=["fp16", "bf16"]
)
def test_half_precision_inputs(dtype, tol):
    x, y = make_data((4, 3, 5), seed=13)
    x_half, y_half = x.to(dtype).requires_grad_(), y.to(dtype)
    pos_weight = torch.rand(5) + 0.5
    loss = bce(x_half, y_half, pos_weight=pos_weight, label_smoothing=0.1)
    assert loss.dtype == dtype
    # the reference sees the same rounded inputs, in float64
    x64 = x_half.detach().double().requires_grad_()
    expected = reference_loss(
        bce_reference, x64, y_half, pos_weight=pos_weight.double(), label_smoothing=0.1
    )
    assert loss.float().item() == pytest.approx(expected.item(), rel=tol)
    loss.backward()
    expected.backward()
    assert x_half.grad.dtype == dtype
    torch.testing.assert_close(x_half.grad.double(), x64.grad, rtol=tol, atol=tol / 60)
    extreme = torch.tensor([1e4, -1e4], dtype=dtype, requires_grad=True)
    value = bce(extreme, torch.tensor([0.0, 0.0], dtype=dtype), reduction="sum")
    value.backward()
    assert value.item() == extreme[0].item()  # 1e4 rounds to 9984 in bf16
    assert torch.equal(extreme.grad, torch.tensor([1.0, 0.0], dtype=dtype))


# ---------------------------------------------------------------------------- properties


@st.composite
def cases(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    seed = draw(st.integers(0, 10_000))
    smoothing = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    rule = draw(st.sampled_from(["binary", "uniform"]))
    class_dim = draw(st.integers(-ndim, ndim - 1)) if ndim else -1
    reduction = draw(st.sampled_from(["none", "mean", "sum"] + (["sample"] if ndim > 1 else [])))
    return shape, seed, smoothing, rule, class_dim, reduction


@settings(max_examples=60, deadline=None)
@given(cases())
def test_property_matches_reference_and_is_non_negative(case):
    shape, seed, smoothing, rule, class_dim, reduction = case
    x, y = make_data(shape, seed, ignore=True)
    options = dict(
        label_smoothing=smoothing, smoothing_rule=rule, class_dim=class_dim, ignore_index=-1
    )
    actual = bce(x, y, reduction=reduction, **options)
    expected = reference_loss(bce_reference, x, y, reduction=reduction, **options)
    assert_close64(actual, expected)
    assert (actual >= 0).all()


@settings(max_examples=40, deadline=None)
@given(cases())
def test_property_smoothing_equals_smoothing_the_target_by_hand(case):
    shape, seed, smoothing, rule, class_dim, _ = case
    x, y = make_data(shape, seed)
    size = 1 if not shape else shape[class_dim]
    share = 2 if rule == "binary" else size
    ours = bce(x, y, label_smoothing=smoothing, smoothing_rule=rule, class_dim=class_dim)
    assert_close64(ours, bce(x, y * (1 - smoothing) + smoothing / share))


# ---------------------------------------------------------------------------- errors


def test_never_broadcasts_n_against_n_by_1():
    with pytest.raises(ValueError, match=r"`target` must have the input's shape \(4,\).*\(4, 1\)"):
        bce(torch.zeros(4), torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"`target`.*\(4, 1\).*got \(4,\)"):
        bce(torch.zeros(4, 1), torch.zeros(4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(reduction="avg"), ValueError, "`reduction` must be one of"),
        (dict(reduction="none", normalizer=2), ValueError, "`normalizer` divides"),
        (dict(normalizer=-1.0), ValueError, "`normalizer` must be >= 0"),
        (dict(normalizer="2"), TypeError, "`normalizer` must be a number"),
        (dict(ignore_index=-1.0), TypeError, "`ignore_index` must be an int"),
        (dict(smoothing_rule="timm"), ValueError, "`smoothing_rule` must be one of"),
        (dict(label_smoothing=1.5), ValueError, r"`label_smoothing` must lie in \[0, 1\]"),
        (dict(label_smoothing="0.1"), TypeError, "`label_smoothing` must be a float"),
        (dict(class_dim=2), ValueError, r"`class_dim` must be in \[-2, 1\]"),
        (dict(class_dim=1.0), TypeError, "`class_dim` must be an int"),
        (dict(weight=[1.0]), TypeError, "`weight` must be a torch.Tensor"),
        (dict(weight=torch.ones(3, dtype=torch.long)), TypeError, "`weight` must be a floating"),
        (
            dict(weight=torch.ones(4)),
            ValueError,
            r"`weight` must broadcast .* \(2, 3\), got \(4,\)",
        ),
        (dict(weight=torch.ones(1, 2, 3)), ValueError, "`weight` must broadcast"),
        (dict(pos_weight=2.0), TypeError, "`pos_weight` must be a torch.Tensor"),
        (dict(pos_weight=torch.ones(3, dtype=torch.int32)), TypeError, "`pos_weight` must be a fl"),
        (dict(pos_weight=torch.ones(1, 3)), ValueError, "`pos_weight` must be 1-D"),
        (dict(pos_weight=torch.ones(2)), ValueError, r"`pos_weight` must have shape \(3,\)"),
        (dict(mask=torch.ones(2, 3)), TypeError, "`mask` must be a bool tensor"),
        (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, "`mask` must have"),
        (dict(lengths=torch.tensor([1, 4])), ValueError, r"integer `lengths` must lie in \[0, 3\]"),
        (dict(lengths=torch.tensor([1])), ValueError, r"`lengths` must have shape \(2,\)"),
    ],
)
def test_argument_errors(kwargs, error, match):
    x = torch.zeros(2, 3)
    y = torch.zeros(2, 3)
    with pytest.raises(error, match=match):
        bce(x, y, **kwargs)


def test_pos_weight_follows_class_dim():
    x, y = make_data((2, 3), seed=31)
    pos_weight = torch.tensor([2.0, 5.0], dtype=torch.float64)
    actual = bce(x, y, pos_weight=pos_weight, class_dim=0, reduction="none")
    expected = bce_reference(x, y, pos_weight[:, None].expand(2, 3))
    assert_close64(actual, expected)
    with pytest.raises(ValueError, match=r"`pos_weight` must have shape \(2,\)"):
        bce(x, y, pos_weight=torch.ones(3, dtype=torch.float64), class_dim=0)


def test_tensor_type_errors():
    with pytest.raises(TypeError, match="`input` must be a torch.Tensor"):
        bce([0.0], torch.zeros(1))
    with pytest.raises(TypeError, match="`input` must be a floating-point tensor"):
        bce(torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(TypeError, match="`target` must be a torch.Tensor"):
        bce(torch.zeros(2), [0.0, 1.0])
    with pytest.raises(TypeError, match="`target` must be a real tensor"):
        bce(torch.zeros(2), torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="`lengths` needs a target with a sequence axis"):
        bce(torch.zeros(3), torch.zeros(3), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="reduction='sample' needs a batch axis"):
        bce(torch.zeros(3), torch.zeros(3), reduction="sample")
    with pytest.raises(ValueError, match=r"`class_dim` must be in \[-1, 0\]"):
        bce(torch.zeros(3), torch.zeros(3), class_dim=1)


def test_target_range_errors_and_validate_args_off():
    x = torch.zeros(2, 3)
    y = torch.tensor([[0.0, 1.0, 2.0], [0.5, -1.0, 0.0]])
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\], found 2.0"):
        bce(x, y)
    with pytest.raises(ValueError, match=r"or equal ignore_index=-1, found 2.0"):
        bce(x, y, ignore_index=-1)
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\], found nan"):
        bce(x, torch.full((2, 3), float("nan")))
    masked = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.isfinite(bce(x, y, mask=masked))  # out-of-range values are masked out
    assert torch.isfinite(bce(x, y, validate_args=False))


def test_torch_compile_runs_and_matches_eager():
    x, y = make_data((3, 4), seed=37)
    compiled = torch.compile(bce, backend="eager", fullgraph=True)
    options = dict(pos_weight=torch.rand(4, dtype=torch.float64), label_smoothing=0.1)
    expected = bce(x, y, **options)
    assert_close64(compiled(x, y, validate_args=False, **options), expected)


# ---------------------------------------------------------------------------- module


def test_module_equals_functional_and_moves_buffers():
    x, y = make_data((3, 4), seed=17, ignore=True)
    weight = torch.rand(4) + 0.5
    pos_weight = torch.rand(4) + 0.5
    module = xloss.BCEWithLogitsLoss(
        weight,
        pos_weight=pos_weight,
        reduction="sum",
        label_smoothing=0.1,
        smoothing_rule="uniform",
        ignore_index=-1,
    ).to(torch.float64)
    assert module.weight.dtype == torch.float64 and module.pos_weight.dtype == torch.float64
    assert set(dict(module.named_buffers())) == {"weight", "pos_weight"}
    mask = torch.rand(3, 4) > 0.3
    expected = bce(
        x,
        y,
        weight.double(),
        pos_weight=pos_weight.double(),
        reduction="sum",
        label_smoothing=0.1,
        smoothing_rule="uniform",
        ignore_index=-1,
        mask=mask,
    )
    assert_close64(module(x, y, mask=mask), expected)
    assert "smoothing_rule='uniform'" in repr(module)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(reduction="avg"), ValueError, "`reduction` must be one of"),
        (dict(smoothing_rule="x"), ValueError, "`smoothing_rule`"),
        (dict(label_smoothing=-0.1), ValueError, "`label_smoothing` must lie"),
        (dict(ignore_index="-1"), TypeError, "`ignore_index`"),
        (dict(weight=torch.ones(2, dtype=torch.long)), TypeError, "`weight` must be a floating"),
        (dict(pos_weight=torch.ones(2, 2)), ValueError, "`pos_weight` must be 1-D"),
    ],
)
def test_module_validates_settings_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        xloss.BCEWithLogitsLoss(**kwargs)


# ---------------------------------------------------------------------------- class rates


def positive_rate_reference(y, keep, class_dim):
    y = y.double()
    dim = class_dim % y.dim()
    rates = []
    for c in range(y.shape[dim]):
        values = y.select(dim, c)[keep.select(dim, c)]
        rates.append(values.sum() / values.numel() if values.numel() else torch.tensor(0.0))
    return torch.stack(rates).double()


@pytest.mark.parametrize("class_dim", [-1, 0, 1])
def test_positive_rate_matches_reference(class_dim):
    _, y = make_data((4, 3, 5), seed=19, ignore=True)
    mask = torch.rand(4, 3, 5) > 0.3
    keep = (y != -1) & mask
    actual = xloss.positive_rate(y, class_dim=class_dim, ignore_index=-1, mask=mask)
    assert_close64(actual, positive_rate_reference(y, keep, class_dim))
    plain = xloss.positive_rate(y.clamp(min=0), class_dim=class_dim)
    expected = positive_rate_reference(y.clamp(min=0), torch.ones_like(keep), class_dim)
    assert_close64(plain, expected)


def test_positive_rate_small_shapes_lengths_and_empty_class():
    assert torch.equal(xloss.positive_rate(torch.tensor(1.0)), torch.tensor([1.0]))
    assert torch.equal(xloss.positive_rate(torch.tensor([1, 0, 1])), torch.tensor([1.0, 0.0, 1.0]))
    labels = torch.tensor([[1.0, -1.0], [0.0, -1.0]])
    assert torch.equal(xloss.positive_rate(labels, ignore_index=-1), torch.tensor([0.5, 0.0]))
    seq = torch.tensor([[[1.0], [1.0], [0.0]], [[0.0], [1.0], [1.0]]])  # (B, T, C=1)
    rate = xloss.positive_rate(seq, lengths=torch.tensor([2, 1]))
    assert torch.equal(rate, torch.tensor([2.0 / 3.0]))
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\], found 3.0"):
        xloss.positive_rate(torch.tensor([[3.0, 0.0]]))
    with pytest.raises(TypeError, match="`target` must be a real tensor"):
        xloss.positive_rate(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="`target` must be a torch.Tensor"):
        xloss.positive_rate([1.0, 0.0])
    with pytest.raises(TypeError, match="`ignore_index` must be an int"):
        xloss.positive_rate(torch.zeros(2, 2), ignore_index="-1")
    with pytest.raises(ValueError, match=r"`class_dim` must be in \[-2, 1\]"):
        xloss.positive_rate(torch.zeros(2, 2), class_dim=2)


def test_balance_weights_match_formula():
    _, y = make_data((5, 4), seed=23, ignore=True)
    rate = torch.rand(4, dtype=torch.float64)
    weights = xloss.multilabel_balance_weights(y, rate, ignore_index=-1)
    for (i, c), value in zip(
        torch.cartesian_prod(torch.arange(5), torch.arange(4)).tolist(),
        weights.flatten().tolist(),
        strict=True,
    ):
        label, r = y[i, c].item(), rate[c].item()
        if label == -1:
            assert value == 0.0
        else:
            assert value == pytest.approx(math.exp(label * (1 - r) + (1 - label) * r), rel=1e-12)
    hard = torch.tensor([[1, 0], [0, 1]])
    by_class_axis_0 = xloss.multilabel_balance_weights(hard, torch.tensor([0.2, 0.9]), class_dim=0)
    expected = torch.tensor([[math.exp(0.8), math.exp(0.2)], [math.exp(0.9), math.exp(0.1)]])
    torch.testing.assert_close(by_class_axis_0, expected)


def test_balance_weights_feed_bce():
    x, y = make_data((6, 3), seed=29)
    y = y.round()
    rate = xloss.positive_rate(y)
    weights = xloss.multilabel_balance_weights(y, rate)
    expected = (bce_reference(x, y, None) * weights).mean()
    assert_close64(bce(x, y, weights), expected)


@pytest.mark.parametrize(
    ("rate", "error", "match"),
    [
        ([0.5, 0.5], TypeError, "`positive_rate` must be a torch.Tensor"),
        (torch.tensor([1, 0]), TypeError, "`positive_rate` must be a floating"),
        (torch.ones(3), ValueError, r"`positive_rate` must have shape \(2,\)"),
        (torch.ones(2, 1), ValueError, r"`positive_rate` must have shape \(2,\)"),
        (torch.tensor([0.5, 1.5]), ValueError, r"`positive_rate` must lie in \[0, 1\]"),
    ],
)
def test_balance_weight_errors(rate, error, match):
    with pytest.raises(error, match=match):
        xloss.multilabel_balance_weights(torch.zeros(3, 2), rate)


def test_balance_weight_target_errors():
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\], found 2.0"):
        xloss.multilabel_balance_weights(torch.tensor([[2.0, 0.0]]), torch.ones(2))
    with pytest.raises(TypeError, match="`target` must be a real tensor"):
        xloss.multilabel_balance_weights(torch.zeros(2, dtype=torch.complex64), torch.ones(2))
    with pytest.raises(TypeError, match="`ignore_index` must be an int"):
        xloss.multilabel_balance_weights(torch.zeros(2), torch.ones(2), ignore_index=0.5)
