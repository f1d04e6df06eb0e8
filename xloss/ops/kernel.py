"""The fused CPU row cross-entropy (numba): one pass per row, gradient written in place.

``row_loss_and_grad_`` follows the shared row-gradient contract (the portable twin is
``xloss.ops.row_grad``). numba is imported on first use, so ``import xloss`` stays fast;
compiled kernels are cached on disk (numba ``cache=True``). Without numba the callers use
the portable torch path, and a warning says why, once.

Threads: the kernels run on numba's thread pool, capped at ``torch.get_num_threads()`` so
``torch.set_num_threads`` limits both libraries (numba's own cap is ``NUMBA_NUM_THREADS``,
all cores by default). Unless the user chose a numba threading layer
(``NUMBA_THREADING_LAYER``) or numba's pool already runs, xloss selects the layer before
the first launch:

- ``omp`` where numba's OpenMP pool would run on torch's own GNU OpenMP runtime (torch's
  pip wheels on Linux: torch puts its bundled libgomp in the global symbol scope, and
  numba's ``omppool`` binds to it; :func:`_shares_torch_openmp` checks). The pool is then
  torch's own thread team: nothing spins against torch, and a kernel launched right
  after a torch op finds the team awake. On ``workqueue`` the same call paid for torch's
  spinning workers: BCE at (4096, 1000) right after a 512 x 512 matmul took 1.74x
  (1.67-1.94) its time after a pause, cross-entropy at (2048, 32000) 1.29x (1.27-1.37)
  (``benchmarks/after_torch_op.py``, 3 runs of 25 rounds, 2026-12-04);
- ``workqueue`` otherwise: its idle workers sleep on a condition variable, where a
  second OpenMP runtime's would spin after every kernel and take the cores from torch's.

Starting the ``omp`` layer sets the runtime's thread count to ``NUMBA_NUM_THREADS``;
torch's count is put back (:func:`_set_threads`). GNU OpenMP cannot start a parallel
region in a child forked after one ran in the parent, so such a child runs torch
single-threaded (as DataLoader workers do) and the kernels' serial twins, with no
warning; on ``workqueue`` a forked child keeps the pool.

Measured on ``workqueue`` with both pools at their defaults (torch 2, numba 2 threads,
on 2 cores shared with other jobs, 2026-12-03), before the ``omp`` choice: steps of the
training-step bench's small LM alternated in one process, torch's loss against
``xloss.cross_entropy``, show no slowdown from numba's pool: at V = 8192 the head + loss
part ran 1.37x faster with xloss (1.18-1.61 over 40 pairs) and the whole step 1.09x
(per-pair median of 30, quartiles 0.95-1.39); at V = 256 the head + loss part 1.57x
(quartiles 0.89-1.86 over 40 pairs), the whole step within noise (per-pair median 1.11x,
quartiles 0.56-1.42). A 0.77x at V = 8192 from separate processes was noise between
processes. A small launch costs about 0.3 ms more on ``workqueue`` than on ``omp``
(the queue wakes its sleeping workers): at 1024 x 256 logits that is more than the work
itself (0.12-0.14 ms on one thread), so problems of at most ``SERIAL_ELEMENTS`` logits, and
every problem when torch runs one thread, take a serial twin of the kernel in the calling
thread (``rows_f32_serial``, ``rows_half_serial``, and the binary family's), without the
pool and without the launch lock. Each shares its loop with the parallel kernel; the fp32
row twin's own cold compile is about 7 s of CPU, once.

The ``workqueue`` layer is not thread-safe, so every launch holds one process-wide lock
(on either layer): calls from several Python threads take turns (each kernel uses all
the pool's threads anyway).

The disk cache: kernels are cached next to the package (or under the home directory);
when neither is writable they are compiled in each process instead, with one warning,
never disabled.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import sys
import tempfile
import threading
import warnings

import numpy as np
import torch
from torch import Tensor

from xloss._core.validation import eager_host
from xloss.ops.row_grad import check_rows, check_stats

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# "kernels": the kernel module, or None when numba is unusable; "omp_before_fork": this
# process was forked after numba's OpenMP layer ran (it cannot launch it again)
_loaded: dict = {}
_launch_lock = threading.Lock()  # one kernel launch at a time (workqueue is not thread-safe)


def _numba_layer() -> str | None:
    """The threading layer numba's running pool uses; None while no pool has started."""
    numba = sys.modules.get("numba")
    if numba is None:
        return None
    try:
        return numba.threading_layer()
    except ValueError:  # "Threading layer is not initialized."
        return None


