"""Hostile-user regressions (issue 11): each case ends in the right number or a clear error."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xloss
from xloss._core.validation import check_inplace_allowed

# ---------------------------------------------------------------------------------------
# inplace_backward on a leaf that requires grad, or a view of one: raise like PyTorch


_VIEWS = {
    "parameter": lambda param: param,
    "view": lambda param: param.view(3, 2, 5).reshape(6, 5),
    "slice": lambda param: param[1:],
}


@pytest.mark.parametrize("case", list(_VIEWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inplace_backward_on_a_leaf_raises_and_leaves_it_untouched(case, dtype):
    param = torch.nn.Parameter(torch.randn(6, 5, dtype=dtype))
    before = param.detach().clone()
    logits = _VIEWS[case](param)
    target = torch.randint(0, 5, logits.shape[:1])
    what = "a leaf tensor" if case == "parameter" else "a view of a leaf tensor"
    with pytest.raises(
        RuntimeError, match=f"`input` is {what} that requires grad.*inplace_backward=False"
    ):
        xloss.cross_entropy(logits, target, inplace_backward=True)
    assert torch.equal(param.detach(), before)
    assert param.grad is None


def test_inplace_backward_on_a_leaf_raises_under_torch_compile():
    param = torch.nn.Parameter(torch.randn(6, 5))
    before = param.detach().clone()
    target = torch.randint(0, 5, (6,))

    def loss_fn(logits, target):
        return xloss.cross_entropy(logits, target, inplace_backward=True, validate_args=False)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        compiled(param, target)
    with pytest.raises(RuntimeError, match="view of a leaf tensor"):
        compiled(param[1:], target[1:])
    assert torch.equal(param.detach(), before)


def test_inplace_backward_still_writes_into_non_leaf_logits():
    param = torch.nn.Parameter(torch.randn(6, 5))
    target = torch.randint(0, 5, (6,))
    logits = param * 1.0  # a non-leaf: overwriting it is the point of the option
    reference = torch.nn.functional.cross_entropy(param.double(), target)
    (expected,) = torch.autograd.grad(reference, param)  # float32, like param
    loss = xloss.cross_entropy(logits, target, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6)
    # a view of a non-leaf is allowed too, as in PyTorch
    xloss.cross_entropy(
        (param * 1.0).view(2, 3, 5), target.view(2, 3), class_dim=-1, inplace_backward=True
    ).backward()


def test_inplace_allowed_without_grad_mode_or_grad():
    param = torch.nn.Parameter(torch.randn(6, 5))
    with torch.no_grad():
        check_inplace_allowed(param)
        xloss.cross_entropy(param, torch.randint(0, 5, (6,)), inplace_backward=True)
    check_inplace_allowed(torch.randn(3, 4))
    check_inplace_allowed(torch.randn(3, 4)[1:])
    with pytest.raises(RuntimeError, match="`scores` is a leaf.*`in_place=False`"):
        check_inplace_allowed(param, name="scores", option="in_place")


# ---------------------------------------------------------------------------------------
# float64 references written here (never xloss itself)


def reference_rows(x, target, weight=None, eps=0.0, z=0.0):
    """Per-row loss (float64 torch ops, differentiable twice) and each row's w[y]."""
    num_classes = x.shape[-1]
    w = torch.ones(num_classes, dtype=x.dtype) if weight is None else weight
    lse = x.logsumexp(-1)
    nll = lse - x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss = (1 - eps) * w[target] * nll + eps / num_classes * (w.sum() * lse - x @ w)
    return loss + z * lse.square(), w[target]


def reference_reduce(loss, reduction, denominator):
    if reduction == "mean":
        return loss.sum() / denominator.sum()
    if reduction == "sum":
        return loss.sum()
    if reduction == "sample":
        return loss.sum(-1) / denominator.sum(-1)
    return loss


def hessian_vector(fn, x, v):
    """d/dx <d fn(x) / dx, v>: a second derivative, taken with create_graph=True."""
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    return hv


# ---------------------------------------------------------------------------------------
# 1. second-order gradients: right where claimed, a clear error at the second backward
#    everywhere else

