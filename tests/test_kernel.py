"""The fused numba row kernel and the cross-entropy path through it, against float64."""

import sys
import time
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from concurrency import run_in_threads, torch_threads
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import xloss
from xloss.ops import kernel
from xloss.ops.kernel import row_loss, row_loss_and_grad, row_loss_and_grad_

# one unit in the last place of the half type, since the fp32 gradient is rounded once
HALF_TOLERANCE = {
    torch.float16: dict(rtol=1e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-7),
}

pytestmark = pytest.mark.skipif(not kernel.kernel_available(), reason="numba is unavailable")


def reference_row_loss(x, target, *, weight=None, eps=0.0, z=0.0, cap=None):
    """float64 per-row loss of the shared contract; a negative target drops its row."""
    num_classes = x.shape[1]
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    capped = x if cap is None else cap * torch.tanh(x / cap)
    lse = torch.logsumexp(capped, dim=1)
    kept = target >= 0
    y = target.clamp(min=0)
    loss = (1 - eps) * w[y] * (lse - capped.gather(1, y[:, None])[:, 0])
    if eps > 0:
        loss = loss + eps / num_classes * (w * (lse[:, None] - capped)).sum(1)
    if z > 0:
        loss = loss + z * lse**2
    return torch.where(kept, loss, 0.0)


def reference_rows(x, target, *, scale=1.0, **options):
    """float64 per-row loss and d(sum_i s_i loss_i)/dx, by autograd."""
    x = x.detach().double().requires_grad_()
    loss = reference_row_loss(x, target, **options)
    scale = torch.as_tensor(scale, dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss * scale).sum(), x)
    return loss.detach(), grad


def random_case(rows, classes, seed=0, dtype=torch.float32, spread=3.0):
    generator = torch.Generator().manual_seed(seed)
    x = (spread * torch.randn(rows, classes, generator=generator)).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=generator)
    return x, target


def check_rows(x, target, atol=2e-6, rtol=2e-5, **options):
    loss_ref, grad_ref = reference_rows(x, target, **options)
    kernel_options = dict(options)
    kernel_options["class_weight"] = kernel_options.pop("weight", None)
    kernel_options["label_smoothing"] = kernel_options.pop("eps", 0.0)
    kernel_options["z_loss"] = kernel_options.pop("z", 0.0)
    kernel_options["softcap"] = kernel_options.pop("cap", None)
    kernel_options["grad_scale"] = kernel_options.pop("scale", 1.0)
    grad = x.clone()
    loss = row_loss_and_grad_(grad, target, **kernel_options)
    assert loss.dtype == torch.float32 and loss.shape == (x.shape[0],)
    assert grad.dtype == x.dtype
    torch.testing.assert_close(loss.double(), loss_ref, atol=atol * 10, rtol=rtol)
    torch.testing.assert_close(grad.double(), grad_ref, atol=atol, rtol=rtol)
    return loss, grad


@pytest.fixture(params=["serial", "parallel"])
def launch_path(request, monkeypatch):
    """Run a test through the serial kernel (small problems) or the parallel one."""
    limit = 2**62 if request.param == "serial" else -1
    monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", limit)
    # the eager host call's threshold under the omp layer
    monkeypatch.setattr(kernel, "OMP_HOST_SERIAL_ELEMENTS", defaultdict(lambda: limit))
    return request.param


# 1024 and 1025: the last row length the short-row loop serves, and the first blocked one
@pytest.mark.parametrize("classes", [1, 2, 3, 1023, 1024, 1025, 32001])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_rows_match_float64_across_sizes(classes, eps, launch_path):
    x, target = random_case(3, classes, seed=classes)
    check_rows(x, target, eps=eps)


@pytest.mark.parametrize(
    "options",
    [
        dict(weight=True),
        dict(weight=True, eps=0.2),
        dict(z=1e-2),
        dict(cap=4.0),
        dict(cap=4.0, eps=0.1, z=1e-3, weight=True),
        dict(scale=0.25, eps=0.1),
        dict(scale="per_row", eps=0.1, weight=True),
    ],
    ids=lambda options: "-".join(sorted(options)),
)
@pytest.mark.parametrize("classes", [3, 1023, 1025])
def test_rows_every_option(options, classes, launch_path):
    x, target = random_case(6, classes, seed=1)
    target[2] = -1  # a dropped row
    options = dict(options)
    if options.get("weight"):
        options["weight"] = torch.rand(classes, generator=torch.Generator().manual_seed(5)) + 0.5
    if options.get("scale") == "per_row":
        options["scale"] = torch.linspace(0.5, 2.0, 6)
    loss, grad = check_rows(x, target, **options)
    assert loss[2] == 0 and bool((grad[2] == 0).all())


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    classes=st.integers(1, 70),
    eps=st.sampled_from([0.0, 0.05, 1.0]),
    z=st.sampled_from([0.0, 1e-2]),
    cap=st.sampled_from([None, 2.0]),
    weighted=st.booleans(),
    spread=st.sampled_from([0.1, 5.0, 60.0]),
    seed=st.integers(0, 2**16),
)
def test_rows_property_random_options(rows, classes, eps, z, cap, weighted, spread, seed):
    x, target = random_case(rows, classes, seed=seed, spread=spread)
    target[::3] = -1  # every third row dropped
    weight = (
        torch.rand(classes, generator=torch.Generator().manual_seed(seed)) if weighted else None
    )
    scale = torch.rand(rows, generator=torch.Generator().manual_seed(seed + 1))
    check_rows(x, target, eps=eps, z=z, cap=cap, weight=weight, scale=scale, atol=1e-5)