def _choose_threading_layer() -> None:
    """Select numba's threading layer before its pool starts, unless the user chose one:
    ``omp`` when its launches would run on torch's own GNU OpenMP runtime, else
    ``workqueue`` (see the module docstring)."""
    import numba

    if os.environ.get("NUMBA_THREADING_LAYER") or _numba_layer() is not None:
        return
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "omp" if _shares_torch_openmp() else "workqueue"


def _configured_layer() -> str:
    """The threading layer numba's pool will start with (or runs with)."""
    import numba

    return _numba_layer() or os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER


def _openmp_function(name: str):
    """``name`` from the OpenMP runtime in the process's global scope, or None."""
    import ctypes

    try:
        return ctypes.CDLL(None)[name]
    except (AttributeError, OSError):
        return None


def _shares_torch_openmp() -> bool:
    """True when numba's ``omp`` layer would run on torch's own GNU OpenMP runtime.

    torch loads its libraries into the global symbol scope, so numba's ``omppool``
    module, loaded later, binds its OpenMP calls to the runtime found there first: the
    pool is then torch's own thread team. That holds when the global ``GOMP_parallel``
    is the one libtorch_cpu uses and numba's pool is GNU OpenMP. Any doubt: False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        from numba.np.ufunc import omppool

        library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        ours = _openmp_function("GOMP_parallel")
        theirs = ctypes.CDLL(library)["GOMP_parallel"]
        address = ctypes.c_void_p
        return (
            omppool.openmp_vendor == "GNU"
            and ours is not None
            and ctypes.cast(ours, address).value == ctypes.cast(theirs, address).value
        )
    except Exception:  # no omppool, no libtorch_cpu, no GNU OpenMP: the workqueue layer
        return False


def _after_fork_in_child() -> None:
    global _launch_lock, _pool_lock
    _launch_lock = threading.Lock()  # a lock held by another thread at fork() stays held
    _pool_lock = threading.Lock()
    if _numba_layer() == "omp":
        # GNU OpenMP keeps the parent's thread team, which the child does not have: any
        # parallel region in the child (numba's, or torch's own on the same runtime)
        # would abort or hang. Run this child single-threaded, as DataLoader workers do,
        # with the kernels' serial twins (see _serial).
        _loaded["omp_before_fork"] = True
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _import_kernels(name: str = "xloss.ops._numba_rows"):
    """Import (compile or load) the kernel module ``name``; when numba cannot cache next
    to the package nor in the home directory, compile without a disk cache (one warning).

    numba's SSA pass reports variables of xloss's inlined fp16/bf16 helpers as "not in
    scope" (``NumbaIRAssumptionWarning``, "an internal pedantic check", a dozen lines per
    cold compile asking to report it to numba); the compiled code is right (tested), so
    that one warning category is silenced once the kernels are first imported.
    """
    from numba.core.errors import NumbaIRAssumptionWarning

    warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)
    module = _import_or_compile(name)
    _type_arrays_directly(module)
    return module


def _type_arrays_directly(module) -> None:
    """Give the kernels of ``module`` a ``typeof_pyval`` that types a plain ndarray as
    numba does, without numba's first test, ``isinstance(val, np.ma.MaskedArray)``: that
    attribute imports ``numpy.ma`` (about 15 ms of a warm first call) at the first
    launch, when numba types each argument in Python once. Anything but an exact
    ndarray (a MaskedArray included) goes to numba's own."""
    from numba.core import types
    from numba.core.dispatcher import Dispatcher
    from numba.np import numpy_support

    def typer(numba_typeof):
        def typeof_pyval(value):
            if type(value) is not np.ndarray:
                return numba_typeof(value)
            dtype = numpy_support.from_dtype(value.dtype)
            layout = numpy_support.map_layout(value)
            return types.Array(dtype, value.ndim, layout, readonly=not value.flags.writeable)

        return typeof_pyval

    for kernel in vars(module).values():
        if isinstance(kernel, Dispatcher) and "typeof_pyval" not in vars(kernel):
            kernel.typeof_pyval = typer(kernel.typeof_pyval)


