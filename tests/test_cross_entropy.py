"""xloss.cross_entropy against an independent float64 reference and against PyTorch."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import xloss

# --------------------------------------------------------------------------- reference


def reference_cross_entropy(
    input,
    target,
    weight=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    class_dim=1,
    mask=None,
    lengths=None,
    z_loss=0.0,
    softcap=None,
    normalizer=None,
):
    """Position-by-position float64 cross-entropy written from the formula (autograd-able)."""
    x = input.double()
    dim = class_dim % x.dim()
    x = x.movedim(dim, -1)
    num_classes = x.shape[-1]
    soft = target.is_floating_point()
    target_shape = x.shape[:-1]
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    losses, counts, keeps, samples = [], [], [], []
    for pos in itertools.product(*[range(s) for s in target_shape]):
        row = x[pos]
        if softcap is not None:
            row = softcap * torch.tanh(row / softcap)
        top = row.max()
        lse = top + torch.log(torch.exp(row - top).sum())
        logp = row - lse
        if soft:
            t = target.double().movedim(dim, -1)[pos]
            t = (1 - label_smoothing) * t + label_smoothing / num_classes
            loss = -(w * t * logp).sum()
            count = 1.0
            keep = True
        else:
            y = int(target[pos])
            keep = ignore_index is None or y != ignore_index
            if keep:
                loss = -(1 - label_smoothing) * w[y] * logp[y]
                loss = loss - label_smoothing / num_classes * (w * logp).sum()
                count = float(w[y])
            else:
                loss, count = None, 0.0
        if keep and mask is not None and not bool(mask[pos]):
            keep = False
        if keep and lengths is not None:
            steps = target_shape[1]
            length = lengths[pos[0]].item()
            if isinstance(length, float):  # relative: keep t < L * T - 1e-6 (SpeechBrain)
                length = math.ceil(length * steps - 1e-6)
            keep = pos[1] < length
        if keep:
            loss = loss + z_loss * lse**2
        losses.append(loss if keep else torch.zeros((), dtype=torch.float64))
        counts.append(count if keep else 0.0)
        keeps.append(keep)
        samples.append(pos[0] if pos else 0)
    per_position = torch.stack(losses).reshape(target_shape) if losses else x.new_zeros(0)
    total = per_position.sum()
    if normalizer is not None:
        norm = float(normalizer)
        return total / norm if norm != 0 else total * 0
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return total
    if reduction == "mean":
        denom = sum(counts)
        return total / denom if denom != 0 else total * 0
    assert reduction == "sample"
    out = []
    for n in range(target_shape[0]):
        sel = [i for i, s in enumerate(samples) if s == n]
        num = sum((losses[i] for i in sel), torch.zeros((), dtype=torch.float64))
        den = sum(counts[i] for i in sel)
        out.append(num / den if den != 0 else num * 0)
    return torch.stack(out)


def random_index_target(shape, num_classes, generator, ignore_index=None, ignore_frac=0.2):
    target = torch.randint(0, num_classes, shape, generator=generator)
    if ignore_index is not None:
        drop = torch.rand(shape, generator=generator) < ignore_frac
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
    return target


def assert_close_with_grads(ours_fn, ref_fn, input, atol=1e-10, rtol=1e-8):
    x1 = input.detach().clone().requires_grad_(True)
    x2 = input.detach().clone().double().requires_grad_(True)
    ours, ref = ours_fn(x1), ref_fn(x2)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref.detach(), atol=atol, rtol=rtol)
    probe = torch.linspace(0.5, 1.5, max(ours.numel(), 1), dtype=torch.float64)
    probe = probe[: ours.numel()].reshape(ours.shape)
    (ours.double() * probe).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(x1.grad.double(), x2.grad, atol=atol * 10, rtol=rtol * 10)


SHAPES = [(7,), (5, 7), (3, 7, 4), (2, 5, 3, 2)]  # class axis 1 (0 for unbatched)


def class_axis(shape):
    return 0 if len(shape) == 1 else 1


# --------------------------------------------------------------------------- PyTorch parity


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_matches_torch_index_targets(shape, reduction, label_smoothing, weighted, ignore_index):
    g = torch.Generator().manual_seed(hash((shape, reduction, weighted, ignore_index)) % 2**31)
    num_classes = shape[class_axis(shape)]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = random_index_target(tshape, num_classes, g, -100, 0.3)
    weight = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    kwargs = dict(
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if ignore_index == 2:
        target = torch.where(target == -100, 3, target)  # ignore_index is a valid class here
    target.view(-1)[0] = 1  # one kept position: PyTorch gives NaN for an all-ignored batch
    assert_close_with_grads(
        lambda t: xloss.cross_entropy(t, target, **kwargs),
        lambda t: F.cross_entropy(t, target, **kwargs),
        x,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_torch_probability_targets(shape, reduction, label_smoothing, weighted):
    g = torch.Generator().manual_seed(7)
    num_classes = shape[class_axis(shape)]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), class_axis(shape))
    weight = torch.rand(num_classes, generator=g, dtype=torch.float64) if weighted else None
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    assert_close_with_grads(
        lambda t: xloss.cross_entropy(t, probs, **kwargs),
        lambda t: F.cross_entropy(t, probs, **kwargs),
        x,
    )


def test_matches_torch_float32_default_call():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 100, generator=g)
    target = torch.randint(0, 100, (64,), generator=g)
    torch.testing.assert_close(xloss.cross_entropy(x, target), F.cross_entropy(x, target))


# --------------------------------------------------------------------------- reference


OPTION_SETS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(softcap=2.5),
    dict(label_smoothing=0.2, z_loss=1e-3, softcap=4.0, weighted=True),
    dict(weighted=True, ignore_index=0),
    dict(ignore_index=None),
]


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "sample"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_sequence_logits_class_last(options, reduction, use_mask):
    g = torch.Generator().manual_seed(11)
    options = dict(options)
    batch, steps, vocab = 3, 5, 6
    x = torch.randn(batch, steps, vocab, generator=g, dtype=torch.float64) * 2
    ignore_index = options.pop("ignore_index", -100)
    target = random_index_target((batch, steps), vocab, g, ignore_index, 0.2)
    weight = None
    if options.pop("weighted", False):
        weight = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.5
    mask = torch.rand(batch, steps, generator=g) > 0.3 if use_mask else None
    kwargs = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, mask=mask)
    kwargs.update(options)
    assert_close_with_grads(
        lambda t: xloss.cross_entropy(t, target, class_dim=-1, **kwargs),
        lambda t: reference_cross_entropy(t, target, class_dim=-1, **kwargs),
        x,
    )


@pytest.mark.parametrize("class_dim", [0, 1, 2, -1, -2])
def test_any_class_axis(class_dim):
    g = torch.Generator().manual_seed(3)
    shape = (3, 4, 5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    dim = class_dim % 3
    tshape = shape[:dim] + shape[dim + 1 :]
    target = torch.randint(0, shape[dim], tshape, generator=g)
    for reduction in ["none", "mean"]:
        kwargs = dict(class_dim=class_dim, reduction=reduction, label_smoothing=0.1)
        assert_close_with_grads(
            lambda t, kwargs=kwargs: xloss.cross_entropy(t, target, **kwargs),
            lambda t, kwargs=kwargs: reference_cross_entropy(t, target, **kwargs),
            x,
        )


def test_class_dim_minus_one_equals_transposed_torch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 9, generator=g)
    target = torch.randint(0, 9, (2, 7), generator=g)
    ours = xloss.cross_entropy(x, target, class_dim=-1, label_smoothing=0.1)
    theirs = F.cross_entropy(x.transpose(1, 2), target, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sample", "none", "sum"])
def test_lengths(relative, reduction):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (4, 6), generator=g)
    lengths = torch.tensor([6, 3, 1, 4])
    if relative:
        lengths = torch.tensor([1.0, 0.5, 0.2, 0.7])  # 0.2 * 6 = 1.2 -> 2, 0.7 * 6 = 4.2 -> 5
    kwargs = dict(class_dim=-1, lengths=lengths, reduction=reduction, label_smoothing=0.1)
    assert_close_with_grads(
        lambda t: xloss.cross_entropy(t, target, **kwargs),
        lambda t: reference_cross_entropy(t, target, **kwargs),
        x,
    )


def test_lengths_equal_keeping_only_valid_positions_in_torch():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 8, 4, generator=g)
    target = torch.randint(0, 4, (3, 8), generator=g)
    lengths = torch.tensor([8, 2, 5])
    keep = torch.arange(8) < lengths[:, None]
    ours = xloss.cross_entropy(x, target, class_dim=-1, lengths=lengths)
    torch.testing.assert_close(ours, F.cross_entropy(x[keep], target[keep]))


def test_lengths_on_4d_target_broadcast_over_trailing_axes():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 4, 2, generator=g, dtype=torch.float64)  # (N, C, T, d)
    target = torch.randint(0, 3, (2, 4, 2), generator=g)
    lengths = torch.tensor([1, 3])
    assert_close_with_grads(
        lambda t: xloss.cross_entropy(t, target, lengths=lengths, reduction="sample"),
        lambda t: reference_cross_entropy(t, target, lengths=lengths, reduction="sample"),
        x,
    )


@pytest.mark.parametrize("normalizer", [7, 2.5, torch.tensor(13.0), 0])
def test_normalizer_divides_the_sum(normalizer):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, -100, 4])
    assert_close_with_grads(
        lambda t: xloss.cross_entropy(t, target, normalizer=normalizer, z_loss=0.1),
        lambda t: reference_cross_entropy(t, target, normalizer=normalizer, z_loss=0.1),
        x,
    )


def test_gradient_accumulation_with_global_count_equals_full_batch_mean():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, 10, 7, generator=g, dtype=torch.float64)
    target = random_index_target((6, 10), 7, g, -100, 0.4)
    full = xloss.cross_entropy(x, target, class_dim=-1)
    count = (target != -100).sum()
    parts = [
        xloss.cross_entropy(x[i : i + 2], target[i : i + 2], class_dim=-1, normalizer=count)
        for i in range(0, 6, 2)
    ]
    torch.testing.assert_close(sum(parts), full)


@pytest.mark.parametrize("reduction", ["mean", "sum", "sample", "none"])
def test_no_valid_position_gives_zero_and_zero_grad(reduction):
    x = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.full((2, 3), -100)
    loss = xloss.cross_entropy(x, target, class_dim=-1, reduction=reduction, label_smoothing=0.1)
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert torch.all(x.grad == 0)


def test_empty_batch_gives_zero():
    x = torch.randn(0, 5, requires_grad=True)
    loss = xloss.cross_entropy(x, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, 5)


def test_sample_reduction_empty_sample_is_zero():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    target = torch.tensor([[1, 2, 3], [-100, -100, -100]])
    out = xloss.cross_entropy(x, target, class_dim=-1, reduction="sample")
    assert out[1] == 0
    torch.testing.assert_close(out[0], F.cross_entropy(x[0], target[0]))


def test_gradcheck_all_options():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0, 1, 4, -100], [2, 2, 3, 1], [4, 0, -100, 3]])
    weight = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    mask = torch.rand(3, 4, generator=g) > 0.2
    for reduction in ["none", "mean", "sum", "sample"]:

        def fn(t, reduction=reduction):
            return xloss.cross_entropy(
                t,
                target,
                weight,
                class_dim=-1,
                label_smoothing=0.2,
                z_loss=0.05,
                softcap=3.0,
                mask=mask,
                reduction=reduction,
            )

        assert torch.autograd.gradcheck(fn, (x,))
    probs = torch.softmax(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(
        lambda t: xloss.cross_entropy(t, probs, weight, class_dim=-1, label_smoothing=0.1),
        (x,),
    )


# --------------------------------------------------------------------------- dtypes, stability


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_half_inputs_compute_in_float32(dtype, tol, reduction):
    g = torch.Generator().manual_seed(15)
    x = (torch.randn(6, 4, 33, generator=g) * 4).to(dtype)
    target = random_index_target((6, 4), 33, g, -100)
    kwargs = dict(class_dim=-1, label_smoothing=0.1, reduction=reduction, z_loss=1e-3)
    xh = x.clone().requires_grad_(True)
    ours = xloss.cross_entropy(xh, target, **kwargs)
    assert ours.dtype == dtype
    xr = x.double().requires_grad_(True)
    ref = reference_cross_entropy(xr, target, **kwargs)
    torch.testing.assert_close(ours.double(), ref.detach(), atol=tol, rtol=tol)
    ours.double().sum().backward()
    ref.sum().backward()
    assert xh.grad.dtype == dtype
    torch.testing.assert_close(xh.grad.double(), xr.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_logits_are_finite(scale):
    x = torch.tensor([[scale, 0.0, -scale], [scale, scale, scale], [0.0, scale, 1.0]])
    x.requires_grad_(True)
    target = torch.tensor([0, 1, 2])
    loss = xloss.cross_entropy(x, target, label_smoothing=0.1, z_loss=1e-4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    ref = reference_cross_entropy(x.detach(), target, label_smoothing=0.1, z_loss=1e-4)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)


def test_single_class_and_all_equal_logits():
    x = torch.zeros(3, 1, requires_grad=True)
    loss = xloss.cross_entropy(x, torch.zeros(3, dtype=torch.long), label_smoothing=0.3)
    loss.backward()
    assert loss.item() == 0.0
    # softmax of one class is 1: the gradient is zero up to fp32 rounding of exp(0) / sum
    torch.testing.assert_close(x.grad, torch.zeros_like(x.grad), atol=1e-7, rtol=0)
    y = torch.full((4, 9), 2.5)
    out = xloss.cross_entropy(y, torch.arange(4), reduction="none")
    torch.testing.assert_close(out, torch.full((4,), math.log(9)))


def test_integer_target_dtypes_accepted():
    x = torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 3])
    expected = F.cross_entropy(x, target)
    for dtype in [torch.int32, torch.int16, torch.uint8]:
        torch.testing.assert_close(xloss.cross_entropy(x, target.to(dtype)), expected)


def test_meta_device_creates_nothing_elsewhere():
    x = torch.empty(4, 6, 10, device="meta")
    target = torch.empty(4, 6, dtype=torch.long, device="meta")
    mask = torch.empty(4, 6, dtype=torch.bool, device="meta")
    weight = torch.empty(10, device="meta")
    lengths = torch.empty(4, dtype=torch.long, device="meta")
    for reduction in ["none", "mean", "sample", "sum"]:
        out = xloss.cross_entropy(
            x,
            target,
            weight,
            class_dim=-1,
            mask=mask,
            lengths=lengths,
            reduction=reduction,
            label_smoothing=0.1,
            validate_args=False,
        )
        assert out.device.type == "meta"


# --------------------------------------------------------------------------- property tests


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    class_dim = draw(st.integers(-ndim, ndim - 1))
    seed = draw(st.integers(0, 2**16))
    options = dict(
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 0.01])),
        softcap=draw(st.sampled_from([None, 1.5])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"] + (["sample"] if ndim > 1 else []))),
    )
    return shape, class_dim, seed, options, draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(problems())
def test_property_matches_reference(problem):
    shape, class_dim, seed, options, weighted = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    dim = class_dim % len(shape)
    num_classes = shape[dim]
    target = random_index_target(shape[:dim] + shape[dim + 1 :], num_classes, g, -100)
    weight = torch.rand(num_classes, generator=g, dtype=torch.float64) if weighted else None
    ours = xloss.cross_entropy(x, target, weight, class_dim=class_dim, **options)
    ref = reference_cross_entropy(x, target, weight, class_dim=class_dim, **options)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)
    if weight is None or options["reduction"] in ("sum", "none"):
        assert torch.all(ours >= -1e-12)  # cross-entropy and lse^2 are non-negative


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 5), st.integers(1, 6))
def test_property_mask_equals_selecting_kept_rows(seed, batch, steps):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (batch, steps), generator=g)
    mask = torch.rand(batch, steps, generator=g) > 0.5
    ours = xloss.cross_entropy(x, target, class_dim=-1, mask=mask, label_smoothing=0.1)
    if mask.any():
        expected = F.cross_entropy(x[mask], target[mask], label_smoothing=0.1)
    else:
        expected = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(ours, expected)


# --------------------------------------------------------------------------- module


def test_module_equals_functional_and_moves_weight():
    weight = torch.rand(6) + 0.1
    module = xloss.CrossEntropyLoss(weight, label_smoothing=0.1, class_dim=-1, z_loss=1e-3)
    assert "weight" in dict(module.named_buffers())
    x = torch.randn(2, 3, 6)
    target = torch.randint(0, 6, (2, 3))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    expected = xloss.cross_entropy(
        x, target, weight, label_smoothing=0.1, class_dim=-1, z_loss=1e-3, mask=mask
    )
    torch.testing.assert_close(module(x, target, mask=mask), expected)
    module = module.to(torch.float64)
    assert module.weight.dtype == torch.float64
    lengths = torch.tensor([1, 3])
    out = module(x.double(), target, lengths=lengths)
    expected = xloss.cross_entropy(
        x.double(),
        target,
        weight.double(),
        label_smoothing=0.1,
        class_dim=-1,
        z_loss=1e-3,
        lengths=lengths,
    )
    torch.testing.assert_close(out, expected)


def test_module_rejects_bad_settings_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        xloss.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        xloss.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="`weight` must be 1-D"):
        xloss.CrossEntropyLoss(torch.ones(2, 3))
    with pytest.raises(ValueError, match="z_loss"):
        xloss.CrossEntropyLoss(z_loss=-1.0)


# --------------------------------------------------------------------------- errors


def test_error_messages():
    x = torch.randn(8, 10)
    t = torch.randint(0, 10, (8,))
    cases = [
        (TypeError, "`input` must be a floating-point", lambda: xloss.cross_entropy(t, t)),
        (TypeError, "`input` must be a torch.Tensor", lambda: xloss.cross_entropy([1.0], t)),
        (TypeError, "`target` must be a torch.Tensor", lambda: xloss.cross_entropy(x, [1])),
        (
            ValueError,
            r"`target` must have shape \(8,\) for `input` of shape \(8, 10\) with "
            r"class_dim=1, got \(8, 10\)",
            lambda: xloss.cross_entropy(x, torch.zeros(8, 10, dtype=torch.long)),
        ),
        (
            ValueError,
            r"probability `target` must have the input's shape \(8, 10\), got \(8,\)",
            lambda: xloss.cross_entropy(x, torch.zeros(8)),
        ),
        (TypeError, "dtype torch.bool", lambda: xloss.cross_entropy(x, t > 3)),
        (
            ValueError,
            r"class indices must lie in \[0, 9\] or equal ignore_index=-100, found 10",
            lambda: xloss.cross_entropy(x, torch.full((8,), 10)),
        ),
        (
            ValueError,
            r"found -1",
            lambda: xloss.cross_entropy(x, torch.full((8,), -1)),
        ),
        (
            ValueError,
            r"`label_smoothing` must lie in \[0, 1\], got 1.5",
            lambda: xloss.cross_entropy(x, t, label_smoothing=1.5),
        ),
        (
            TypeError,
            "`label_smoothing` must be a float",
            lambda: xloss.cross_entropy(x, t, label_smoothing="0.1"),
        ),
        (
            ValueError,
            "`reduction` must be one of",
            lambda: xloss.cross_entropy(x, t, reduction="batchmean"),
        ),
        (
            ValueError,
            r"`weight` must have shape \(10,\), one value per class, got \(9,\)",
            lambda: xloss.cross_entropy(x, t, torch.ones(9)),
        ),
        (
            TypeError,
            "`weight` must be a floating-point",
            lambda: xloss.cross_entropy(x, t, torch.ones(10, dtype=torch.long)),
        ),
        (
            ValueError,
            r"`mask` must have the target's shape \(8,\), got \(8, 1\)",
            lambda: xloss.cross_entropy(x, t, mask=torch.ones(8, 1, dtype=torch.bool)),
        ),
        (
            TypeError,
            "`mask` must be a bool tensor",
            lambda: xloss.cross_entropy(x, t, mask=torch.ones(8)),
        ),
        (
            ValueError,
            "`lengths` needs a target with a sequence axis",
            lambda: xloss.cross_entropy(x, t, lengths=torch.ones(8, dtype=torch.long)),
        ),
        (
            ValueError,
            r"`class_dim` must be in \[-2, 1\]",
            lambda: xloss.cross_entropy(x, t, class_dim=2),
        ),
        (TypeError, "`class_dim` must be an int", lambda: xloss.cross_entropy(x, t, class_dim=1.0)),
        (ValueError, "`z_loss` must be >= 0", lambda: xloss.cross_entropy(x, t, z_loss=-0.1)),
        (ValueError, "`softcap` must be > 0", lambda: xloss.cross_entropy(x, t, softcap=0.0)),
        (
            TypeError,
            "`softcap` must be a positive float",
            lambda: xloss.cross_entropy(x, t, softcap="1"),
        ),
        (
            TypeError,
            "`ignore_index` must be an int",
            lambda: xloss.cross_entropy(x, t, ignore_index=1.5),
        ),
        (
            ValueError,
            "needs reduction='mean' or 'sum'",
            lambda: xloss.cross_entropy(x, t, reduction="none", normalizer=3),
        ),
        (ValueError, "`normalizer` must be >= 0", lambda: xloss.cross_entropy(x, t, normalizer=-1)),
        (
            ValueError,
            "`normalizer` must be >= 0",
            lambda: xloss.cross_entropy(x, t, normalizer=torch.tensor(-1.0)),
        ),
        (
            ValueError,
            "one-element tensor",
            lambda: xloss.cross_entropy(x, t, normalizer=torch.ones(2)),
        ),
        (
            TypeError,
            "`normalizer` must be a number",
            lambda: xloss.cross_entropy(x, t, normalizer="3"),
        ),
        (
            ValueError,
            "needs a batch axis",
            lambda: xloss.cross_entropy(torch.randn(5), torch.tensor(1), reduction="sample"),
        ),
        (
            ValueError,
            "0-dimensional",
            lambda: xloss.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
        ),
        (
            ValueError,
            "no classes",
            lambda: xloss.cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long)),
        ),
    ]
    for error, pattern, call in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_lengths_errors():
    x = torch.randn(2, 5, 4)
    t = torch.randint(0, 4, (2, 5))
    with pytest.raises(ValueError, match=r"`lengths` must have shape \(2,\)"):
        xloss.cross_entropy(x, t, class_dim=-1, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"integer `lengths` must lie in \[0, 5\]"):
        xloss.cross_entropy(x, t, class_dim=-1, lengths=torch.tensor([6, 2]))
    with pytest.raises(ValueError, match=r"floating `lengths` are relative .* \(0, 1\]"):
        xloss.cross_entropy(x, t, class_dim=-1, lengths=torch.tensor([1.5, 0.5]))
    with pytest.raises(TypeError, match="`lengths` must hold integers or floats"):
        xloss.cross_entropy(x, t, class_dim=-1, lengths=torch.tensor([True, False]))


def test_validate_args_false_skips_data_dependent_checks():
    x = torch.randn(4, 6)
    target = torch.tensor([0, 1, 2, 7])  # 7 is out of range; masked out below
    mask = torch.tensor([True, True, True, False])
    loss = xloss.cross_entropy(x, target, mask=mask)  # masked positions are not checked
    torch.testing.assert_close(loss, F.cross_entropy(x[:3], target[:3]))
    lengths = torch.tensor([9, 2])
    xs, ts = torch.randn(2, 3, 6), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        xloss.cross_entropy(xs, ts, class_dim=-1, lengths=lengths)
    out = xloss.cross_entropy(xs, ts, class_dim=-1, lengths=lengths, validate_args=False)
    assert torch.isfinite(out)


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "sample"])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_float32_path_every_option(options, reduction, use_mask, inplace_backward):
    """fp32 on CPU takes the fused kernel: the same grid as above at fp32 tolerance."""
    g = torch.Generator().manual_seed(21)
    options = dict(options)
    batch, steps, vocab = 3, 5, 37
    x = torch.randn(batch, steps, vocab, generator=g) * 2
    ignore_index = options.pop("ignore_index", -100)
    target = random_index_target((batch, steps), vocab, g, ignore_index, 0.2)
    weight = None
    if options.pop("weighted", False):
        weight = torch.rand(vocab, generator=g) + 0.5
    mask = torch.rand(batch, steps, generator=g) > 0.3 if use_mask else None
    kwargs = dict(ignore_index=ignore_index, reduction=reduction, mask=mask, **options)
    ours_input = x.clone().requires_grad_(True)
    # in place needs a non-leaf (the leaf itself raises, as PyTorch's in-place ops do)
    logits = ours_input.clone() if inplace_backward else ours_input
    ours = xloss.cross_entropy(
        logits, target, weight, class_dim=-1, inplace_backward=inplace_backward, **kwargs
    )
    ref_input = x.double().requires_grad_(True)
    ref = reference_cross_entropy(ref_input, target, weight, class_dim=-1, **kwargs)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref.detach(), atol=2e-5, rtol=2e-5)
    probe = torch.rand(ours.shape, generator=g, dtype=torch.float64)
    (ours.double() * probe).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(ours_input.grad.double(), ref_input.grad, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("normalizer", [7, torch.tensor(13.0), 0])
def test_normalizer_float32_kernel_path(normalizer):
    g = torch.Generator().manual_seed(22)
    x = torch.randn(4, 9, generator=g)
    target = torch.tensor([0, 1, -100, 8])
    kwargs = dict(normalizer=normalizer, z_loss=0.1, label_smoothing=0.1)
    ours_input = x.clone().requires_grad_(True)
    ours = xloss.cross_entropy(ours_input, target, **kwargs)
    ref_input = x.double().requires_grad_(True)
    ref = reference_cross_entropy(ref_input, target, **kwargs)
    torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours_input.grad.double(), ref_input.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 2)])  # the thin eager path and the general one
@pytest.mark.parametrize("bad", [5, 99, -7])
def test_unchecked_out_of_range_target_with_weight_raises_xlosss_error(shape, bad):
    """validate_args=False with a class weight: the weighted mean's gather of w[y] must not
    fail first with torch's IndexError; the kernel's range report names the target."""
    torch.manual_seed(0)
    logits = torch.randn(*shape, requires_grad=True)
    target = torch.randint(0, 5, (shape[0],) + shape[2:])
    target.view(-1)[1] = bad
    weight = torch.rand(5) + 0.5
    with pytest.raises(ValueError, match=rf"found {bad} \(row "):
        xloss.cross_entropy(logits, target, weight=weight, class_dim=1, validate_args=False)
