"""Argument and tensor checks shared by every loss.

Settings are checked once per call at the public boundary (`check_*` helpers), tensors
right after (`check_floating_input`, `check_index_target`, ...). Every error names the
argument, what was expected and what was received. Checks that read tensor values
(and so synchronise with the device) are only run when ``validate_args`` is true.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum", "sample")


def shape_str(shape) -> str:
    """Format a shape as a tuple: ``(8, 10)``, ``(8,)`` or ``()``."""
    return str(tuple(shape))


def check_reduction(reduction: str, normalizer=None) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None and reduction not in ("mean", "sum"):
        raise ValueError(
            "`normalizer` divides the summed loss and needs reduction='mean' or 'sum', "
            f"got reduction={reduction!r}"
        )


def check_unit_interval(name: str, value) -> float:
    """A float setting that must lie in [0, 1] (label smoothing)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1], got {value}")
    return value


def check_non_negative(name: str, value) -> float:
    """A finite float setting >= 0 (z-loss, focusing exponents): inf and NaN raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a non-negative float, got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"`{name}` must be >= 0, got {value}")
    if value == math.inf:
        raise ValueError(f"`{name}` must be finite, got {value}")
    return value


def check_positive_or_none(name: str, value) -> float | None:
    """A finite float setting > 0, or None for "off" (softcap): inf and NaN raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive float or None, got {type(value).__name__}")
    value = float(value)
    if not value > 0.0:  # also rejects NaN
        raise ValueError(f"`{name}` must be > 0 or None, got {value}")
    if value == math.inf:
        raise ValueError(f"`{name}` must be finite, got {value}; use None to switch it off")
    return value


def check_flag(name: str, value) -> bool:
    """A bool setting (``validate_args``, ``inplace_backward``, ...); no truthy strings."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_class_dim(class_dim) -> int:
    """``class_dim`` as a setting: an int (its range is checked against each input)."""
    if isinstance(class_dim, bool) or not isinstance(class_dim, int):
        raise TypeError(f"`class_dim` must be an int, got {class_dim!r}")
    return class_dim


def check_ignore_index(ignore_index) -> None:
    """``ignore_index`` is an int or None."""
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise TypeError(f"`ignore_index` must be an int or None, got {type(ignore_index).__name__}")


def differs_from(target: Tensor, ignore_index: int) -> Tensor:
    """``target != ignore_index`` as integers: PyTorch first casts the scalar to the
    target's dtype, so a uint8 target compared with -100 would see 156 and drop class 156.
    A value outside an integer target's range equals no element."""
    if not target.is_floating_point() and target.dtype != torch.bool:
        info = torch.iinfo(target.dtype)
        if not info.min <= ignore_index <= info.max:
            return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def check_floating_input(input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"`input` must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(
            f"`input` must be a floating-point tensor of logits, got dtype {input.dtype}"
        )


def check_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")


def normalize_dim(class_dim, ndim: int) -> int:
    """Return ``class_dim`` as a non-negative axis of a tensor with ``ndim`` dimensions."""
    check_class_dim(class_dim)
    if not -ndim <= class_dim < ndim:
        raise ValueError(
            f"`class_dim` must be in [{-ndim}, {ndim - 1}] for `input` with {ndim} "
            f"dimension(s), got {class_dim}"
        )
    return class_dim % ndim


def check_class_weight(weight, num_classes: int | None, name: str = "weight") -> None:
    """Class weights: a floating (C,) tensor; any C when ``num_classes`` is None."""
    if weight is None:
        return
    check_tensor(name, weight)
    if not weight.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {weight.dtype}")
    if num_classes is None and weight.dim() != 1:
        raise ValueError(
            f"`{name}` must be 1-D, one value per class, got shape {shape_str(weight.shape)}"
        )
    if num_classes is not None and weight.shape != (num_classes,):
        raise ValueError(
            f"`{name}` must have shape ({num_classes},), one value per class, "
            f"got {shape_str(weight.shape)}"
        )


def any_violation(bad: Tensor, message: str) -> bool:
    """Whether any element of the bool tensor ``bad`` is set: the data check behind
    ``validate_args``, which synchronises with the device.

    Traced by ``torch.compile`` (``fullgraph=True`` included) a branch on data is not
    possible: the check becomes an assertion inside the graph (``torch._assert_async``,
    which raises a RuntimeError with ``message`` when it fails, without the value found)
    and this returns False. Under ``torch.func.vmap`` it raises, naming validate_args=False.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), message)
        return False
    try:
        return bool(bad.any())
    except RuntimeError as error:
        if "vmap" not in str(error):
            raise
        raise RuntimeError(
            "validate_args=True checks tensor values (a data-dependent branch), which "
            "torch.func.vmap cannot batch; pass validate_args=False under vmap and check the "
            f"inputs outside it (the check: {message})"
        ) from error


def eager_host(*tensors: Tensor | None) -> bool:
    """True when every tensor given (None skipped) is a plain CPU tensor in eager mode: no
    ``torch.compile`` or ``torch.jit.trace`` tracing, no ``torch.func`` transform, no
    dispatch mode (FakeTensor, a tracer) and no subclass. Their values can then be read
    through numpy, where a few operations on a small tensor cost microseconds instead of
    a torch op's dispatch each (a tracer would record such reads as constants)."""
    return eager_mode() and all(t is None or (type(t) is Tensor and t.is_cpu) for t in tensors)