def _import_or_compile(name: str):
    try:
        return importlib.import_module(name)
    except RuntimeError as error:
        if "cannot cache function" not in str(error):
            raise
        cause = error
    import numba

    # numba picks a cache locator per function when it is decorated; a private directory
    # for this process only (removed at exit) satisfies it, so nothing is reused later
    private = tempfile.mkdtemp(prefix="xloss-numba-")
    import atexit

    atexit.register(shutil.rmtree, private, ignore_errors=True)
    previous, numba.config.CACHE_DIR = numba.config.CACHE_DIR, private
    try:
        module = importlib.import_module(name)
    finally:
        numba.config.CACHE_DIR = previous
    warnings.warn(
        f"xloss: numba cannot write its disk cache ({cause}); the CPU kernels are "
        "compiled in this process and not cached (a few seconds in each new process). "
        "Set NUMBA_CACHE_DIR to a writable directory to keep them between runs.",
        RuntimeWarning,
        stacklevel=4,
    )
    return module


def _kernels():
    """The compiled-kernel module, or None (with one warning) when numba is unusable."""
    if "kernels" not in _loaded:
        try:
            _choose_threading_layer()
            _numba_rows = _import_kernels()
            _loaded["layer"] = _configured_layer()
        except Exception as error:  # ImportError, or a broken numba/llvmlite install
            warnings.warn(
                f"xloss: numba is unavailable ({type(error).__name__}: {error}); "
                "cross-entropy on CPU uses the slower portable torch path",
                RuntimeWarning,
                stacklevel=3,
            )
            _numba_rows = None
        _loaded["kernels"] = _numba_rows
    return _loaded["kernels"]


def kernel_available() -> bool:
    """True when the numba row kernel can run (numba imports)."""
    return _kernels() is not None


# torch.compile takes the result as a constant instead of tracing numba's import. This is
# the mark torch.compiler.assume_constant_result sets; setting it directly keeps
# `import xloss` from importing torch._dynamo (about 1.5 s). The compile tests cover it.
kernel_available._dynamo_marked_constant = True


def dynamo_disable_when_imported(*ops) -> None:
    """Let the custom ops' first call skip importing torch._dynamo (about 1 s).

    ``torch.library.custom_op`` wraps each device implementation in
    ``torch._disable_dynamo``, which imports torch._dynamo on the first call to build the
    wrapper. Without torch._dynamo imported nothing can be compiling, so the wrapper is
    only needed once it is: until then the implementation runs as it is. (Private
    attributes of torch 2.13; on another torch this does nothing.)
    """
    for op in ops:
        for wrapper in getattr(op, "_backend_fns", {}).values():
            function = getattr(wrapper, "__wrapped__", None)
            if function is None or hasattr(function, "__dynamo_disable"):
                continue

            def call(*args, _function=function, **kwargs):
                if "torch._dynamo" not in sys.modules:
                    return _function(*args, **kwargs)
                import torch._dynamo

                disabled = torch._dynamo.disable(_function, True, wrapping=False)
                _function.__dynamo_disable = disabled  # torch's own wrapper from now on
                return disabled(*args, **kwargs)

            function.__dynamo_disable = call