def test_rows_all_equal_logits():
    x = torch.full((4, 1000), 7.5)
    target = torch.tensor([0, 10, 999, 500])
    loss, grad = check_rows(x, target, eps=0.1)
    torch.testing.assert_close(loss, torch.full((4,), float(torch.log(torch.tensor(1000.0)))))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_rows_extreme_logits(eps):
    generator = torch.Generator().manual_seed(3)
    x = 1e4 * torch.randint(-1, 2, (4, 257), generator=generator).float()
    target = torch.tensor([0, 5, 100, 256])
    loss, grad = check_rows(x, target, eps=eps, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("classes", [300, 3000])  # one block; several (fully masked ones too)
def test_rows_masked_vocabulary_with_minus_inf(classes):
    x, target = random_case(5, classes, seed=7)
    visible = 2 * classes // 3
    x[:, visible:] = float("-inf")  # a vocabulary masked to its first 2/3
    x[1, : classes // 2] = float("-inf")
    target = target % (classes // 2)  # every target is a visible class
    target[1] = classes // 2 + 7
    loss, grad = check_rows(x, target, z=1e-3)
    assert bool((grad[:, visible:] == 0).all()) and bool((grad[1, : classes // 2] == 0).all())
    weight = torch.linspace(0.5, 1.5, classes)
    check_rows(x, target, weight=weight, scale=0.5)
    # smoothing spreads mass over the masked classes: the loss is infinite, as in float64
    smoothed = row_loss(x, target, label_smoothing=0.1)
    assert bool(torch.isinf(smoothed).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(eps=0.1, weight=True), dict(cap=3.0, z=1e-3)])
def test_rows_half_precision(dtype, options, launch_path):
    x, target = random_case(5, 1001, seed=11, dtype=dtype)
    x[0, :4] = torch.tensor([0.0, -0.0, 6e-8, 60000.0]).to(dtype)  # zeros, subnormal, large
    target[3] = -1
    if options.get("weight"):
        options = dict(options, weight=torch.linspace(0.5, 1.5, 1001))
    loss_ref, grad_ref = reference_rows(x, target, **options)
    grad = x.clone()
    loss = row_loss_and_grad_(
        grad,
        target,
        grad_scale=1.0,
        class_weight=options.get("weight"),
        label_smoothing=options.get("eps", 0.0),
        z_loss=options.get("z", 0.0),
        softcap=options.get("cap"),
    )
    assert grad.dtype == dtype
    # the loss is computed in fp32 from the exact half inputs; the gradient is rounded once
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(grad, grad_ref.to(dtype), **HALF_TOLERANCE[dtype])


def test_half_conversion_round_trips_special_values():
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 6e-8, 1e-6, 65504.0, -65504.0, 1 / 3])
    for dtype in (torch.float16, torch.bfloat16):
        # single-class rows: the loss is 0 and the gradient exactly 0 ...
        x = values.to(dtype)[:, None].clone()
        loss = row_loss_and_grad_(x, torch.zeros(len(values), dtype=torch.long), grad_scale=1.0)
        assert bool((x == 0).all()) and bool((loss == 0).all())
    # ... and the widening itself is exact: loss of [v, 0] with target 1 is log(1 + e^v)
    small = torch.tensor([[6e-8, 0.0], [-2.5, 0.0], [1 / 3, 0.0]])
    for dtype in (torch.float16, torch.bfloat16):
        rounded = small.to(dtype)
        loss = row_loss(rounded, torch.ones(3, dtype=torch.long))
        expected = torch.nn.functional.softplus(rounded.double()[:, 0])
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)


def test_small_problems_run_serially_and_match_the_parallel_kernel(monkeypatch):
    """fp32 problems of at most SERIAL_ELEMENTS logits, or with torch at one thread, skip
    numba's pool (its launch costs more than the work there); both kernels agree, with
    and without a gradient, out of place and in place, with statistics."""
    kernels = kernel._kernels()
    calls = []
    for name in ("rows_f32", "rows_f32_serial"):
        original = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
        )
    x, target = random_case(128, 4096, seed=3)  # exactly SERIAL_ELEMENTS logits
    target[5] = -1
    weight = torch.rand(4096, generator=torch.Generator().manual_seed(4)) + 0.5
    options = dict(label_smoothing=0.1, z_loss=1e-3, class_weight=weight)

    def every_call():
        stats = (torch.empty(128, 2), torch.empty(128, dtype=torch.long))
        in_place = x.clone()
        loss, grad = row_loss_and_grad(x, target, grad_scale=0.5, **options)
        grad = grad.clone()  # the pooled buffer is reused by the next call
        return (
            loss, grad, row_loss(x, target, **options),
            row_loss_and_grad_(in_place, target, grad_scale=0.5, stats=stats, **options),
            in_place, *stats,
        )  # fmt: skip

    serial = every_call()
    assert calls == ["rows_f32_serial"] * 3
    calls.clear()
    monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", 128 * 4096 - 1)
    parallel = every_call()
    assert calls == ["rows_f32"] * 3
    # the same row code, compiled into two kernels: sums may associate differently
    for got, want in zip(parallel, serial, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-8)
    calls.clear()
    with torch_threads(1):
        one_thread = every_call()
    for got, want in zip(one_thread, serial, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-8)
    assert calls == ["rows_f32_serial"] * 3
    loss_ref, grad_ref = reference_rows(
        x, target, scale=0.5, eps=0.1, z=1e-3, weight=weight
    )
    torch.testing.assert_close(serial[1].double(), grad_ref, atol=2e-7, rtol=1e-4)
    bad = target.clone()
    bad[7] = 4096
    for limit in (0, 2**62):  # an out-of-range target is reported by both kernels
        monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", limit)
        with pytest.raises(ValueError, match=r"found 4096 \(row 7 "):
            row_loss_and_grad(x, bad, grad_scale=1.0)


def test_out_of_place_and_forward_only_leave_logits_untouched():
    x, target = random_case(4, 50, seed=2)
    original = x.clone()
    loss, grad = row_loss_and_grad(x, target, grad_scale=0.5, label_smoothing=0.1)
    loss_only = row_loss(x, target, label_smoothing=0.1)
    assert torch.equal(x, original)
    loss_ref, grad_ref = reference_rows(x, target, scale=0.5, eps=0.1)
    torch.testing.assert_close(grad.double(), grad_ref, atol=2e-7, rtol=1e-5)
    torch.testing.assert_close(loss, loss_only)


@pytest.mark.parametrize(
    ("logits", "target", "scale", "error", "match"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), 1.0, ValueError, "2-D"),
        (torch.zeros(2, 3).double(), torch.zeros(2, dtype=torch.long), 1.0, TypeError, "float32"),
        (torch.zeros(3, 2).t(), torch.zeros(2, dtype=torch.long), 1.0, ValueError, "contiguous"),
        (torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), 1.0, ValueError, "shape \\(2,\\)"),
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32), 1.0, ValueError, "int64"),
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(3), ValueError, "1 or 2"),
    ],
)
def test_row_kernel_errors(logits, target, scale, error, match):
    with pytest.raises(error, match=match):
        row_loss_and_grad_(logits, target, grad_scale=scale)


# --- xloss.cross_entropy through the kernel ---------------------------------------------


def reference_cross_entropy(x, target, *, weight=None, keep=None, reduction="mean", **options):
    """float64 reduced loss for (N, C) or (N, T, C) logits with the class axis last."""
    classes = x.shape[-1]
    flat_target = target.reshape(-1).clone()
    if keep is not None:
        flat_target[~keep.reshape(-1)] = -1
    loss = reference_row_loss(x.reshape(-1, classes), flat_target, weight=weight, **options)
    kept = (flat_target >= 0).double()
    counts = kept if weight is None else kept * weight.double()[flat_target.clamp(min=0)]
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / counts.sum()
    per_sample = loss.reshape(target.shape[0], -1).sum(1)
    return per_sample / counts.reshape(target.shape[0], -1).sum(1)