SECOND_BACKWARD = r'differentiated twice.*with xloss\.backends\.use\("torch"\)'


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_through_the_cross_entropy_kernel_raises(dtype, inplace_backward,
                                                                 reduction):  # fmt: skip
    x = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 3, 6, 1, 2])
    loss = xloss.cross_entropy(x * 1.0, target, reduction=reduction, label_smoothing=0.1,
                               inplace_backward=inplace_backward)  # fmt: skip
    (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    expected = torch.autograd.grad(
        reference_reduce(*reference_rows(x.double(), target, eps=0.1)[:1], reduction,
                         torch.ones(5, dtype=torch.float64)).sum(), x)[0]  # fmt: skip
    torch.testing.assert_close(grad.double(), expected.double(), atol=1e-2, rtol=1e-2)
    with pytest.raises(RuntimeError, match=SECOND_BACKWARD):
        grad.square().sum().backward()


def test_meta_gradient_through_the_kernel_raises_instead_of_a_wrong_number():
    # MAML: the inner gradient of W flows through the loss's gradient w.r.t. the logits
    hidden = torch.randn(6, 4)
    weight = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = xloss.cross_entropy(hidden @ weight.T, target)
    (grad_weight,) = torch.autograd.grad(loss, weight, create_graph=True)
    adapted = weight - 0.5 * grad_weight
    with pytest.raises(RuntimeError, match=SECOND_BACKWARD):
        xloss.cross_entropy(hidden @ adapted.T, target).backward()
    with xloss.backends.use("torch"):  # the documented way: the right meta-gradient
        loss = xloss.cross_entropy(hidden @ weight.T, target)
        (grad_weight,) = torch.autograd.grad(loss, weight, create_graph=True)
        xloss.cross_entropy(hidden @ (weight - 0.5 * grad_weight).T, target).backward()
    reference_weight = weight.detach().double().requires_grad_()
    h = hidden.double()
    inner = reference_rows(h @ reference_weight.T, target)[0].mean()
    (g,) = torch.autograd.grad(inner, reference_weight, create_graph=True)
    reference_rows(h @ (reference_weight - 0.5 * g).T, target)[0].mean().backward()
    torch.testing.assert_close(weight.grad.double(), reference_weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_backward_through_chunked_linear_cross_entropy_raises(reduction, dtype):
    hidden = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    weight = torch.randn(7, 3, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 1, -100, 6, 2])
    loss = xloss.linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=2)
    grads = torch.autograd.grad(loss, (hidden, weight), create_graph=True)
    for grad in grads:
        with pytest.raises(RuntimeError, match=SECOND_BACKWARD):
            grad.sum().backward(retain_graph=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sample"])
def test_linear_cross_entropy_float64_gradgradcheck(reduction):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0, 5, -100], [3, 3, 1]])

    def fn(hidden, weight, bias):
        options = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.01, chunk_size=4)
        return xloss.linear_cross_entropy(hidden, weight, target, bias, **options)

    assert torch.autograd.gradgradcheck(fn, (hidden, weight, bias))


