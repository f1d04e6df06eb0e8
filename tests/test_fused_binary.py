"""The fused CPU kernel of BCE, focal and ASL (xloss.ops.fused_binary) against float64.

The same option grid as the portable path's tests (tests/elementwise_reference.py), run in
fp32 so the kernel serves it, with values and gradients compared to the float64
reference; then the kernel's own contract: in place, half precision, second order,
learnable weights, empty input, validation, torch.func and torch.compile.
"""

import itertools
import warnings

import pytest
import torch
from concurrency import run_in_threads, torch_threads
from elementwise_reference import GRID_CASES, GRID_IDS, make_data, option_grid, reference_loss
from test_binary import bce_reference
from test_focal import asl_reference, focal_reference

import xloss
from xloss.bench.registry import model_output
from xloss.ops import fused_binary, kernel

bce = xloss.binary_cross_entropy_with_logits
focal = xloss.sigmoid_focal_loss
asl = xloss.asymmetric_loss

# name -> (xloss function with its settings, float64 reference, takes pos_weight)
LOSSES = {
    "bce": (bce, bce_reference, True),
    "focal": (
        lambda x, y, **kw: focal(x, y, alpha=0.3, gamma=2.0, **kw),
        focal_reference(0.3, 2.0),
        False,
    ),
    "focal_gamma_half": (
        lambda x, y, **kw: focal(x, y, alpha=-1.0, gamma=0.5, **kw),
        focal_reference(-1.0, 0.5),
        False,
    ),
    "asl": (
        lambda x, y, **kw: asl(x, y, gamma_pos=1.0, gamma_neg=4.0, clip=0.05, **kw),
        asl_reference(1.0, 4.0, 0.05),
        False,
    ),
    "asl_no_clip": (
        lambda x, y, **kw: asl(x, y, gamma_pos=0.5, gamma_neg=2.0, clip=0.0, **kw),
        asl_reference(0.5, 2.0, 0.0),
        False,
    ),
}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the fused kernel, to prove a test ran on the kernel path."""
    calls = []
    original = fused_binary._run

    def counting(*args):
        calls.append(args[7])  # the loss kind
        return original(*args)

    monkeypatch.setattr(fused_binary, "_run", counting)
    return calls


def as_fp32(options):
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in options.items()}  # fmt: skip


def clean_reference_inputs(y, options):
    """Ignored targets (-1) as 0 plus a mask: the float64 reference's gradient at a
    dropped element with target -1 (e.g. (1 - p_t) < 0 under a fractional power) is NaN
    times 0; the kernel's is 0, as the portable path's."""
    if options.get("ignore_index") is None:
        return y, options
    kept = y != options["ignore_index"]
    mask = kept if options.get("mask") is None else kept & options["mask"]
    return torch.where(kept, y, 0.0), dict(options, ignore_index=None, mask=mask)


def weighted_sum(loss):
    """A scalar whose gradient sends a different factor to every output element."""
    factors = torch.linspace(0.5, 1.5, max(loss.numel(), 1), dtype=loss.dtype)
    return (loss * factors[: loss.numel()].reshape(loss.shape)).sum()


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize(("shape", "reduction"), GRID_CASES, ids=GRID_IDS)
def test_kernel_matches_float64_reference_over_the_grid(shape, reduction, name, kernel_calls):
    loss_fn, reference, with_pos_weight = LOSSES[name]
    grid = option_grid(shape, with_pos_weight=with_pos_weight)
    if name != "bce":  # every third combination: the element formula is all that differs
        grid = itertools.islice(grid, 0, None, 3)
    checked = 0
    for x, y, options in grid:
        x32 = x.float().requires_grad_()
        actual = loss_fn(x32, y.float(), reduction=reduction, **as_fp32(options))
        x64 = x.float().double().requires_grad_()  # the reference sees the fp32 logits
        y_ref, ref_options = clean_reference_inputs(y, options)
        expected = reference_loss(reference, x64, y_ref, reduction=reduction, **ref_options)
        assert actual.dtype == torch.float32 and actual.shape == expected.shape
        torch.testing.assert_close(actual.double(), expected.detach(), rtol=1e-5, atol=1e-6)
        weighted_sum(actual).backward()
        if expected.requires_grad:
            weighted_sum(expected).backward()
            torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
        else:  # the reference returns a constant 0 when every element is dropped
            assert not x32.grad.any()
        checked += 1
    assert len(kernel_calls) == checked > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_in_place_equals_out_of_place_and_overwrites_the_input(name, kernel_calls):
    loss_fn, _, _ = LOSSES[name]
    x, y = make_data((6, 2, 9), seed=3, ignore=True)
    mask = torch.rand(6, 2, 9, generator=torch.Generator().manual_seed(1)) > 0.2
    options = dict(ignore_index=-1, mask=mask, label_smoothing=0.1, class_dim=1)
    for reduction in ["mean", "sum", "none", "sample"]:
        leaf = x.float().requires_grad_()
        expected = loss_fn(leaf, y.float(), reduction=reduction, **options)
        weighted_sum(expected).backward()

        base = x.float().requires_grad_()
        logits = base * 1.0  # an activation, not a leaf
        logits.retain_grad()
        version = logits._version
        actual = loss_fn(logits, y.float(), reduction=reduction, inplace_backward=True, **options)
        assert logits._version > version
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        weighted_sum(actual).backward()
        torch.testing.assert_close(base.grad, leaf.grad, rtol=0, atol=0)
        assert torch.equal(logits.detach(), logits.grad)  # the input now holds its gradient


def test_in_place_on_a_leaf_or_its_view_raises():
    y = torch.zeros(3, 4)
    for make in [
        lambda: torch.zeros(3, 4, requires_grad=True),
        lambda: torch.nn.Parameter(torch.zeros(3, 4)),
        lambda: torch.zeros(12, requires_grad=True).view(3, 4),
    ]:
        leaf = make()
        with pytest.raises(RuntimeError, match="inplace_backward=True` would overwrite `input`"):
            bce(leaf, y, inplace_backward=True)
        assert torch.equal(leaf, torch.zeros(3, 4))
    with pytest.raises(TypeError, match="`inplace_backward` must be a bool, got str"):
        bce(torch.zeros(3, 4), y, inplace_backward="yes")


def test_in_place_on_a_strided_input_leaves_it_untouched():
    x, y = make_data((4, 6), seed=5)
    logits = (torch.randn(4, 12, requires_grad=True) * 1.0)[:, ::2]  # not contiguous
    assert not logits.is_contiguous()
    before = logits.detach().clone()
    loss = bce(logits, y.float(), inplace_backward=True)
    loss.backward()
    assert torch.equal(logits.detach(), before)


def test_in_place_after_another_op_saved_the_input_raises():
    x = torch.randn(3, 4, requires_grad=True)
    logits = torch.sigmoid(x)  # sigmoid saves its output for backward
    loss = bce(logits, torch.zeros(3, 4), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("name", ["bce", "focal", "asl"])
def test_second_order_raises_at_the_second_backward(name, inplace_backward):
    loss_fn, _, _ = LOSSES[name]
    x = torch.randn(4, 5)
    y = (torch.rand(4, 5) > 0.5).float()
    base = x.clone().requires_grad_()
    logits = base * 1.0
    loss = loss_fn(logits, y, inplace_backward=inplace_backward)
    (grad,) = torch.autograd.grad(loss, base, create_graph=True)  # first order: fine
    x64 = x.double().requires_grad_()
    expected = torch.autograd.grad(loss_fn(x64, y.double()), x64)[0]
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"differentiated twice.*backends.use\(\"torch\"\)"):
        grad.pow(2).sum().backward()


def test_second_order_on_the_portable_path_is_right(kernel_calls):
    x, y = make_data((3, 4), seed=7)
    x.requires_grad_()
    for loss_fn, _, _ in LOSSES.values():
        assert torch.autograd.gradgradcheck(lambda logits, f=loss_fn: f(logits, y), (x,))
    x32 = x.detach().float().requires_grad_()
    y32 = y.float()
    with xloss.backends.use("torch"):  # fp32 on the portable path: second order works
        for loss_fn, _, _ in LOSSES.values():
            (grad,) = torch.autograd.grad(loss_fn(x32, y32), x32, create_graph=True)
            (second,) = torch.autograd.grad(grad.pow(2).sum(), x32)
            x64 = x32.detach().double().requires_grad_()
            (grad64,) = torch.autograd.grad(loss_fn(x64, y), x64, create_graph=True)
            (second64,) = torch.autograd.grad(grad64.pow(2).sum(), x64)
            torch.testing.assert_close(second.double(), second64, rtol=1e-4, atol=1e-7)
    assert not kernel_calls


def test_learnable_weight_pos_weight_and_target_get_their_gradients(kernel_calls):
    x, y = make_data((5, 4), seed=9)
    weight = (torch.rand(5, 4) + 0.5).requires_grad_()
    pos_weight = (torch.rand(4) + 0.5).requires_grad_()
    logits = x.float().requires_grad_()
    bce(logits, y.float(), weight, pos_weight=pos_weight).backward()
    assert not kernel_calls  # the portable path computes the gradients of the weights

    w64 = weight.detach().double().requires_grad_()
    pw64 = pos_weight.detach().double().requires_grad_()
    x64 = x.float().double().requires_grad_()
    (bce_reference(x64, y, pw64.expand(5, 4)) * w64).mean().backward()
    for ours, theirs in [(logits, x64), (weight, w64), (pos_weight, pw64)]:
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-7)
    soft = y.float().requires_grad_()
    bce(x.float(), soft).backward()
    assert soft.grad is not None and torch.isfinite(soft.grad).all()


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,), (2, 0, 4)], ids=str)
@pytest.mark.parametrize("name", ["bce", "focal", "asl"])
def test_empty_input(shape, name):
    loss_fn, _, _ = LOSSES[name]
    x = torch.zeros(shape, requires_grad=True)
    y = torch.zeros(shape)
    loss = loss_fn(x, y)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == shape
    assert loss_fn(x, y, reduction="sum").item() == 0.0
    assert loss_fn(x, y, reduction="none").shape == shape


def test_validation_on_the_kernel_path_raises_and_in_place_leaves_the_input(kernel_calls):
    y = torch.tensor([[0.0, 1.0, 2.0], [0.5, -1.0, 0.0]])
    base = torch.randn(2, 3, requires_grad=True)
    logits = base * 1.0
    before = logits.detach().clone()
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\], found 2.0"):
        bce(logits, y)
    with pytest.raises(ValueError, match=r"or equal ignore_index=-1, found 2.0"):
        focal(logits, y, ignore_index=-1, inplace_backward=True)
    assert torch.equal(logits.detach(), before)
    with pytest.raises(ValueError, match=r"found nan"):
        asl(logits, torch.full((2, 3), float("nan")))
    keep = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.isfinite(bce(logits, y, mask=keep))  # out-of-range values masked out
    assert len(kernel_calls) == 4


@pytest.mark.parametrize(
    "value", [1.0000001, -1e-30, float("inf"), float("-inf"), float("nan"), -1.0, 3e38]
)
def test_every_kind_of_bad_target_is_caught_and_negative_zero_is_not_one(value, kernel_calls):
    """The kernel flags a bad target by its bit pattern (an unsigned max); values just
    outside [0, 1], infinities, NaN and negatives all raise, in the last element of a
    long row too; -0.0 (flagged by the bits, cleared by the exact check) gives the loss
    of +0.0."""
    x = torch.randn(3, 2500, generator=torch.Generator().manual_seed(5))
    y = (torch.rand(3, 2500, generator=torch.Generator().manual_seed(6)) < 0.1).float()
    bad = y.clone()
    bad[-1, -1] = value
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\], found"):
        bce(x.clone().requires_grad_(), bad)
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[-1, -1] = False
    assert torch.isfinite(bce(x, bad, mask=mask))  # a dropped bad target is no error
    zeros = torch.where(y == 0, -0.0, y)
    assert torch.signbit(zeros).any()
    logits, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    bce(logits, zeros, pos_weight=torch.tensor(2.0)).backward()
    bce(plain, y, pos_weight=torch.tensor(2.0)).backward()
    assert torch.equal(logits.grad, plain.grad)
    assert len(kernel_calls) == 4


@pytest.mark.parametrize("name", list(LOSSES))
def test_dropped_elements_with_nan_and_inf_logits_leave_no_trace(name, kernel_calls):
    """A dropped element's gradient and loss are cleared bit-wise: NaN, inf and -inf
    logits there give exact zeros, and the loss of the kept elements is unchanged."""
    loss_fn, _, _ = LOSSES[name]
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(8))
    y = (torch.rand(4, 7, generator=torch.Generator().manual_seed(9)) < 0.3).float()
    mask = torch.rand(4, 7, generator=torch.Generator().manual_seed(10)) < 0.7
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(10)[:28]
    dirty = torch.where(mask, x, garbage.reshape(4, 7)).requires_grad_()
    clean = torch.where(mask, x, 0.0).requires_grad_()
    for reduction in ("sum", "none"):
        for logits in (dirty, clean):
            logits.grad = None
            loss_fn(logits, y, mask=mask, reduction=reduction).sum().backward()
        torch.testing.assert_close(dirty.grad, clean.grad, rtol=0, atol=0)
        assert torch.equal(dirty.grad[~mask], torch.zeros(int((~mask).sum())))
    values = loss_fn(dirty, y, mask=mask, reduction="none")
    assert torch.equal(values[~mask], torch.zeros(int((~mask).sum())))
    assert torch.isfinite(values).all()
    assert len(kernel_calls) == 5


@pytest.mark.parametrize("name", list(LOSSES))
def test_out_of_range_targets_without_validation_agree_with_the_portable_path(name, kernel_calls):
    loss_fn, _, _ = LOSSES[name]
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([[2.0, -3.0, 0.5, 1e6, 0.0]] * 3)
    logits = x.clone().requires_grad_()
    actual = loss_fn(logits, y, reduction="none", validate_args=False)
    actual.sum().backward()
    x64 = x.double().requires_grad_()
    expected = loss_fn(x64, y.double(), reduction="none", validate_args=False)  # portable
    expected.sum().backward()
    assert len(kernel_calls) == 1
    torch.testing.assert_close(actual.double(), expected.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", list(LOSSES))
def test_torch_func_grad_equals_autograd(name):
    loss_fn, _, _ = LOSSES[name]
    x, y = make_data((4, 6), seed=11)
    x, y = x.float(), y.float()
    grad = torch.func.grad(lambda logits: loss_fn(logits, y, label_smoothing=0.1))(x)
    leaf = x.clone().requires_grad_()
    loss_fn(leaf, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sample"])
def test_eager_host_path_equals_the_op_path_bit_for_bit(reduction):
    """Eager calls take HostFusedBinary (no argument binding, a float mean factor); a
    torch.func transform takes FusedBinary and the custom op. Same values and gradients."""
    x, y = make_data((5, 7), seed=12)
    x, y = x.float(), y.float()
    pos_weight = torch.linspace(0.5, 2.0, 7)

    def loss(logits):
        return weighted_sum(bce(logits, y, pos_weight=pos_weight, reduction=reduction))

    grad, value = torch.func.grad_and_value(loss)(x)
    leaf = x.clone().requires_grad_()
    eager = bce(leaf, y, pos_weight=pos_weight, reduction=reduction)
    if reduction in ("mean", "sum"):
        assert type(eager.grad_fn).__name__ == "HostFusedBinaryBackward"
    weighted_sum(eager).backward()
    assert torch.equal(weighted_sum(eager.detach()), value)
    assert torch.equal(leaf.grad, grad)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_vmap_raises_naming_the_portable_path(requires_grad):
    x = torch.randn(3, 4, 5, requires_grad=requires_grad)
    y = torch.zeros(4, 5)
    with pytest.raises(RuntimeError, match=r"vmap cannot batch.*backends.use\(\"torch\"\)"):
        torch.func.vmap(lambda logits: bce(logits, y, validate_args=False))(x)
    with xloss.backends.use("torch"):
        batched = torch.func.vmap(lambda logits: bce(logits, y, validate_args=False))(x)
    torch.testing.assert_close(batched[1], bce(x[1], y))


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_torch_compile_fullgraph_traces_the_kernel(inplace_backward):
    x, y = make_data((5, 6), seed=13)
    y = y.float()
    pos_weight = torch.rand(6) + 0.5

    def step(base):
        logits = base * 2.0
        return bce(logits, y, pos_weight=pos_weight, label_smoothing=0.1, validate_args=False,
                   inplace_backward=inplace_backward)  # fmt: skip

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_base = x.float().requires_grad_()
    step(eager_base).backward()
    base = x.float().requires_grad_()
    loss = compiled(base)
    loss.backward()
    torch.testing.assert_close(loss, step(x.float()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(base.grad, eager_base.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    ("name", "target_dtype"),
    [("bce", "same"), ("bce", "float32"), ("focal", "same"), ("asl", "same")],
)  # each pair of dtypes is one more compiled kernel: the element formulas are shared
def test_half_inputs_are_read_natively(name, dtype, tol, target_dtype, kernel_calls):
    loss_fn, reference, _ = LOSSES[name]
    x, y = make_data((7, 3, 5), seed=17)
    x_half = x.to(dtype).requires_grad_()
    y_in = y.to(dtype) if target_dtype == "same" else y.float()
    for reduction in ["mean", "none"]:
        x_half.grad = None
        loss = loss_fn(x_half, y_in, reduction=reduction, label_smoothing=0.1)
        assert loss.dtype == dtype
        x64 = x_half.detach().double().requires_grad_()
        expected = reference_loss(
            reference, x64, y_in.double(), reduction=reduction, label_smoothing=0.1
        )
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=tol, atol=tol / 10)
        weighted_sum(loss.float()).backward()
        weighted_sum(expected).backward()
        assert x_half.grad.dtype == dtype
        torch.testing.assert_close(x_half.grad.double(), x64.grad, rtol=tol, atol=tol / 100)
    assert len(kernel_calls) == 2


def test_kinds_match_the_kernel_table():
    from xloss.ops import _numba_binary

    names = ["BCE", "FOCAL", "ASL_CLIP", "ASL_NO_CLIP"]
    assert [getattr(fused_binary, n) for n in names] == [getattr(_numba_binary, n) for n in names]


@pytest.fixture(params=["serial", "parallel"])
def launch_path(request, monkeypatch):
    """Run a test through the serial kernels (small problems) or the parallel ones."""
    monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", 2**62 if request.param == "serial" else -1)
    return request.param


def test_long_rows_span_several_tiles_and_threads(kernel_calls, launch_path):
    from xloss.ops._numba_binary import TILE

    x, y = make_data((3, 2 * TILE + 5), seed=19)
    pos_weight = torch.rand(2 * TILE + 5, dtype=torch.float64) + 0.5
    for reduction in ["mean", "sample", "none"]:
        actual = bce(x.float(), y.float(), pos_weight=pos_weight.float(), reduction=reduction)
        expected = reference_loss(bce_reference, x.float().double(), y, pos_weight=pos_weight,
                                  reduction=reduction)  # fmt: skip
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    assert len(kernel_calls) == 3


@pytest.mark.parametrize("name", ["bce", "asl"])
def test_short_rows_run_in_blocks_of_rows(name, kernel_calls):
    """C = 7 < TILE: blocks of TILE // 7 whole rows are one item (the last block shorter),
    with the per-column positive weight, a broadcast weight and a broadcast mask repeated
    over a block's rows, a full weight and a full mask; "sample" keeps rows apart."""
    from xloss.ops._numba_binary import TILE

    loss_fn, reference, with_pos_weight = LOSSES[name]
    rows = TILE // 7 + 9  # two blocks, the second of 9 rows
    x, y = make_data((rows, 7), seed=23)
    gen = torch.Generator().manual_seed(29)
    broadcast_weight = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5
    full_weight = torch.rand(rows, 7, generator=gen, dtype=torch.float64) + 0.5
    column_mask = torch.tensor([True, False, True, True, True, True, False]).expand(rows, 7)
    full_mask = torch.rand(rows, 7, generator=gen) > 0.3
    pos_weight = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5
    settings = [
        dict(weight=broadcast_weight, mask=column_mask),
        dict(weight=full_weight, mask=full_mask),
    ]
    for options, reduction in itertools.product(settings, ["mean", "sum", "none", "sample"]):
        if with_pos_weight:
            options = dict(options, pos_weight=pos_weight)
        x32 = x.float().requires_grad_()
        actual = loss_fn(x32, y.float(), reduction=reduction, **as_fp32(options))
        x64 = x.float().double().requires_grad_()
        expected = reference_loss(reference, x64, y, reduction=reduction, **options)
        torch.testing.assert_close(actual.double(), expected.detach(), rtol=1e-5, atol=1e-6)
        weighted_sum(actual).backward()
        weighted_sum(expected).backward()
        torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert len(kernel_calls) == 8


