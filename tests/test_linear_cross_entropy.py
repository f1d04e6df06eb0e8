"""linear_cross_entropy against a materialised float64 reference written here."""

import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xloss
from xloss.ops import linear as linear_ops
from xloss.ops.row_grad import row_loss_and_grad_ as portable_row_loss_and_grad_

V = 11  # classes
H = 5  # hidden size


@pytest.fixture(autouse=True)
def chunked_path(monkeypatch):
    """These tests are of the chunked Function: small fp32 CPU calls would form their
    logits and take xloss.cross_entropy instead (tests/test_linear_small_calls.py)."""
    linear_functional = sys.modules["xloss.functional.linear_cross_entropy"]
    monkeypatch.setattr(linear_functional, "SMALL_HOST_LOGITS", -1)


def reference(
    input,
    weight,
    target,
    bias=None,
    *,
    class_weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    mask=None,
    lengths=None,
    normalizer=None,
    chunk_size=None,
):
    """Materialised float64 logits, then the cross-entropy formula and the reduction."""
    logits = input.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    num_classes = logits.shape[-1]
    w = torch.ones(num_classes, dtype=torch.float64) if class_weight is None else class_weight
    w = w.double()
    keep = torch.ones(target.shape, dtype=torch.bool)
    if ignore_index is not None:
        keep &= target != ignore_index
    if mask is not None:
        keep &= mask
    if lengths is not None:
        by_length = torch.arange(target.shape[1]) < lengths.unsqueeze(1)  # B x T
        keep &= by_length.reshape(by_length.shape + (1,) * (target.dim() - 2))
    y = torch.where(keep, target, 0)
    lse = torch.logsumexp(logits, -1)
    neg_log_p = lse.unsqueeze(-1) - logits
    nll = neg_log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    loss = (1 - label_smoothing) * w[y] * nll
    loss = loss + label_smoothing / num_classes * (neg_log_p * w).sum(-1) + z_loss * lse**2
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    counts = torch.where(keep, w[y], torch.zeros_like(loss))
    if normalizer is not None:
        return loss.sum() / normalizer
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / counts.sum() if counts.sum() > 0 else loss.sum() * 0
    per_sample = loss.reshape(loss.shape[0], -1).sum(1)
    count = counts.reshape(loss.shape[0], -1).sum(1)
    return per_sample / torch.where(count > 0, count, torch.ones_like(count))