def reference_grad(x, target, grad_output, **options):
    x = x.detach().double().requires_grad_()
    out = reference_cross_entropy(x, target, **options)
    (grad,) = torch.autograd.grad(out, x, grad_output.double())
    return out.detach(), grad


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "sample"])
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(label_smoothing=0.1, weight=True),
        dict(z_loss=1e-3, softcap=5.0, ignore=True),
        dict(label_smoothing=0.2, mask=True, weight=True, z_loss=1e-4),
    ],
    ids=["plain", "smooth-weight", "z-softcap-ignore", "mask-all"],
)
def test_cross_entropy_kernel_matches_float64(reduction, options):
    generator = torch.Generator().manual_seed(4)
    batch, steps, classes = 3, 5, 37
    x = 2 * torch.randn(batch, steps, classes, generator=generator)
    target = torch.randint(0, classes, (batch, steps), generator=generator)
    weight = torch.rand(classes, generator=generator) + 0.5 if options.get("weight") else None
    keep = torch.ones(batch, steps, dtype=torch.bool)
    kwargs = dict(
        reduction=reduction,
        label_smoothing=options.get("label_smoothing", 0.0),
        z_loss=options.get("z_loss", 0.0),
        softcap=options.get("softcap"),
    )
    if options.get("ignore"):
        target[0, 1] = -100
        keep[0, 1] = False
    mask = None
    if options.get("mask"):
        mask = torch.rand(batch, steps, generator=generator) > 0.3
        keep &= mask
    lengths = torch.tensor([5, 3, 4])
    keep &= torch.arange(steps) < lengths[:, None]

    logits = x.clone().requires_grad_()
    out = xloss.cross_entropy(
        logits, target, weight, class_dim=-1, mask=mask, lengths=lengths, **kwargs
    )
    grad_output = torch.rand(out.shape, generator=generator) + 0.5
    out.backward(grad_output)
    ref_kwargs = dict(eps=kwargs["label_smoothing"], z=kwargs["z_loss"], cap=kwargs["softcap"])
    expected, expected_grad = reference_grad(
        x, target, grad_output, weight=weight, keep=keep, reduction=reduction, **ref_kwargs
    )
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("grad_scale", [1.0, 2.5])
@pytest.mark.parametrize("normalizer", [None, 7.0])
def test_cross_entropy_kernel_class_dim_1_and_normalizer(grad_scale, normalizer):
    x, target = random_case(6, 11, seed=9)
    images = x.reshape(2, 3, 11).transpose(1, 2).contiguous()  # (N, C, d) with class_dim=1
    labels = target.reshape(2, 3)
    logits = images.clone().requires_grad_()
    out = xloss.cross_entropy(logits, labels, normalizer=normalizer, label_smoothing=0.1)
    (out * grad_scale).backward()
    rows = images.transpose(1, 2).reshape(6, 11)
    total = normalizer if normalizer is not None else 6.0
    scale = grad_scale / total
    loss_ref, grad_ref = reference_rows(rows, target, eps=0.1, scale=scale)
    assert out.item() == pytest.approx(loss_ref.sum().item() / total, rel=1e-6)
    torch.testing.assert_close(
        logits.grad.transpose(1, 2).reshape(6, 11).double(), grad_ref, atol=1e-7, rtol=1e-5
    )