def test_short_rows_with_extreme_logits_stay_finite(kernel_calls):
    """+-1e4 logits in the second block of short rows: BCE equals its float64 reference,
    focal and ASL equal the portable path, and all stay finite."""
    from xloss.ops._numba_binary import TILE

    rows = TILE // 5 + 3
    x, y = make_data((rows, 5), seed=31)
    x[-1] = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0], dtype=torch.float64)
    y[-1] = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    x32 = x.float().requires_grad_()
    actual = bce(x32, y.float(), reduction="none")
    x64 = x.float().double()
    softplus = torch.nn.functional.softplus  # float64; log(1 - s) would be log(0) here
    expected = y * softplus(-x64) + (1 - y) * softplus(x64)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    weighted_sum(actual).backward()
    factors = torch.linspace(0.5, 1.5, x.numel(), dtype=torch.float64).reshape(x.shape)
    expected_grad = (torch.sigmoid(x64) - y) * factors  # d/dx of the unweighted BCE
    torch.testing.assert_close(x32.grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    for name in ["focal", "asl"]:
        loss_fn = LOSSES[name][0]
        x32 = x.float().requires_grad_()
        actual = loss_fn(x32, y.float(), reduction="none")
        weighted_sum(actual).backward()
        with xloss.backends.use("torch"):
            portable_x = x.float().requires_grad_()
            portable = loss_fn(portable_x, y.float(), reduction="none")
            weighted_sum(portable).backward()
        assert torch.isfinite(actual).all() and torch.isfinite(x32.grad).all()
        torch.testing.assert_close(actual, portable, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x32.grad, portable_x.grad, rtol=1e-4, atol=1e-5)
    assert len(kernel_calls) == 3


def test_a_sweep_of_logits_matches_float64_within_a_few_ulp(kernel_calls):
    """The kernel's exp, log1p and reciprocal are short polynomials: over a dense sweep of
    logits (both signs, past the flush to 0 at |x| = 86) the element loss softplus(-+x)
    and the gradient s - y stay within 1e-6 relative of float64 (fp32 is 6e-8)."""
    x = torch.cat([torch.linspace(-100.0, 100.0, 40001), torch.logspace(-30, 0, 301)])
    x = torch.cat([x, -x])
    softplus = torch.nn.functional.softplus  # float64
    x64 = x.double()
    for target in [0.0, 1.0]:
        y = torch.full_like(x, target)
        logits = x.clone().requires_grad_()
        loss = bce(logits, y, reduction="none")
        loss.sum().backward()
        expected = target * softplus(-x64) + (1 - target) * softplus(x64)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-37)
        # s - y without float64's own cancellation: 1 - s(x) = s(-x)
        expected_grad = torch.sigmoid(x64) if target == 0 else -torch.sigmoid(-x64)
        torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=1e-6, atol=1e-37)
    assert len(kernel_calls) == 2


