"""numba kernels of the fused binary family (BCE, sigmoid focal, ASL); imported lazily.

The input is seen as (R, L) rows (see :mod:`xloss.ops.fused_binary` for the layout). One
pass over each row, in fp32, reads the logit x, the target y (and, when given, the
element weight w, the keep mask and the positive weight along the class axis) and writes
the gradient dl/dx, already multiplied by the reduction's scale, and the loss (per row
sum, and per element for ``reduction="none"``). Bytes per element: 4 + 4 read and 4
written for fp32 logits and targets (2 + 2 + 2 for fp16/bf16), plus 1 for a mask and 4
for a full element weight when given.

Per element, with e = exp(-|x|) and l1 = log1p(e):

- softplus(x) = max(x, 0) + l1 = -log(1 - s(x)), softplus(-x) = max(-x, 0) + l1 = -log s(x),
  so no log of a rounded probability is ever taken (finite at x = +-1e4);
- s(x) = 1/(1+e) or e/(1+e) by the sign of x, and 1 - s(x) the other one, both without
  cancellation.

At a few dozen vector operations per element this loop is bound by arithmetic rather
than memory bandwidth on 2 cores, so every piece is a short polynomial of fused
multiply-adds and nothing divides (no SVML here, so ``math.exp`` would not vectorise;
the vector division of 1/(1+e) was the largest single cost measured): e from a degree-5
polynomial with 2^n added to its exponent bits; l1 = e P(e), P of degree 7 on [0, 1];
1/(1+e) from a quadratic and two Newton steps. Each is within a few ulp (tested over a
sweep of logits against float64). The two polynomials are evaluated in Estrin's form
(pairs of terms combined by powers of the argument, three and four dependent steps
instead of five and eight, one and two operations more): the compiled loop (on the AMD
Zen 4 host of 2026-12-03: 16 lanes, two vectors per iteration) ran at about half the rate
its operation count allows, held back by the length of its dependency chains, and
Estrin's form made the BCE kernel 1.06x (0.97-1.41) faster than Horner's at 4096 x 1000
(11 interleaved rounds).

The loop asks LLVM for 512-bit vectors (:func:`~xloss.ops._numba_rows._prefer_wide_vectors`):
its tuning for Intel's AVX-512 cores otherwise stops at 256 bits. On this 2-core Xeon (Sapphire
Rapids class) one thread at 4096 x 1000 then took 4.1-4.6 ms for BCE instead of 8.6-12.6,
13.1-13.8 ms for ASL instead of 33.2-33.8 (3 interleaved processes).

An absent pos_weight is passed as ones, so the element loop has no branch; the weight
carries the reduction's scale (1/count of a mean), one multiply fewer per element. With
neither an element weight nor a keep mask (the common call), the weight is that scale
alone and the mask ``None``: a specialisation whose loop loads neither (see
:func:`_span`); with either, both come as arrays (absent ones as ones). The loss kind
picks one of four kernels, each compiling one copy of the loop (``reduction="none"``
runs it a second time to write the element losses, rather than compiling a second
loop). Short rows are processed in blocks of whole rows (see :func:`_items`). fp16 and
bf16 both arrive as uint16 bit patterns with a runtime flag, so one compiled kernel
serves both: per loss kind and weight/mask form, the specialisations are fp32 logits and
targets, half logits and targets, and half logits with fp32 targets.

Each kind has a parallel kernel (numba's pool, threads taking contiguous runs of items)
and a serial twin compiled from the same :func:`_items` (``prange`` runs as ``range``)
that runs in the calling thread: problems of at most ``SERIAL_ELEMENTS`` elements (see
:mod:`xloss.ops.kernel`) take it, because handing the items to the pool costs more than
the whole pass there.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from xloss.ops._numba_rows import (
    FASTMATH,
    _bf16_to_float,
    _exp_nonpositive,
    _float_as_int,
    _float_to_bf16,
    _float_to_half,
    _half_to_float,
    _int_as_float,
    _load_cache_without_refresh,
    _prefer_wide_vectors,
)

BCE, FOCAL, ASL_CLIP, ASL_NO_CLIP = 0, 1, 2, 3
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_LN2 = np.float32(0.6931471805599453)
_SQRT2 = np.float32(1.4142135623730951)
_TINY = np.float32(1.1754943508222875e-38)  # smallest normal fp32
_TWO_POW_23 = np.float32(8388608.0)


def _widen(value, is_bf16):
    """A stored element as float32 (fp16 or, with ``is_bf16``, bf16 bits as uint16)."""


@overload(_widen, inline="always")
def _widen_impl(value, is_bf16):
    if isinstance(value, types.Float):

        def widen_float(value, is_bf16):
            return np.float32(value)

        return widen_float
    if value == types.uint16:

        def widen_half(value, is_bf16):
            bits = np.int32(value)
            return _bf16_to_float(bits) if is_bf16 else _half_to_float(bits)

        return widen_half
    return None


def _narrow(array, value, is_bf16):
    """float32 to the element type of ``array`` (round to nearest even for fp16/bf16)."""


@overload(_narrow, inline="always")
def _narrow_impl(array, value, is_bf16):
    if isinstance(array.dtype, types.Float):

        def narrow_float(array, value, is_bf16):
            return value

        return narrow_float
    if array.dtype == types.uint16:

        def narrow_half(array, value, is_bf16):
            return _float_to_bf16(value) if is_bf16 else _float_to_half(value)

        return narrow_half
    return None


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _log1p_moderate(t):
    """log(1 + t) for t in [-0.5, 1]: 2 atanh(z), z = t / (2 + t), |z| <= 1/3 (no
    cancellation for tiny t; relative error ~1e-8 from the series up to z^15)."""
    z = t / (np.float32(2.0) + t)
    z2 = z * z
    p = np.float32(1.0 / 15.0)
    p = p * z2 + np.float32(1.0 / 13.0)
    p = p * z2 + np.float32(1.0 / 11.0)
    p = p * z2 + np.float32(1.0 / 9.0)
    p = p * z2 + np.float32(1.0 / 7.0)
    p = p * z2 + np.float32(1.0 / 5.0)
    p = p * z2 + np.float32(1.0 / 3.0)
    p = p * z2 + _ONE
    return np.float32(2.0) * z * p


# log1p(e)/e on [0, 1]: a degree-7 fit of the relative error (Chebyshev nodes, weighted
# least squares); e * P(e) in fp32 is within 6 ulp (3.7e-7) of log1p(e), in relative
# terms down to e -> 0.
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7 = (
    np.float32(c)
    for c in (
        0.9999998211860657, -0.4999740421772003, 0.3327547609806061, -0.24495434761047363,
        0.17745161056518555, -0.10768052935600281, 0.04408876970410347,
        -0.008538962341845036,
    )
)  # fmt: skip


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1], a polynomial e P(e): no division, so it vectorises
    at the cost of a few fused multiply-adds (Estrin's form, see the module docstring)."""
    e2 = e * e
    low = (_L3 * e + _L2) * e2 + (_L1 * e + _L0)
    high = (_L7 * e + _L6) * e2 + (_L5 * e + _L4)
    return (high * (e2 * e2) + low) * e


