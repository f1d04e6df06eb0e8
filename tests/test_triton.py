"""The Triton row kernel, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set in conftest.py), against a float64 reference and against the numba kernel.

The interpreter runs each program (one row) in Python: shapes stay small. The two-pass
path (rows longer than one block) is reached with the block sizes shrunk to 16.
"""

import pytest
import torch

import xloss
from xloss import backends
from xloss.ops import kernel

triton = pytest.importorskip("triton")
if not backends.interpreting():  # pragma: no cover (conftest sets it)
    pytest.skip("TRITON_INTERPRET=1 must be set before triton loads", allow_module_level=True)

from xloss.ops.triton import cross_entropy as triton_ce  # noqa: E402

NUMBA = kernel.kernel_available()
TOLERANCE = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    # the gradient is rounded once to the half type
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-4),
}


@pytest.fixture(autouse=True)
def force_triton():
    with backends.use("triton"):
        yield


@pytest.fixture(params=["single", "blocks"])
def block_path(request, monkeypatch):
    """Both code paths: the row in one block (read once), and blocks of 16 (two passes)."""
    if request.param == "blocks":
        monkeypatch.setattr(triton_ce, "SINGLE_BLOCK_MAX", 16)
        monkeypatch.setattr(triton_ce, "LOOP_BLOCK", 16)
    return request.param


def reference_rows(x, target, *, weight=None, eps=0.0, z=0.0, cap=None, scale=1.0):
    """float64 loss per row (0 where target < 0) and d(sum s_i loss_i)/dx by autograd."""
    x = x.detach().double().requires_grad_()
    num_classes = x.shape[1]
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    capped = x if cap is None else cap * torch.tanh(x / cap)
    lse = torch.logsumexp(capped, dim=1)
    y = target.clamp(min=0)
    loss = (1 - eps) * w[y] * (lse - capped.gather(1, y[:, None])[:, 0])
    if eps > 0:
        loss = loss + eps / num_classes * (w * (lse[:, None] - capped)).sum(1)
    loss = loss + z * lse**2
    loss = torch.where(target >= 0, loss, 0.0)
    scale = torch.as_tensor(scale, dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss * scale).sum(), x)
    return loss.detach(), grad


def case(rows, classes, dtype=torch.float32, seed=0, spread=3.0):
    generator = torch.Generator().manual_seed(seed)
    x = (spread * torch.randn(rows, classes, generator=generator)).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=generator)
    return x, target


OPTIONS = {
    "plain": {},
    "smoothing": dict(eps=0.1),
    "z_loss": dict(z=1e-2),
    "softcap": dict(cap=2.5),
    "weight": dict(weight="w"),
    "all": dict(weight="w", eps=0.2, z=1e-3, cap=4.0),
}