@pytest.mark.parametrize("validate_args", [True, False])
def test_in_place_with_a_bad_target_far_into_the_input(validate_args, kernel_calls):
    """In place, the targets are checked in the same kernel launch before any logit is
    overwritten: a bad target in the last of many items (several threads' runs) raises
    and leaves every logit and the version counter as they were. Without validation the
    pass runs and writes the gradient."""
    from xloss.ops._numba_binary import TILE

    shape = (9, 2 * TILE + 3)  # 27 items
    x, y = make_data(shape, seed=37)
    y = y.float()
    y[-1, -1] = 1.5
    base = x.float().requires_grad_()
    logits = base * 1.0
    before, version = logits.detach().clone(), logits._version
    if validate_args:
        with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\], found 1.5"):
            bce(logits, y, inplace_backward=True)
        assert torch.equal(logits.detach(), before) and logits._version == version
    else:
        loss = bce(logits, y, inplace_backward=True, validate_args=False)
        assert logits._version > version and not torch.equal(logits.detach(), before)
        loss.backward()
        expected = torch.sigmoid(before.double()) - y.double()
        torch.testing.assert_close(base.grad.double(), expected / y.numel(), rtol=1e-5,
                                   atol=1e-12)  # fmt: skip
    assert len(kernel_calls) == 1