# 1/d on [1, 2]: a quadratic (relative error 1.0e-2) refined by two Newton steps
# r <- r + r (1 - d r), within 1.6 ulp; a vector division costs more than these six
# fused multiply-adds here (measured).
_RECIP_C0 = np.float32(2.1212105751037598)
_RECIP_C1 = np.float32(-1.4545432329177856)
_RECIP_C2 = np.float32(0.32323160767555237)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _reciprocal_1_2(d):
    """1/d for d in [1, 2], without a division."""
    r = (_RECIP_C2 * d + _RECIP_C1) * d + _RECIP_C0
    r = r + r * (_ONE - d * r)
    return r + r * (_ONE - d * r)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _log_positive(v):
    """log(v) for finite v > 0 (subnormals included): v = m 2^k, m in [sqrt(1/2), sqrt(2))."""
    small = v < _TINY
    v = v * _TWO_POW_23 if small else v
    bits = _float_as_int(v)
    k = (bits >> np.int32(23)) - np.int32(127)
    m = _int_as_float((bits & np.int32(0x7FFFFF)) | np.int32(0x3F800000))  # [1, 2)
    big = m > _SQRT2
    m = m * np.float32(0.5) if big else m
    k = k + np.int32(1) if big else k
    k = k - np.int32(23) if small else k
    return np.float32(k) * _LN2 + _log1p_moderate(m - _ONE)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _power(base, log_base, exponent):
    """base ** exponent for base in [0, 1] from log(base); 0 at base 0 (1 for exponent 0)."""
    if base > _ZERO:
        return _exp_nonpositive(exponent * log_base)
    return _ONE if exponent == _ZERO else _ZERO


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _sigmoid_parts(x):
    """(softplus(x), softplus(-x), s(x), 1 - s(x)), each without cancellation."""
    e = _exp_nonpositive(-abs(x))
    l1 = _log1p_unit(e)
    inv = _reciprocal_1_2(_ONE + e)
    positive = x >= _ZERO
    s = inv if positive else e * inv
    q = e * inv if positive else inv
    return max(x, _ZERO) + l1, max(-x, _ZERO) + l1, s, q


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _bce(x, y, pw, p1, p2, p3):
    """-[pw y log s + (1-y) log(1-s)] and its derivative (1-y) s - pw y (1-s).

    Not a s - pw y with a = 1 + (pw-1) y (two operations fewer): that cancels for y = 1
    and s near 1, where (1-s) keeps its relative accuracy here.
    """
    sp_pos, sp_neg, s, q = _sigmoid_parts(x)
    loss = pw * y * sp_neg + (_ONE - y) * sp_pos
    return loss, (_ONE - y) * s - pw * y * q


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _focal(x, y, pw, alpha_pos, alpha_neg, gamma):
    """alpha_t (1 - p_t)^gamma BCE and its derivative; 1 - p_t = y (1-s) + (1-y) s."""
    sp_pos, sp_neg, s, q = _sigmoid_parts(x)
    ce = y * sp_neg + (_ONE - y) * sp_pos
    miss = y * q + (_ONE - y) * s
    lifted = max(miss, _TINY * _TINY)  # the log is only used where miss > 0
    modulation = _power(miss, _log_positive(lifted), gamma)
    # d miss/dx = s (1-s) (1 - 2y); s (1-s) / miss <= 1 since miss >= min(s, 1-s)
    ratio = s * q / lifted if miss > _ZERO else _ZERO
    alpha_t = alpha_pos * y + alpha_neg * (_ONE - y)
    loss = alpha_t * modulation * ce
    # ratio is 0 where s (1-s) underflows (|x| > 86), and there ce may be near 3e38: ce *
    # gamma would overflow to inf, and inf * 0 is NaN (fastmath may multiply in any order)
    pull = ce * gamma * modulation * ratio if ratio > _ZERO else _ZERO
    grad = modulation * (s - y) + pull * (_ONE - np.float32(2.0) * y)
    return loss, alpha_t * grad


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _asl_positive(sp_pos, sp_neg, s, q, gamma_pos):
    """(1-s)^g+ (-log s) and its derivative; (1-s)^g+ = exp(-g+ softplus(x))."""
    focus = _exp_nonpositive(-gamma_pos * sp_pos)
    lift = gamma_pos * s * sp_neg if s > _ZERO else _ZERO  # no inf * 0 (see _focal)
    return focus * sp_neg, -focus * (lift + q)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _asl_clip(x, y, pw, gamma_pos, gamma_neg, clip):
    """ASL with p_m = max(s - clip, 0): y A + (1-y) p_m^g- (-log(1 - p_m))."""
    sp_pos, sp_neg, s, q = _sigmoid_parts(x)
    positive, d_positive = _asl_positive(sp_pos, sp_neg, s, q, gamma_pos)
    shifted = s - clip
    p_m = max(shifted, _ZERO)  # <= 1 - clip, so 1 - p_m >= clip > 0
    lifted = max(p_m, _TINY * _TINY)
    not_shifted = _ONE - p_m  # exact for p_m >= 0.5 (Sterbenz)
    log_not = _log_positive(not_shifted) if p_m > np.float32(0.5) else _log1p_moderate(-p_m)
    focus = _power(p_m, _log_positive(lifted), gamma_neg)
    negative = -focus * log_not
    d_negative = s * q * (gamma_neg * focus / lifted * -log_not + focus / not_shifted)
    d_negative = d_negative if shifted > _ZERO else _ZERO
    loss = y * positive + (_ONE - y) * negative
    return loss, y * d_positive + (_ONE - y) * d_negative


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _asl_no_clip(x, y, pw, gamma_pos, gamma_neg, unused):
    """ASL with clip 0: y A + (1-y) s^g- softplus(x), s^g- = exp(-g- softplus(-x))."""
    sp_pos, sp_neg, s, q = _sigmoid_parts(x)
    positive, d_positive = _asl_positive(sp_pos, sp_neg, s, q, gamma_pos)
    focus = _exp_nonpositive(-gamma_neg * sp_neg)
    negative = focus * sp_pos
    lift = gamma_neg * q * sp_pos if q > _ZERO else _ZERO  # no inf * 0 (see _focal)
    d_negative = focus * (lift + s)
    loss = y * positive + (_ONE - y) * negative
    return loss, y * d_positive + (_ONE - y) * d_negative