def make_inputs(shape, *, dtype=torch.float32, bias=True, seed=0):
    """input (shape + (H,)), weight (V, H), bias (V,), target with some ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=gen).to(dtype)
    weight = torch.randn(V, H, generator=gen).to(dtype)
    bias_t = torch.randn(V, generator=gen).to(dtype) if bias else None
    target = torch.randint(0, V, shape, generator=gen)
    target.view(-1)[2::5] = -100
    return hidden, weight, bias_t, target


def loss_and_grads(fn, hidden, weight, bias, target, upstream_seed=1, double=False, **kwargs):
    """Loss and gradients of <upstream, loss> for input, weight and bias (float64 leaves
    when ``double``)."""
    sources = [t for t in (hidden, weight, bias) if t is not None]
    leaves = [(t.double() if double else t).detach().clone().requires_grad_() for t in sources]
    args = leaves + ([None] if bias is None else [])
    loss = fn(args[0], args[1], target, args[2], **kwargs)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(upstream_seed))
    grads = torch.autograd.grad((loss.double() * upstream.double()).sum(), leaves)
    return loss.detach(), grads


def assert_matches_reference(hidden, weight, bias, target, tol=1e-5, **kwargs):
    got_loss, got_grads = loss_and_grads(
        xloss.linear_cross_entropy, hidden, weight, bias, target, **kwargs
    )
    want_loss, want_grads = loss_and_grads(
        reference, hidden, weight, bias, target, double=True, **kwargs
    )
    assert got_loss.dtype == hidden.dtype and got_loss.shape == want_loss.shape
    torch.testing.assert_close(got_loss.double(), want_loss, rtol=tol, atol=tol)
    for got, want, source in zip(got_grads, want_grads, (hidden, weight, bias), strict=False):
        assert got.dtype == source.dtype and got.shape == source.shape
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


OPTIONS = {
    "plain": dict(),
    "class_weight": dict(class_weight=torch.rand(V) + 0.5),
    "smoothing": dict(label_smoothing=0.2),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=3.0),
    "all": dict(class_weight=torch.rand(V) + 0.5, label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
}
REDUCTIONS = {
    "mean": dict(reduction="mean"),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "normalizer": dict(reduction="sum", normalizer=7.0),
}


@pytest.mark.parametrize("chunk_size", [1, 7, 1000, None])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTIONS)
def test_matches_float64_reference(option, reduction, chunk_size):
    hidden, weight, bias, target = make_inputs((13,))
    assert_matches_reference(
        hidden,
        weight,
        bias,
        target,
        chunk_size=chunk_size,
        **OPTIONS[option],
        **REDUCTIONS[reduction],
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sample"])
def test_sequence_input_with_mask_and_lengths(reduction):
    hidden, weight, bias, target = make_inputs((3, 6))
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(5)) > 0.2
    lengths = torch.tensor([6, 2, 4])
    assert_matches_reference(
        hidden,
        weight,
        bias,
        target,
        reduction=reduction,
        mask=mask,
        lengths=lengths,
        chunk_size=4,
        class_weight=torch.rand(V) + 0.5,
        label_smoothing=0.1,
    )


def test_relative_lengths_match_integer_lengths():
    hidden, weight, bias, target = make_inputs((2, 4))
    by_count = xloss.linear_cross_entropy(
        hidden, weight, target, bias, lengths=torch.tensor([4, 2])
    )
    by_ratio = xloss.linear_cross_entropy(
        hidden, weight, target, bias, lengths=torch.tensor([1.0, 0.5])
    )
    torch.testing.assert_close(by_count, by_ratio)


@pytest.mark.parametrize("ignore_index", [None, 3])
def test_ignore_index_none_or_a_valid_class(ignore_index):
    hidden, weight, bias, target = make_inputs((10,))
    target = target.clamp(min=0)
    assert_matches_reference(
        hidden, weight, bias, target, ignore_index=ignore_index, label_smoothing=0.1, chunk_size=3
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_without_bias(reduction):
    hidden, weight, _, target = make_inputs((9,), bias=False)
    assert_matches_reference(hidden, weight, None, target, reduction=reduction, chunk_size=2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sample"])
def test_all_rows_dropped_gives_zero_loss_and_zero_gradients(reduction):
    hidden, weight, bias, target = make_inputs((2, 3))
    target[:] = -100
    loss, grads = loss_and_grads(
        xloss.linear_cross_entropy, hidden, weight, bias, target, reduction=reduction
    )
    assert torch.all(loss == 0)
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_inputs(dtype, reduction):
    hidden, weight, bias, target = make_inputs((12,), dtype=dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert_matches_reference(
        hidden,
        weight,
        bias,
        target,
        tol=tol,
        reduction=reduction,
        label_smoothing=0.1,
        chunk_size=5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_chunk_writes_the_gradient_buffers(monkeypatch, dtype):
    # grad_weight and grad_bias start uninitialised (no zero fill): the first chunk must
    # overwrite them, never add onto them. NaN-filled "uninitialised" memory proves it.
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(torch.nan))
    hidden, weight, bias, target = make_inputs((13,), dtype=dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for reduction in ("mean", "none"):
        assert_matches_reference(
            hidden, weight, bias, target, tol=tol, reduction=reduction, chunk_size=4
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_weight_gets_its_gradient(dtype):
    # a tied weight is often a transposed view: its gradient (written by the first chunk's
    # GEMM into a buffer of the weight's strides) must still be right
    hidden, weight, bias, target = make_inputs((13,), dtype=dtype)
    weight = weight.T.contiguous().T  # V x H with strides (1, V)
    assert not weight.is_contiguous()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert_matches_reference(hidden, weight, bias, target, tol=tol, chunk_size=4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sample"])
def test_float64_gradcheck(reduction):
    hidden, weight, bias, target = make_inputs((2, 4), dtype=torch.float64)
    class_weight = torch.rand(V, dtype=torch.float64) + 0.5
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]

    def fn(h, w, b):
        return xloss.linear_cross_entropy(
            h,
            w,
            target,
            b,
            class_weight=class_weight,
            reduction=reduction,
            label_smoothing=0.1,
            z_loss=1e-2,
            softcap=4.0,
            chunk_size=3,
        )

    assert torch.autograd.gradcheck(fn, leaves)


def test_scaled_backward_and_retain_graph():
    hidden, weight, bias, target = make_inputs((8,))
    hidden.requires_grad_()
    loss = xloss.linear_cross_entropy(hidden, weight, target, bias)
    (once,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (tripled,) = torch.autograd.grad(3 * loss, hidden, retain_graph=True)
    (again,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(tripled, 3 * once)
    torch.testing.assert_close(again, once)


def test_only_the_weight_needs_grad_and_no_grad_mode():
    hidden, weight, bias, target = make_inputs((8,))
    weight.requires_grad_()
    loss = xloss.linear_cross_entropy(hidden, weight, target, bias, reduction="sum")
    loss.backward()
    leaf = weight.detach().double().requires_grad_()
    reference(hidden, leaf, target, bias, reduction="sum").backward()
    torch.testing.assert_close(weight.grad.double(), leaf.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        value = xloss.linear_cross_entropy(hidden, weight, target, bias, reduction="sum")
    torch.testing.assert_close(value, loss.detach())


def test_module_matches_functional_and_moves_class_weight():
    hidden, weight, bias, target = make_inputs((2, 5))
    class_weight = torch.rand(V) + 0.5
    module = xloss.LinearCrossEntropyLoss(class_weight, label_smoothing=0.1, chunk_size=3)
    assert "class_weight" in dict(module.named_buffers())
    want = xloss.linear_cross_entropy(
        hidden, weight, target, bias, class_weight=class_weight, label_smoothing=0.1
    )
    torch.testing.assert_close(module(hidden, weight, target, bias), want)
    module = module.double()
    assert module.class_weight.dtype == torch.float64
    got = module(hidden.double(), weight.double(), target, bias.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), want)


def test_module_passes_per_batch_tensors():
    hidden, weight, bias, target = make_inputs((2, 4))
    module = xloss.LinearCrossEntropyLoss(reduction="sample")
    lengths = torch.tensor([3, 4])
    got = module(hidden, weight, target, bias, lengths=lengths)
    want = reference(hidden, weight, target, bias, reduction="sample", lengths=lengths)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    normalized = xloss.LinearCrossEntropyLoss()(hidden, weight, target, bias, normalizer=4)
    want = reference(hidden, weight, target, bias, normalizer=4)
    torch.testing.assert_close(normalized.double(), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 9),
    classes=st.integers(1, 6),
    chunk=st.integers(1, 10),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    eps=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_property_any_chunking_matches_reference(rows, classes, chunk, reduction, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 3, generator=gen)
    weight = torch.randn(classes, 3, generator=gen)
    target = torch.randint(-1, classes, (rows,), generator=gen)
    kwargs = dict(reduction=reduction, label_smoothing=eps, ignore_index=-1)
    got = xloss.linear_cross_entropy(hidden, weight, target, chunk_size=chunk, **kwargs)
    want = reference(hidden, weight, target, **kwargs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_default_chunk_is_bounded_by_the_memory_budget():
    rows = linear_ops.default_chunk_size(10**6, 32000, torch.float32)
    assert 1 <= rows and rows * 32000 * 4 <= linear_ops.CHUNK_BYTES
    assert linear_ops.default_chunk_size(10, 32000, torch.float32) == 10
    assert linear_ops.default_chunk_size(10, 10**9, torch.float32) == 1
    # a large weight allows up to TARGET_ROWS rows, within WEIGHT_SHARE of its gradient
    for vocab, hidden in [(32000, 2048), (128256, 1024), (128256, 4096)]:
        rows = linear_ops.default_chunk_size(10**6, vocab, torch.float32, hidden)
        assert linear_ops.CHUNK_BYTES // (vocab * 4) < rows <= linear_ops.TARGET_ROWS
        assert rows * vocab <= linear_ops.WEIGHT_SHARE * vocab * hidden
    # chunks are evened out: 1843 rows in chunks of at most 1024 -> 2 chunks of 922
    assert linear_ops.default_chunk_size(1843, 128256, torch.float32, 1024) == 922
    assert linear_ops.default_chunk_size(1843, 128256, torch.bfloat16, 1024) == 922


def test_row_kernel_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    fake = types.ModuleType("xloss.ops.kernel")
    fake.row_loss_and_grad_ = lambda *a, **k: None
    fake.kernel_available = lambda: True
    monkeypatch.setitem(sys.modules, "xloss.ops.kernel", fake)
    assert linear_ops.select_row_kernel(cpu, torch.float32) is fake.row_loss_and_grad_
    assert linear_ops.select_row_kernel(cpu, torch.float64) is portable_row_loss_and_grad_
    meta = torch.device("meta")
    assert linear_ops.select_row_kernel(meta, torch.float32) is portable_row_loss_and_grad_
    fake.kernel_available = lambda: False
    assert linear_ops.select_row_kernel(cpu, torch.float32) is portable_row_loss_and_grad_
    monkeypatch.setitem(sys.modules, "xloss.ops.kernel", None)  # import fails
    assert linear_ops.select_row_kernel(cpu, torch.float32) is portable_row_loss_and_grad_


def test_available_row_kernel_is_used_on_cpu(monkeypatch):
    calls = []

    def spy(logits, target, **kwargs):
        calls.append(logits.shape)
        return portable_row_loss_and_grad_(logits, target, **kwargs)

    fake = types.ModuleType("xloss.ops.kernel")
    fake.row_loss_and_grad_ = spy
    fake.kernel_available = lambda: True
    monkeypatch.setitem(sys.modules, "xloss.ops.kernel", fake)
    hidden, weight, bias, target = make_inputs((9,))
    assert_matches_reference(hidden, weight, bias, target, chunk_size=4, label_smoothing=0.1)
    assert calls and all(shape[1] == V and shape[0] <= 4 for shape in calls)


ERRORS = [
    (dict(input=torch.zeros(())), ValueError, r"`input` must have shape \(\.\.\., H\)"),
    (dict(input=torch.zeros(3, H, dtype=torch.long)), TypeError, "floating-point"),
    (dict(weight=torch.zeros(V, H + 1)), ValueError, r"`weight` must have shape \(V, 5\)"),
    (dict(weight=torch.zeros(0, H)), ValueError, "no classes"),
    (
        dict(weight=torch.zeros(V, H, dtype=torch.float64)),
        TypeError,
        "`weight` must have the input's dtype",
    ),
    (dict(weight=[[0.0]]), TypeError, "`weight` must be a torch.Tensor"),
    (dict(bias=torch.zeros(V + 1)), ValueError, r"`bias` must have shape \(11,\)"),
    (
        dict(bias=torch.zeros(V, dtype=torch.float16)),
        TypeError,
        "`bias` must have the input's dtype",
    ),
    (dict(target=torch.zeros(3)), TypeError, "integer class indices"),
    (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, r"`target` must have shape \(3,\)"),
    (dict(target=torch.tensor([0, 1, V])), ValueError, r"must lie in \[0, 10\]"),
    (dict(class_weight=torch.ones(V + 1)), ValueError, r"`class_weight` must have shape \(11,\)"),
    (
        dict(class_weight=torch.ones(V, dtype=torch.long)),
        TypeError,
        "`class_weight` must be a floating",
    ),
    (dict(chunk_size=0), ValueError, "`chunk_size` must be >= 1"),
    (dict(chunk_size=2.0), TypeError, "`chunk_size` must be a positive int"),
    (dict(chunk_size=True), TypeError, "`chunk_size` must be a positive int"),
    (dict(reduction="avg"), ValueError, "`reduction` must be one of"),
    (dict(reduction="sample"), ValueError, r"reduction='sample' needs \(B, T, \.\.\., H\) input"),
    (dict(reduction="none", normalizer=2.0), ValueError, "`normalizer` divides the summed loss"),
    (dict(label_smoothing=1.5), ValueError, "`label_smoothing` must lie in"),
    (dict(z_loss=-1.0), ValueError, "`z_loss` must be >= 0"),
    (dict(softcap=0.0), ValueError, "`softcap` must be > 0"),
    (dict(ignore_index=1.0), TypeError, "`ignore_index` must be an int"),
    (dict(mask=torch.ones(3, dtype=torch.long)), TypeError, "`mask` must be a bool"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "`mask` must have the target's shape"),
    (dict(lengths=torch.tensor([1, 2, 3])), ValueError, "`lengths` needs a target with a sequence"),
]


@pytest.mark.parametrize(("override", "error", "match"), ERRORS)
def test_errors(override, error, match):
    args = dict(input=torch.zeros(3, H), weight=torch.zeros(V, H), target=torch.tensor([0, 1, 2]))
    args.update(bias=None)
    args.update(override)
    with pytest.raises(error, match=match):
        xloss.linear_cross_entropy(
            args.pop("input"), args.pop("weight"), args.pop("target"), args.pop("bias"), **args
        )


def test_weight_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="`weight` must be on the input's device"):
        xloss.linear_cross_entropy(
            torch.zeros(3, H), torch.zeros(V, H, device="meta"), torch.tensor([0, 1, 2])
        )


def test_module_validates_settings():
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1"):
        xloss.LinearCrossEntropyLoss(chunk_size=-2)
    with pytest.raises(ValueError, match="`label_smoothing` must lie in"):
        xloss.LinearCrossEntropyLoss(label_smoothing=2.0)
    with pytest.raises(ValueError, match="`class_weight` must be 1-D"):
        xloss.LinearCrossEntropyLoss(torch.ones(2, 2))


def test_no_grad_mode_computes_the_loss_only(monkeypatch):
    seen = []
    run_chunks = linear_ops._run_chunks

    def spy(*args):
        seen.append(args[-1])
        return run_chunks(*args)

    monkeypatch.setattr(linear_ops, "_run_chunks", spy)
    hidden, weight, bias, target = make_inputs((6,))
    weight.requires_grad_()
    with torch.no_grad():
        value = xloss.linear_cross_entropy(hidden, weight, target, bias)
    loss = xloss.linear_cross_entropy(hidden, weight, target, bias)
    assert seen == [None, (False, True, False)]
    torch.testing.assert_close(value, loss.detach())


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_portable_row_gradient_path_in_fp32(option, reduction, monkeypatch):
    """The path other devices take, forced on CPU (the numba kernel is used by default)."""
    monkeypatch.setattr(
        linear_ops, "select_row_kernel", lambda device, dtype: portable_row_loss_and_grad_
    )
    hidden, weight, bias, target = make_inputs((10,))
    assert_matches_reference(
        hidden, weight, bias, target, chunk_size=3, reduction=reduction, **OPTIONS[option]
    )


def test_torch_compile_runs_and_matches_eager():
    # backend="eager" exercises dynamo's tracing (where numba broke it) without inductor's
    # compile time; the chunk loop itself runs eagerly behind a graph break.
    hidden, weight, bias, target = make_inputs((7,))
    compiled = torch.compile(
        lambda h, w, t, b: xloss.linear_cross_entropy(h, w, t, b, label_smoothing=0.1),
        backend="eager",
    )
    got_loss, got_grads = loss_and_grads(compiled, hidden, weight, bias, target)
    want_loss, want_grads = loss_and_grads(
        xloss.linear_cross_entropy, hidden, weight, bias, target, label_smoothing=0.1
    )
    torch.testing.assert_close(got_loss, want_loss)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_row_kept_with_the_default_ignore_index(reduction):
    hidden, weight, bias, target = make_inputs((8,))
    target = target.clamp(min=0)  # nothing equals ignore_index=-100: no gather
    assert_matches_reference(hidden, weight, bias, target, reduction=reduction, chunk_size=3)


@pytest.mark.parametrize("shape", [(), (7,), (2, 3), (2, 3, 4), (2, 1, 3, 2)])
@pytest.mark.parametrize("reduction", ["mean", "none", "sample"])
def test_any_number_of_leading_axes(shape, reduction):
    """input (..., H) with target (...): every leading shape, mask and lengths on them."""
    if reduction == "sample" and len(shape) < 2:
        pytest.skip("'sample' needs (B, T, ..., H)")
    hidden, weight, bias, target = make_inputs(shape, seed=3)
    assert_matches_reference(hidden, weight, bias, target, reduction=reduction, chunk_size=5)
    if len(shape) >= 2:
        mask = torch.rand(shape, generator=torch.Generator().manual_seed(4)) > 0.3
        lengths = torch.tensor([shape[1], 1] + [0] * (shape[0] - 2))
        assert_matches_reference(
            hidden, weight, bias, target, reduction=reduction, mask=mask, lengths=lengths
        )


def test_accum_dtype_float64_and_its_check():
    hidden, weight, bias, target = make_inputs((9,))
    weight = weight.clone().requires_grad_()
    xloss.linear_cross_entropy(hidden, weight, target, bias, accum_dtype=torch.float64).backward()
    assert weight.grad.dtype == weight.dtype
    weight64 = weight.detach().double().requires_grad_()
    logits = hidden.double() @ weight64.T + bias.double()
    torch.nn.functional.cross_entropy(logits, target).backward()
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="`accum_dtype` must be None or a floating torch.dtype"):
        xloss.linear_cross_entropy(hidden, weight, target, accum_dtype=torch.int32)


def test_module_passes_accum_dtype():
    hidden, weight, bias, target = make_inputs((9,))
    weight = weight.clone().requires_grad_()
    module = xloss.LinearCrossEntropyLoss(accum_dtype=torch.float64)
    assert module.accum_dtype == torch.float64
    module(hidden, weight, target, bias).backward()
    weight64 = weight.detach().double().requires_grad_()
    logits = hidden.double() @ weight64.T + bias.double()
    torch.nn.functional.cross_entropy(logits, target).backward()
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="`accum_dtype` must be None"):
        xloss.LinearCrossEntropyLoss(accum_dtype="float32")
