"""xloss.compat.torchreid against a float64 reference of torchreid's formula."""

import pytest
import torch

from xloss.compat.torchreid import CrossEntropyLoss


def reference(inputs, targets, num_classes, eps):
    """(-q * log_softmax(x)).mean(0).sum() with q = (1 - eps) onehot + eps / K, in float64."""
    log_probs = torch.log_softmax(inputs.double(), dim=1)
    onehot = torch.zeros_like(log_probs)
    onehot[torch.arange(len(targets)), targets] = 1.0
    q = (1 - eps) * onehot + eps / num_classes
    return (-q * log_probs).mean(0).sum()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35, 1.0])
@pytest.mark.parametrize("shape", [(1, 2), (5, 7), (13, 3)])
def test_matches_reference(eps, shape):
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, shape[1], (shape[0],), generator=gen)
    loss = CrossEntropyLoss(num_classes=shape[1], eps=eps)(inputs, targets)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference(inputs, targets, shape[1], eps))


def test_label_smooth_false_is_plain_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 4, (6,), generator=gen)
    loss = CrossEntropyLoss(4, eps=0.3, label_smooth=False)(inputs, targets)
    torch.testing.assert_close(loss, reference(inputs, targets, 4, 0.0))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(inputs, targets))


def test_cpu_only_with_use_gpu_true(monkeypatch):
    """Regression: upstream calls .cuda() when use_gpu=True; the device must follow the input."""

    def no_cuda(*args, **kwargs):
        raise AssertionError("CrossEntropyLoss must not move anything to CUDA")

    monkeypatch.setattr(torch.Tensor, "cuda", no_cuda)
    criterion = CrossEntropyLoss(num_classes=3, use_gpu=True)
    inputs = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([0, 2, 1, 2])
    loss = criterion(inputs, targets)
    loss.backward()
    assert loss.device.type == "cpu" and inputs.grad.device.type == "cpu"
    torch.testing.assert_close(loss.double(), reference(inputs.detach(), targets, 3, 0.1))


def test_gradcheck():
    inputs = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([4, 0, 2])
    criterion = CrossEntropyLoss(5, eps=0.2)
    assert torch.autograd.gradcheck(lambda x: criterion(x, targets), (inputs,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_returns_input_dtype(dtype):
    gen = torch.Generator().manual_seed(2)
    inputs = (torch.randn(8, 6, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 6, (8,), generator=gen)
    loss = CrossEntropyLoss(6)(inputs, targets)
    assert loss.dtype == dtype
    expected = reference(inputs.double(), targets, 6, 0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)


def test_extreme_logits_are_finite():
    inputs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]])
    loss = CrossEntropyLoss(3, eps=0.1)(inputs, torch.tensor([0, 2]))
    expected = reference(inputs, torch.tensor([0, 2]), 3, 0.1)
    torch.testing.assert_close(loss.double(), expected)


def test_errors():
    with pytest.raises(TypeError, match="num_classes"):
        CrossEntropyLoss(3.0)
    with pytest.raises(ValueError, match="num_classes"):
        CrossEntropyLoss(0)
    with pytest.raises(ValueError, match="eps"):
        CrossEntropyLoss(3, eps=1.5)
    criterion = CrossEntropyLoss(3)
    with pytest.raises(ValueError, match=r"shape \(N, 3, \.\.\.\)"):
        criterion(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\]"):
        criterion(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="floating-point"):
        criterion(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))


def test_matches_upstream_when_installed():
    losses = pytest.importorskip("torchreid.losses")
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(5, 4, generator=gen)
    targets = torch.randint(0, 4, (5,), generator=gen)
    upstream = losses.CrossEntropyLoss(4, use_gpu=False)(inputs, targets)
    torch.testing.assert_close(CrossEntropyLoss(4)(inputs, targets), upstream)