@njit(inline="always", cache=True)
def _outside_unit(value):
    """True outside [0, 1], and for NaN."""
    return not ((value >= _ZERO) & (value <= _ONE))


_ONE_BITS = np.uint32(0x3F800000)  # the bit pattern of 1.0


# Without an element weight and a keep mask, they arrive as a scalar (the reduction's
# scale) and None: a specialisation of its own, whose loop loads neither and has no AND
# with the keep bits. BCE (pos_weight given) ran 1.09x (0.94-1.11) as fast at 4096 x 1000
# and 1.21x (1.08-1.30) at 256 x 20000 (2 threads, 3 pairs of bench workers, alternated).
# These helpers pick the code by type.


def _span(values, size, begin, end, start, stop):
    """``values`` for one item: its run [begin, end) of a full array (``size`` elements,
    as the flat input), or [start, stop) of a pattern, or the scalar / None as it is."""


@overload(_span, inline="always")
def _span_impl(values, size, begin, end, start, stop):
    if isinstance(values, types.Array):

        def span(values, size, begin, end, start, stop):
            return values[begin:end] if values.shape[0] == size else values[start:stop]

        return span
    return lambda values, size, begin, end, start, stop: values


def _at(values, c):
    """``values[c]``, or the scalar weight as it is."""


@overload(_at, inline="always")
def _at_impl(values, c):
    if isinstance(values, types.Array):
        return lambda values, c: values[c]
    return lambda values, c: values


