"""xloss.compat.liger against a float64 reference of Liger-Kernel's documented formula."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xloss.compat.liger import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss


def reference(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    lse_square_scale=0.0,
    label_smoothing=0.0,
    reduction="mean",
    softcap=None,
):
    """Per-row loss and z-loss from the formula; mean: loss / sum w[y] + z / n (float64)."""
    x = logits.double().reshape(-1, logits.shape[-1])
    y = target.reshape(-1)
    num_classes = x.shape[-1]
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    losses, z_losses, weights = [], [], []
    for row, label in zip(x, y.tolist(), strict=True):
        if label == ignore_index:
            losses.append(row.sum() * 0)
            z_losses.append(row.sum() * 0)
            weights.append(0.0)
            continue
        lse = torch.log(torch.exp(row - row.max()).sum()) + row.max()
        nll = (1 - label_smoothing) * w[label] * (lse - row[label])
        smooth = label_smoothing / num_classes * (w * (lse - row)).sum()
        losses.append(nll + smooth)
        z_losses.append(lse_square_scale * lse**2)
        weights.append(float(w[label]))
    loss, z = torch.stack(losses), torch.stack(z_losses)
    kept = sum(1 for label in y.tolist() if label != ignore_index)
    if reduction == "none":
        return (loss + z).reshape(target.shape), z.reshape(target.shape)
    if reduction == "sum":
        return loss.sum() + z.sum(), z.sum()
    loss_mean = loss.sum() / sum(weights) if kept else loss.sum() * 0
    z_mean = z.sum() / kept if kept else z.sum() * 0
    return loss_mean + z_mean, z_mean


def make_batch(shape, seed=0, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    if ignore:
        target.view(-1)[::3] = -100
    return logits, target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"lse_square_scale": 1e-3},
        {"softcap": 2.5, "lse_square_scale": 1e-2},
        {"label_smoothing": 0.2, "lse_square_scale": 1e-2, "weighted": True},
    ],
)
def test_matches_reference(reduction, options):
    options = dict(options)
    logits, target = make_batch((7, 5))
    if options.pop("weighted", False):
        options["weight"] = torch.rand(5, generator=torch.Generator().manual_seed(4)) + 0.5
    loss_fn = LigerCrossEntropyLoss(reduction=reduction, return_z_loss=True, **options)
    loss, z_loss, *_ = loss_fn(logits, target)
    expected, expected_z = reference(logits, target, reduction=reduction, **options)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z_loss, expected_z)
    plain = LigerCrossEntropyLoss(reduction=reduction, **options)(logits, target)
    torch.testing.assert_close(plain, expected)


def test_matches_pytorch_without_z_loss():
    logits, target = make_batch((9, 6), seed=1)
    weight = torch.rand(6, dtype=torch.float64) + 0.1
    loss = LigerCrossEntropyLoss(weight=weight, label_smoothing=0.1)(logits, target)
    expected = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_logits_are_not_overwritten():
    logits, target = make_batch((4, 8), seed=2)
    logits.requires_grad_(True)
    before = logits.detach().clone()
    loss, *_ = LigerCrossEntropyLoss(lse_square_scale=1e-2, return_z_loss=True)(logits, target)
    loss.backward()
    torch.testing.assert_close(logits.detach(), before, rtol=0, atol=0)
    assert logits.grad is not None


def test_z_loss_is_detached_and_loss_has_its_gradient():
    logits, target = make_batch((5, 4), seed=3)
    logits.requires_grad_(True)
    loss, z_loss, *_ = LigerCrossEntropyLoss(lse_square_scale=0.1, return_z_loss=True)(
        logits, target
    )
    assert not z_loss.requires_grad
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(
        reference(ref_logits, target, lse_square_scale=0.1)[0], ref_logits
    )
    torch.testing.assert_close(grad, ref_grad)


def test_gradcheck_with_everything():
    logits, target = make_batch((3, 4), seed=5)
    logits.requires_grad_(True)
    loss_fn = LigerCrossEntropyLoss(
        weight=torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64),
        lse_square_scale=0.05,
        label_smoothing=0.1,
        softcap=3.0,
    )
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, target), (logits,))


def test_sequence_shape_and_return_z_loss_false():
    logits, target = make_batch((2, 3, 5), seed=6)
    loss_fn = LigerCrossEntropyLoss(lse_square_scale=1e-2, reduction="none")
    loss = loss_fn(logits, target)
    assert loss.shape == (2, 3)
    expected, _ = reference(logits, target, lse_square_scale=1e-2, reduction="none")
    torch.testing.assert_close(loss, expected)


def test_all_ignored_gives_zero_with_zero_gradient():
    logits = torch.randn(3, 4, requires_grad=True)
    target = torch.full((3,), -100)
    loss, z_loss, *_ = LigerCrossEntropyLoss(lse_square_scale=0.1, return_z_loss=True)(
        logits, target
    )
    loss.backward()
    assert loss.item() == 0.0 and z_loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_zero_scale_returns_zero_z_loss():
    logits, target = make_batch((4, 3), seed=7)
    loss, z_loss, *_ = LigerCrossEntropyLoss(return_z_loss=True)(logits, target)
    assert z_loss.item() == 0.0
    torch.testing.assert_close(loss, reference(logits, target)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    logits, target = make_batch((6, 10), seed=8)
    loss, z_loss, *_ = LigerCrossEntropyLoss(lse_square_scale=1e-2, return_z_loss=True)(
        logits.to(dtype), target
    )
    assert loss.dtype == dtype and z_loss.dtype == dtype
    expected, expected_z = reference(logits.to(dtype), target, lse_square_scale=1e-2)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(z_loss.double(), expected_z, rtol=1e-2, atol=1e-2)


def test_errors():
    with pytest.raises(ValueError, match="reduction"):
        LigerCrossEntropyLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="label_smoothing"):
        LigerCrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="lse_square_scale"):
        LigerCrossEntropyLoss(lse_square_scale=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        LigerCrossEntropyLoss(softcap=0.0)
    with pytest.raises(TypeError, match="return_z_loss"):
        LigerCrossEntropyLoss(return_z_loss=1)
    with pytest.raises(TypeError, match="weight"):
        LigerCrossEntropyLoss(weight=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="ignore_index"):
        LigerCrossEntropyLoss(ignore_index=1.5)
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\]"):
        LigerCrossEntropyLoss()(torch.zeros(2, 3), torch.tensor([0, 5]))


def test_matches_upstream_when_installed():
    transformers = pytest.importorskip("liger_kernel.transformers")
    if not torch.cuda.is_available():
        pytest.skip("Liger-Kernel needs a CUDA device")
    logits, target = make_batch((16, 32), seed=9)
    logits = logits.float().cuda()
    target = target.cuda()
    options = dict(lse_square_scale=1e-3, label_smoothing=0.1, return_z_loss=True)
    ours = LigerCrossEntropyLoss(**options)(logits, target)
    upstream = transformers.LigerCrossEntropyLoss(**options)(logits.clone(), target)
    torch.testing.assert_close(ours[0], upstream[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], upstream[1], rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    classes=st.integers(1, 9),
    scale=st.floats(0.0, 0.1),
    smoothing=st.floats(0.0, 1.0),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignore_every=st.integers(1, 4),
)
def test_property_matches_reference(rows, classes, scale, smoothing, reduction, ignore_every):
    gen = torch.Generator().manual_seed(rows * 10 + classes)
    logits = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 4
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[::ignore_every] = -100
    options = dict(lse_square_scale=scale, label_smoothing=smoothing, reduction=reduction)
    loss, z_loss, *_ = LigerCrossEntropyLoss(return_z_loss=True, **options)(logits, target)
    expected, expected_z = reference(logits, target, **options)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z_loss, expected_z)


def test_inplace_backward_is_opt_in():
    from xloss.ops.fused_cross_entropy import fused_kernel_applies

    logits, target = make_batch((6, 5), seed=12)
    logits = logits.float()
    expected, expected_z = reference(logits, target, lse_square_scale=0.01, label_smoothing=0.1)
    ref_logits = logits.double().requires_grad_(True)
    reference(ref_logits, target, lse_square_scale=0.01, label_smoothing=0.1)[0].backward()

    leaf = logits.clone().requires_grad_(True)
    work = leaf * 1.0  # a non-leaf the kernel may overwrite
    before = work.detach().clone()
    loss_fn = LigerCrossEntropyLoss(
        lse_square_scale=0.01, label_smoothing=0.1, return_z_loss=True, inplace_backward=True
    )
    loss, z_loss, *_ = loss_fn(work, target)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_loss.double(), expected_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-6)
    if fused_kernel_applies(work, False):
        assert not torch.equal(work.detach(), before)  # asked for: the storage was reused


def test_inplace_backward_errors():
    with pytest.raises(TypeError, match="inplace_backward"):
        LigerCrossEntropyLoss(inplace_backward=1)
    with pytest.raises(ValueError, match="inplace_backward"):
        LigerCrossEntropyLoss(weight=torch.ones(3), lse_square_scale=0.1, inplace_backward=True)


# --------------------------------------------------------------------------- fused linear


def linear_batch(rows=7, hidden=4, classes=6, seed=11):
    gen = torch.Generator().manual_seed(seed)
    _input = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    lin_weight = torch.randn(classes, hidden, generator=gen, dtype=torch.float64)
    bias = torch.randn(classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[::3] = -100
    return _input, lin_weight, bias, target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"lse_square_scale": 1e-2, "label_smoothing": 0.1},
        {"lse_square_scale": 1e-2, "softcap": 3.0, "weighted": True},
    ],
)
def test_fused_linear_matches_reference(reduction, options):
    options = dict(options)
    _input, lin_weight, bias, target = linear_batch()
    if options.pop("weighted", False):
        options["weight"] = torch.rand(6, generator=torch.Generator().manual_seed(4)) + 0.5
    ce_weight = options.pop("weight", None)
    loss_fn = LigerFusedLinearCrossEntropyLoss(
        ce_weight, reduction=reduction, return_z_loss=True, **options
    )
    loss, z_loss, *_ = loss_fn(lin_weight, _input, target, bias)
    logits = _input @ lin_weight.T + bias
    expected, expected_z = reference(logits, target, ce_weight, reduction=reduction, **options)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z_loss, expected_z)


def test_fused_linear_gradients_match_reference():
    _input, lin_weight, bias, target = linear_batch(seed=12)
    ce_weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 0.25], dtype=torch.float64)
    tensors = [t.clone().requires_grad_(True) for t in (_input, lin_weight, bias)]
    loss_fn = LigerFusedLinearCrossEntropyLoss(
        ce_weight, lse_square_scale=0.05, label_smoothing=0.1
    )
    grads = torch.autograd.grad(loss_fn(tensors[1], tensors[0], target, tensors[2]), tensors)
    ref = [t.clone().requires_grad_(True) for t in (_input, lin_weight, bias)]
    logits = ref[0] @ ref[1].T + ref[2]
    expected = reference(logits, target, ce_weight, lse_square_scale=0.05, label_smoothing=0.1)
    expected_grads = torch.autograd.grad(expected[0], ref)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_fused_linear_sequence_input_and_plain_return():
    gen = torch.Generator().manual_seed(13)
    _input = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    lin_weight = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 3), generator=gen)
    loss = LigerFusedLinearCrossEntropyLoss(lse_square_scale=1e-3)(lin_weight, _input, target)
    expected, _ = reference(_input @ lin_weight.T, target, lse_square_scale=1e-3)
    torch.testing.assert_close(loss, expected)


def test_fused_linear_errors():
    with pytest.raises(ValueError, match="reduction"):
        LigerFusedLinearCrossEntropyLoss(reduction="sample")
    with pytest.raises(TypeError, match="ce_weight"):
        LigerFusedLinearCrossEntropyLoss(ce_weight=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="return_z_loss"):
        LigerFusedLinearCrossEntropyLoss(return_z_loss="yes")
    with pytest.raises(ValueError, match="label_smoothing"):
        LigerFusedLinearCrossEntropyLoss(label_smoothing=-0.1)


def reference_accuracy(logits, target, ignore_index=-100):
    """float64 argmax per row (-1 at ignored rows) and the accuracy over kept rows."""
    kept = target != ignore_index
    predicted = torch.where(kept, logits.double().argmax(-1), -1)
    hits = (predicted == target) & kept
    return predicted, hits.double(), hits.sum().double() / kept.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_output_with_accuracy_and_predicted_tokens(reduction):
    from xloss.compat.liger import CrossEntropyOutput

    logits, target = make_batch((2, 6, 9), seed=11)
    target[0, :3] = logits[0, :3].argmax(-1)  # some hits
    flags = dict(return_token_accuracy=True, return_predicted_tokens=True)
    out = LigerCrossEntropyLoss(reduction=reduction, lse_square_scale=1e-3, **flags)(logits, target)
    assert isinstance(out, CrossEntropyOutput) and out.z_loss is None
    plain = LigerCrossEntropyLoss(reduction=reduction, lse_square_scale=1e-3)(logits, target)
    torch.testing.assert_close(out.loss, plain)
    predicted, hits, accuracy = reference_accuracy(logits, target)
    assert torch.equal(out.predicted_tokens, predicted)
    want = hits if reduction == "none" else accuracy
    torch.testing.assert_close(out.token_accuracy.double(), want)
    assert not out.token_accuracy.requires_grad
    loss, z_loss, token_accuracy, predicted_tokens = out  # unpacks in upstream's field order
    assert z_loss is None and predicted_tokens is out.predicted_tokens


def test_fused_linear_output_accum_dtype_and_token_scaling():
    gen = torch.Generator().manual_seed(5)
    _input = torch.randn(2, 7, 4, generator=gen, requires_grad=True)
    lin_weight = torch.randn(30, 4, generator=gen, requires_grad=True)
    target = torch.randint(0, 30, (2, 7), generator=gen)
    target[1, 5:] = -100
    loss_fn = LigerFusedLinearCrossEntropyLoss(
        return_z_loss=True, lse_square_scale=1e-2, accum_dtype=torch.float64,
        return_token_accuracy=True, return_predicted_tokens=True,
    )  # fmt: skip
    out = loss_fn(lin_weight, _input, target)
    logits = _input.detach().double() @ lin_weight.detach().double().T
    predicted, _, accuracy = reference_accuracy(logits, target)
    assert torch.equal(out.predicted_tokens, predicted)
    torch.testing.assert_close(out.token_accuracy.double(), accuracy)
    expected, expected_z = reference(logits, target, lse_square_scale=1e-2)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.z_loss.double(), expected_z, rtol=1e-5, atol=1e-6)
    out.loss.backward()  # accum_dtype=float64 sums grad_weight in fp64, returned in fp32
    assert lin_weight.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="`use_token_scaling=True`"):
        LigerFusedLinearCrossEntropyLoss(use_token_scaling=True)
    with pytest.raises(TypeError, match="`return_token_accuracy` must be a bool"):
        LigerFusedLinearCrossEntropyLoss(return_token_accuracy=1)
    with pytest.raises(TypeError, match="`return_predicted_tokens` must be a bool"):
        LigerCrossEntropyLoss(return_predicted_tokens="yes")