def kernel_options(options, classes):
    options = dict(options)
    weight = options.pop("weight", None)
    if weight == "w":
        weight = torch.linspace(0.5, 2.0, classes)
    return dict(
        class_weight=weight,
        label_smoothing=options.get("eps", 0.0),
        z_loss=options.get("z", 0.0),
        softcap=options.get("cap"),
    ), dict(options, weight=weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("classes", [1, 37])  # 37: not a multiple of any block
def test_row_kernel_matches_float64_and_numba(classes, option, dtype, block_path):
    x, target = case(5, classes, dtype, seed=classes)
    target[1] = -1  # a dropped row
    scale = torch.tensor([0.5, 2.0, 1.0, 0.25, 1.5])
    options, reference_options = kernel_options(OPTIONS[option], classes)
    grad = x.clone()
    loss = triton_ce.row_loss_and_grad_(grad, target, grad_scale=scale, **options)
    loss_ref, grad_ref = reference_rows(x, target, scale=scale, **reference_options)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(loss.double(), loss_ref, rtol=tol["rtol"], atol=10 * tol["atol"])
    torch.testing.assert_close(grad.double(), grad_ref, **tol)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    if NUMBA:
        numba_grad = x.clone()
        numba_loss = kernel.row_loss_and_grad_(numba_grad, target, grad_scale=scale, **options)
        torch.testing.assert_close(loss, numba_loss, rtol=2e-5, atol=2e-6)
        # both round an fp32 gradient once: at most one unit in the last place apart
        torch.testing.assert_close(grad.float(), numba_grad.float(), **tol)


def test_buffer_and_loss_only_outputs(block_path):
    x, target = case(4, 23, seed=3)
    options = dict(label_smoothing=0.1, z_loss=1e-3)
    loss_ref, grad_ref = reference_rows(x, target, eps=0.1, z=1e-3, scale=0.5)
    loss, grad = triton_ce.row_loss_and_grad(x, target, grad_scale=0.5, **options)
    assert torch.equal(x, case(4, 23, seed=3)[0])  # the input is untouched
    torch.testing.assert_close(grad.double(), grad_ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(triton_ce.launch(x, target, None, **options), loss)


def reference_stats(x, target, cap=None):
    """float64 (lse, entropy) of the softmax after the softcap, and the first argmax of
    the raw row; (0, 0) and -1 where the row is dropped."""
    x64 = x.double()
    capped = x64 if cap is None else cap * torch.tanh(x64 / cap)
    p = capped.softmax(1)
    values = torch.stack([torch.logsumexp(capped, 1), -torch.xlogy(p, p).sum(1)], 1)
    is_max = x64 == x64.max(1, keepdim=True).values
    first = torch.where(is_max, torch.arange(x.shape[1]), x.shape[1]).min(1).values
    dropped = target < 0
    return values.masked_fill(dropped[:, None], 0.0), first.masked_fill(dropped, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("classes", [1, 37])
def test_stats_in_the_same_pass_match_float64_and_numba(classes, cap, dtype, block_path):
    """(lse, entropy) and argmax: odd V and V = 1 on both block paths, softcap (argmax
    of the raw row: 9.0 and 9.5 tie after a cap of 2 in fp32), a dropped row and a tie."""
    x, target = case(5, classes, dtype, seed=classes + 1)
    target[1] = -1
    if classes > 1:
        x[2, [4, 30]] = x[2].max() + 1  # a tie in the raw row: the first index wins
        x[3, 20], x[3, 33] = 9.0, 9.5  # tanh(4.5) and tanh(4.75) round to 1 in fp32
    values, predicted = torch.empty(5, 2), torch.empty(5, dtype=torch.long)
    grad = x.clone()
    options = dict(softcap=cap, label_smoothing=0.1)
    loss = triton_ce.row_loss_and_grad_(grad, target, grad_scale=1.0, stats=(values, predicted),
                                        **options)  # fmt: skip
    want_values, want_predicted = reference_stats(x, target, cap)
    torch.testing.assert_close(values.double(), want_values, rtol=2e-5, atol=2e-5)
    assert torch.equal(predicted, want_predicted)
    plain = triton_ce.row_loss_and_grad_(x.clone(), target, grad_scale=1.0, **options)
    assert torch.equal(loss, plain)  # the statistics change nothing else
    if NUMBA:
        numba_values, numba_predicted = torch.empty(5, 2), torch.empty(5, dtype=torch.long)
        kernel.row_loss(x, target, stats=(numba_values, numba_predicted), **options)
        torch.testing.assert_close(values, numba_values, rtol=2e-5, atol=2e-5)
        assert torch.equal(predicted, numba_predicted)


def test_stats_of_rows_out_of_range_infinite_and_wrong_buffers(block_path):
    x = torch.tensor([[0.0, float("-inf"), 2.0], [float("-inf")] * 3, [1.0, 2.0, 3.0]])
    target = torch.tensor([2, 0, 3])  # row 2: out of range (validate_args=False)
    values, predicted = torch.empty(3, 2), torch.empty(3, dtype=torch.long)
    loss = triton_ce.row_loss(x, target, stats=(values, predicted))
    want = reference_stats(x[:1], target[:1])[0][0]
    torch.testing.assert_close(values[0].double(), want)
    assert values[1, 0] == float("-inf") and values[1, 1].isnan()  # as numba and torch
    assert torch.equal(values[2], torch.zeros(2)) and loss[2].isnan()
    assert predicted.tolist() == [2, 0, -1]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stats_of_a_nan_row_point_at_the_nan(sign, block_path):
    # tl.argmax passed over a NaN: a NaN row's argmax was its finite maximum, a hit in
    # the accuracy. torch.argmax, the portable path and the numba kernel give the NaN's
    # index; lse and entropy are NaN.
    x = torch.tensor([[1.0, 0.0, 2.0, 0.0] * 10, [1.0, 0.0, 2.0, 0.0] * 10])
    x[0, 29] = float("nan") * sign  # past the first block on the multi-block path
    target = torch.tensor([2, 2])
    values, predicted = torch.empty(2, 2), torch.empty(2, dtype=torch.long)
    loss = triton_ce.row_loss(x, target, stats=(values, predicted))
    assert predicted.tolist() == [29, 2] == [int(torch.argmax(row)) for row in x]
    assert values[0].isnan().all() and loss[0].isnan()
    torch.testing.assert_close(values[1].double(), reference_stats(x[1:], target[1:])[0][0])
    with pytest.raises(ValueError, match=r"`stats` must be contiguous \(\(R, 2\) float32"):
        triton_ce.row_loss(x, target, stats=(torch.empty(3, 2), torch.empty(3)))
    with pytest.raises(ValueError, match="`stats` must be contiguous"):
        triton_ce.row_loss(x, target, stats=(torch.empty(2, 3).T, predicted))


def test_all_rows_dropped_and_no_rows():
    x, target = case(3, 11)
    target[:] = -1
    grad = x.clone()
    loss = triton_ce.row_loss_and_grad_(grad, target, grad_scale=1.0, label_smoothing=0.1)
    assert torch.equal(loss, torch.zeros(3)) and torch.equal(grad, torch.zeros_like(grad))
    empty = torch.empty(0, 11)
    assert triton_ce.row_loss_and_grad_(empty, target[:0], grad_scale=1.0).shape == (0,)


def test_extreme_and_masked_logits():
    """Huge spreads, and -inf for a masked part of the vocabulary, stay finite."""
    x = torch.tensor([[1e4, -1e4, 0.0, 3.0], [0.0, float("-inf"), 2.0, float("-inf")]])
    target = torch.tensor([1, 2])
    grad = x.clone()
    loss = triton_ce.row_loss_and_grad_(grad, target, grad_scale=1.0)
    loss_ref, grad_ref = reference_rows(x, target)
    torch.testing.assert_close(loss.double(), loss_ref)
    torch.testing.assert_close(grad.double(), grad_ref)


def test_argument_errors():
    x, target = case(2, 5)
    with pytest.raises(ValueError, match=r"`logits` must be a 2-D \(R, C\) tensor"):
        triton_ce.row_loss(x[0], target)
    with pytest.raises(TypeError, match="`logits` must be one of float32"):
        triton_ce.row_loss(x.double(), target)
    with pytest.raises(ValueError, match="`target` must be an int64 tensor of shape"):
        triton_ce.row_loss(x, target.int())
    with pytest.raises(ValueError, match="contiguous class axis"):
        triton_ce.row_loss(x.T.contiguous().T, target)
    with pytest.raises(ValueError, match="`grad_scale` must be a float or a tensor of 1 or 2"):
        triton_ce.row_loss(x, target, grad_scale=torch.ones(3))


# ---------------------------------------------------------------- cross_entropy on Triton


def reference_cross_entropy(x, target, weight=None, *, eps=0.0, keep=None, reduction="mean"):
    """float64 F.cross_entropy semantics, keep: bool mask over rows (None: all)."""
    x = x.double()
    logp = x.log_softmax(-1)
    num_classes = x.shape[-1]
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    keep = torch.ones(target.shape, dtype=torch.bool) if keep is None else keep
    y = torch.where(keep, target, 0)
    loss = -(1 - eps) * w[y] * logp.gather(-1, y[..., None])[..., 0]
    loss = loss - eps / num_classes * (w * logp).sum(-1)
    loss = torch.where(keep, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    denominator = torch.where(keep, w[y], 0.0).sum()
    return loss.sum() / denominator if denominator > 0 else loss.sum() * 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_matches_float64_and_numba(reduction, dtype, inplace):
    x, target = case(6, 13, dtype, seed=7)
    target[2] = -100
    weight = torch.linspace(0.5, 1.5, 13)
    keep = target != -100
    options = dict(weight=weight, label_smoothing=0.1, reduction=reduction)
    logits = x.clone().requires_grad_()
    work = logits * 1 if inplace else logits  # in place needs a non-leaf
    loss = xloss.cross_entropy(work, target, inplace_backward=inplace, **options)
    generator = torch.Generator().manual_seed(1)
    upstream = torch.rand(loss.shape, generator=generator) if reduction == "none" else 1.0
    (loss * upstream).sum().backward()
    x64 = x.double().requires_grad_()
    want = reference_cross_entropy(x64, target, weight, eps=0.1, keep=keep, reduction=reduction)
    (want * torch.as_tensor(upstream).double()).sum().backward()
    # the stored gradient and its product with the upstream gradient: two roundings
    tol = {key: 2 * value for key, value in TOLERANCE[dtype].items()}
    torch.testing.assert_close(
        loss.double(), want.detach(), rtol=tol["rtol"], atol=10 * tol["atol"]
    )
    torch.testing.assert_close(logits.grad.double(), x64.grad, **tol)
    if NUMBA:
        with backends.use("numba"):
            numba_loss = xloss.cross_entropy(x, target, **options)
        torch.testing.assert_close(loss, numba_loss, rtol=2e-5, atol=2e-6)


def test_cross_entropy_masks_class_dim_sample_and_normalizer():
    """(N, C, d) input with class_dim=1, a mask, 'sample' and a normalizer."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 3, generator=generator)
    target = torch.randint(0, 7, (2, 3), generator=generator)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    rows = x.movedim(1, -1)
    sample = xloss.cross_entropy(x, target, mask=mask, reduction="sample", z_loss=1e-2)
    lse = torch.logsumexp(rows.double(), -1)
    per_position = lse - rows.double().gather(-1, target[..., None])[..., 0] + 1e-2 * lse**2
    per_position = torch.where(mask, per_position, 0.0)
    torch.testing.assert_close(sample.double(), per_position.sum(1) / mask.sum(1))
    logits = x.clone().requires_grad_()
    normalized = xloss.cross_entropy(logits, target, mask=mask, normalizer=10.0, softcap=3.0)
    normalized.backward()
    x64 = x.double().requires_grad_()
    capped = 3.0 * torch.tanh(x64.movedim(1, -1) / 3.0)
    want = torch.where(mask, reference_cross_entropy(capped, target, reduction="none"), 0.0)
    (want.sum() / 10.0).backward()
    torch.testing.assert_close(normalized.double(), want.sum().detach() / 10.0)
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=2e-5, atol=2e-6)


def test_cross_entropy_every_row_ignored_gives_zero_and_zero_gradient():
    x, target = case(4, 9)
    logits = x.clone().requires_grad_()
    loss = xloss.cross_entropy(logits, torch.full_like(target, -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(x))


def test_the_triton_kernel_serves_the_call(monkeypatch):
    calls = []
    launch = triton_ce.launch

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_ce, "launch", spy)
    monkeypatch.setattr(kernel, "_launch", None)  # numba must not run
    x, target = case(3, 5)
    xloss.cross_entropy(x, target)
    assert calls == [(3, 5)]


def test_inplace_backward_bumps_the_version_counter():
    x, target = case(3, 6)
    logits = x.clone().requires_grad_()
    work = logits * 1
    product = work * work  # saves `work` for its backward
    loss = xloss.cross_entropy(work, target, inplace_backward=True)  # overwrites `work`
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + product.sum()).backward()


def test_torch_compile_fullgraph_with_the_triton_op():
    x, target = case(4, 10, seed=2)

    def loss_fn(logits, labels):
        options = dict(label_smoothing=0.1, validate_args=False)
        in_place = xloss.cross_entropy(logits * 2.0, labels, inplace_backward=True, **options)
        return xloss.cross_entropy(logits, labels, **options) + in_place

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    logits = x.clone().requires_grad_()
    compiled(logits, target).backward()
    x64 = x.double().requires_grad_()
    want = reference_cross_entropy(x64, target, eps=0.1)
    want = want + reference_cross_entropy(2 * x64, target, eps=0.1)
    want.backward()
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------ linear_cross_entropy on Triton


def reference_linear(hidden, weight, target, bias=None, class_weight=None, *, eps=0.0, z=0.0,
                     cap=None, keep, reduction):  # fmt: skip
    """float64 loss of the logits hidden @ weight.T + bias, per row or reduced."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    rows = logits.reshape(-1, weight.shape[0])
    flat_target = torch.where(keep, target, 0).reshape(-1)
    w = torch.ones(weight.shape[0], dtype=torch.float64) if class_weight is None else class_weight
    capped = rows if cap is None else cap * torch.tanh(rows / cap)
    lse = torch.logsumexp(capped, -1)
    y = flat_target
    loss = (1 - eps) * w.double()[y] * (lse - capped.gather(1, y[:, None])[:, 0])
    if eps > 0:
        loss = loss + eps / rows.shape[1] * (w.double() * (lse[:, None] - capped)).sum(1)
    loss = (loss + z * lse**2).reshape(target.shape)
    loss = torch.where(keep, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sample":
        return loss.sum(1) / torch.where(keep, w.double()[torch.where(keep, target, 0)], 0).sum(1)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / torch.where(keep, w.double()[torch.where(keep, target, 0)], 0).sum()


LINEAR_OPTIONS = {
    "plain": {},
    "bias_smoothing": dict(bias=True, eps=0.1),
    "weight_z_softcap": dict(class_weight=True, z=1e-2, cap=3.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sample"])
@pytest.mark.parametrize("option", list(LINEAR_OPTIONS))
def test_linear_cross_entropy_matches_float64_and_numba(option, reduction, dtype):
    generator = torch.Generator().manual_seed(11)
    batch, steps, hidden_size, classes = 2, 3, 5, 37
    hidden = torch.randn(batch, steps, hidden_size, generator=generator).to(dtype)
    weight = (0.5 * torch.randn(classes, hidden_size, generator=generator)).to(dtype)
    target = torch.randint(0, classes, (batch, steps), generator=generator)
    target[0, 1] = -100
    options = LINEAR_OPTIONS[option]
    bias = (
        (0.1 * torch.randn(classes, generator=generator)).to(dtype) if "bias" in options else None
    )
    class_weight = torch.linspace(0.5, 1.5, classes) if "class_weight" in options else None
    settings = dict(
        class_weight=class_weight,
        label_smoothing=options.get("eps", 0.0),
        z_loss=options.get("z", 0.0),
        softcap=options.get("cap"),
        reduction=reduction,
        chunk_size=2,  # 3 chunks of the 5 kept rows
    )
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    bias_leaf = None if bias is None else bias.clone().requires_grad_()
    loss = xloss.linear_cross_entropy(leaves[0], leaves[1], target, bias_leaf, **settings)
    generator = torch.Generator().manual_seed(2)
    upstream = torch.rand(loss.shape, generator=generator) if loss.dim() else 1.0
    (loss * upstream).sum().backward()

    wants = [t.double().requires_grad_() for t in (hidden, weight)]
    bias64 = None if bias is None else bias.double().requires_grad_()
    want = reference_linear(wants[0], wants[1], target, bias64, class_weight, keep=target >= 0,
                            eps=settings["label_smoothing"], z=settings["z_loss"],
                            cap=settings["softcap"], reduction=reduction)  # fmt: skip
    (want * torch.as_tensor(upstream).double()).sum().backward()
    # bf16: the GEMMs run in bf16 on this path, so the logits carry bf16 rounding
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    for got, ref in zip(leaves + [bias_leaf], wants + [bias64], strict=True):
        if ref is not None:
            torch.testing.assert_close(got.grad.double(), ref.grad, **tol)
    if NUMBA:
        with backends.use("numba"):
            numba_loss = xloss.linear_cross_entropy(hidden, weight, target, bias, **settings)
        torch.testing.assert_close(loss.double(), numba_loss.double(), **tol)


@pytest.mark.parametrize("accum_dtype", [None, torch.float32, torch.bfloat16])
def test_linear_bf16_gemms_and_accumulation_dtype(accum_dtype, monkeypatch):
    """On the Triton path bf16 chunks stay bf16; the weight gradient sums in accum_dtype."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(9, 6, generator=generator).bfloat16()
    weight = torch.randn(21, 6, generator=generator).bfloat16().requires_grad_()
    target = torch.randint(0, 21, (9,), generator=generator)
    seen = []
    row_kernel = triton_ce.row_loss_and_grad_

    def spy(logits, target, **options):
        seen.append(logits.dtype)
        return row_kernel(logits, target, **options)

    monkeypatch.setattr(triton_ce, "row_loss_and_grad_", spy)
    loss = xloss.linear_cross_entropy(
        hidden, weight, target, reduction="sum", chunk_size=4, accum_dtype=accum_dtype
    )
    loss.backward()
    assert seen == [torch.bfloat16] * 3
    weight64 = weight.detach().double().requires_grad_()
    want = reference_linear(hidden, weight64, target, keep=target >= 0, reduction="sum")
    want.backward()
    assert weight.grad.dtype == torch.bfloat16
    tol = 8e-2 if accum_dtype == torch.bfloat16 else 3e-2
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=tol, atol=tol)


def test_target_past_the_row_with_checks_off_gives_nan_not_a_bad_read(block_path):
    x, target = case(3, 20)
    target[1] = 20  # out of range, only possible with validate_args=False
    logits = x.clone().requires_grad_()
    loss = xloss.cross_entropy(logits, target, reduction="none", validate_args=False)
    loss.sum().backward()
    assert loss[1].isnan() and logits.grad[1].isnan().all()
    keep = torch.tensor([True, False, True])
    want = reference_cross_entropy(x, target.clamp(max=19), keep=keep, reduction="none")
    torch.testing.assert_close(loss[keep].double(), want[keep])
    assert logits.grad[keep].isfinite().all()


def test_empty_batch_on_triton():
    logits = torch.zeros(0, 5, requires_grad=True)
    loss = xloss.cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 5)


# ------------------------------------------- vocab-parallel local gradient on Triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_local_gradient_matches_float64(dtype, monkeypatch):
    from xloss.ops.triton import vocab_parallel as triton_vp

    monkeypatch.setattr(triton_vp, "BLOCK", 16)  # 37 classes: three blocks, the last partial
    x, _ = case(5, 37, dtype, seed=9)
    lse = torch.logsumexp(x.double(), 1) + 0.7  # the global lse exceeds the local one
    grad_loss = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.5])
    local_target = torch.tensor([3, 36, 0, 5, 17])
    in_slice = torch.tensor([True, True, False, False, True])
    eps, z, num_classes = 0.1, 1e-2, torch.tensor(74.0)
    grad = triton_vp.local_gradient(x, lse.float(), grad_loss, local_target, in_slice,
                                    num_classes, label_smoothing=eps, z_loss=z)  # fmt: skip
    g = grad_loss.double()[:, None]
    want = g * ((1 + 2 * z * lse[:, None]) * torch.exp(x.double() - lse[:, None]) - eps / 74)
    onehot = torch.nn.functional.one_hot(local_target, 37).double() * in_slice[:, None]
    want = want - g * (1 - eps) * onehot
    assert grad.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(grad.double(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_cross_entropy_on_triton_one_process(dtype, one_process_group,
                                                            monkeypatch):  # fmt: skip
    """Both kernels serve the call (spied); bf16 slices reach them as bf16 (no copy)."""
    from xloss.distributed import vocab_parallel_cross_entropy
    from xloss.ops.triton import vocab_parallel as triton_vp

    calls = []
    for name in ("local_partials", "local_gradient"):
        original = getattr(triton_vp, name)

        def spy(logits, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, logits.dtype))
            return _original(logits, *args, **kwargs)

        monkeypatch.setattr(triton_vp, name, spy)
    x, target = case(6, 11, dtype, seed=4)
    target[2] = -100
    logits = x.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-2)
    loss.backward()
    assert calls == [("local_partials", dtype), ("local_gradient", dtype)]
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else TOLERANCE[dtype]
    x64 = x.double().requires_grad_()
    keep = target != -100
    want = reference_cross_entropy(x64, target, eps=0.1, keep=keep, reduction="none")
    want = want + torch.where(keep, 1e-2 * torch.logsumexp(x64, 1) ** 2, 0.0)
    want = want.sum() / keep.sum()
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    torch.testing.assert_close(logits.grad.double(), x64.grad, **tol)


# ------------------------------------------------- no host synchronisation on Triton


class HostSyncGuard(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that would make the host wait for a GPU, on any tensor.

    torch.cuda.set_sync_debug_mode needs a GPU; on CPU tensors this mode sees the same
    events at the ATen level: a device value read on the host (``_local_scalar_dense``,
    behind ``bool()``, ``.item()``, ``float()``, ``int()``), and outputs whose shape
    depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean indexing).
    Dispatch modes follow autograd into backward. ``xloss::`` custom ops are re-entered
    under the mode so their bodies are watched too. A host copy (``.cpu()``,
    ``.tolist()``) of a CPU tensor is invisible here: none is in these paths.
    """

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2",
                "unique_consecutive", "unique_dim", "argwhere")  # fmt: skip

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()
        )
        if name in self.SYNC_OPS or boolean_index:
            self.events.append(str(func))
        if func.namespace == "xloss":
            with self:  # the body, below the Python key, under this mode
                keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
                return func.redispatch(keys, *args, **kwargs)
        return func(*args, **kwargs)


class _TestsOnesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad if bool((grad == 1).all()) else 2 * grad


def test_the_sync_guard_sees_what_it_must():
    """The guard's own check: each kind of sync it claims to see, inside a backward too,
    and the target check of validate_args=True inside xloss."""
    x = torch.randn(4)
    with HostSyncGuard() as guard:
        bool((x > 0).all()), float(x.sum()), x.nonzero(), x[x > 0]
    assert len(guard.events) == 4, guard.events
    leaf = x.clone().requires_grad_()
    with HostSyncGuard() as guard:
        _TestsOnesInBackward.apply(leaf).sum().backward()
    assert guard.events == ["aten._local_scalar_dense.default"]
    with HostSyncGuard() as guard:
        xloss.cross_entropy(x[None], torch.tensor([1]))  # validate_args=True reads
    assert guard.events


SYNC_FREE_CALLS = {
    "cross_entropy mean": lambda x, h, w, t: xloss.cross_entropy(
        x, t, label_smoothing=0.1, validate_args=False),
    "cross_entropy none": lambda x, h, w, t: xloss.cross_entropy(
        x, t, reduction="none", z_loss=1e-3, validate_args=False).sum(),
    "cross_entropy in place": lambda x, h, w, t: xloss.cross_entropy(
        x * 1, t, inplace_backward=True, softcap=3.0, validate_args=False),
    "cross_entropy stats": lambda x, h, w, t: xloss.cross_entropy(
        x, t, return_stats=True, validate_args=False).loss,
    "linear mean": lambda x, h, w, t: xloss.linear_cross_entropy(
        h, w, t, chunk_size=4, validate_args=False),
    "linear stats": lambda x, h, w, t: xloss.linear_cross_entropy(
        h, w, t, chunk_size=4, return_stats=True, validate_args=False).loss,
    "linear none": lambda x, h, w, t: xloss.linear_cross_entropy(
        h, w, t, reduction="none", chunk_size=4, validate_args=False).sum(),
}  # fmt: skip


@pytest.mark.parametrize("call", list(SYNC_FREE_CALLS))
def test_no_host_sync_in_forward_and_backward(call):
    """With validate_args=False nothing on the Triton path reads a device value on the
    host or makes a data-dependent shape, in forward or backward (a mask drops a row)."""
    x, target = case(6, 13, seed=3)
    target[2] = -100
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 5, generator=generator).requires_grad_()
    weight = torch.randn(13, 5, generator=generator).requires_grad_()
    logits = x.clone().requires_grad_()
    with HostSyncGuard() as guard:
        loss = SYNC_FREE_CALLS[call](logits, hidden, weight, target)
        loss.backward()
    assert guard.events == []
    assert all(t.grad is None or t.grad.isfinite().all() for t in (logits, hidden, weight))


def test_no_host_sync_in_vocab_parallel_cross_entropy(one_process_group):
    from xloss.distributed import vocab_parallel_cross_entropy

    x, target = case(6, 11, seed=4)
    target[2] = -100
    logits = x.clone().requires_grad_()
    with HostSyncGuard() as guard:
        loss = vocab_parallel_cross_entropy(
            logits, target, label_smoothing=0.1, z_loss=1e-2, validate_args=False
        )
        loss.backward()
    assert guard.events == []
    assert logits.grad.isfinite().all()


# ----------------------------------------------- return_stats on the Triton backend


def check_stats_result(out, x, target, keep, cap, want_loss):
    """``out`` (CrossEntropyStats) against float64: per position lse, entropy (after the
    softcap), the raw argmax, 0 / 0 / -1 where dropped, and the accuracy."""
    rows = x.reshape(-1, x.shape[-1])
    flat = torch.where(keep, target, -1).reshape(-1)
    values, predicted = reference_stats(rows, flat, cap)
    shape = target.shape
    torch.testing.assert_close(out.loss.double(), want_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.lse.double(), values[:, 0].reshape(shape), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(
        out.entropy.double(), values[:, 1].reshape(shape), rtol=2e-5, atol=2e-5
    )
    assert torch.equal(out.predicted, predicted.reshape(shape))
    hits = ((predicted.reshape(shape) == target) & keep).sum()
    torch.testing.assert_close(out.accuracy.double(), hits.double() / keep.sum())


@pytest.mark.parametrize("classes", [1, 37])
@pytest.mark.parametrize("cap", [None, 2.0])
def test_cross_entropy_return_stats_on_triton(classes, cap, block_path, monkeypatch):
    """One launch of the Triton kernel fills the loss, gradient and statistics (spied)."""
    launches = []
    launch = triton_ce.launch

    def spy(*args, **kwargs):
        launches.append(kwargs.get("stats") is not None and args[2] is not None)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_ce, "launch", spy)
    x, target = case(6, classes, seed=21)
    if classes > 1:
        x[0, [3, 8]] = x[0].max() + 1  # a tie: the first index
    target[4] = -100
    keep = target != -100
    logits = x.clone().requires_grad_()
    out = xloss.cross_entropy(logits, target, softcap=cap, return_stats=True)
    out.loss.backward()
    capped = x.double() if cap is None else cap * torch.tanh(x.double() / cap)
    want = reference_cross_entropy(capped, target, keep=keep)
    check_stats_result(out, x, target, keep, cap, want)
    assert logits.grad.isfinite().all()
    assert launches == [True]


@pytest.mark.parametrize("cap", [None, 2.0])
def test_linear_cross_entropy_return_stats_on_triton(cap, monkeypatch):
    """The chunk driver passes each chunk's buffers to the Triton row kernel (spied),
    rows ignored, odd V."""
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 4, 5, generator=generator)
    weight = torch.randn(37, 5, generator=generator)
    target = torch.randint(0, 37, (2, 4), generator=generator)
    target[1, 2] = -100
    keep = target != -100
    seen = []
    row_kernel = triton_ce.row_loss_and_grad_

    def spy(logits, target, **options):
        seen.append(options.get("stats") is not None)
        return row_kernel(logits, target, **options)

    monkeypatch.setattr(triton_ce, "row_loss_and_grad_", spy)
    leaf = weight.clone().requires_grad_()
    out = xloss.linear_cross_entropy(hidden, leaf, target, softcap=cap, chunk_size=3,
                                     return_stats=True)  # fmt: skip
    out.loss.backward()
    assert seen == [True] * 3
    want = reference_linear(hidden, weight, target, cap=cap, keep=keep, reduction="mean")
    check_stats_result(out, hidden @ weight.T, target, keep, cap, want)


# ----------------------------------------- vocab-parallel partial sums (step 2) on Triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("sum_logits", "entropy"), [(False, False), (True, True)])
def test_vocab_parallel_local_partials_match_float64_and_torch(sum_logits, entropy, dtype,
                                                               monkeypatch):  # fmt: skip
    """One slice of a wider row: M is the max of the whole row; a -inf class, large
    logits, a row whose target lies elsewhere; 37 classes in blocks of 16."""
    from xloss.distributed import _rows
    from xloss.ops.triton import vocab_parallel as triton_vp

    monkeypatch.setattr(triton_vp, "BLOCK", 16)
    x, _ = case(4, 45, seed=12)
    x[1, 7] = float("-inf")
    x[2] += 1e4
    full = x.to(dtype)
    row_max = full.float().amax(-1)
    local = full[:, 4:41]  # a strided slice: classes 4..40
    target = torch.tensor([5, 0, 40, -1])
    in_slice = (target >= 4) & (target < 41)
    local_target = torch.where(in_slice, target - 4, 0)
    got = _rows.local_partials(local, row_max, local_target, in_slice,
                               sum_logits=sum_logits, entropy=entropy)  # fmt: skip
    x64 = local.double()
    shifted = x64 - row_max.double()[:, None]
    want = [torch.where(in_slice, x64.gather(1, local_target[:, None])[:, 0], 0.0)]
    if sum_logits:
        want.append(x64.sum(1))
    want.append(shifted.exp().sum(1))
    if entropy:
        want.append((shifted.exp() * torch.where(x64.isfinite(), shifted, 0.0)).sum(1))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5)
    with backends.use("torch"):
        portable = _rows.local_partials(local.float(), row_max, local_target, in_slice,
                                        sum_logits=sum_logits, entropy=entropy)  # fmt: skip
    for g, p in zip(got, portable, strict=True):
        torch.testing.assert_close(g, p, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_rows_skips_the_rows_whose_factor_is_one(dtype, block_path):
    """The in-place backward's scaling on the device: factor 1 rows untouched (a NaN
    there would survive, so the kernel did not even read them), others rounded once
    (within one unit in the last place: the interpreter's bf16 cast truncates)."""
    x, _ = case(3, 37, dtype, seed=5)
    x[0, 3] = float("nan")
    grad = x.clone()
    triton_ce.scale_rows_(grad, torch.tensor([1.0, 0.3, 1.0]))
    assert torch.equal(grad[2], x[2]) and grad[0, 3].isnan()
    ulp = dict(rtol=2e-7 if dtype == torch.float32 else 8e-3, atol=0.0)
    torch.testing.assert_close(grad[1].float(), x[1].float() * 0.3, **ulp)
    triton_ce.scale_rows_(grad, torch.tensor(2.0))
    assert torch.equal(grad[2], x[2] * 2)  # exact
    unchanged = x.clone()
    triton_ce.scale_rows_(unchanged, torch.tensor(1.0))
    assert torch.equal(unchanged[1:], x[1:])


@pytest.mark.parametrize("call", ["out of place", "in place", "linear"])
def test_second_backward_through_the_same_graph_raises(call):
    """The stored gradient is scaled in place on the device and handed over: a second
    backward (retain_graph=True) raises instead of scaling it twice."""
    x, target = case(3, 7, seed=6)
    logits = x.clone().requires_grad_()
    if call == "linear":
        weight = torch.randn(7, 7, requires_grad=True)
        loss = xloss.linear_cross_entropy(logits, weight, target)
    else:
        work = logits * 1 if call == "in place" else logits
        loss = xloss.cross_entropy(work, target, inplace_backward=call == "in place")
    (2 * loss).backward(retain_graph=True)
    first = logits.grad.clone()
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        loss.backward()
    x64 = x.double().requires_grad_()
    if call == "linear":
        reference = reference_cross_entropy(x64 @ weight.detach().double().T, target)
    else:
        reference = reference_cross_entropy(x64, target)
    (2 * reference).backward()
    torch.testing.assert_close(first.double(), x64.grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_func_grad_on_triton(inplace):
    x, target = case(4, 7, seed=2)
    target[3] = -100

    def loss_fn(z):
        return xloss.cross_entropy(z * 1, target, label_smoothing=0.1, inplace_backward=inplace)

    grad = torch.func.grad(loss_fn)(x)
    x64 = x.double().requires_grad_()
    reference_cross_entropy(x64, target, eps=0.1, keep=target != -100).backward()
    torch.testing.assert_close(grad.double(), x64.grad, rtol=2e-5, atol=2e-6)