def _keep_bits(keep, c):
    """-1 (all bits) where element ``c`` is kept, 0 where not; -1 without a mask."""


@overload(_keep_bits, inline="always")
def _keep_bits_impl(keep, c):
    if isinstance(keep, types.Array):
        return lambda keep, c: -np.int32(keep[c])
    return lambda keep, c: np.int32(-1)


@njit(inline="always", fastmath=FASTMATH)
def _kept(value, bits_mask):
    """``value`` where ``bits_mask`` is -1, +0.0 where it is 0 (NaN and inf included)."""
    return _int_as_float(_float_as_int(value) & bits_mask)


def _make_row(element):
    """The loop over one tile of a row for one loss kind (``element`` is inlined).

    It writes one array, ``out``: the scaled gradient, or with ``write_loss`` the weighted
    element loss (``reduction="none"``); it returns the tile's loss sum and 1 when a kept
    target may lie outside [0, 1] (else 0). One loop for both keeps one inlined copy of
    ``element`` (half the compile time of two loops). Each loop writes one array: with
    more, the runtime alias checks that LLVM inserts before vectorising exceed its limit
    and the loop stays scalar.

    Two integer tricks keep the loop short (the whole BCE kernel on one thread with the
    data in cache: 1.04x (1.02-1.05) faster than with a select per kept value and an exact
    count of bad targets; LLVM had already turned most of that select into masked loads):

    - a dropped element's gradient, loss and target are cleared by an AND of their bits
      with 0 (the keep flag as 0 or -1), so whatever its logit (NaN, inf) nothing leaks;
    - the target check is one unsigned max over the kept targets' bit patterns: every
      float in [+0, 1] has a pattern <= 1.0's, every other one (negative, above 1, inf,
      NaN) a larger one, and -0.0 too, so a flag can be a false alarm that the caller's
      exact check clears.
    """

    @njit(inline="always", fastmath=FASTMATH)
    def row(src, target, out, weight, keep, pos_col, pos_scalar, smooth_scale, smooth_shift,
            write_loss, is_bf16, p1, p2, p3):  # fmt: skip
        _prefer_wide_vectors()
        total = _ZERO
        largest = np.uint32(0)
        for c in range(src.shape[0]):
            raw = _widen(target[c], is_bf16)
            bits_mask = _keep_bits(keep, c)
            y = raw * smooth_scale + smooth_shift
            loss, grad = element(_widen(src[c], is_bf16), y, pos_col[c] * pos_scalar, p1, p2, p3)
            w = _at(weight, c)
            out[c] = _narrow(out, _kept((loss if write_loss else grad) * w, bits_mask), is_bf16)
            total += _kept(loss * w, bits_mask)
            largest = max(largest, np.uint32(_float_as_int(raw) & bits_mask))
        return total, np.int32(largest > _ONE_BITS)

    return row


