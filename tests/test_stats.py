"""return_stats=True: lse, entropy, argmax and accuracy against materialised float64 logits,
on the numba kernel path and the portable torch path."""

import pytest
import torch

import xloss
from xloss import backends
from xloss.ops import kernel

BACKENDS = ["numba", "torch"]


def reference_stats(logits, target, keep, softcap=None):
    """float64 (lse, entropy, predicted, accuracy) of class-last logits (..., C)."""
    raw = logits.double()
    predicted = raw.argmax(-1)  # the raw logits' argmax (soft-capping is monotonic)
    x = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    lse = torch.logsumexp(x, -1)
    log_p = torch.log_softmax(x, -1)
    entropy = -(log_p.exp() * torch.where(torch.isinf(log_p), 0.0, log_p)).sum(-1)
    lse, entropy = torch.where(keep, lse, 0.0), torch.where(keep, entropy, 0.0)
    predicted = torch.where(keep, predicted, -1)
    hits = ((predicted == target) & keep).sum().double()
    accuracy = hits / keep.sum() if keep.any() else torch.zeros((), dtype=torch.float64)
    return lse, entropy, predicted, accuracy


def assert_stats(out, want, tol):
    lse, entropy, predicted, accuracy = want
    for got in (out.lse, out.entropy, out.predicted, out.accuracy):
        assert not got.requires_grad
    assert out.predicted.dtype == torch.int64 and out.predicted.shape == predicted.shape
    torch.testing.assert_close(out.lse.double(), lse, rtol=tol, atol=tol)
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=tol, atol=tol)
    assert torch.equal(out.predicted, predicted)
    torch.testing.assert_close(out.accuracy.double(), accuracy)