def test_cross_entropy_matches_torch_and_empty_batch_is_zero():
    x, target = random_case(8, 20, seed=12)
    target[3] = -100
    for eps in (0.0, 0.1):
        ours = x.clone().requires_grad_()
        theirs = x.clone().requires_grad_()
        xloss.cross_entropy(ours, target, label_smoothing=eps).backward()
        F.cross_entropy(theirs, target, label_smoothing=eps).backward()
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5)
    empty = x.clone().requires_grad_()
    out = xloss.cross_entropy(empty, torch.full((8,), -100))
    out.backward()
    assert out.item() == 0 and bool((empty.grad == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropy_half_inputs(dtype):
    x, target = random_case(6, 40, seed=13, dtype=dtype)
    logits = x.clone().requires_grad_()
    out = xloss.cross_entropy(logits, target, label_smoothing=0.1)
    out.backward()
    assert out.dtype == dtype and logits.grad.dtype == dtype
    loss_ref, grad_ref = reference_rows(x, target, eps=0.1, scale=1 / 6)
    torch.testing.assert_close(out.double(), loss_ref.mean(), rtol=1e-2, atol=0.0)
    torch.testing.assert_close(logits.grad, grad_ref.to(dtype), **HALF_TOLERANCE[dtype])


def test_no_gradient_is_written_without_grad(monkeypatch):
    """The eager host path's kernel (host_rows_f32) and every other fp32 launch (through
    run_f32) are asked for no gradient without grad mode or a logit that requires one."""
    destinations = []
    run = kernel.run_f32
    kernels = kernel._kernels()
    host_rows = kernels.host_rows_f32

    def spy(kernels, source, dest, *args, **options):
        destinations.append(dest)
        return run(kernels, source, dest, *args, **options)

    def host_spy(source, dest, *args):
        write = args[9]  # after target, ignore_index, has_ignore, weight, eps, z, cap, scale, mean
        destinations.append(None if not write and dest.size == 0 else dest)
        return host_rows(source, dest, *args)

    monkeypatch.setattr(kernel, "run_f32", spy)
    monkeypatch.setattr(kernels, "host_rows_f32", host_spy)
    x, target = random_case(4, 9, seed=1)
    with torch.no_grad():
        xloss.cross_entropy(x.requires_grad_(), target)
    xloss.cross_entropy(x.detach(), target)
    xloss.cross_entropy(x.detach(), target, inplace_backward=True)
    assert destinations == [None, None, None]
    xloss.cross_entropy(x.detach().requires_grad_(), target)
    assert destinations[-1] is not None and destinations[-1].shape == (4, 9)


def test_inplace_backward_writes_into_logits_and_bumps_version():
    x, target = random_case(5, 13, seed=6)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # an intermediate whose storage the loss may reuse
    version = logits._version
    out = xloss.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=True)
    assert logits._version > version
    _, grad_ref = reference_rows(x, target, eps=0.1, scale=1 / 5)
    torch.testing.assert_close(logits.detach().double(), grad_ref, atol=1e-7, rtol=1e-5)
    (out * 3).backward()
    torch.testing.assert_close(leaf.grad.double(), 3 * grad_ref, atol=3e-7, rtol=1e-5)
    module = xloss.CrossEntropyLoss(inplace_backward=True, reduction="sum", label_smoothing=0.1)
    again = leaf * 1.0
    module(again, target).backward()
    torch.testing.assert_close(again.detach().double(), 5 * grad_ref, atol=1e-6, rtol=1e-5)


def test_inplace_backward_raises_when_a_saved_tensor_would_be_corrupted():
    x, target = random_case(4, 6, seed=8)
    leaf = x.clone().requires_grad_()
    logits = leaf.exp()  # exp saves its output for backward
    out = xloss.cross_entropy(logits, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_inplace_backward_with_class_dim_1_copies_and_keeps_input():
    x, target = random_case(6, 11, seed=10)
    images = x.reshape(2, 3, 11).transpose(1, 2).contiguous()  # (N, C, d)
    leaf = images.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf (a leaf raises)
    out = xloss.cross_entropy(logits, target.reshape(2, 3), inplace_backward=True)
    out.backward()
    assert torch.equal(logits.detach(), images)
    _, grad_ref = reference_rows(x, target, scale=1 / 6)
    torch.testing.assert_close(
        leaf.grad.transpose(1, 2).reshape(6, 11).double(), grad_ref, atol=1e-7, rtol=1e-5
    )


def test_torch_compile_fullgraph_traces_the_kernel(monkeypatch):
    monkeypatch.setattr(kernel, "_loaded", {})  # as in a fresh process: numba not loaded yet
    x, target = random_case(4, 10, seed=14)

    def loss_fn(logits, labels):
        options = dict(label_smoothing=0.1, validate_args=False)
        out_of_place = xloss.cross_entropy(logits, labels, **options)
        in_place = xloss.cross_entropy(logits * 2.0, labels, inplace_backward=True, **options)
        return out_of_place + in_place

    # aot_eager runs dynamo and AOT autograd (fake tensors, the ops' autograd) without
    # inductor's code generation, which would take minutes on two cores
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    logits = x.clone().requires_grad_()
    out = compiled(logits, target)
    out.backward()
    loss_ref, grad_ref = reference_rows(x, target, eps=0.1, scale=1 / 4)
    loss_ref2, grad_ref2 = reference_rows(2 * x, target, eps=0.1, scale=1 / 4)
    torch.testing.assert_close(
        out.double(), loss_ref.mean() + loss_ref2.mean(), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(logits.grad.double(), grad_ref + 2 * grad_ref2, atol=1e-7, rtol=1e-5)


def test_without_numba_the_portable_path_runs_and_warns_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "xloss.ops._numba_rows", None)  # import now fails
    monkeypatch.setattr(kernel, "_loaded", {})
    x, target = random_case(4, 10, seed=15)
    logits = x.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="numba is unavailable"):
        out = xloss.cross_entropy(logits, target, label_smoothing=0.1)
    assert not kernel.kernel_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xloss.cross_entropy(x, target)  # no second warning
    out.backward()
    loss_ref, grad_ref = reference_rows(x, target, eps=0.1, scale=1 / 4)
    torch.testing.assert_close(out.double(), loss_ref.mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits.grad.double(), grad_ref, atol=1e-7, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unavailable"):
        row_loss(x, target)


def test_gradient_buffer_is_reused_only_when_free():
    kernel.release_buffers()
    first = kernel.gradient_buffer((30, 40), torch.float32)
    pointer = first.data_ptr()
    view = first[1:]
    del first
    busy = kernel.gradient_buffer((30, 40), torch.float32)  # `view` still uses the buffer
    assert busy.data_ptr() != pointer
    pointer = busy.data_ptr()
    del busy, view
    again = kernel.gradient_buffer((30, 40), torch.float32)
    assert again.data_ptr() == pointer and again.shape == (30, 40)
    half = kernel.gradient_buffer((30, 40), torch.bfloat16)  # another size: a new buffer
    assert half.dtype == torch.bfloat16 and half.data_ptr() != pointer
    kernel.release_buffers()


def test_inplace_backward_on_a_strided_slice_leaves_the_base_untouched():
    x, target = random_case(4, 20, seed=16)
    leaf = x.clone().requires_grad_()
    base = leaf * 1.0  # a non-leaf (a view of a leaf raises)
    logits = base[:, :13]  # rows of 13 classes inside rows of 20: not contiguous
    out = xloss.cross_entropy(logits, target % 13, inplace_backward=True)
    out.backward()
    assert torch.equal(base.detach(), x)
    _, grad_ref = reference_rows(x[:, :13], target % 13, scale=1 / 4)
    torch.testing.assert_close(leaf.grad[:, :13].double(), grad_ref, atol=1e-7, rtol=1e-5)
    assert bool((leaf.grad[:, 13:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_with_no_rows(dtype):
    logits = torch.zeros(0, 5, dtype=dtype, requires_grad=True)
    out = xloss.cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0 and logits.grad.shape == (0, 5)
    none = xloss.cross_entropy(logits, torch.zeros(0, dtype=torch.long), reduction="none")
    assert none.shape == (0,)


def test_inplace_backward_must_be_a_bool():
    with pytest.raises(TypeError, match="`inplace_backward` must be a bool, got str"):
        xloss.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), inplace_backward="yes")


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: under it the custom op path runs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(reduction="sum", label_smoothing=0.1),
        dict(weight=True, z_loss=1e-3),
        dict(normalizer=7.0),
        dict(reduction="none", softcap=3.0),
        dict(reduction="sample", mask=True),
        dict(all_ignored=True),
        dict(return_stats=True, weight=True),
        # (N, C) input: the thin host path (host_cross_entropy)
        dict(rows=True),
        dict(rows=True, reduction="sum", label_smoothing=0.1, ignore_index=None),
        dict(rows=True, weight=True, z_loss=1e-3),
        dict(rows=True, normalizer=7.0, softcap=3.0),
        dict(rows=True, reduction="none", label_smoothing=0.2),
        dict(rows=True, all_ignored=True),
        dict(rows=True, all_ignored=True, weight=True),
        dict(rows=True, validate_args=False),
    ],
    ids=str,
)
def test_eager_host_calls_match_the_custom_op_path(options):
    """Eager calls on plain CPU tensors skip the custom op (HostFusedCrossEntropy, the
    mean's factor as a float, numpy index checks); under a dispatch mode, as under
    tracing, the op runs. Both give the same bits, forward and backward."""
    options = dict(options)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(4, 5, 37, generator=generator)
    target = torch.randint(0, 37, (4, 5), generator=generator)
    target[1, 2] = -100
    if options.pop("all_ignored", False):
        target[:] = -100
    if options.pop("weight", False):
        options["weight"] = torch.rand(37, generator=generator) + 0.5
    if options.pop("mask", False):
        options["mask"] = torch.rand(4, 5, generator=generator) > 0.3
    if options.pop("rows", False):
        x, target = x.reshape(20, 37), target.reshape(20)
    if options.get("ignore_index", -100) is None:
        target = torch.where(target == -100, 3, target)

    def run():
        logits = x.clone().requires_grad_()
        out = xloss.cross_entropy(logits, target, class_dim=-1, **options)
        loss = out.loss if isinstance(out, tuple) else out
        (loss * torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)).sum().backward()
        name = type(loss.grad_fn).__name__ if loss.grad_fn is not None else ""
        return tuple(out) if isinstance(out, tuple) else (out,), logits.grad, name

    eager, eager_grad, eager_node = run()
    with _PassThrough():
        traced, traced_grad, traced_node = run()
    host = ("HostFusedCrossEntropy", "HostCallCrossEntropy")  # the general path's, the host call's
    assert eager_node.startswith(host) or options.get("reduction") in ("none", "sample")
    assert not traced_node.startswith(host)
    for got, want in zip(eager, traced, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(eager_grad, traced_grad)
    keep = target != -100 if options.get("ignore_index", -100) is not None else None
    reference = reference_cross_entropy(
        x, target, keep=keep if "mask" not in options else keep & options["mask"],
        reduction=options.get("reduction", "mean"),
        weight=options.get("weight"), eps=options.get("label_smoothing", 0.0),
        z=options.get("z_loss", 0.0), cap=options.get("softcap"),
    ) if "normalizer" not in options else None  # fmt: skip
    if reference is not None:  # an empty mean is 0 in xloss (0/0 in the reference)
        reference = torch.nan_to_num(reference, nan=0.0)
        torch.testing.assert_close(eager[0].double(), reference, atol=1e-5, rtol=1e-5)


def test_host_path_serves_plain_rows_and_nothing_else(monkeypatch):
    """Plain (N, C) fp32, fp16 and bf16 calls, (..., C) input with the class axis last
    and a bool mask (folded into the targets as ignore_index) take host_cross_entropy;
    anything it does not handle (a mask without an ignore_index, int32 targets, float64,
    a learnable weight, ...) takes the general path; all give the reference's number."""
    from xloss.ops import fused_cross_entropy

    served = []
    host = fused_cross_entropy.host_cross_entropy
    monkeypatch.setattr(
        sys.modules["xloss.functional.cross_entropy"],
        "host_cross_entropy",
        lambda *a, **k: served.append(True) or host(*a, **k),
    )
    x, target = random_case(6, 11, seed=5)
    target[2] = -100
    weight = torch.rand(11, generator=torch.Generator().manual_seed(6)) + 0.5
    calls = {
        "plain": (x, target, {}),
        "class_dim=-1": (x, target, dict(class_dim=-1)),
        "weight": (x, target, dict(weight=weight)),
        "normalizer": (x, target, dict(normalizer=4.0, reduction="sum")),
        "mask": (x, target, dict(mask=target != 1)),
        "mask, no ignore_index": (x, target.clamp(min=0), dict(mask=target != 1,
                                                               ignore_index=None)),
        "3-D": (x.reshape(2, 3, 11), target.reshape(2, 3), dict(class_dim=-1)),
        "3-D mask none": (x.reshape(2, 3, 11), target.reshape(2, 3),
                          dict(class_dim=-1, mask=(target != 1).reshape(2, 3), reduction="none")),
        "3-D class_dim=1": (x.reshape(2, 11, 3), target.reshape(2, 3), {}),
        "int32": (x, target.int(), {}),
        "fp16": (x.half(), target, {}),
        "bf16": (x.bfloat16(), target, {}),
        "float64": (x.double(), target, {}),
        "learnable weight": (x, target, dict(weight=weight.clone().requires_grad_())),
        "tensor normalizer": (x, target, dict(normalizer=torch.tensor(4.0))),
        "sample": (x, target, dict(reduction="sample")),
        "strided": (torch.randn(11, 6).T, target, {}),
    }
    for name, (logits, labels, options) in calls.items():
        served.clear()
        out = xloss.cross_entropy(logits, labels, **options)
        host_calls = ("plain", "class_dim=-1", "weight", "normalizer", "fp16", "bf16", "mask",
                      "3-D", "3-D mask none")  # fmt: skip
        assert served == ([True] if name in host_calls else []), name
        assert out.dtype == logits.dtype, name
        rows = logits.reshape(-1, 11).double() if name != "strided" else logits.double()
        if name == "3-D class_dim=1":
            rows = logits.transpose(1, 2).reshape(-1, 11).double()
        want = F.cross_entropy(
            rows, labels.reshape(-1).long(), reduction=options.get("reduction", "mean")
            if options.get("reduction") != "sample" else "none",
            weight=None if "weight" not in options else options["weight"].detach().double(),
        )  # fmt: skip
        if name in ("normalizer", "tensor normalizer"):
            want = F.cross_entropy(rows, labels.long(), reduction="sum") / 4.0
        if name.startswith("mask"):
            keep = (target != 1) & (labels != -100)
            want = F.cross_entropy(rows[keep], labels[keep])
        if name == "3-D mask none":
            flat = labels.reshape(-1)
            keep = (flat != 1) & (flat != -100)
            want = torch.zeros(6, dtype=torch.float64)
            want[keep] = F.cross_entropy(rows[keep], flat[keep], reduction="none")
            want = want.reshape(2, 3)
        # "sample" on (N, C): one position per sample, so each sample's mean is its row
        tolerance = {"fp16": dict(atol=2e-3, rtol=2e-3), "bf16": dict(atol=2e-2, rtol=2e-2)}.get(
            name, dict(atol=1e-5, rtol=1e-5)
        )
        torch.testing.assert_close(out.double(), want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_path_half_precision_matches_float64(dtype):
    """fp16/bf16 logits on the host path: the loss in the input's dtype (float32 under
    autocast, as F.cross_entropy), values and gradients against float64 for each
    reduction, with a class weight, ignored rows and smoothing."""
    x, target = random_case(9, 37, seed=8)
    target[4] = -100
    weight = torch.rand(37, generator=torch.Generator().manual_seed(9)) + 0.5
    half = x.to(dtype)
    tolerance = HALF_TOLERANCE[dtype]
    for reduction in ["mean", "sum", "none"]:
        logits = half.clone().requires_grad_()
        loss = xloss.cross_entropy(logits, target, weight=weight, label_smoothing=0.1,
                                   reduction=reduction)  # fmt: skip
        assert loss.dtype == dtype
        ref = half.double().requires_grad_()
        want = F.cross_entropy(ref, target, weight=weight.double(), label_smoothing=0.1,
                               reduction=reduction)  # fmt: skip
        torch.testing.assert_close(loss.double(), want, rtol=1e-2, atol=1e-3)
        factors = torch.linspace(0.5, 1.5, max(loss.numel(), 1))
        (loss.float() * factors.reshape(loss.shape)).sum().backward()
        (want * factors.double().reshape(want.shape)).sum().backward()
        torch.testing.assert_close(logits.grad, ref.grad.to(dtype), **tolerance)
    with torch.autocast("cpu", dtype=dtype):
        assert xloss.cross_entropy(half, target).dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_host_path_on_an_empty_batch(reduction):
    x = torch.randn(0, 7, requires_grad=True)
    out = xloss.cross_entropy(x, torch.zeros(0, dtype=torch.long), reduction=reduction,
                              label_smoothing=0.1)  # fmt: skip
    assert out.shape == ((0,) if reduction == "none" else ())
    assert torch.all(out == 0)
    out.sum().backward()
    assert x.grad.shape == (0, 7)


def test_host_path_all_rows_ignored_gives_zero_and_a_zero_gradient():
    x = torch.randn(4, 7, requires_grad=True)
    out = xloss.cross_entropy(x, torch.full((4,), -100), weight=torch.rand(7) + 0.5)
    assert out.item() == 0.0
    out.backward()
    assert torch.all(x.grad == 0)


def test_host_path_logits_changed_in_place_after_the_loss():
    """Small logits are the second-order anchor themselves, kept as a plain attribute,
    not saved: changing them in place after the loss (the gradient is already computed)
    does not make the backward raise, and the gradient is that of the original logits."""
    x, target = random_case(5, 9, seed=7)
    logits = x.clone().requires_grad_()
    hidden = logits * 1.0
    loss = xloss.cross_entropy(hidden, target)
    hidden.mul_(100.0)
    loss.backward()
    _, grad_ref = reference_rows(x, target, scale=1 / 5)
    torch.testing.assert_close(logits.grad.double(), grad_ref, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("small", [True, False])
def test_host_path_second_backward_raises_and_large_logits_are_not_kept(monkeypatch, small):
    """Under create_graph=True the gradient raises when differentiated again, with the
    logits as anchor (small) or grad_anchor's 0-dim tensor (large: the graph then keeps no
    reference to the logits)."""
    import weakref

    from xloss.ops import fused_cross_entropy

    if not small:
        monkeypatch.setattr(fused_cross_entropy, "_SMALL_ANCHOR_ELEMENTS", 0)
    hidden = torch.randn(6, 4)
    weight = torch.randn(5, 4, requires_grad=True)
    logits = hidden @ weight.T
    alive = weakref.ref(logits)
    loss = xloss.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 4, 0]))
    del logits
    assert (alive() is not None) == small
    (grad_weight,) = torch.autograd.grad(loss, weight, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        grad_weight.square().sum().backward()


def test_eager_host_call_with_a_tensor_subclass_takes_the_op():
    """A tensor subclass never reaches numpy: it goes through the custom op."""

    class Tagged(torch.Tensor):
        pass

    x = torch.randn(6, 9).as_subclass(Tagged).requires_grad_()
    target = torch.tensor([0, 1, 2, -100, 4, 8])
    loss = xloss.cross_entropy(x, target)
    loss.backward()
    want = F.cross_entropy(x.detach().as_subclass(torch.Tensor).double().requires_grad_(),
                           target)  # fmt: skip
    torch.testing.assert_close(loss.double().as_subclass(torch.Tensor), want)


def test_four_threads_on_the_serial_kernel():
    """Small problems run in the calling thread without the launch lock: four Python
    threads at once each get their own numbers."""

    def work(seed):
        x, target = random_case(64, 100, seed=seed)
        target[::7] = -100
        want = F.cross_entropy(x.double(), target)
        for _ in range(30):
            logits = x.clone().requires_grad_()
            loss = xloss.cross_entropy(logits, target, label_smoothing=0.0)
            loss.backward()
            torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-6)
            ref = x.double().requires_grad_()
            F.cross_entropy(ref, target).backward()
            torch.testing.assert_close(logits.grad.double(), ref.grad, atol=1e-7, rtol=1e-5)

    run_in_threads(work, range(30, 34))