_ROWS = (_make_row(_bce), _make_row(_focal), _make_row(_asl_clip), _make_row(_asl_no_clip))


def _row(kind, src, target, out, weight, keep, pos_col, pos_scalar, smooth_scale,
         smooth_shift, write_loss, is_bf16, p1, p2, p3):  # fmt: skip
    """The tile loop of loss ``kind`` (a compile-time constant)."""


# Typed with the literal kind, so each kernel compiles only its own loop; numba retries a
# call with literal types when the overload returns None for the plain int.
@overload(_row, inline="always")
def _row_impl(kind, src, target, out, weight, keep, pos_col, pos_scalar, smooth_scale,
              smooth_shift, write_loss, is_bf16, p1, p2, p3):  # fmt: skip
    if not isinstance(kind, types.IntegerLiteral):
        return None
    row = _ROWS[kind.literal_value]

    def impl(kind, src, target, out, weight, keep, pos_col, pos_scalar, smooth_scale,
             smooth_shift, write_loss, is_bf16, p1, p2, p3):  # fmt: skip
        return row(src, target, out, weight, keep, pos_col, pos_scalar, smooth_scale,
                   smooth_shift, write_loss, is_bf16, p1, p2, p3)  # fmt: skip

    return impl


TILE = 2048  # elements handled at once: 8 KiB of fp32, stays in L1
CHUNKS = 256  # work is split into at most this many contiguous runs of items


@njit(inline="always")
def _item_bounds(i, width, rows_per_item, tiles_per_row, num_rows):
    """(begin, end) of item ``i`` in the flat arrays, (start, stop) in the row pattern."""
    block = i // tiles_per_row
    row = block * rows_per_item
    start = (i - block * tiles_per_row) * TILE
    stop = min(start + TILE, width) if rows_per_item == 1 else (
        min(rows_per_item, num_rows - row) * width)  # fmt: skip
    return row * width + start, row * width + stop, start, stop


@njit(inline="always", fastmath=FASTMATH)
def _count_bad(target, keep, is_bf16):
    """How many kept targets lie outside [0, 1] (NaN included)."""
    bad = np.int32(0)
    for c in range(target.shape[0]):
        bad += np.int32((_keep_bits(keep, c) != 0) & _outside_unit(_widen(target[c], is_bf16)))
    return bad