def _set_threads() -> None:
    """Size numba's pool like torch's (and pick the threading layer before it starts).

    Launch kernels inside :func:`parallel_region`, which calls this under the launch lock:
    a launch outside it can race another thread's on the workqueue layer, which aborts.

    Starting numba's ``omp`` layer calls ``omp_set_num_threads(NUMBA_NUM_THREADS)`` and
    enables nested regions on this thread, and torch (on the same GNU OpenMP runtime)
    follows: ``torch.get_num_threads()`` read 4 instead of the user's 2 after the first
    launch with ``NUMBA_NUM_THREADS=4``. torch's count and the runtime's nesting depth
    are put back.
    """
    threads = torch.get_num_threads()
    if getattr(_sized_for, "threads", None) == threads:  # this thread's mask is set already
        return
    import numba

    _choose_threading_layer()
    wanted = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if _numba_layer() is not None:  # the pool runs: only numba's own thread mask changes
        numba.set_num_threads(wanted)
        _sized_for.threads = threads
        return
    read_depth = _openmp_function("omp_get_max_active_levels")
    depth = read_depth() if read_depth is not None else None
    numba.set_num_threads(wanted)  # starts the pool
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if depth is not None and _numba_layer() == "omp":
        _openmp_function("omp_set_max_active_levels")(depth)
    _sized_for.threads = threads


# The torch thread count this thread last sized numba's pool for: numba's thread mask is
# per thread, and setting it costs about ten Python calls, which a small launch feels.
_sized_for = threading.local()


class parallel_region:  # noqa: N801 (used as a function: `with parallel_region():`)
    """Hold the process-wide launch lock and size numba's pool like torch's: wrap every
    call of a ``parallel=True`` kernel in it (the workqueue layer is not thread-safe).
    A class, not a generator context manager: three fewer Python calls a launch."""

    def __enter__(self) -> None:
        _launch_lock.acquire()
        try:
            _set_threads()
        except BaseException:
            _launch_lock.release()
            raise

    def __exit__(self, *exc_info) -> None:
        _launch_lock.release()