def test_under_a_dispatch_mode_the_custom_ops_are_called():
    """In plain eager the Functions call the implementation directly; a dispatch mode (a
    FLOP counter, FakeTensorMode, a logger) must still see xloss's ops, in and out of place."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, y = make_data((4, 6), seed=41)
    for inplace_backward, name in [(False, "xloss.fused_binary."), (True, "xloss.fused_binary_.")]:
        base = x.float().requires_grad_()
        logits = base * 1.0
        version = logits._version
        with Log() as log:
            loss = bce(logits, y.float(), inplace_backward=inplace_backward)
        assert any(op.startswith(name) for op in log.ops), log.ops
        assert inplace_backward == (logits._version > version)
        loss.backward()
        expected = (torch.sigmoid(x.float().double()) - y) / y.numel()
        torch.testing.assert_close(base.grad.double(), expected, rtol=1e-5, atol=1e-9)


def test_a_jit_traced_call_follows_new_inputs():
    """Under torch.jit.trace the op is recorded (eager runs it directly, reading numpy,
    which a tracer would freeze into constants): the traced function follows new data."""
    x, y = make_data((4, 6), seed=43)
    x, y = x.float(), y.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python-level branches
        traced = torch.jit.trace(lambda a, b: bce(a, b), (x, y), check_trace=False)
    y2 = 1.0 - y
    torch.testing.assert_close(traced(x, y2), bce(x, y2), rtol=0, atol=0)
    assert not torch.equal(traced(x, y2), traced(x, y))


@pytest.mark.parametrize("name", ["bce", "focal", "asl", "asl_no_clip"])
def test_small_problems_run_serially_and_match_the_parallel_kernel(name, monkeypatch):
    """At most SERIAL_ELEMENTS elements, or torch at one thread, run in the calling thread
    (a launch on numba's pool costs more than the work there); both kernels give the same
    losses and gradients for every output form, in place with its target check first,
    and both report a target outside [0, 1]."""
    kernels = fused_binary._binary_kernels()
    calls = []
    for table in ("KERNELS", "SERIAL_KERNELS"):
        wrapped = tuple(
            lambda *a, _f=f, _t=table: calls.append(_t) or _f(*a) for f in getattr(kernels, table)
        )
        monkeypatch.setattr(kernels, table, wrapped)
    loss_fn, _, with_pos_weight = LOSSES[name]
    x, y = make_data((40, 57), seed=31)
    gen = torch.Generator().manual_seed(32)
    options = dict(mask=torch.rand(40, 57, generator=gen) > 0.2,
                   weight=torch.rand(57, generator=gen) + 0.5)  # fmt: skip
    if with_pos_weight:
        options["pos_weight"] = torch.rand(57, generator=gen) + 0.5
    x, y = x.float(), y.float()

    def every_call():
        results = []
        for reduction in ["mean", "none", "sample"]:
            leaf = x.clone().requires_grad_()
            loss = loss_fn(leaf, y, reduction=reduction, **options)
            weighted_sum(loss).backward()
            logits = x.clone().requires_grad_() * 1.0
            logits.retain_grad()
            in_place = loss_fn(logits, y, reduction=reduction, inplace_backward=True, **options)
            weighted_sum(in_place).backward()
            results += [loss.detach(), leaf.grad, in_place.detach(), logits.grad]
        with torch.no_grad():
            results.append(loss_fn(x, y, **options))
        return results

    serial = every_call()
    assert set(calls) == {"SERIAL_KERNELS"}
    calls.clear()
    monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", 40 * 57 - 1)
    parallel = every_call()
    assert set(calls) == {"KERNELS"}
    # the same item code, compiled into two kernels: sums may associate differently
    for got, want in zip(parallel, serial, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-8)
    calls.clear()
    monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", -1)
    with torch_threads(1):
        one_thread = every_call()
    for got, want in zip(one_thread, serial, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-8)
    assert set(calls) == {"SERIAL_KERNELS"}
    bad = y.clone()
    bad[39, 56] = 1.5
    for limit in (-1, 2**62):
        monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", limit)
        logits = x.clone().requires_grad_() * 1.0
        before = logits.detach().clone()
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\], found 1.5"):
            loss_fn(logits, bad, inplace_backward=True, **options)
        assert torch.equal(logits.detach(), before)  # checked before anything was written
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\], found 1.5"):
            loss_fn(x.clone().requires_grad_(), bad, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_on_the_parallel_kernel(dtype, monkeypatch):
    """fp16/bf16 logits and targets through numba's pool give what the serial kernel gives
    (one compiled kernel serves both half types)."""
    x, y = make_data((9, 70), seed=37)
    x, y = x.to(dtype), y.to(dtype)
    results = {}
    for limit in (2**62, -1):
        monkeypatch.setattr(kernel, "SERIAL_ELEMENTS", limit)
        leaf = x.clone().requires_grad_()
        loss = bce(leaf, y, reduction="none", label_smoothing=0.1)
        weighted_sum(loss.float()).backward()
        results[limit] = (loss.detach(), leaf.grad)
    for got, want in zip(results[-1], results[2**62], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_four_threads_on_the_serial_binary_kernel():
    """The serial kernels release the GIL and take no lock: four Python threads at once
    each get their own losses and gradients."""

    def work(seed):
        x, y = make_data((32, 80), seed=seed)
        pos_weight = torch.full((80,), 2.0, dtype=torch.float64)
        x64 = x.float().double().requires_grad_()
        want = reference_loss(bce_reference, x64, y, pos_weight=pos_weight)
        want.backward()
        for _ in range(30):
            logits = x.float().requires_grad_()
            loss = bce(logits, y.float(), pos_weight=pos_weight.float())
            loss.backward()
            torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-5, atol=1e-8)

    run_in_threads(work, range(40, 44))


def test_host_fast_path_serves_plain_calls_and_nothing_else(monkeypatch):
    """Plain fp32 calls with the class axis last (and at most a plain (C,) pos_weight) go
    from the settings check straight to the kernel; every other call takes the general
    path. Each gives the float64 reference's loss and gradient, and bad input still
    raises the general path's errors."""
    from xloss.functional import binary as functional

    served = []
    predicate = functional.host_binary_applies
    monkeypatch.setattr(functional, "host_binary_applies",
                        lambda *a: served.append(predicate(*a)) or served[-1])  # fmt: skip
    x, y = make_data((6, 5), seed=41)
    x, y = x.float(), y.float()
    gen = torch.Generator().manual_seed(42)
    pw = torch.rand(5, generator=gen) + 0.5
    mask = torch.rand(6, 5, generator=gen) > 0.3
    fast = {
        "plain": (x, y, {}),
        "class_dim=1": (x, y, dict(class_dim=1)),
        "pos_weight": (x, y, dict(pos_weight=pw)),
        "sum": (x, y, dict(reduction="sum")),
        "none": (x, y, dict(reduction="none")),
        "smoothing": (x, y, dict(label_smoothing=0.2)),
        "uniform": (x, y, dict(label_smoothing=0.2, smoothing_rule="uniform")),
        "1-D": (x[0], y[0], {}),
        "3-D": (x.reshape(2, 3, 5), y.reshape(2, 3, 5), dict(pos_weight=pw)),
        "bf16": (x.bfloat16(), y.bfloat16(), dict(pos_weight=pw)),
        "fp16, fp32 target": (x.half(), y, {}),
    }
    general = {
        "weight": (x, y, dict(weight=torch.rand(6, 5, generator=gen))),
        "mask": (x, y, dict(mask=mask)),
        "ignore_index": (x, torch.where(mask, y, -1.0), dict(ignore_index=-1)),
        "lengths": (x, y, dict(lengths=torch.tensor([5, 3, 0, 1, 5, 2]))),
        "normalizer": (x, y, dict(normalizer=7.0)),
        "sample": (x, y, dict(reduction="sample")),
        "class_dim=0": (x, y, dict(class_dim=0)),
        "float64 pos_weight": (x, y, dict(pos_weight=pw.double())),
        "one pos_weight": (x, y, dict(pos_weight=pw[:1])),
        "half target": (x, y.half(), {}),
        "bf16 input, fp16 target": (x.bfloat16(), y.half(), {}),
        "float64": (x.double(), y.double(), {}),
        "strided target": (x, torch.cat([y, y], 1)[:, ::2], {}),
        "strided input": (x, y, {}),  # a strided view of the logits is passed
    }
    for name, (logits, target, options) in {**fast, **general}.items():
        served.clear()
        leaf = logits.detach().clone().requires_grad_()
        passed = leaf
        if name == "strided input":
            passed = torch.stack([leaf, leaf], 2)[..., 0]
            assert not passed.is_contiguous()
        loss = bce(passed, target, **options)
        assert served == ([True] if name in fast else []) or (
            name not in fast and served == [False]
        ), name
        x64 = logits.detach().double().requires_grad_()
        ref_options = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                       else v for k, v in options.items()}  # fmt: skip
        want = reference_loss(bce_reference, x64, target.double(), **ref_options)
        assert loss.dtype == logits.dtype, name
        half = logits.dtype.itemsize == 2
        tol = dict(rtol=2e-2, atol=2e-3) if half else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.double(), want, **tol, msg=name)
        weighted_sum(loss.float()).backward()
        weighted_sum(want).backward()
        torch.testing.assert_close(leaf.grad.double(), x64.grad, **tol, msg=name)
    for name, (loss_fn, reference, _) in LOSSES.items():  # focal and ASL take it too
        served.clear()
        leaf = x.clone().requires_grad_()
        loss = loss_fn(leaf, y, reduction="sum")
        assert served == [True], name
        x64 = x.double().requires_grad_()
        want = reference_loss(reference, x64, y.double(), reduction="sum")
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\], found 1.5"):
        bce(x, torch.where(mask, y, 1.5))
    with pytest.raises(ValueError, match="pos_weight"):
        bce(x, y, pos_weight=torch.ones(6))
    with pytest.raises((ValueError, IndexError), match="class_dim|dim"):
        bce(x, y, class_dim=2)
    with pytest.raises(ValueError, match="target"):
        bce(x, y[:, :4])
    with torch.no_grad():  # no gradient asked: the loss only
        torch.testing.assert_close(bce(x, y).double(), reference_loss(bce_reference, x, y))