@njit(inline="always", fastmath=FASTMATH)
def _items(kind, source, target, dest, element_loss, in_place, check_first, weight, keep,
           pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16, smooth_scale,
           smooth_shift, p1, p2, p3, item_loss, item_bad):  # fmt: skip
    """The whole pass over the R x L elements (flat, row-major), in items of <= TILE.

    An item is a piece of one row (``rows_per_item`` = 1, ``tiles_per_row`` pieces of
    TILE per row) or a block of ``rows_per_item`` whole rows (short rows, one piece per
    row): a contiguous run of the flat arrays, so short rows (C = 80) run as one long
    vectorised loop instead of one short loop each.

    Args:
        kind: BCE, FOCAL, ASL_CLIP or ASL_NO_CLIP (a compile-time constant).
        source: (R*L,) logits, float32 or uint16 (fp16 bits, or bf16 bits with
            ``is_bf16``); unused (0,) with ``in_place``, where ``dest`` holds the logits.
        target: (R*L,) targets, float32 or uint16 (then the logits' half type).
        dest: (R*L,) gradient in the logits' type; (0,) computes no gradient.
        element_loss: (R*L,) per-element loss in the logits' type, or (0,).
        weight, keep: (R*L,) float32 / bool, or the pattern of one item (see ``pattern``);
            the weight carries the reduction's scale (1/count for a mean), so the
            gradient and the loss sums come out scaled. Or a float32 scale and None: no
            element weight, every element kept.
        pattern: (rows_per_item * L,) positive weight per column, repeated for the rows of
            a block; pos_row: (P,) per row r, read at r % P (P = 1 when rows_per_item > 1).
        smooth_scale, smooth_shift: y' = y * smooth_scale + smooth_shift.
        p1, p2, p3: (alpha_pos, alpha_neg, gamma) for focal, (gamma_pos, gamma_neg, clip)
            for ASL, unused for BCE.
        item_loss: (I,) float32 loss sum of each item; item_bad: (I,) int32, nonzero when
            a kept target of the item may lie outside [0, 1] (exact counts with
            ``check_first``, else a flag that -0.0 raises too: see :func:`_make_row`);
            items are numbered row-major (I = R * tiles_per_row when rows_per_item = 1).
        check_first: count the kept targets outside [0, 1] in a read-only sweep over the
            targets before anything is written, and write nothing when there is one (in
            place with validation: the logits stay as they were when the op raises).

    Returns (the loss sum over the items in float64, the sum of ``item_bad``), so that the
    caller reads two numbers instead of reducing the item arrays.

    With ``in_place`` an item of logits is first copied to a per-thread scratch (from L1):
    reading and writing one array through two names would fail LLVM's alias check and
    run the loop unvectorised.
    """
    num_rows = target.shape[0] // width
    num_items = item_loss.shape[0]
    write = dest.shape[0] > 0
    store = element_loss.shape[0] > 0
    num_pos_rows = pos_row.shape[0]
    span = min(width, TILE) if rows_per_item == 1 else rows_per_item * width
    num_chunks = min(num_items, CHUNKS)
    if check_first:
        for chunk in prange(num_chunks):
            for i in range(chunk * num_items // num_chunks, (chunk + 1) * num_items // num_chunks):
                begin, end, start, stop = _item_bounds(i, width, rows_per_item, tiles_per_row,
                                                       num_rows)  # fmt: skip
                k = _span(keep, target.shape[0], begin, end, start, stop)
                item_bad[i] = _count_bad(target[begin:end], k, is_bf16)
        bad = item_bad.sum()
        if bad > 0:
            return 0.0, bad
    for chunk in prange(num_chunks):
        src_scratch = np.empty(span if in_place else 0, dtype=dest.dtype)
        dst_scratch = np.empty(0 if write or store else span, dtype=dest.dtype)
        for i in range(chunk * num_items // num_chunks, (chunk + 1) * num_items // num_chunks):
            begin, end, start, stop = _item_bounds(i, width, rows_per_item, tiles_per_row,
                                                   num_rows)  # fmt: skip
            row = (i // tiles_per_row) * rows_per_item
            if in_place:
                src = src_scratch[: stop - start]
                src[:] = dest[begin:end]
            else:
                src = source[begin:end]
            y = target[begin:end]
            w = _span(weight, target.shape[0], begin, end, start, stop)
            k = _span(keep, target.shape[0], begin, end, start, stop)
            pw = pattern[start:stop]
            pos_scalar = pos_row[row % num_pos_rows]
            if store:
                out = element_loss[begin:end]
            elif write:
                out = dest[begin:end]
            else:
                out = dst_scratch[: stop - start]
            total, bad = _row(kind, src, y, out, w, k, pw, pos_scalar, smooth_scale,
                              smooth_shift, store, is_bf16, p1, p2, p3)  # fmt: skip
            item_loss[i] = total
            item_bad[i] = bad
    total = 0.0  # float64, in item order: the same sum at any thread count
    for i in range(num_items):
        total += item_loss[i]
    return total, item_bad.sum()


# One kernel per loss kind, so that a call compiles (and caches) only its own loop.


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def bce(source, target, dest, element_loss, in_place, check_first, weight, keep, pattern,
        pos_row, width, rows_per_item, tiles_per_row, is_bf16, smooth_scale, smooth_shift,
        p1, p2, p3, item_loss, item_bad):  # fmt: skip
    """The bce kernel: :func:`_items` with kind=BCE."""
    return _items(BCE, source, target, dest, element_loss, in_place, check_first, weight,
                  keep, pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16,
                  smooth_scale, smooth_shift, p1, p2, p3, item_loss, item_bad)  # fmt: skip


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def focal(source, target, dest, element_loss, in_place, check_first, weight, keep, pattern,
          pos_row, width, rows_per_item, tiles_per_row, is_bf16, smooth_scale, smooth_shift,
          p1, p2, p3, item_loss, item_bad):  # fmt: skip
    """The focal kernel: :func:`_items` with kind=FOCAL."""
    return _items(FOCAL, source, target, dest, element_loss, in_place, check_first, weight,
                  keep, pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16,
                  smooth_scale, smooth_shift, p1, p2, p3, item_loss, item_bad)  # fmt: skip


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def asl_clip(source, target, dest, element_loss, in_place, check_first, weight, keep, pattern,
             pos_row, width, rows_per_item, tiles_per_row, is_bf16, smooth_scale, smooth_shift,
             p1, p2, p3, item_loss, item_bad):  # fmt: skip
    """The asl_clip kernel: :func:`_items` with kind=ASL_CLIP."""
    return _items(ASL_CLIP, source, target, dest, element_loss, in_place, check_first, weight,
                  keep, pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16,
                  smooth_scale, smooth_shift, p1, p2, p3, item_loss, item_bad)  # fmt: skip


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def asl_no_clip(source, target, dest, element_loss, in_place, check_first, weight, keep, pattern,
                pos_row, width, rows_per_item, tiles_per_row, is_bf16, smooth_scale, smooth_shift,
                p1, p2, p3, item_loss, item_bad):  # fmt: skip
    """The asl_no_clip kernel: :func:`_items` with kind=ASL_NO_CLIP."""
    return _items(ASL_NO_CLIP, source, target, dest, element_loss, in_place, check_first, weight,
                  keep, pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16,
                  smooth_scale, smooth_shift, p1, p2, p3, item_loss, item_bad)  # fmt: skip


KERNELS = (bce, focal, asl_clip, asl_no_clip)  # indexed by kind


# The same passes in the calling thread, for problems too small to share out: a parallel
# launch hands the items to numba's pool and waits for them (0.1-0.3 ms here, more than
# the whole pass over a few thousand elements). They release the GIL, so Python threads
# computing losses at once run their kernels at the same time. The numpy error model, as
# in the parallel kernels' loops: a float division by zero gives inf or NaN (which the
# elements' selects then discard) instead of raising.


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def bce_serial(source, target, dest, element_loss, in_place, check_first, weight, keep,
               pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16, smooth_scale,
               smooth_shift, p1, p2, p3, item_loss, item_bad):  # fmt: skip
    """:func:`bce` in the calling thread."""
    return _items(BCE, source, target, dest, element_loss, in_place, check_first, weight,
                  keep, pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16,
                  smooth_scale, smooth_shift, p1, p2, p3, item_loss, item_bad)  # fmt: skip


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def focal_serial(source, target, dest, element_loss, in_place, check_first, weight, keep,
                 pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16, smooth_scale,
                 smooth_shift, p1, p2, p3, item_loss, item_bad):  # fmt: skip
    """:func:`focal` in the calling thread."""
    return _items(FOCAL, source, target, dest, element_loss, in_place, check_first, weight,
                  keep, pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16,
                  smooth_scale, smooth_shift, p1, p2, p3, item_loss, item_bad)  # fmt: skip


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def asl_clip_serial(source, target, dest, element_loss, in_place, check_first, weight, keep,
                    pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16,
                    smooth_scale, smooth_shift, p1, p2, p3, item_loss, item_bad):  # fmt: skip
    """:func:`asl_clip` in the calling thread."""
    return _items(ASL_CLIP, source, target, dest, element_loss, in_place, check_first, weight,
                  keep, pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16,
                  smooth_scale, smooth_shift, p1, p2, p3, item_loss, item_bad)  # fmt: skip


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def asl_no_clip_serial(source, target, dest, element_loss, in_place, check_first, weight,
                       keep, pattern, pos_row, width, rows_per_item, tiles_per_row, is_bf16,
                       smooth_scale, smooth_shift, p1, p2, p3, item_loss, item_bad):  # fmt: skip
    """:func:`asl_no_clip` in the calling thread."""
    return _items(ASL_NO_CLIP, source, target, dest, element_loss, in_place, check_first,
                  weight, keep, pattern, pos_row, width, rows_per_item, tiles_per_row,
                  is_bf16, smooth_scale, smooth_shift, p1, p2, p3, item_loss,
                  item_bad)  # fmt: skip


SERIAL_KERNELS = (bce_serial, focal_serial, asl_clip_serial, asl_no_clip_serial)

# A cache hit loads without numba's target refresh, as the row kernels do (see
# xloss.ops._numba_rows): the first BCE of a process took 0.74-0.90 s with the refresh.
for _kernel in (*KERNELS, *SERIAL_KERNELS):
    _load_cache_without_refresh(_kernel)