def test_vocab_parallel_second_backward_raises():
    import torch.distributed as dist

    from xloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for dtype in (torch.float32, torch.float64):
            logits = torch.randn(4, 5, dtype=dtype, requires_grad=True)
            target = torch.tensor([0, 1, 4, -100])
            for reduction in ("mean", "none"):
                loss = vocab_parallel_cross_entropy(logits, target, reduction=reduction)
                (grad,) = torch.autograd.grad(loss.sum(), logits, create_graph=True)
                with pytest.raises(RuntimeError, match=SECOND_BACKWARD):
                    grad.square().sum().backward()
                hidden = torch.randn(4, 3, dtype=dtype, requires_grad=True)
                weight = torch.randn(5, 3, dtype=dtype, requires_grad=True)
                loss = vocab_parallel_linear_cross_entropy(hidden, weight, target,
                                                           reduction=reduction)  # fmt: skip
                (grad,) = torch.autograd.grad(loss.sum(), weight, create_graph=True)
                with pytest.raises(RuntimeError, match=SECOND_BACKWARD):
                    grad.square().sum().backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vocab_parallel_linear_under_autocast_computes_in_the_inputs_dtype(dtype):
    """As xloss.linear_cross_entropy: autocast does not lower the GEMMs of fp32 inputs
    (the forward's GEMM ran in bf16 before: 5e-4 off the float64 loss, not 4e-7)."""
    import torch.distributed as dist

    from xloss.distributed import vocab_parallel_linear_cross_entropy

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(37, 6, generator=g)
    weight = torch.randn(13, 6, generator=g)
    target = torch.randint(0, 13, (37,), generator=g)
    wide = [t.double().requires_grad_() for t in (hidden, weight)]
    reference = torch.nn.functional.cross_entropy(wide[0] @ wide[1].T, target)
    expected = torch.autograd.grad(reference, wide)
    leaves = [t.requires_grad_() for t in (hidden, weight)]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with torch.autocast("cpu", dtype=dtype):
            loss = vocab_parallel_linear_cross_entropy(*leaves, target)
        grads = torch.autograd.grad(loss, leaves)
    finally:
        dist.destroy_process_group()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


SECOND_ORDER_PATHS = {
    # name: (loss of logits-or-hidden x, dtype, tolerance); paths that claim second order
    "cross_entropy float64": ("ce", torch.float64, None, 1e-9),
    "cross_entropy forced torch": ("ce", torch.float32, "torch", 2e-4),
    "linear_cross_entropy float64": ("linear", torch.float64, None, 1e-9),
    "linear_cross_entropy per row": ("linear_rows", torch.float32, None, 2e-4),
    "linear_cross_entropy forced torch": ("linear", torch.float32, "torch", 2e-4),
}


@given(
    path=st.sampled_from(sorted(SECOND_ORDER_PATHS)),
    rows=st.integers(1, 5),
    classes=st.integers(2, 7),
    eps=st.sampled_from([0.0, 0.1, 0.5]),
    z=st.sampled_from([0.0, 0.01]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_property_second_order_gradients_match_torch(path, rows, classes, eps, z, reduction,
                                                     seed):  # fmt: skip
    kind, dtype, backend, tol = SECOND_ORDER_PATHS[path]
    if kind == "linear_rows":
        reduction = "none"
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (rows,), generator=g)
    options = dict(label_smoothing=eps, z_loss=z, reduction=reduction)
    hidden_size = 3
    weight = torch.randn(classes, hidden_size, generator=g, dtype=torch.float64)
    x = torch.randn(rows, classes if kind == "ce" else hidden_size, generator=g,
                    dtype=torch.float64)  # fmt: skip
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def ours(x):
        if kind == "ce":
            return xloss.cross_entropy(x, target, **options)
        return xloss.linear_cross_entropy(x, weight.to(dtype), target, chunk_size=2, **options)

    def reference(x):
        logits = x if kind == "ce" else x @ weight.T
        loss, denominator = reference_rows(logits, target, eps=eps, z=z)
        return reference_reduce(loss, reduction, denominator)

    context = xloss.backends.use(backend) if backend else contextlib.nullcontext()
    with context:
        got = hessian_vector(ours, x.to(dtype), v.to(dtype))
    expected = hessian_vector(reference, x, v)
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol * 10)


def test_torch_func_jacrev_of_grad_through_the_kernel_raises():
    target = torch.tensor([0, 1, 2])

    def loss_fn(x):
        return xloss.cross_entropy(x, target, validate_args=False)

    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=SECOND_BACKWARD):
        torch.func.jacrev(torch.func.grad(loss_fn))(x)
    with xloss.backends.use("torch"):
        hessian = torch.func.jacrev(torch.func.grad(loss_fn))(x.double())
    expected = torch.autograd.functional.hessian(
        lambda x: reference_rows(x, target)[0].mean(), x.double()
    )
    torch.testing.assert_close(hessian, expected)


# ---------------------------------------------------------------------------------------
# 3. out-of-range class indices with validate_args=False: the kernels raise, never read