def make_logits(shape, classes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, classes, generator=gen)).to(dtype)
    target = torch.randint(0, classes, shape, generator=gen)
    flat = logits.view(-1, classes)
    flat[0, : classes // 3] = float("-inf")  # a masked vocabulary slice
    target.view(-1)[0] = classes - 1
    flat[1, 2] = flat[1, 5] = flat[1].max() + 1  # a tie: the first index wins
    target.view(-1)[1] = 2  # a hit
    target.view(-1)[3::4] = -100
    return logits, target


CASES = {
    "plain": dict(),
    "softcap": dict(softcap=4.0),
    "smoothing+z": dict(label_smoothing=0.1, z_loss=1e-3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("classes", [7, 1500, 3001])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_stats(backend, classes, case):
    options = CASES[case]
    logits, target = make_logits((3, 5), classes)
    keep = target != -100
    mask = torch.ones_like(keep)
    mask[2, 1] = False
    with backends.use(backend):
        plain = xloss.cross_entropy(logits, target, class_dim=-1, mask=mask, **options)
        out = xloss.cross_entropy(
            logits, target, class_dim=-1, mask=mask, return_stats=True, **options
        )
    assert isinstance(out, xloss.CrossEntropyStats)
    assert torch.equal(out.loss, plain)
    want = reference_stats(logits, target, keep & mask, options.get("softcap"))
    assert_stats(out, want, tol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_stats_half(backend, dtype, monkeypatch):
    logits, target = make_logits((9,), 1100, dtype=dtype)
    for serial_limit in (2**62, -1):  # numba: the serial kernel, then numba's pool
        monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", serial_limit)
        with backends.use(backend):
            out = xloss.cross_entropy(logits, target, return_stats=True)
        assert out.lse.dtype == torch.float32
        assert_stats(out, reference_stats(logits, target, target != -100), tol=2e-5)


def test_cross_entropy_stats_class_dim_1_and_inplace_backward():
    logits, target = make_logits((2, 4), 11)  # (N, d, C)
    logits_c1 = logits.movedim(-1, 1).contiguous().requires_grad_()  # (N, C, d)
    out = xloss.cross_entropy(logits_c1, target, return_stats=True)
    assert_stats(out, reference_stats(logits, target, target != -100), tol=2e-5)
    seq = logits.clone().requires_grad_()
    work = seq * 1.0  # a non-leaf the gradient may overwrite
    out = xloss.cross_entropy(work, target, class_dim=-1, inplace_backward=True,
                              return_stats=True)  # fmt: skip
    out.loss.backward()
    assert_stats(out, reference_stats(logits, target, target != -100), tol=2e-5)


def reference_linear(hidden, weight, bias):
    logits = hidden.double() @ weight.double().T
    return logits if bias is None else logits + bias.double()


@pytest.mark.parametrize("shape", [(13,), (2, 3, 4)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_stats(backend, case, reduction, shape):
    options = CASES[case]
    gen = torch.Generator().manual_seed(1)
    classes, hidden_size = 1300, 8
    hidden = torch.randn(*shape, hidden_size, generator=gen, requires_grad=True)
    weight = torch.randn(classes, hidden_size, generator=gen, requires_grad=True)
    bias = torch.randn(classes, generator=gen)
    target = torch.randint(0, classes, shape, generator=gen)
    target.view(-1)[1::3] = -100
    args = (hidden, weight, target, bias)
    kwargs = dict(reduction=reduction, chunk_size=5, **options)
    with backends.use(backend):
        plain = xloss.linear_cross_entropy(*args, **kwargs)
        want_grads = torch.autograd.grad(plain.sum(), (hidden, weight))
        out = xloss.linear_cross_entropy(*args, return_stats=True, **kwargs)
        grads = torch.autograd.grad(out.loss.sum(), (hidden, weight))
    # the stats specialisation of the kernel may sum in another order: 1-ulp differences
    torch.testing.assert_close(out.loss, plain, rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    logits = reference_linear(hidden.detach(), weight.detach(), bias)
    want = reference_stats(logits, target, target != -100, options.get("softcap"))
    assert_stats(out, want, tol=2e-5)


def test_linear_cross_entropy_stats_nothing_kept_and_no_grad():
    hidden = torch.randn(4, 3)
    weight = torch.randn(6, 3)
    target = torch.full((4,), -100)
    out = xloss.linear_cross_entropy(hidden, weight, target, return_stats=True)
    assert out.accuracy.item() == 0.0 and torch.equal(out.predicted, torch.full((4,), -1))
    with torch.no_grad():
        target = torch.tensor([0, 1, 2, 3])
        out = xloss.linear_cross_entropy(hidden, weight, target, return_stats=True)
    want = reference_stats(reference_linear(hidden, weight, None), target, target >= 0)
    assert_stats(out, want, tol=2e-5)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_stats_leave_loss_and_gradient_unchanged(dtype, softcap):
    """The stats specialisation of the row kernel writes the same loss and gradient
    (smoothing over a -inf slice included: an inf loss stays inf)."""
    logits, target = make_logits((6,), 2100, dtype=dtype)
    index = torch.where(target == -100, -1, target)
    options = dict(grad_scale=0.5, label_smoothing=0.1, z_loss=1e-3, softcap=softcap)
    plain = logits.clone()
    loss = kernel.row_loss_and_grad_(plain, index, **options)
    with_stats = logits.clone()
    values, predicted = torch.empty(6, 2), torch.empty(6, dtype=torch.int64)
    loss_stats = kernel.row_loss_and_grad_(with_stats, index, stats=(values, predicted),
                                           **options)  # fmt: skip
    # the same math; the specialisation may sum in another order (1-ulp differences)
    torch.testing.assert_close(loss_stats, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(with_stats, plain, rtol=1e-5, atol=1e-7, equal_nan=True)
    want = reference_stats(logits, index, index >= 0, softcap)
    torch.testing.assert_close(values[:, 0].double(), want[0], rtol=2e-5, atol=2e-5)
    assert torch.equal(predicted, want[2])


def test_errors():
    logits, target = make_logits((4,), 7)
    with pytest.raises(TypeError, match="`return_stats` must be a bool"):
        xloss.cross_entropy(logits, target, return_stats=1)
    with pytest.raises(ValueError, match="needs class-index targets"):
        xloss.cross_entropy(logits, torch.softmax(logits, -1), return_stats=True)
    with pytest.raises(TypeError, match="`return_stats` must be a bool"):
        xloss.linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3), target,
                                   return_stats="yes")  # fmt: skip
    with pytest.raises(ValueError, match="`stats` must be contiguous"):
        bad = (torch.empty(4, 3), torch.empty(4, dtype=torch.long))  # (R, 3): wrong
        kernel.row_loss_and_grad_(logits.clone(), target.clamp(min=0), grad_scale=1.0, stats=bad)


def test_cross_entropy_stats_under_torch_compile_fullgraph():
    logits, target = make_logits((6,), 50)
    keep = target != -100

    def loss_fn(x, y):
        return xloss.cross_entropy(x, y, return_stats=True, validate_args=False)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    out = compiled(logits.clone().requires_grad_(), target)
    assert_stats(out, reference_stats(logits, target, keep), tol=2e-5)
    torch.testing.assert_close(out.loss, xloss.cross_entropy(logits, target))


def reference_grad(logits, target, keep):
    """float64 gradient of the mean cross-entropy over kept positions (0 when none)."""
    x = logits.detach().double().requires_grad_()
    rows = torch.nn.functional.cross_entropy(
        x.reshape(-1, x.shape[-1]), torch.where(keep, target, 0).reshape(-1), reduction="none"
    )
    (rows * keep.reshape(-1)).sum().div(max(int(keep.sum()), 1)).backward()
    return x.grad


@pytest.fixture
def launches(monkeypatch):
    """Every numba launch of the row kernel, with whether it filled statistics."""
    calls = []
    launch = kernel._launch

    def counted(*args, stats=None, **kwargs):
        calls.append(stats is not None)
        return launch(*args, stats=stats, **kwargs)

    monkeypatch.setattr(kernel, "_launch", counted)
    return calls


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_fills_stats_in_the_loss_pass(launches, dtype, inplace):
    """One kernel launch gives loss, gradient and stats (no read-only stats pass first),
    in place too (the stats are read before the row is overwritten)."""
    logits, target = make_logits((2, 3), 1100, dtype=dtype)
    keep = target != -100
    leaf = logits.clone().requires_grad_()
    out = xloss.cross_entropy(leaf * 1.0, target, class_dim=-1, inplace_backward=inplace,
                              return_stats=True)  # fmt: skip
    assert launches == [True]
    out.loss.backward()
    assert launches == [True]  # backward only scales the stored gradient
    assert_stats(out, reference_stats(logits, target, keep), tol=2e-5)
    rows = torch.nn.functional.cross_entropy(logits.double().reshape(-1, 1100),
                                             target.reshape(-1), reduction="none")  # fmt: skip
    want_loss = rows.sum() / keep.sum()  # ignore_index rows give 0
    loss_tol = 2e-5 if dtype == torch.float32 else 1e-2  # a bf16 loss is rounded to bf16
    torch.testing.assert_close(out.loss.double(), want_loss, rtol=loss_tol, atol=0)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(leaf.grad.double(), reference_grad(logits, target, keep),
                               rtol=0, atol=tol)  # fmt: skip


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("rows", [0, 4])
def test_kernel_stats_no_rows_and_all_ignored(rows, inplace):
    logits = torch.randn(rows, 7)
    target = torch.full((rows,), -100)
    leaf = logits.clone().requires_grad_()
    out = xloss.cross_entropy(leaf * 1.0, target, inplace_backward=inplace, return_stats=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.accuracy.item() == 0.0
    assert torch.equal(out.predicted, torch.full((rows,), -1))
    assert torch.equal(out.lse, torch.zeros(rows)) and torch.equal(out.entropy, torch.zeros(rows))
    assert torch.equal(leaf.grad, torch.zeros(rows, 7))


@pytest.mark.parametrize("inplace", [False, True])
def test_kernel_stats_under_torch_compile_fullgraph_with_backward(inplace):
    """The ops' fake implementations give the stats' shapes: no graph break, in place too."""
    logits, target = make_logits((6,), 50)
    keep = target != -100

    def step(x, y):
        out = xloss.cross_entropy(x * 1.0, y, return_stats=True, validate_args=False,
                                  inplace_backward=inplace, reduction="sum")  # fmt: skip
        return out.loss, out.lse, out.entropy, out.predicted, out.accuracy

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    leaf = logits.clone().requires_grad_()
    loss, *stats = compiled(leaf, target)
    loss.backward()
    assert_stats(xloss.CrossEntropyStats(loss, *stats), reference_stats(logits, target, keep),
                 tol=2e-5)  # fmt: skip
    want = reference_grad(logits, target, keep) * keep.sum()  # reduction="sum"
    torch.testing.assert_close(leaf.grad.double(), want, rtol=0, atol=1e-6)