def test_jit_trace_and_inference_mode_take_the_traceable_path():
    """Under torch.jit.trace the numpy reads of the eager host path would be recorded as
    constants: the traced function must follow new targets; inference mode works."""
    x = torch.randn(6, 9)
    target = torch.tensor([0, 1, 2, -100, 4, 8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace's deprecation and bool-conversion notes
        traced = torch.jit.trace(lambda a, b: xloss.cross_entropy(a, b), (x, target),
                                 check_trace=False)  # fmt: skip
    other_x, other_target = torch.randn(6, 9), torch.tensor([3, -100, 0, 5, -100, 1])
    want = F.cross_entropy(other_x.double(), other_target)
    torch.testing.assert_close(traced(other_x, other_target).double(), want)
    with torch.inference_mode():
        torch.testing.assert_close(xloss.cross_entropy(x, target).double(),
                                   F.cross_entropy(x.double(), target))  # fmt: skip


def test_gradient_buffer_is_never_handed_to_two_threads(monkeypatch):
    """The pooled buffer's free test and its handout happen under one lock: with Python
    switching threads between them, two threads wrote into one buffer. The free test is
    slowed down here (a thread switch inside it) so that the race would show."""
    import types

    def slow_refcount(obj):
        time.sleep(1e-4)
        return sys.getrefcount(obj) - 1  # minus this function's own reference

    monkeypatch.setattr(kernel, "sys", types.SimpleNamespace(getrefcount=slow_refcount))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work(value):
        for _ in range(100):
            buffer = kernel.gradient_buffer((4, 1024), torch.float32)
            buffer.fill_(value)
            time.sleep(0)  # let the others run while this one holds the buffer
            assert bool((buffer == value).all()), f"another thread wrote into {value}'s buffer"
            del buffer

    try:
        run_in_threads(work, [float(i) for i in range(6)], timeout=60)
    finally:
        sys.setswitchinterval(interval)


def test_polynomial_exp_within_three_ulp_and_exact_at_zero():
    """The kernels' exp (rows and the binary family): within 3 ulp of float64 over
    [-86, 0], exactly 1 at 0 (a row's largest logit; a one-class row's loss is 0) and
    exactly 0 at and below the flush point, -inf (a masked logit) included."""
    import numba
    import numpy as np

    from xloss.ops import _numba_rows

    exp = numba.njit(lambda t: np.array([_numba_rows._exp_nonpositive(v) for v in t]))
    t = -np.concatenate([np.linspace(0.0, 85.99, 400_001), np.geomspace(1e-30, 1.0, 2001)])
    t = t.astype(np.float32)
    got = exp(t).astype(np.float64)
    want = np.exp(t.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert float(np.max(np.abs(got - want) / ulp)) <= 3.0
    edges = exp(np.array([0.0, -0.0, -86.0, -86.5, -1e4, -np.inf], dtype=np.float32))
    assert edges.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("classes", [1, 2, 17, 1024, 1025])  # short-row loop, then blocked
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_logits_give_nan_rows_as_torch(classes, dtype):
    """A NaN (either sign: a negative NaN's bits order below -inf in the integer max) or
    +inf logit anywhere in a row, the target's column included: NaN loss and an all-NaN
    gradient row, as F.cross_entropy; the other rows keep their float64 values. Out of
    place, in place and without grad, with smoothing and class weights."""
    nan = float("nan")
    x, target = random_case(7, classes, seed=classes, dtype=dtype)
    x = x.float()
    x[1, 0] = nan
    x[2, classes - 1] = -nan
    x[3, classes // 2] = float("inf")
    x[4, target[4]] = nan
    x[5, : classes // 2] = -nan  # with -inf: no finite logit, but a NaN
    x[5, classes // 2 :] = float("-inf")
    x = x.to(dtype)
    assert torch.signbit(x[2, classes - 1]) and x[2, classes - 1].isnan()
    clean = [0, 6]
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=0)
    grad_tolerance = HALF_TOLERANCE.get(dtype, tolerance)
    for weight, eps in [(None, 0.0), (torch.linspace(0.5, 1.5, classes), 0.1)]:
        weight64 = None if weight is None else weight.double()
        expected = F.cross_entropy(x.double(), target, weight64, reduction="none",
                                   label_smoothing=eps)  # fmt: skip
        assert expected[1:6].isnan().all() and expected[clean].isfinite().all()
        ref = x[clean].double().requires_grad_()
        F.cross_entropy(ref, target[clean], weight64, reduction="sum",
                        label_smoothing=eps).backward()  # fmt: skip
        for mode in ["out_of_place", "in_place", "no_grad"]:
            leaf = x.clone().requires_grad_(mode != "no_grad")
            logits = leaf * 1.0 if mode == "in_place" else leaf
            with torch.set_grad_enabled(mode != "no_grad"):
                loss = xloss.cross_entropy(logits, target, weight, reduction="none",
                                           label_smoothing=eps,
                                           inplace_backward=mode == "in_place")  # fmt: skip
            assert torch.equal(loss.isnan(), expected.isnan()), mode
            torch.testing.assert_close(loss[clean].double(), expected[clean], **tolerance)
            if mode == "no_grad":
                continue
            loss.sum().backward()
            assert leaf.grad[1:6].isnan().all(), mode
            torch.testing.assert_close(leaf.grad[clean].double(), ref.grad, **grad_tolerance)


def test_held_gradients_survive_later_calls_of_the_same_byte_count():
    """The gradient pool hands out its buffer again only when nothing holds it: keep each
    call's x.grad while later calls of other shapes and dtypes with the same byte count
    (96) run, out of place, then check every kept gradient against float64."""
    kernel.release_buffers()
    cases = [
        ((4, 6), torch.float32),
        ((6, 4), torch.float32),
        ((4, 12), torch.bfloat16),
        ((12, 4), torch.float16),
        ((24, 1), torch.float32),
        ((4, 6), torch.float32),
    ]
    kept = []
    for seed, (shape, dtype) in enumerate(cases):
        x, target = random_case(*shape, seed=40 + seed, dtype=dtype)
        leaf = x.clone().requires_grad_()
        xloss.cross_entropy(leaf, target, reduction="sum", label_smoothing=0.1).backward()
        assert leaf.grad.shape == shape and leaf.grad.dtype == dtype
        kept.append((x, target, leaf.grad))
        # a throwaway call of the same shape: the held gradient is busy, so a new buffer
        again = x.clone().requires_grad_()
        xloss.cross_entropy(again, target, reduction="sum").backward()
        assert again.grad.data_ptr() != leaf.grad.data_ptr()
    for x, target, grad in kept:
        _, grad_ref = reference_rows(x.float(), target, eps=0.1)
        tolerance = HALF_TOLERANCE.get(x.dtype, dict(rtol=1e-5, atol=1e-7))
        torch.testing.assert_close(grad, grad_ref.to(x.dtype), **tolerance)
    kernel.release_buffers()


# fp16/bf16 short rows, many of them: per-row scales, dropped rows, the loss alone, and
# an out-of-range target late in the batch reported with its own row
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("classes", [1, 7, 300, 1024])
def test_half_short_rows_many(dtype, classes, launch_path):
    x, target = random_case(301, classes, seed=classes, dtype=dtype)
    target[[5, 150]] = -1  # dropped rows
    weight = torch.linspace(0.5, 1.5, classes)
    scale = torch.linspace(0.1, 2.0, 301)  # per row
    loss_ref, grad_ref = reference_rows(x, target, weight=weight, eps=0.1, scale=scale)
    grad = x.clone()
    options = dict(class_weight=weight, label_smoothing=0.1)
    loss = row_loss_and_grad_(grad, target, grad_scale=scale, **options)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(grad, grad_ref.to(dtype), **HALF_TOLERANCE[dtype])
    assert bool((grad[[5, 150]] == 0).all())
    only_loss = row_loss(x, target, **options)
    torch.testing.assert_close(only_loss.double(), loss_ref, rtol=2e-5, atol=1e-4)
    bad = target.clone()
    bad[287] = classes + 5  # reported as itself, with its row, from a late group
    with pytest.raises(ValueError, match=rf"found {classes + 5} \(row 287 "):
        row_loss_and_grad_(x.clone(), bad, grad_scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 17, 70])
def test_half_short_rows_match_the_fp32_rows_of_the_widened_logits(dtype, rows, launch_path):
    """fp16/bf16 rows of at most BLOCK classes run the fp32 short-row passes on groups of
    widened rows (a partial last group at 17 rows, more rows than the parallel kernel's
    64 blocks at 70): loss and gradient are the fp32 kernel's on the widened logits,
    rounded once (within one unit in the last place: the serial and parallel fp32 loops
    may sum in different orders)."""
    gen = torch.Generator().manual_seed(rows)
    x = (3 * torch.randn(rows, 300, generator=gen)).to(dtype)
    target = torch.randint(0, 300, (rows,), generator=gen)
    target[::4] = -100
    weight = torch.rand(300, generator=gen) + 0.5
    smoothed = dict(label_smoothing=0.1, weight=weight, z_loss=1e-3)
    for options in ({}, smoothed, dict(reduction="sum")):
        logits = x.clone().requires_grad_()
        loss = xloss.cross_entropy(logits, target, **options)
        loss.backward()
        wide = x.float().requires_grad_()
        expected = xloss.cross_entropy(wide, target, **options)
        expected.backward()
        torch.testing.assert_close(loss, expected.to(dtype), **HALF_TOLERANCE[dtype])
        torch.testing.assert_close(logits.grad, wide.grad.to(dtype), **HALF_TOLERANCE[dtype])


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return " avx512f" in cpuinfo.read()
    except OSError:
        return False


def test_the_row_loops_ask_llvm_for_512_bit_vectors():
    """Regression: LLVM's tuning for Intel's AVX-512 cores stops its vectoriser at 256 bits, and
    the kernels ran at half the width the CPU has (BCE 2.1x, ASL 2.5x slower on one
    thread, cross-entropy at 4096 x 32000 1.1x). The loops' functions now carry
    "prefer-vector-width"="512"; on an AVX-512 CPU their code uses zmm registers.

    The kernels come from the disk cache, whose code numba does not show, so the loops are
    compiled afresh here from the same Python functions."""
    import numba
    import numpy as np

    from xloss.ops import _numba_binary, _numba_rows

    rows, classes = 3, 40
    short_rows = numba.njit(fastmath=_numba_rows.FASTMATH)(_numba_rows._short_rows_range.py_func)
    short_rows(
        0, rows, np.empty((0, 0), np.float32), np.random.rand(rows, classes).astype(np.float32),
        np.zeros(rows, np.int64), np.ones(1, np.float32), np.empty(0, np.float32),
        np.float32(0.0), np.float32(0.0), False, True, np.empty(rows, np.float32),
        np.array([-1], np.int64),
    )  # fmt: skip
    row = _numba_binary._ROWS[_numba_binary.BCE]

    @numba.njit(fastmath=_numba_rows.FASTMATH)
    def bce_row(src, target, out, weight, keep, pos_col):
        return row(src, target, out, weight, keep, pos_col, np.float32(1.0), np.float32(1.0),
                   np.float32(0.0), False, False, np.float32(0.0), np.float32(0.0),
                   np.float32(0.0))  # fmt: skip

    ones, zeros = np.ones(classes, np.float32), np.zeros(classes, np.float32)
    keep = np.ones(classes, np.bool_)
    total, _ = bce_row(zeros, zeros, np.empty(classes, np.float32), ones, keep, ones)
    assert total == pytest.approx(classes * np.log(2.0), rel=1e-6)  # s(0) = 1/2 everywhere
    for compiled in (short_rows, bce_row):
        (signature,) = compiled.signatures
        assert '"prefer-vector-width"="512"' in compiled.inspect_llvm(signature)
        if _has_avx512():
            assert "zmm" in compiled.inspect_asm(signature)


def _float64_cross_entropy(x, target, weight, ignore_index, reduction, eps):
    """F.cross_entropy in float64 (its semantics are xloss's on these calls), with the
    mean over no kept row 0 as xloss defines it."""
    keep = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        keep = target != ignore_index
    index = torch.where(keep, target, 0)
    w = None if weight is None else weight.double()
    rows = F.cross_entropy(x.double(), index, weight=w, reduction="none", label_smoothing=eps)
    rows = torch.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    denominator = keep.double().sum() if w is None else torch.where(keep, w[index], 0.0).sum()
    return rows.sum() / denominator if denominator > 0 else rows.sum() * 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize(
    "ignore_index, reduction, weighted",
    [(-100, "mean", False), (0, "mean", True), (3, "sum", False), (None, "none", True),
     (2, "mean", False)],
)  # fmt: skip
def test_host_call_kernel_checks_counts_and_reduces(
    monkeypatch, dtype, parallel, ignore_index, reduction, weighted
):
    """The host call's one kernel (targets checked, kept rows counted or their weights
    summed, rows run, loss reduced), serial and parallel, against float64: an ignore_index
    that is a valid class (0, 3) drops its rows; all rows ignored gives 0 and a zero
    gradient."""
    kernels, launched = kernel._kernels(), []
    entry = "host_rows_f32" if dtype == torch.float32 else "host_rows_half"
    if parallel:
        monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", 0)
        monkeypatch.setitem(kernel.OMP_HOST_SERIAL_ELEMENTS, dtype, 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        entry += "_parallel"
    launch = getattr(kernels, entry)
    monkeypatch.setattr(kernels, entry, lambda *args: launched.append(entry) or launch(*args))
    x, target = random_case(37, 11, seed=21, dtype=dtype)
    if ignore_index is not None:
        target[::4] = ignore_index
    if ignore_index == 2:
        target[:] = 2  # nothing kept
    weight = torch.rand(11, generator=torch.Generator().manual_seed(3)) + 0.5 if weighted else None
    logits = x.clone().requires_grad_()
    out = xloss.cross_entropy(logits, target, weight, ignore_index=ignore_index,
                              reduction=reduction, label_smoothing=0.05)  # fmt: skip
    upstream = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape).to(out.dtype)
    (out * upstream).sum().backward()
    reference_input = x.double().requires_grad_()
    want = _float64_cross_entropy(reference_input, target, weight, ignore_index, reduction, 0.05)
    (want * upstream.double()).sum().backward()
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else HALF_TOLERANCE[dtype]
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, atol=bound, rtol=bound)
    torch.testing.assert_close(logits.grad, reference_input.grad.to(dtype), **tolerance)
    assert launched == [entry]
    if ignore_index == 2:
        assert out.item() == 0.0 and not logits.grad.any()


@pytest.mark.parametrize("validate_args", [True, False])
@pytest.mark.parametrize("bad", [11, -3])
def test_host_call_raises_on_a_kept_target_out_of_range(validate_args, bad):
    """A kept target outside [0, C) raises before any row is computed, with the range
    check's message (validate_args) or the kernel's; an ignored row with that value does
    not."""
    x, target = random_case(6, 11, seed=2)
    target[4] = bad
    logits = x.clone().requires_grad_()
    message = "found -3 \\(row 4" if bad < 0 and not validate_args else f"found {bad}"
    with pytest.raises(ValueError, match=message):
        xloss.cross_entropy(logits, target, validate_args=validate_args)
    assert logits.grad is None
    out = xloss.cross_entropy(logits, target, ignore_index=bad, validate_args=validate_args)
    keep = target != bad
    want = F.cross_entropy(x.double()[keep], target[keep])
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)


def test_checked_settings_are_kept_per_type_and_value():
    """The settings of a call are checked once per combination of values and types: a
    bool that equals an accepted int still raises, and so do NaN and unhashable values
    after a valid call."""
    x, target = random_case(4, 5, seed=3)
    good = xloss.cross_entropy(x, target, label_smoothing=1, z_loss=0)
    assert xloss.cross_entropy(x, target, label_smoothing=1, z_loss=0) == good
    with pytest.raises(TypeError, match="label_smoothing"):
        xloss.cross_entropy(x, target, label_smoothing=True, z_loss=0)
    with pytest.raises(TypeError, match="validate_args"):
        xloss.cross_entropy(x, target, validate_args=1)
    with pytest.raises(ValueError, match="label_smoothing"):
        xloss.cross_entropy(x, target, label_smoothing=float("nan"))
    with pytest.raises(TypeError, match="label_smoothing"):
        xloss.cross_entropy(x, target, label_smoothing=[0.1])
    with pytest.raises(ValueError, match="reduction"):
        xloss.cross_entropy(x, target, reduction="mean ")
    sys.modules["xloss.functional.cross_entropy"]._checked.clear()
    assert xloss.cross_entropy(x, target, label_smoothing=1, z_loss=0) == good


def test_a_leaked_transform_wrapper_takes_the_general_path():
    """A tensor that escaped a finished ``torch.func`` transform (a dead wrapper, still of
    type Tensor) is not read as numpy by the host path: the general path unwraps it."""
    leaked = []

    def square_sum(x):
        leaked.append(x)
        return (x**2).sum()

    torch.func.grad(square_sum)(torch.randn(4, 3))
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    target = torch.tensor([0, 1, 2, 0])
    want = F.cross_entropy(dead.double(), target)
    torch.testing.assert_close(xloss.cross_entropy(dead, target).double(), want)