def _as_array(tensor: Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; fp16/bf16 as their uint16 bit patterns."""
    if tensor.requires_grad:  # detach only when it must: a torch op's dispatch saved
        tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _check_rows(logits: Tensor, target: Tensor) -> None:
    check_rows(logits, target, KERNEL_DTYPES)
    if logits.device.type != "cpu" or not logits.is_contiguous():
        raise ValueError("`logits` must be a contiguous CPU tensor")


def _launch(
    logits: Tensor,
    target: Tensor,
    dest: Tensor | None,
    *,
    grad_scale: float | Tensor = 1.0,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Run the kernel over rows; ``dest`` None: loss only, else the gradient goes there.

    ``stats``: None, or ((R, 2) float32, (R,) int64) contiguous CPU tensors that receive
    per row (lse, entropy) and the argmax, in the same pass (-1 and zeros at dropped rows).
    """
    _check_rows(logits, target)
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("the numba row kernel is unavailable; check kernel_available()")
    num_rows = logits.shape[0]
    if isinstance(grad_scale, Tensor):
        scale = grad_scale.detach().to(torch.float32).contiguous().reshape(-1).numpy()
        if scale.shape not in ((1,), (num_rows,)):
            raise ValueError(
                f"`grad_scale` must be a float or a tensor of 1 or {num_rows} elements, "
                f"got shape {tuple(grad_scale.shape)}"
            )
    else:
        scale = np.array([grad_scale], dtype=np.float32)
    if class_weight is None:
        weight = np.empty(0, dtype=np.float32)
    else:
        weight = class_weight.detach().to(torch.float32).contiguous().numpy()
    loss = torch.empty(num_rows, dtype=torch.float32)
    settings = (
        weight,
        np.float32(label_smoothing),
        np.float32(z_loss),
        np.float32(0.0 if softcap is None else softcap),
    )
    source = _as_array(logits)
    stats_arrays = (None, None) if stats is None else _stats_arrays(stats, num_rows)
    target_array = target.detach().numpy()
    write = dest is not None
    if write and (dest.shape != logits.shape or dest.dtype != logits.dtype):
        raise ValueError("the gradient buffer must have the logits' shape and dtype")
    if write and not dest.is_contiguous():
        raise ValueError("the gradient buffer must be contiguous")
    if logits.dtype == torch.float32:
        in_place = write and dest.data_ptr() == logits.data_ptr()
        rows_dest = _as_array(dest) if write else None
        run_f32(kernels, source, rows_dest, target_array, scale, settings, loss.numpy(),
                in_place=in_place, stats=stats_arrays)  # fmt: skip
        return loss
    is_bf16 = logits.dtype == torch.bfloat16
    run_half(kernels, source, _as_array(dest) if write else None, target_array, scale,
             settings, loss.numpy(), is_bf16, stats=stats_arrays)  # fmt: skip
    return loss


_NO_ROWS = np.empty((0, 0), np.float32)
_NO_HALF_ROWS = np.empty((0, 0), np.uint16)


def run_half(kernels, source, dest, target, scale, settings, loss, is_bf16, *,
             stats=(None, None)) -> None:  # fmt: skip
    """The fp16/bf16 kernel on checked numpy arrays, as :func:`run_f32`: ``source`` and
    ``dest`` (or None: loss only) are (R, C) uint16 bit patterns, of bf16 with
    ``is_bf16``, else of fp16. Raises when a kept target is out of range."""
    bad_row = np.array([-1], dtype=np.int64)  # the kernel's out-of-range report
    write = dest is not None
    arguments = (source, dest if write else _NO_HALF_ROWS, target, scale, *settings, is_bf16,
                 write, loss, bad_row, *stats)  # fmt: skip
    if _serial(source.size):
        kernels.rows_half_serial(*arguments)
    else:
        with parallel_region():
            kernels.rows_half(*arguments)
    if bad_row[0] >= 0:
        raise_out_of_range(int(bad_row[0]), int(target[bad_row[0]]), source.shape[1])


def run_f32(kernels, source, dest, target, scale, settings, loss, *, in_place=False,
            stats=(None, None)) -> None:  # fmt: skip
    """The fp32 kernel on numpy arrays that :func:`_launch` (or the eager host path of
    ``xloss.ops.fused_cross_entropy``) checked: (R, C) ``source``, ``dest`` (R, C) or None
    (loss only; the same array as ``source`` with ``in_place``), (R,) int64 ``target``,
    ``scale`` (1,) or (R,) float32, ``settings`` (weight, eps, z, cap), (R,) float32
    ``loss`` to fill. Raises when a kept target is out of range."""
    write = dest is not None
    bad_row = np.array([-1], dtype=np.int64)  # the kernel's out-of-range report
    # In place passes one array: aliased source/dest arrays would defeat vectorisation.
    arguments = (
        _NO_ROWS if in_place else source, dest if write else _NO_ROWS, target, scale,
        *settings, write and not in_place, write, loss, bad_row, *stats,
    )  # fmt: skip
    if _serial(source.size):
        kernels.rows_f32_serial(*arguments)
    else:
        with parallel_region():
            kernels.rows_f32(*arguments)
    if bad_row[0] >= 0:
        raise_out_of_range(int(bad_row[0]), int(target[bad_row[0]]), source.shape[1])


# Below this many elements an fp32 row launch, and any binary-family launch, runs in the
# calling thread. A parallel launch hands the work to numba's pool and waits for it: 0.1
# to 0.4 ms of fixed cost here, depending on how long the host takes to wake the pool's
# threads. Measured on the kernels alone, alternated in one process: rows (5 rounds,
# C = 256, 1024 and 4096) serial/parallel 0.71-0.93x at 2**19 logits, 1.14-1.39x at 2**20;
# binary (7 rounds, C = 1000) at 2**19 elements BCE 0.54x, focal 0.62x, ASL 0.87x, at 2**18
# 0.42x, 0.41x, 0.69x (the pool woke slowly in that run: at 2**20 still 0.68-0.99x).
SERIAL_ELEMENTS = 2**19


# The eager host cross-entropy call (``xloss.ops.fused_cross_entropy.host_cross_entropy``)
# shares out rows from far smaller problems when numba's pool is torch's own OpenMP team
# (the ``omp`` layer, see _choose_threading_layer): that team's threads spin between
# parallel regions, so a launch finds them awake. Measured here (forward + backward of
# (N, C) logits, 2 threads, 3 alternated rounds of 160 calls, serial time / parallel):
# fp32 2**15 elements 0.86-0.92x, 2**16 0.95-0.97x, 2**17 1.19-1.30x, 2**18 1.60-1.64x;
# bf16 (its rows are widened to fp32 first) 2**15 1.00-1.11x, 2**16 1.19-1.23x. In a
# training step, right after the model's forward, 1024 x 256 fp32 took 0.18 ms in
# parallel against 0.27 ms in the calling thread.
OMP_HOST_SERIAL_ELEMENTS = {torch.float32: 2**16, torch.float16: 2**15, torch.bfloat16: 2**15}


def _serial(elements: int, limit: int | None = None) -> bool:
    """Run a kernel in the calling thread: a problem of at most ``limit`` elements
    (``SERIAL_ELEMENTS`` by default), one thread anyway, or a child forked after the
    ``omp`` layer ran (it cannot start a parallel region)."""
    if elements <= (SERIAL_ELEMENTS if limit is None else limit):
        return True
    return torch.get_num_threads() == 1 or "omp_before_fork" in _loaded


def host_serial(elements: int, dtype: torch.dtype) -> bool:
    """:func:`_serial` for the eager host cross-entropy call (``OMP_HOST_SERIAL_ELEMENTS``
    with the ``omp`` layer, else ``SERIAL_ELEMENTS``)."""
    omp = _loaded.get("layer") == "omp"
    return _serial(elements, OMP_HOST_SERIAL_ELEMENTS[dtype] if omp else SERIAL_ELEMENTS)


def _stats_arrays(stats: tuple[Tensor, Tensor], num_rows: int):
    check_stats(stats, num_rows, torch.device("cpu"))
    return stats[0].detach().numpy(), stats[1].detach().numpy()


# A kept negative class index is shifted by this much (past any class count) before the
# kernel, whose contract drops rows with a negative target: the kernel then reports it.
NEGATIVE_TARGET_SHIFT = 2**62


def kernel_target(index: Tensor, keep: Tensor | None) -> Tensor:
    """int64 targets for the row kernels: -1 where ``keep`` drops the row, and a kept
    negative index y as y + 2**62, which the kernel rejects instead of dropping the row."""
    if eager_host(index, keep):  # numpy: a few microseconds where each torch op costs more
        return torch.from_numpy(
            kernel_target_array(index.numpy(), None if keep is None else keep.numpy())
        )
    index = torch.where(index < 0, index + NEGATIVE_TARGET_SHIFT, index)
    return index if keep is None else torch.where(keep, index, -1)


def kernel_target_array(index: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """:func:`kernel_target` on numpy arrays (``index`` itself when nothing changes; the
    kernels only read it)."""
    if index.size and index.min() < 0:
        index = np.where(index < 0, index + NEGATIVE_TARGET_SHIFT, index)
    return index if keep is None else np.where(keep, index, -1)


def raise_out_of_range(row: int, value: int, num_classes: int) -> None:
    if value >= NEGATIVE_TARGET_SHIFT // 2:
        value -= NEGATIVE_TARGET_SHIFT
    raise ValueError(
        f"`target` class indices must lie in [0, {num_classes - 1}], found {value} (row "
        f"{row} of the flattened target). With validate_args=False the range is not checked "
        "before the kernel; the kernel does not read such rows and stops here. Fix the "
        "target, or give padding an ignore_index."
    )


def row_loss_and_grad_(
    logits: Tensor,
    target: Tensor,
    *,
    grad_scale: float | Tensor,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Per-row loss; ``logits`` is OVERWRITTEN with the scaled gradient (shared contract).

    loss_i = (1-eps) w[y] (lse - x[y]) + eps/C sum_c w[c] (lse - x[c]) + z lse^2, with x
    after the softcap; the row of ``logits`` becomes
    s_i [(1-eps) w[y] (p - onehot_y) + eps/C (W p - w) + 2 z lse p] (times the softcap
    factor 1 - tanh(x/cap)^2). A negative target drops its row: loss 0, gradient 0.

    Args:
        logits: (R, C) contiguous CPU float32, float16 or bfloat16; overwritten.
        target: (R,) int64 class indices; negative marks a dropped row; an index >= C
            raises a ValueError after the kernel (the row is not read).
        grad_scale: s_i, a float or an (R,) tensor.
        class_weight: (C,) weights w, or None.
        label_smoothing, z_loss, softcap: eps, z and the softcap (None: off).
        stats: None, or ((R, 2) float32, (R,) int64) tensors filled in the same pass with
            (lse, entropy) per row and the argmax of the raw logits (zeros and -1 at
            dropped rows).

    Returns:
        (R,) float32 loss, not scaled by s_i.
    """
    return _launch(
        logits, target, logits, grad_scale=grad_scale, class_weight=class_weight,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, stats=stats,
    )  # fmt: skip


def row_loss_and_grad(logits: Tensor, target: Tensor, **options) -> tuple[Tensor, Tensor]:
    """Out-of-place twin of :func:`row_loss_and_grad_`: returns (loss, gradient).

    The gradient goes to a buffer from :func:`gradient_buffer`.
    """
    grad = gradient_buffer(logits.shape, logits.dtype)  # R x C
    return _launch(logits, target, grad, **options), grad


# One reusable gradient buffer. A fresh R x C buffer costs a page fault per 4 KiB on first
# touch (2-4 GB/s here, slower than the kernel itself), so the last buffer is kept and
# handed out again once nothing references it any more, like a caching allocator.
_buffer_pool: list[np.ndarray] = []
_pool_lock = threading.Lock()


def gradient_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor, reusing the pooled buffer when it is free.

    The pool keeps a numpy array of the buffer's own shape and element type, so a
    handout is one ``torch.from_numpy`` (bfloat16, which numpy lacks, is kept as uint16
    and viewed: one more op); that array's reference count tells whether any tensor still
    uses it. A buffer of another shape or type, or one still in use, is replaced.
    """
    numel = math.prod(shape)
    element = _NUMPY_ELEMENTS.get(dtype)
    if numel == 0 or element is None:
        return torch.empty(shape, dtype=dtype)
    # Under the lock: Python may switch threads between the free test and the handout,
    # and two threads would then write their gradients into one buffer.
    with _pool_lock:
        if _buffer_pool:
            pooled = _buffer_pool[0]
            # 3 references: the pool, `pooled` and getrefcount's argument; a tensor adds one
            if pooled.shape == shape and pooled.dtype == element and sys.getrefcount(pooled) <= 3:
                return _as_tensor(pooled, dtype)
            _buffer_pool.clear()
        nbytes = numel * dtype.itemsize
        raw = np.empty(nbytes + 64, dtype=np.uint8)
        start = -raw.ctypes.data % 64  # on a cache line, as torch's allocator does
        fresh = raw[start : start + nbytes].view(element).reshape(shape)
        _buffer_pool.append(fresh)
        return _as_tensor(fresh, dtype)


# numpy's element type for each gradient dtype (bfloat16 travels as its uint16 bits)
_NUMPY_ELEMENTS = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(np.uint16),
}


def _as_tensor(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    tensor = torch.from_numpy(array)
    return tensor if dtype != torch.bfloat16 else tensor.view(dtype)


def release_buffers() -> None:
    """Drop the pooled gradient buffer (it is freed once no tensor uses it).

    Public as ``xloss.release_buffers()``. The out-of-place kernel keeps its last R x C
    gradient buffer between calls, so a training loop does not pay the page faults of a
    fresh buffer every step (see the README's Limits for the measured cost); call this
    after training (or before a memory-hungry phase) to give that memory back.
    """
    _buffer_pool.clear()


def row_loss(logits: Tensor, target: Tensor, **options) -> Tensor:
    """Per-row loss only (no gradient is written); options as :func:`row_loss_and_grad_`."""
    return _launch(logits, target, None, grad_scale=1.0, **options)