@pytest.mark.parametrize("loss", ["bce", "focal", "asl", "cross_entropy"])
def test_in_place_gradient_reaches_the_leaf_without_a_copy(loss):
    # The saved tensor was the caller's own logits object, which the caller still holds
    # during backward: autograd then copied the gradient before storing it as the leaf's
    # .grad (1 ms of a 4-7 ms step at 4096 x 1000). In place, .grad is the logits' storage.
    torch.manual_seed(0)
    x = torch.randn(8, 5, requires_grad=True)
    target = (torch.rand(8, 5) < 0.3).double()
    labels = torch.randint(0, 5, (8,))
    calls = {  # xloss's call (mean), float64 element-wise reference
        "bce": (xloss.binary_cross_entropy_with_logits, lambda x, y: bce_reference(x, y, None)),
        "focal": (xloss.sigmoid_focal_loss, focal_reference(0.25, 2.0)),
        "asl": (xloss.asymmetric_loss, asl_reference(1.0, 4.0, 0.05)),
    }
    logits = model_output(x)  # a model's output: the leaf's storage, gradient passed on
    x64 = x.detach().double().requires_grad_()
    if loss == "cross_entropy":
        xloss.cross_entropy(logits, labels, inplace_backward=True).backward()
        reference = -torch.log_softmax(x64, 1).gather(1, labels[:, None]).mean()
    else:
        ours, pointwise = calls[loss]
        ours(logits, target.float(), inplace_backward=True).backward()
        reference = (pointwise(x64, target) if loss == "bce" else pointwise(x64, target, None))
        reference = reference.mean()
    (want,) = torch.autograd.grad(reference, x64)
    assert x.grad.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(64, 37), (3, 5000), (1100, 517)])
