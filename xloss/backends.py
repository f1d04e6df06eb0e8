"""Which implementation serves a call: the numba kernel, the Triton kernel, or torch ops.

Three backends fulfil the same row contract (``xloss.ops.row_grad``):

- ``"numba"``: the fused CPU row kernel (CPU tensors; needs numba).
- ``"triton"``: the fused GPU row kernel (CUDA/ROCm tensors; needs triton). On CPU
  tensors it runs only when forced and ``TRITON_INTERPRET=1`` is set before xloss first
  uses Triton: Triton's interpreter then runs the same kernels, slowly, for testing.
- ``"torch"``: portable torch ops on any device. It is the only backend whose results
  can be differentiated twice (``torch.autograd.grad(..., create_graph=True)``, Hessian
  products, gradient penalties): the kernels compute the gradient in the forward pass.

By default a call takes the kernel for its device when one is available (numba on CPU,
triton on CUDA/ROCm) and torch otherwise. Calls no kernel serves (probability targets,
float64, and forward-mode AD: ``torch.func.jvp``, ``jacfwd``, ``hessian`` or a
``torch.autograd.forward_ad`` dual level) always run on torch. A user can force a
backend for a block of code with the context manager :func:`use` (per thread) or for the
process with the environment variable ``XLOSS_BACKEND`` (read at each call; :func:`use`
takes precedence).

Under ``torch.compile`` the choice is made once, when the function is traced, and baked
into the compiled graph (no guard): force the backend before the first call.

Example:
    >>> import torch, xloss
    >>> "torch" in xloss.backends.available()
    True
    >>> x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    >>> with xloss.backends.use("torch"):  # second-order gradients
    ...     loss = xloss.cross_entropy(x, torch.tensor([0, 1, 2, 3]))
    ...     (g,) = torch.autograd.grad(loss, x, create_graph=True)
    >>> g.requires_grad
    True
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator

import torch
from torch._C._functorch import TransformType
from torch.autograd import forward_ad

BACKENDS = ("numba", "triton", "torch")
ENV_VAR = "XLOSS_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GPU_DEVICES = ("cuda",)  # ROCm builds of torch expose their GPUs as "cuda" too

_local = threading.local()  # .forced: a list used as a stack by `use`
_triton_ok: dict = {}


def _check_name(name, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"{source} must be one of {', '.join(repr(b) for b in BACKENDS)}, got {name!r}"
        )
    return name.lower()


def _numba_available() -> bool:
    kernel = sys.modules.get("xloss.ops.kernel")  # imported already: skip the import
    if kernel is None:
        try:
            from xloss.ops import kernel
        except ImportError:
            return False
    return kernel.kernel_available()


def _triton_available() -> bool:
    """True when ``import triton`` works (tried once; not at ``import xloss``)."""
    if "ok" not in _triton_ok:
        ok = importlib.util.find_spec("triton") is not None
        if ok:
            try:
                import triton  # noqa: F401
            except Exception:  # a broken install counts as missing
                ok = False
        _triton_ok["ok"] = ok
    return _triton_ok["ok"]


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available() -> tuple[str, ...]:
    """The backends this machine can run, in preference order; ``"torch"`` always.

    ``"triton"`` is listed when triton imports and a GPU is visible, or when
    ``TRITON_INTERPRET=1`` (CPU tensors through Triton's interpreter).
    """
    names = []
    if _numba_available():
        names.append("numba")
    if _triton_available() and (torch.cuda.is_available() or interpreting()):
        names.append("triton")
    names.append("torch")
    return tuple(names)


def _require(name: str) -> None:
    if name == "numba" and not _numba_available():
        raise RuntimeError(
            "backend 'numba' is unavailable: numba does not import on this machine; "
            "install numba, or use backend 'torch'"
        )
    if name == "triton" and not _triton_available():
        raise RuntimeError(
            "backend 'triton' is unavailable: triton does not import on this machine; "
            "install triton (CUDA builds of torch bring it), or use backend 'torch'"
        )


# os.environ's own store on POSIX (bytes keys, the values as set through os.environ):
# reading it is one dict lookup, where os.environ.get runs four Python frames, each tens
# of microseconds at a loss call right after a model's forward (see
# xloss.ops.fused_cross_entropy.host_cross_entropy). Elsewhere os.environ.get.
_ENV_STORE = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEY = os.fsencode(ENV_VAR)


def _env_value() -> str:
    """``os.environ.get(ENV_VAR, "")``, read at each call."""
    if type(_ENV_STORE) is dict:
        raw = _ENV_STORE.get(_ENV_KEY)
        return "" if raw is None else os.fsdecode(raw)
    return os.environ.get(ENV_VAR, "")


def forced() -> str | None:
    """The backend forced by :func:`use` or ``XLOSS_BACKEND``, or None for automatic."""
    stack = getattr(_local, "forced", None)
    if stack:
        return stack[-1]
    value = _env_value()
    if value in ("", "auto"):
        return None
    return _check_name(value, f"the environment variable {ENV_VAR}")


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Force backend ``name`` (``"numba"``, ``"triton"`` or ``"torch"``) in this thread.

    Calls that the forced kernel cannot serve (probability targets, float64 input) still
    run on torch; a forced kernel given tensors of a device it does not run on raises
    a RuntimeError at the call. Raises RuntimeError here when the backend is unavailable.
    Nestable; other threads keep their own choice.
    """
    name = _check_name(name, "`name`")
    _require(name)
    stack = getattr(_local, "forced", None)
    if stack is None:
        stack = _local.forced = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def forward_mode_ad() -> bool:
    """A forward-mode tangent may reach the call: a ``torch.autograd.forward_ad`` dual level
    is open, or a ``torch.func`` jvp transform (``jvp``, ``jacfwd``, ``hessian``) is active.
    The kernels compute no tangent: their custom ops would hand back a zero one."""
    if forward_ad._current_level >= 0:
        return True
    return torch._C._are_functorch_transforms_active() and any(
        level.key() == TransformType.Jvp for level in torch._C._functorch.get_interpreter_stack()
    )


def select(device_type: str, dtype: torch.dtype, kernel_ok: bool = True) -> str:
    """The backend for a call on ``device_type`` tensors of ``dtype``.

    ``kernel_ok`` False (a call no kernel serves, e.g. probability targets) gives
    ``"torch"``, and so does forward-mode AD (:func:`forward_mode_ad`), forced backend or
    not. Takes strings and dtypes only, so ``torch.compile`` evaluates it as a constant
    while tracing.
    """
    name = forced()
    if name == "torch" or not kernel_ok or dtype not in KERNEL_DTYPES or forward_mode_ad():
        return "torch"
    if name is None:
        if device_type == "cpu":
            return "numba" if _numba_available() else "torch"
        if device_type in _GPU_DEVICES and _triton_available():
            return "triton"
        return "torch"
    _require(name)
    if name == "numba" and device_type != "cpu":
        raise RuntimeError(
            f"backend 'numba' runs on CPU tensors only, got {device_type} tensors; "
            "use backend 'triton' or 'torch' for them"
        )
    if name == "triton" and device_type not in _GPU_DEVICES:
        if device_type != "cpu" or not interpreting():
            raise RuntimeError(
                f"backend 'triton' runs on CUDA/ROCm tensors, got {device_type} tensors; "
                "on CPU tensors it needs TRITON_INTERPRET=1 set before the first call "
                "(Triton's interpreter, for testing), or use backend 'numba' or 'torch'"
            )
    return name


# torch.compile takes the result as a constant instead of tracing the thread-local and
# environment reads (see kernel.kernel_available for why the mark is set directly).
select._dynamo_marked_constant = True
