"""Review findings on linear_cross_entropy, return_stats and the compat adapters."""

import pytest
import torch

import xloss
from xloss import backends
from xloss.ops import kernel

needs_kernel = pytest.mark.skipif(not kernel.kernel_available(), reason="numba kernel absent")


def nan_row(sign: float, num: int = 4, at: int = 1) -> torch.Tensor:
    """One row of ``num`` logits (1, 0, 2, 0, ...) with a NaN of the given sign at ``at``
    (x86's inf - inf is a negative NaN)."""
    row = torch.zeros(1, num)
    row[0, 0], row[0, 2] = 1.0, 2.0
    row[0, at] = torch.tensor(float("nan")) * sign
    return row


@needs_kernel
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num, at", [(4, 1), (1500, 1200), (1500, 1)])  # one, two blocks
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("grad", [False, True])
def test_stats_of_a_nan_row_match_the_portable_path(sign, dtype, num, at, softcap, grad):
    # The kernel's argmax skipped a NaN (an integer max over the bit patterns puts a
    # negative NaN below -inf) and a positive NaN gave lse -inf: a NaN row could count as
    # a hit in the accuracy. torch.argmax (the portable path) returns the first NaN.
    logits = nan_row(sign, num, at).repeat(3, 1).to(dtype)
    logits[1] = torch.arange(num, dtype=dtype) % 7  # a finite row between NaN rows
    target = torch.tensor([2, 3, 2])
    results = {}
    for name in ("numba", "torch"):
        x = logits.clone().requires_grad_(grad)
        with backends.use(name):
            results[name] = xloss.cross_entropy(x, target, softcap=softcap, return_stats=True)
    got, want = results["numba"], results["torch"]
    assert want.predicted.tolist() == [at, min(num - 1, 6), at]
    assert got.predicted.tolist() == want.predicted.tolist()
    torch.testing.assert_close(got.accuracy, want.accuracy)
    for field in ("lse", "entropy"):
        ours, theirs = getattr(got, field), getattr(want, field)
        assert torch.isnan(ours[[0, 2]]).all() and torch.isnan(theirs[[0, 2]]).all()
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert torch.isnan(got.loss) and torch.isnan(want.loss)


def test_fullgraph_error_does_not_advise_the_torch_backend():
    # The graph-break reason advised xloss.backends.use("torch") as an alternative to
    # fullgraph=False, but the call is a graph break under it too: fullgraph=True raised.
    hidden, weight = torch.randn(6, 4), torch.randn(5, 4)
    target = torch.randint(0, 5, (6,))
    compiled = torch.compile(xloss.linear_cross_entropy, fullgraph=True, backend="eager")
    with backends.use("torch"), pytest.raises(Exception, match="fullgraph=False") as error:
        compiled(hidden, weight, target)
    assert "backends.use(\"torch\") (plain" not in str(error.value)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction="sum"),
        dict(ignore_index=1, reduction="none"),
    ],
    ids=["plain", "smoothing-zloss-softcap-sum", "ignore-none"],
)
def test_linear_cross_entropy_under_forward_mode_ad(options):
    # The chunked autograd Function has no jvp: jvp raised "must implement jvp". Now the
    # logits are formed and the tangent is the float64 reference's.
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(6, 4), torch.randn(5, 4), torch.randn(5)
    target = torch.tensor([0, 1, 4, 1, 2, 3])
    direction = torch.randn(6, 4)

    def reference(h):
        logits = h.double() @ weight.double().T + bias.double()
        cap = options.get("softcap")
        capped = logits if cap is None else cap * torch.tanh(logits / cap)
        eps, z = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0)
        log_p = torch.log_softmax(capped, 1)
        nll = -log_p.gather(1, target[:, None]).squeeze(1)
        per_row = (1 - eps) * nll - eps * log_p.mean(1) + z * torch.logsumexp(capped, 1) ** 2
        kept = target != options.get("ignore_index", -100)
        per_row = torch.where(kept, per_row, 0.0)
        reduction = options.get("reduction", "mean")
        return {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / kept.sum()}[
            reduction
        ]

    def ours(h):
        return xloss.linear_cross_entropy(h, weight, target, bias, **options)

    value, tangent = torch.func.jvp(ours, (hidden,), (direction,))
    want_value, want_tangent = torch.func.jvp(reference, (hidden.double(),), (direction.double(),))
    torch.testing.assert_close(value.double(), want_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tangent.double(), want_tangent, rtol=1e-5, atol=1e-6)
    if options.get("reduction", "mean") != "none":
        hessian = torch.func.hessian(ours)(hidden)
        want = torch.func.hessian(reference)(hidden.double())
        torch.testing.assert_close(hessian.double(), want, rtol=1e-4, atol=1e-5)