def test_plain_specialisation_equals_the_masked_kernel(name, shape, kernel_calls):
    """Without an element weight and a mask the kernels run their plain specialisation
    (the scale as a scalar, no keep array); an all-True mask takes the general one. Both
    agree with each other and with float64, serial (small) and parallel (1100 x 517)."""
    from xloss.ops import _numba_binary

    loss_fn, reference, takes_pos_weight = LOSSES[name]
    generator = torch.Generator().manual_seed(7)
    x = (4 * torch.randn(shape, generator=generator)).requires_grad_()
    y = (torch.rand(shape, generator=generator) < 0.3).float()
    extra = {"pos_weight": torch.linspace(0.5, 2.0, shape[-1])} if takes_pos_weight else {}
    results = []
    for mask in (None, torch.ones(shape, dtype=torch.bool)):
        loss = loss_fn(x, y, mask=mask, **extra)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.detach(), grad))
    assert len(kernel_calls) == 2
    torch.testing.assert_close(results[0], results[1], rtol=2e-6, atol=1e-9)
    xd = x.detach().double().requires_grad_()
    pos_weight = extra["pos_weight"].double() if extra else None
    want = reference(xd, y.double(), pos_weight).mean()
    (want_grad,) = torch.autograd.grad(want, xd)
    torch.testing.assert_close(results[0][0].double(), want.detach(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(results[0][1].double(), want_grad, rtol=2e-5, atol=1e-8)
    # the plain call compiled a specialisation whose keep argument is None
    kind = {"bce": 0, "focal": 1, "focal_gamma_half": 1}.get(name, 2 if name == "asl" else 3)
    compiled = [*_numba_binary.KERNELS[kind].signatures,
                *_numba_binary.SERIAL_KERNELS[kind].signatures]  # fmt: skip
    assert any(str(signature[7]) == "none" for signature in compiled)
