"""xloss.compat.torch.linear_cross_entropy against torch 2.13's own function."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from xloss.compat.torch import linear_cross_entropy

C, H = 13, 6


def case(input_shape, weight_shape, target_kind, *, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*input_shape, H, generator=gen, dtype=torch.float64)
    head = torch.randn(*weight_shape, H, generator=gen, dtype=torch.float64)
    linear_bias = torch.randn(weight_shape, generator=gen, dtype=torch.float64) if bias else None
    logits_shape = (*input_shape, *weight_shape)
    if target_kind == "probabilities":
        target = torch.rand(logits_shape, generator=gen, dtype=torch.float64)
        target = target / target.sum(len(input_shape), keepdim=True)
    else:
        index_shape = (*input_shape, *weight_shape[1:])
        target = torch.randint(0, weight_shape[0], index_shape, generator=gen)
        if target.dim() > 0:
            target.view(-1)[1::4] = -100
    return hidden, head, target, linear_bias


def loss_and_grads(fn, hidden, head, target, linear_bias, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, head, linear_bias)
              if t is not None]  # fmt: skip
    bias = leaves[2] if linear_bias is not None else None
    loss = fn(leaves[0], leaves[1], target, linear_bias=bias, **kwargs)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(9), dtype=loss.dtype)
    grads = torch.autograd.grad((loss * upstream).sum(), leaves)
    return loss.detach(), grads


def assert_same_as_torch(hidden, head, target, linear_bias, dtype=torch.float64, **kwargs):
    args = [t.to(dtype) if t is not None and t.is_floating_point() else t
            for t in (hidden, head, target, linear_bias)]  # fmt: skip
    if kwargs.get("weight") is not None:
        kwargs["weight"] = kwargs["weight"].to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream's "options ignored" fallback warning
        want, want_grads = loss_and_grads(F.linear_cross_entropy, *args, **kwargs)
    got, got_grads = loss_and_grads(linear_cross_entropy, *args, **kwargs)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


OPTIONS = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.15),
    "weighted": dict(weight=torch.rand(C, dtype=torch.float64) + 0.5),
    "weighted+smoothing": dict(
        weight=torch.rand(C, dtype=torch.float64) + 0.5, label_smoothing=0.1
    ),  # fmt: skip
    "ignore 3": dict(ignore_index=3),
    "chunked": dict(options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4)),
    "chunked default": dict(options=torch.nn.LinearCrossEntropyOptions()),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", OPTIONS)
def test_index_targets_match_torch(option, reduction, bias, dtype):
    hidden, head, target, linear_bias = case((17,), (C,), "index", bias=bias)
    ignore_index = OPTIONS[option].get("ignore_index")
    if ignore_index is not None:
        target = torch.where(target == -100, ignore_index, target)
    assert_same_as_torch(hidden, head, target, linear_bias, dtype=dtype,
                         reduction=reduction, **OPTIONS[option])  # fmt: skip


@pytest.mark.parametrize(
    "input_shape,weight_shape,kind",
    [
        ((), (C,), "index"),
        ((), (C,), "probabilities"),
        ((5,), (C,), "probabilities"),
        ((5,), (C, 3), "index"),
        ((5,), (C, 3, 2), "index"),
        ((5,), (C, 3), "probabilities"),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_other_shapes_and_probabilities_match_torch(input_shape, weight_shape, kind, reduction):
    hidden, head, target, linear_bias = case(input_shape, weight_shape, kind, bias=True)
    for smoothing in (0.0, 0.2):
        assert_same_as_torch(hidden, head, target, linear_bias, reduction=reduction,
                             label_smoothing=smoothing)  # fmt: skip


def test_all_ignored_mean_is_zero_not_nan():
    """The one documented difference: upstream's mean over no row is NaN."""
    hidden, head, target, _ = case((4,), (C,), "index")
    target = torch.full_like(target, -100)
    assert torch.isnan(F.linear_cross_entropy(hidden, head, target))
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, head, target)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


ERRORS = [
    (dict(input=torch.zeros(2, 3, H)), ValueError, r"`input` must have shape \(in_features\)"),
    (dict(linear_weight=torch.zeros(C, H + 1)), ValueError, r"`linear_weight` must have shape"),
    (dict(linear_bias=torch.zeros(C + 1)), ValueError, r"`linear_bias` must have shape \(13,\)"),
    (dict(reduction="batchmean"), ValueError, "`reduction` must be one of"),
    (dict(ignore_index=1.5), TypeError, "`ignore_index` must be an int or None"),
    (dict(options={"batch_chunk_size": 2}), TypeError, "`options` must be a torch.nn.Linear"),
    (dict(target=torch.rand(4, C), ignore_index=0), ValueError, "`ignore_index` must be None"),
    (
        dict(input=torch.zeros(H), linear_weight=torch.zeros(C, 2, H), target=torch.zeros(2)),
        ValueError,
        "needs batched",
    ),  # fmt: skip
    (dict(target=torch.tensor([0, 1, 2, C])), ValueError, r"must lie in \[0, 12\]"),
]


@pytest.mark.parametrize("kwargs,error,match", ERRORS)
def test_errors(kwargs, error, match):
    args = dict(input=torch.zeros(4, H), linear_weight=torch.zeros(C, H),
                target=torch.zeros(4, dtype=torch.long))  # fmt: skip
    args.update(kwargs)
    with pytest.raises(error, match=match):
        linear_cross_entropy(args.pop("input"), args.pop("linear_weight"), args.pop("target"),
                             **args)  # fmt: skip


def test_the_signature_is_torchs():
    import inspect

    ours = inspect.signature(linear_cross_entropy)
    theirs = inspect.signature(F.linear_cross_entropy)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, parameter in theirs.parameters.items():
        assert ours.parameters[name].default == parameter.default
        assert ours.parameters[name].kind == parameter.kind