@pytest.mark.parametrize("bad", [7, 10**11, -5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["grad", "inplace", "no_grad"])
def test_out_of_range_target_without_validation_raises_in_the_kernel(bad, dtype, mode):
    x = torch.randn(6, 7, dtype=dtype, requires_grad=mode != "no_grad")
    target = torch.tensor([0, 1, bad, 3, -100, 6])  # -100: ignored, as it should be
    logits = x * 1.0 if mode == "inplace" else x
    with pytest.raises(ValueError, match=rf"must lie in \[0, 6\], found {bad} .*validate_args"):
        xloss.cross_entropy(logits, target, validate_args=False, reduction="none",
                            inplace_backward=mode == "inplace")  # fmt: skip


@pytest.mark.parametrize("bad", [6, 10**11, -5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_out_of_range_target_without_validation_raises(bad, dtype):
    hidden = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    weight = torch.randn(6, 3, dtype=dtype)
    target = torch.tensor([0, bad, -100, 2])
    for reduction in ("mean", "none"):
        # numba (fp32) names the index; the portable twin's gather raises torch's error
        with pytest.raises((ValueError, RuntimeError), match="must lie in|out of bounds"):
            xloss.linear_cross_entropy(hidden, weight, target, reduction=reduction,
                                       validate_args=False)  # fmt: skip


def test_kernel_rows_past_a_bad_target_are_still_right():
    # the kernel skips only the bad row; the call raises, nothing is read out of bounds
    from xloss.ops import kernel

    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"found 5 \(row 1"):
        kernel.row_loss(x, torch.tensor([0, 5, 2]))
    loss = kernel.row_loss(x, torch.tensor([0, -1, 2]))
    expected = reference_rows(x.double(), torch.tensor([0, 0, 2]))[0]
    torch.testing.assert_close(loss.double()[[0, 2]], expected[[0, 2]], atol=1e-6, rtol=1e-6)
    assert loss[1] == 0


# ---------------------------------------------------------------------------------------
# 4. gradients of a learnable class weight and of a tensor normalizer, in every dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weight_gets_its_gradient_in_every_dtype(dtype, reduction):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g).to(dtype)
    target = torch.tensor([0, 4, -100, 2, 2, 1])
    weight = (torch.rand(5, generator=g) + 0.5).to(dtype).requires_grad_()
    out = xloss.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.2)
    out.sum().backward()
    reference_weight = weight.detach().double().requires_grad_()
    kept = target != -100
    loss, denominator = reference_rows(x.double()[kept], target[kept], reference_weight, eps=0.2)
    reference_reduce(loss, reduction, denominator).sum().backward()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(weight.grad.double(), reference_weight.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_normalizer_gets_its_gradient(dtype):
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 5, 1, -100])
    normalizer = torch.tensor(3.0, dtype=dtype, requires_grad=True)
    xloss.cross_entropy(x, target, normalizer=normalizer).backward()
    loss = reference_rows(x.detach().double()[:3], target[:3])[0].sum()
    torch.testing.assert_close(normalizer.grad.double(), -loss / 9.0)