def plain_float32_vector(tensor, size: int) -> bool:
    """A plain contiguous (``size``,) float32 CPU tensor that no gradient is asked for
    (the host paths read it as numpy: only attribute reads here)."""
    return (
        type(tensor) is Tensor
        and tensor.dtype == torch.float32
        and tensor.is_cpu
        and tensor.shape == (size,)
        and tensor.is_contiguous()
        and not (tensor.requires_grad and torch.is_grad_enabled())
    )


def eager_mode() -> bool:
    """:func:`eager_host` without tensors: no tracing, transform or dispatch mode."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._is_tracing()
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def autocast_off(device_type: str):
    """A context in which autocast does not lower a loss's GEMMs (a no-op where it is not
    enabled): linear_cross_entropy's on every path, as its chunks do, so a call's numbers
    do not depend on which path it takes; the weighted logit sum of the torch-ops rows,
    as cross-entropy is on autocast's float32 list."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()  # and on devices without autocast ("meta")


def check_index_target_range(
    target: Tensor, num_classes: int, ignore_index: int | None, valid: Tensor | None
) -> None:
    """Class indices at kept positions must lie in [0, num_classes). Synchronises."""
    if eager_host(target, valid) and not target.requires_grad:
        # the same test as below, without the per-op dispatch
        valid = None if valid is None else valid.numpy()
        check_index_values(target.numpy(), num_classes, ignore_index, valid)
        return
    expected = index_range_message(num_classes, ignore_index)
    wide = target.long()  # uint8 >= 300 would compare with 300 cast to uint8 (44)
    bad = (wide < 0) | (wide >= num_classes)
    if ignore_index is not None:
        bad &= differs_from(target, ignore_index)
    if valid is not None:
        bad &= valid
    if any_violation(bad, expected):
        value = int(target[bad].flatten()[0])
        raise ValueError(f"{expected}, found {value}")


def index_range_message(num_classes: int, ignore_index: int | None) -> str:
    hint = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
    return f"`target` class indices must lie in [0, {num_classes - 1}]{hint}"


def check_index_values(
    values, num_classes: int, ignore_index: int | None, valid=None
) -> None:
    """:func:`check_index_target_range` on host numpy arrays: ``values`` the class
    indices, ``valid`` None or a bool array of kept positions."""
    if values.dtype == np.int64:  # one test: a negative index reads as >= 2**63 unsigned
        bad = values.view(np.uint64) >= num_classes
    else:
        bad = (values < 0) | (values >= num_classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    if valid is not None:
        bad &= valid
    if np.count_nonzero(bad):  # a direct C call; ndarray.any() goes through Python
        raise ValueError(
            f"{index_range_message(num_classes, ignore_index)}, found {int(values[bad].flat[0])}"
        )


# The smallest normal float32. A positive normalizer below it may round to 0 in the
# float32 the kernels divide in (1e-50 did), where 0 means "empty: the loss is 0".
NORMALIZER_TINY = 1.1754943508222875e-38
_NORMALIZER_RULE = (
    "`normalizer` must be >= 0 and finite, and 0 or at least 1.2e-38 (float32's smallest normal)"
)


def check_normalizer(normalizer, validate_args: bool) -> None:
    """``normalizer`` (None, 0, a finite number >= float32's smallest normal, or a
    one-element tensor) and the ``validate_args`` flag: every settings check passes both
    through here."""
    check_flag("validate_args", validate_args)
    if normalizer is None:
        return
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"`normalizer` must be a number or a one-element tensor, "
                f"got shape {shape_str(normalizer.shape)}"
            )
        # a tensor's value is read only with validate_args (it synchronises with the device)
        allowed = (normalizer == 0) | ((normalizer >= NORMALIZER_TINY) & (normalizer < math.inf))
        if validate_args and any_violation(~allowed, _NORMALIZER_RULE):
            raise ValueError(f"{_NORMALIZER_RULE}, got {float(normalizer)}")
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(
            f"`normalizer` must be a number or a tensor, got {type(normalizer).__name__}"
        )
    if not (normalizer == 0 or NORMALIZER_TINY <= normalizer < math.inf):  # NaN too
        raise ValueError(f"{_NORMALIZER_RULE}, got {normalizer}")


def check_inplace_allowed(tensor: Tensor, name: str = "input", option: str = "inplace_backward"):
    """Raise as PyTorch does before an in-place write into a leaf that requires grad.

    ``option=True`` makes a loss overwrite ``tensor`` with its gradient. PyTorch forbids
    in-place operations on a leaf that requires grad (an ``nn.Parameter``) and on a view
    of one while grad mode is on: the parameter would silently become its own gradient.
    Every loss with an in-place option calls this at its public boundary, in every dtype
    and on every path, so the rule does not depend on which kernel serves the call. The
    checks are plain attribute reads, which ``torch.compile(fullgraph=True)`` traces.
    """
    if not (torch.is_grad_enabled() and tensor.requires_grad):
        return
    if tensor.is_leaf:
        what = "a leaf tensor that requires grad (e.g. an nn.Parameter)"
    else:
        base = tensor._base
        if base is None or not base.is_leaf:
            return
        what = "a view of a leaf tensor that requires grad (e.g. a slice of an nn.Parameter)"
    raise RuntimeError(
        f"`{option}=True` would overwrite `{name}` with its gradient, but `{name}` is {what}, "
        "and PyTorch forbids in-place operations on such tensors. Pass the logits computed "
        f"from it (any non-leaf tensor), or use `{option}=False`."
    )