def test_linear_cross_entropy_class_weight_and_normalizer_get_their_gradients():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, 3, generator=g)
    weight = torch.randn(6, 3, generator=g)
    target = torch.tensor([0, 5, -100, 2, 2])
    class_weight = (torch.rand(6, generator=g) + 0.5).requires_grad_()
    normalizer = torch.tensor(4.0, requires_grad=True)
    xloss.linear_cross_entropy(hidden, weight, target, class_weight=class_weight,
                               label_smoothing=0.1).backward()  # fmt: skip
    xloss.linear_cross_entropy(hidden, weight, target, normalizer=normalizer).backward()
    reference_weight = class_weight.detach().double().requires_grad_()
    kept = target != -100
    logits = (hidden @ weight.T).double()[kept]
    loss, denominator = reference_rows(logits, target[kept], reference_weight, eps=0.1)
    (loss.sum() / denominator.sum()).backward()
    torch.testing.assert_close(class_weight.grad.double(), reference_weight.grad, atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    total = reference_rows(logits, target[kept])[0].sum()
    torch.testing.assert_close(normalizer.grad.double(), -total / 16.0, atol=1e-6, rtol=1e-5)


def test_vocab_parallel_linear_normalizer_gets_its_gradient():
    import torch.distributed as dist

    from xloss.distributed import vocab_parallel_linear_cross_entropy

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        hidden = torch.randn(4, 3, dtype=torch.float64)
        weight = torch.randn(5, 3, dtype=torch.float64)
        target = torch.tensor([0, 4, -100, 1])
        normalizer = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        vocab_parallel_linear_cross_entropy(hidden, weight, target,
                                            normalizer=normalizer).backward()  # fmt: skip
    finally:
        dist.destroy_process_group()
    total = reference_rows(hidden[[0, 1, 3]] @ weight.T, target[[0, 1, 3]])[0].sum()
    torch.testing.assert_close(normalizer.grad, -total / 4.0)


# ---------------------------------------------------------------------------------------
# 11. reduction="sample" on an empty batch: an empty (0,) result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_reduction_of_an_empty_batch(dtype):
    import torch.distributed as dist

    from xloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    logits = torch.zeros(0, 4, 5, dtype=dtype, requires_grad=True)
    tokens = torch.zeros(0, 4, dtype=torch.long)
    hidden = torch.zeros(0, 4, 3, dtype=dtype, requires_grad=True)
    weight = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    results = [
        xloss.cross_entropy(logits, tokens, class_dim=-1, reduction="sample"),
        xloss.binary_cross_entropy_with_logits(logits, logits.detach(), reduction="sample"),
        xloss.linear_cross_entropy(hidden, weight, tokens, reduction="sample"),
    ]
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            results.append(vocab_parallel_cross_entropy(logits, tokens, reduction="sample"))
            results.append(
                vocab_parallel_linear_cross_entropy(hidden, weight, tokens, reduction="sample")
            )
        finally:
            dist.destroy_process_group()
    for result in results:
        assert result.shape == (0,) and result.dtype == dtype
        result.sum().backward()
    assert logits.grad.shape == logits.shape and hidden.grad.shape == hidden.shape


# ---------------------------------------------------------------------------------------
# 12. torch.func: grad works through the kernels; vmap raises naming the portable path


def test_torch_func_grad_through_the_kernels():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 6, generator=g)
    target = torch.tensor([0, 5, -100, 2])
    grad = torch.func.grad(lambda x: xloss.cross_entropy(x, target, label_smoothing=0.1))(x)
    kept = target != -100
    reference = x.double().requires_grad_()
    reference_rows(reference[kept], target[kept], eps=0.1)[0].mean().backward()
    torch.testing.assert_close(grad.double(), reference.grad, atol=1e-6, rtol=1e-5)
    hidden = torch.randn(4, 3, generator=g)
    weight = torch.randn(6, 3, generator=g)
    for reduction in ("mean", "none"):
        grad_weight = torch.func.grad(
            lambda w, r=reduction: xloss.linear_cross_entropy(hidden, w, target, reduction=r).sum()
        )(weight)
        reference = weight.double().requires_grad_()
        logits = hidden.double()[kept] @ reference.T
        loss = reference_rows(logits, target[kept])[0]
        (loss.mean() if reduction == "mean" else loss.sum()).backward()
        torch.testing.assert_close(grad_weight.double(), reference.grad, atol=1e-6, rtol=1e-5)


def test_torch_func_vmap_raises_naming_the_portable_path_which_works():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 6, generator=g)
    target = torch.randint(0, 6, (3, 4), generator=g)

    def loss_fn(x, target):
        return xloss.cross_entropy(x, target, validate_args=False)

    with pytest.raises(RuntimeError, match=r'vmap.*backends\.use\("torch"\)'):
        torch.func.vmap(torch.func.grad(loss_fn))(x, target)
    with xloss.backends.use("torch"):
        per_sample = torch.func.vmap(torch.func.grad(loss_fn))(x, target)
    for i in range(3):
        reference = x[i].double().requires_grad_()
        reference_rows(reference, target[i])[0].mean().backward()
        torch.testing.assert_close(per_sample[i].double(), reference.grad, atol=1e-6, rtol=1e-5)


def test_loss_scaled_in_place_after_the_call_still_backpropagates():
    # gradient accumulation scales the loss in place; nothing may have saved it
    x = torch.randn(4, 6, requires_grad=True)
    target = torch.tensor([0, 5, -100, 2])
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(6, 3, requires_grad=True)
    losses = [
        xloss.cross_entropy(x, target),
        xloss.cross_entropy(x * 1.0, target, inplace_backward=True),
        xloss.linear_cross_entropy(hidden, weight, target),
        xloss.linear_cross_entropy(hidden.double(), weight.double(), target),
    ]
    for loss in losses:
        loss /= 4
        loss.backward()
    assert x.grad is not None and weight.grad is not None


# ---------------------------------------------------------------------------------------
# 14. torch.compile(fullgraph=True) with validate_args=True; linear CE says it graph-breaks


def test_fullgraph_compile_keeps_the_target_check_in_the_graph():
    x = torch.randn(4, 6, requires_grad=True)
    normalizer = torch.tensor(3.0)

    def loss_fn(x, target):
        return xloss.cross_entropy(x, target, label_smoothing=0.1, normalizer=normalizer)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    target = torch.tensor([0, 5, -100, 2])
    out = compiled(x, target)
    out.backward()
    kept = target != -100
    expected = reference_rows(x.detach().double()[kept], target[kept], eps=0.1)[0].sum() / 3
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 5\]"):
        compiled(x, torch.tensor([0, 9, -100, 2]))


def test_linear_cross_entropy_fullgraph_names_the_graph_break_and_compiles_without_it():
    hidden = torch.randn(4, 3)
    weight = torch.randn(6, 3, requires_grad=True)
    target = torch.tensor([0, 5, -100, 2])

    def loss_fn(hidden, weight, target):
        return xloss.linear_cross_entropy(hidden, weight, target)

    with pytest.raises(Exception, match="fullgraph=False"):
        torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(hidden, weight, target)
    out = torch.compile(loss_fn, backend="aot_eager")(hidden, weight, target)
    expected = reference_rows((hidden @ weight.T).detach().double()[[0, 1, 3]], target[[0, 1, 3]])
    torch.testing.assert_close(out.double(), expected[0].mean(), atol=1e-6, rtol=1e-5)


def test_vmap_with_validate_args_names_validate_args_false():
    x = torch.randn(3, 4, 6)
    target = torch.randint(0, 6, (3, 4))
    with pytest.raises(RuntimeError, match="pass validate_args=False under vmap"):
        torch.func.vmap(lambda x, t: xloss.cross_entropy(x, t))(x, target)


# ---------------------------------------------------------------------------------------
# 17. autocast: the loss in float32, as F.cross_entropy under autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_returns_a_float32_loss_like_torch(dtype):
    x = torch.randn(4, 6).to(dtype).requires_grad_()
    target = torch.tensor([0, 5, 1, 2])
    with torch.autocast("cpu", dtype=dtype):
        ours = xloss.cross_entropy(x, target, label_smoothing=0.1)
        theirs = torch.nn.functional.cross_entropy(x, target, label_smoothing=0.1)
        linear = xloss.linear_cross_entropy(torch.randn(4, 3, dtype=dtype),
                                            torch.randn(6, 3, dtype=dtype), target)  # fmt: skip
    assert ours.dtype == theirs.dtype == linear.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.backward()
    assert x.grad.dtype == dtype
    assert xloss.cross_entropy(x, target).dtype == dtype  # outside autocast: the input's


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_autocast_keeps_float32_logits_in_float32(backend, monkeypatch):
    """Cross-entropy is on autocast's float32 list: fp32 logits under bf16 autocast give
    F.cross_entropy's float32 numbers on every backend (the torch-ops path's weighted
    logit sum, a GEMM, ran in bf16: 9e-5 off the float64 loss, not 1e-6)."""
    monkeypatch.setenv("XLOSS_BACKEND", backend)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 200, generator=g).requires_grad_()
    target = torch.randint(0, 200, (64,), generator=g)
    weight = torch.rand(200, generator=g) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = xloss.cross_entropy(x, target, weight, label_smoothing=0.5)
    (grad,) = torch.autograd.grad(loss, x)
    wide = x.detach().double().requires_grad_()
    reference = torch.nn.functional.cross_entropy(wide, target, weight.double(),
                                                  label_smoothing=0.5)  # fmt: skip
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(reference, wide)[0],
                               rtol=1e-4, atol=1e-7)  # fmt: skip


@pytest.mark.parametrize("backend", ["numba", "triton", "torch"])
@pytest.mark.parametrize("num_classes", [10, 3000])  # one block / several blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_of_minus_inf_only_gives_nan_as_torch(backend, num_classes, dtype):
    """A fully masked row: F.cross_entropy gives a NaN loss and NaN gradient (0/0 softmax).
    The numba kernel once returned a tiny finite loss and a zero gradient there."""
    if backend == "numba" and not xloss.ops.kernel.kernel_available():
        pytest.skip("numba kernel unavailable")
    if backend == "triton" and not xloss.backends.interpreting():
        pytest.skip("Triton's interpreter is off")
    torch.manual_seed(0)
    x = torch.randn(3, num_classes).to(dtype)
    x[1] = float("-inf")
    target = torch.tensor([1, 2, 3])
    reference = torch.nn.functional.cross_entropy(x.float(), target, reduction="none")
    assert reference[1].isnan()
    with xloss.backends.use(backend):
        logits = x.clone().requires_grad_()
        out = xloss.cross_entropy(
            logits, target, reduction="none", label_smoothing=0.1, return_stats=True
        )
        out.loss.sum().backward()
        capped = xloss.cross_entropy(x, target, reduction="none", softcap=5.0)
    assert out.loss[1].isnan() and logits.grad[1].isnan().all()
    assert out.loss[[0, 2]].isfinite().all() and logits.grad[[0, 2]].isfinite().all()
    assert out.lse[1] == float("-inf") and out.entropy[1].isnan() and out.predicted[1] == 0
    # soft-capping maps -inf to -cap: a uniform row, a finite loss of log C
    expected = torch.log(torch.tensor(float(num_classes)))
    torch.testing.assert_close(capped[1].float(), expected, rtol=5e-3, atol=0)


def test_masked_sequence_logits_on_every_route():
    """(B, T, C) logits with a padding mask (the one-call host path in eager mode): the
    same numbers under torch.compile(fullgraph=True), torch.func.grad and with
    validate_args=False; a second backward raises; four threads agree."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 5, 7, generator=g)
    target = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.arange(5) < torch.tensor([5, 2, 4])[:, None]
    target[1, 3] = 99  # padding holds garbage: masked, never read

    def loss_fn(x):
        return xloss.cross_entropy(x, target, class_dim=-1, mask=mask, label_smoothing=0.1)

    keep = mask.reshape(-1)
    wide = x.double().reshape(-1, 7)[keep].requires_grad_()
    reference = torch.nn.functional.cross_entropy(wide, target.reshape(-1)[keep],
                                                  label_smoothing=0.1)  # fmt: skip
    (expected,) = torch.autograd.grad(reference, wide)
    leaf = x.clone().requires_grad_()
    eager = loss_fn(leaf)
    (grad,) = torch.autograd.grad(eager, leaf, create_graph=True)
    torch.testing.assert_close(eager.double(), reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double().reshape(-1, 7)[keep], expected, rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    assert bool((grad.reshape(-1, 7)[~keep] == 0).all())
    with pytest.raises(RuntimeError, match=SECOND_BACKWARD):
        grad.square().sum().backward()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x)
    functional = torch.func.grad(loss_fn)(x)
    unchecked = xloss.cross_entropy(x, target, class_dim=-1, mask=mask, label_smoothing=0.1,
                                    validate_args=False)  # fmt: skip
    for value in (compiled, unchecked):
        torch.testing.assert_close(value.double(), reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(functional, grad.detach(), rtol=1e-5, atol=1e-7)
    results = []
    threads = [threading.Thread(target=lambda: results.append(loss_fn(x))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(torch.equal(r, eager.detach()) for r in results)
