"""numba kernels of the fused row cross-entropy; imported lazily by xloss.ops.kernel.

One pass over each row of logits, in fp32, while the row sits in cache:

1. the row max (an integer max over the float bit patterns: the float max reduction does
   not vectorise with this llvmlite),
2. t = x - max, S = sum exp(t) with a polynomial exp (no SVML here, so ``math.exp`` would
   not vectorise; the same exp serves the binary family), T = sum w t (the smoothing
   sum, without cancellation), the target's t,
3. the gradient s * (p * A - eps/C * w), then the target entry, written over the row.

With lse = max + log S the loss is (1-eps) w[y] (log S - t[y]) + eps/C (W log S - T)
+ z lse^2 and A = (1-eps) w[y] + eps/C W + 2 z lse. Soft-capping x <- cap tanh(x/cap)
is monotonic, so the max is taken on the raw logits; its rows use ``math.tanh`` (slower
path, recomputed per pass) and the chain factor 1 - tanh^2.

Rows of at most ``BLOCK`` classes without softcap or statistics (the common short
vocabulary) take :func:`_short_rows_range`, the same passes with no per-row views.

fp16 and bf16 rows arrive as uint16 bit patterns, are widened into a per-thread fp32
scratch row and narrowed back with round-to-nearest-even.

Every function holding a row loop asks LLVM for 512-bit vectors (:func:`_prefer_wide_vectors`;
on Intel's AVX-512 cores LLVM otherwise stops at 256): cross-entropy at 4096 x 32000 took 72-74 ms
instead of 79-85 on 2 threads here, no change at 8192 x 256 (2 interleaved processes each).
"""

from __future__ import annotations

import contextlib
import math
import sys

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# No `nnan`/`ninf`: rows may hold -inf (a masked vocabulary) and must give the reference's inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-86.0)  # exp(-86) = 4.5e-38 stays normal; below, exp is flushed to 0


@intrinsic
def _int_as_float(typingctx, bits):
    """Reinterpret int32 bits as float32 (a bit cast the vectoriser understands)."""

    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the caches to fetch ``array[index]`` (llvm.prefetch: read, into L2)."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(
            context, builder, array_type, view, [args[1]], wraparound=False
        )
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]),
            "llvm.prefetch.p0i8",
        )
        builder.call(prefetch, [builder.bitcast(pointer, byte_pointer), i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return types.none(array, types.intp), codegen


@intrinsic
def _prefer_wide_vectors(typingctx):
    """Let LLVM vectorise the enclosing function with 512-bit registers where the CPU has
    them (the function attribute "prefer-vector-width"="512"). LLVM's tuning for Intel's
    AVX-512 cores (Skylake-X to Sapphire Rapids: the "prefer 256-bit" flag) otherwise
    stops at 256 bits; Zen 4's tuning already allowed 512 (the earlier notes on this
    project's AMD host count 512-bit operations). No effect without AVX-512."""

    def codegen(context, builder, signature, args):
        # llvmlite's attribute set only admits its list of keywords; a string attribute is
        # written into the function's prototype as it stands
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _float_as_int(typingctx, value):
    """Reinterpret float32 bits as int32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


# e^r on [-ln2/2, ln2/2] as 1 + r + r^2 Q(r), Q of degree 3 fitted to the relative error
# (Chebyshev nodes, reweighted least squares towards minimax: 1.05e-7 in float64); with
# the Cody-Waite split below, exp(t) is within 2.6 ulp over t in [-86, 0] (a sweep
# against float64), and exp(0) is exactly 1 (a row's largest logit gets e = 1, so a
# one-class row or a certain prediction gets loss 0, not 1e-7).
_E2, _E3, _E4, _E5 = (
    np.float32(c)
    for c in (0.499992311000824, 0.16667114198207855, 0.041890114545822144, 0.008312525227665901)
)  # fmt: skip


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _exp_nonpositive(t):
    """exp(t) for t <= 0 in fp32, flushed to 0 for t <= -86 (below 4.5e-38).

    n = round(t / ln2), r = t - n ln2 (Cody-Waite: ln2 in two parts), e^r from a
    polynomial in Estrin's form (pairs of terms combined by powers of r: three dependent
    steps instead of five), and 2^n added to its exponent bits (an integer add, no
    multiply), which is exact while the result stays a normal number: hence the clamp,
    and the flush (-inf, a masked logit, gives exactly 0).
    """
    clamped = max(t, _EXP_FLOOR)
    n = np.floor(clamped * _LOG2E + np.float32(0.5))
    r = clamped - n * _LN2_HI - n * _LN2_LO
    r2 = r * r
    p = ((_E5 * r + _E4) * r2 + (_E3 * r + _E2)) * r2 + (r + np.float32(1.0))
    value = _int_as_float(_float_as_int(p) + (np.int32(n) << np.int32(23)))
    return np.float32(0.0) if t <= _EXP_FLOOR else value


@njit(inline="always", cache=True)
def _row_max(row):
    """Max of a float32 row via an integer max over order-preserving bit keys."""
    return _range_max(row, 0, row.shape[0])


@njit(inline="always", cache=True)
def _range_max(row, start, stop):
    """Max of ``row[start:stop]`` via an integer max over order-preserving bit keys."""
    best = np.int32(-2147483648)
    for c in range(start, stop):
        best = max(best, _order_key(_float_as_int(row[c])))
    return _int_as_float(_order_key(best))


@njit(inline="always", cache=True)
def _order_key(bits):
    """float32 bits -> an int32 with the floats' order (its own inverse)."""
    return np.int32(bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _row_loss(peak, sum_exp, sum_t, x_target, target_weight, total_weight, smooth, eps, z):
    """A row's loss from its statistics (t = x - peak); returns (loss, lse)."""
    log_sum = np.float32(math.log(sum_exp))
    lse = peak + log_sum
    loss = (np.float32(1.0) - eps) * target_weight * (log_sum - (x_target - peak))
    if eps > 0:
        loss += smooth * (total_weight * log_sum - sum_t)
    if z > 0:
        loss += z * lse * lse
    return loss, lse


_MINUS_INF = np.float32(-np.inf)


@njit(inline="always", cache=True)
def _no_finite_logit(row, write, stats, predicted, first_nan):
    """A row of -inf only (a fully masked vocabulary, no softcap): the softmax is 0/0, so
    the loss, every gradient entry and the entropy are NaN, as in F.cross_entropy, and the
    lse is -inf. Handled apart: under fastmath the general formulas give garbage here.
    A row whose only non--inf values are NaN (``first_nan`` >= 0) ends here too, and gets
    the statistics of a NaN row."""
    if stats is not None:
        if first_nan >= 0:
            _nan_row_stats(stats, predicted, first_nan)
        else:
            stats[0] = _MINUS_INF
            stats[1] = np.float32(np.nan)
            predicted[0] = 0
    if write:
        for c in range(row.shape[0]):
            row[c] = np.float32(np.nan)
    return np.float32(np.nan)


@njit(fastmath=FASTMATH, cache=True)
def _row_loss_grad_whole(row, y, scale, weight, eps, z, cap, write, stats, predicted):
    """Whole-row passes (max, sums, gradient); used for soft-capped rows.

    ``stats`` None (a compile-time specialisation: the branches vanish) or a (2,) view that
    receives (lse, entropy), with ``predicted`` a (1,) view for the argmax of the raw row.
    """
    _prefer_wide_vectors()
    num = row.shape[0]
    has_weight = weight.shape[0] > 0
    has_cap = cap > np.float32(0.0)
    smooth = eps / np.float32(num)
    peak = _row_max(row)
    first_nan = -1
    if stats is not None:
        predicted[0] = _first_index_of(row, peak)
        first_nan = _first_nan(row)
        sum_et = np.float32(0.0)  # sum exp(t) t, for the entropy
    if has_cap:
        peak = cap * np.float32(math.tanh(peak / cap))
    elif peak == _MINUS_INF:
        return _no_finite_logit(row, write, stats, predicted, first_nan)
    # pass 2: sum exp(t) and the smoothing sum of t = x - max
    sum_exp = np.float32(0.0)
    sum_t = np.float32(0.0)
    total_weight = np.float32(num)
    target_weight = np.float32(1.0)
    x_target = row[y]
    if has_cap:
        x_target = cap * np.float32(math.tanh(x_target / cap))
        for c in range(num):
            t = cap * np.float32(math.tanh(row[c] / cap)) - peak
            e = _exp_nonpositive(t)
            sum_exp += e
            sum_t += t if not has_weight else weight[c] * t
            if stats is not None:
                sum_et += e * max(t, _EXP_FLOOR)  # e = 0 where t = -inf
    elif write:
        for c in range(num):
            t = row[c] - peak
            e = _exp_nonpositive(t)
            row[c] = e  # kept for pass 3: the exp is the expensive part
            sum_exp += e
            sum_t += t if not has_weight else weight[c] * t
            if stats is not None:
                sum_et += e * max(t, _EXP_FLOOR)  # e = 0 where t = -inf
    else:
        for c in range(num):
            t = row[c] - peak
            e = _exp_nonpositive(t)
            sum_exp += e
            sum_t += t if not has_weight else weight[c] * t
            if stats is not None:
                sum_et += e * max(t, _EXP_FLOOR)  # e = 0 where t = -inf
    if has_weight:
        total_weight = np.float32(0.0)
        for c in range(num):
            total_weight += weight[c]
        target_weight = weight[y]
    loss, lse = _row_loss(
        peak, sum_exp, sum_t, x_target, target_weight, total_weight, smooth, eps, z
    )
    if stats is not None:
        stats[0] = lse
        stats[1] = np.float32(math.log(sum_exp)) - sum_et / sum_exp
        if first_nan >= 0:
            _nan_row_stats(stats, predicted, first_nan)
    if not write:
        return loss
    # pass 3: gradient = scale * (p * A - eps/C w) - scale (1-eps) w[y] onehot, times softcap'
    inv_sum = np.float32(1.0) / sum_exp
    coef = scale * inv_sum * ((np.float32(1.0) - eps) * target_weight + smooth * total_weight)
    coef += scale * inv_sum * (np.float32(2.0) * z * lse)
    offset = scale * smooth
    target_step = scale * (np.float32(1.0) - eps) * target_weight
    if has_cap:
        target_factor = np.float32(1.0) - (x_target / cap) * (x_target / cap)
        for c in range(num):
            capped = np.float32(math.tanh(row[c] / cap))
            e = _exp_nonpositive(cap * capped - peak)
            w = weight[c] if has_weight else np.float32(1.0)
            row[c] = (e * coef - offset * w) * (np.float32(1.0) - capped * capped)
        row[y] -= target_step * target_factor
    else:
        if has_weight:
            for c in range(num):
                row[c] = row[c] * coef - offset * weight[c]
        else:
            for c in range(num):
                row[c] = row[c] * coef - offset
        row[y] -= target_step
    return loss


BLOCK = 1024  # elements per block: 4 KiB, stays in L1 between the block's two loops


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _exp_block(values, out, peak, weight, has_weight, stats):
    """e = exp(values - peak) into ``out`` (may be ``values``: inlined, the one array
    stays one pointer); returns (sum e, sum w t, sum e t) with t = values - peak, the last
    0 unless ``stats`` is an array (None compiles it away)."""
    sum_exp = np.float32(0.0)
    sum_t = np.float32(0.0)
    sum_et = np.float32(0.0)
    for c in range(values.shape[0]):
        t = values[c] - peak
        e = _exp_nonpositive(t)
        out[c] = e
        sum_exp += e
        sum_t += t if not has_weight else weight[c] * t
        if stats is not None:
            sum_et += e * max(t, _EXP_FLOOR)  # e = 0 where t = -inf
    return sum_exp, sum_t, sum_et


@njit(fastmath=FASTMATH, cache=True)
def _row_loss_grad_blocked(row, source, y, scale, weight, eps, z, write, stats, predicted,
                           partials, partial_arg):  # fmt: skip
    """Uncapped rows, in blocks so the exp overlaps the stream from memory.

    Pass 1, per block b of the row (the block is read from memory once, then reused
    from L1; out of place, ``source`` is the logits row, else it is empty): its max m_b,
    e = exp(x - m_b) (stored over the row), S_b = sum e and T_b = sum w (x - m_b).
    Out of place the exp loop reads the block from ``source`` and writes e into ``row``,
    so the gradient buffer's lines are fetched for writing while the exp computes: with
    a first loop that copied the block into ``row`` while taking its max (every store
    waiting there for its line) the kernel was 1.15x (1.12-1.32) slower out of place on
    2 threads at the three bench shapes (6 quiet runs of 9 interleaved rounds; in place
    unchanged, 1.03x). With
    m = max m_b: S = sum_b S_b exp(m_b - m) and T = sum_b T_b + W_b (m_b - m). Pass 2 (the
    row is in L2): gradient = e * coef_b - eps/C w with coef_b = scale * A / S * exp(m_b - m),
    then the target entry.
    Blocks are sliced so that every loop index starts at 0: numba's negative-index
    wrap-around check on ``row[start + c]`` would otherwise stop the vectoriser. Before a
    block's exp loop the next block is prefetched into L2: the loop computes from L1
    while no demand miss advances the hardware prefetcher, so without the hint the
    memory stream would stall there.

    Statistics (only when ``stats`` is an array; None compiles them away): pass 1 also
    finds the first index of m_b in the block (the block is in L1) and E_b = sum e t;
    with them lse = m + log S, entropy = log S - E / S where
    E = sum_b exp(m_b - m) (E_b + (m_b - m) S_b), and the argmax is the first block's
    index of m.

    ``partials`` (5, >= blocks) float32 and ``partial_arg`` (>= blocks,) int64 hold the
    per-block values: scratch from :func:`_block_scratch`, allocated once per run of rows
    (an allocation per row cost about 0.4 us, a third of a 256-class row's time).
    """
    _prefer_wide_vectors()
    num = row.shape[0]
    has_weight = weight.shape[0] > 0
    smooth = eps / np.float32(num)
    x_target = source[y] if source.shape[0] > 0 else row[y]
    num_blocks = (num + BLOCK - 1) // BLOCK
    first_nan = -1  # with stats: the first NaN of the row
    # partials[k, b] is indexed in place: a view per row would cost a reference-count
    # update each (atomic), a noticeable share of a short row's time
    for b in range(num_blocks):
        block = row[b * BLOCK : min((b + 1) * BLOCK, num)]
        block_w = weight[b * BLOCK : min((b + 1) * BLOCK, num)] if has_weight else weight
        size = block.shape[0]
        values = source[b * BLOCK : min((b + 1) * BLOCK, num)] if source.shape[0] > 0 else block
        peak = _row_max(values)
        if b + 1 < num_blocks:  # fetch the next block while this one's exp runs
            ahead = source if source.shape[0] > 0 else row
            for c in range((b + 1) * BLOCK, min((b + 2) * BLOCK, num), 16):
                _prefetch(ahead, c)
        sum_exp = np.float32(0.0)
        sum_t = np.float32(0.0)
        sum_et = np.float32(0.0)
        if stats is not None:
            partial_arg[b] = b * BLOCK + _first_index_of(values, peak)
            if first_nan < 0:
                block_nan = _first_nan(values)
                first_nan = b * BLOCK + block_nan if block_nan >= 0 else -1
        sum_w = np.float32(size)
        if has_weight:
            sum_w = np.float32(0.0)
            for c in range(size):
                sum_w += block_w[c]
        if peak == _MINUS_INF:  # a fully masked block: e = 0, and x - m is -inf
            sum_t = _MINUS_INF
            if write:
                for c in range(size):
                    block[c] = np.float32(0.0)
        elif write and source.shape[0] > 0:  # out of place: read the logits, write e
            sum_exp, sum_t, sum_et = _exp_block(values, block, peak, block_w, has_weight, stats)
        elif write:  # one array passed twice: the same pointer, so the loop vectorises
            sum_exp, sum_t, sum_et = _exp_block(block, block, peak, block_w, has_weight, stats)
        else:
            for c in range(size):
                t = block[c] - peak
                e = _exp_nonpositive(t)
                sum_exp += e
                sum_t += t if not has_weight else block_w[c] * t
                if stats is not None:
                    sum_et += e * max(t, _EXP_FLOOR)  # e = 0 where t = -inf
        if stats is not None:
            partials[4, b] = sum_et
        partials[0, b] = peak
        partials[1, b] = sum_exp
        partials[2, b] = sum_t
        partials[3, b] = sum_w
    peak = _MINUS_INF
    for b in range(num_blocks):
        peak = max(peak, partials[0, b])
    if peak == _MINUS_INF:
        return _no_finite_logit(row, write, stats, predicted, first_nan)
    sum_exp = np.float32(0.0)
    sum_t = np.float32(0.0)
    total_weight = np.float32(0.0)
    for b in range(num_blocks):
        total_weight += partials[3, b]
        if partials[0, b] == _MINUS_INF:
            sum_t += partials[2, b]
        else:
            sum_exp += partials[1, b] * _exp_nonpositive(partials[0, b] - peak)
            sum_t += partials[2, b] + partials[3, b] * (partials[0, b] - peak)
    target_weight = weight[y] if has_weight else np.float32(1.0)
    loss, lse = _row_loss(
        peak, sum_exp, sum_t, x_target, target_weight, total_weight, smooth, eps, z
    )
    if stats is not None:
        sum_et = np.float32(0.0)
        best = -1
        for b in range(num_blocks):
            if best < 0 and partials[0, b] == peak:
                best = b
            if partials[0, b] != _MINUS_INF:
                shift = partials[0, b] - peak
                sum_et += _exp_nonpositive(shift) * (partials[4, b] + shift * partials[1, b])
        predicted[0] = partial_arg[max(best, 0)]
        stats[0] = lse
        stats[1] = np.float32(math.log(sum_exp)) - sum_et / sum_exp
        if first_nan >= 0:
            _nan_row_stats(stats, predicted, first_nan)
    if not write:
        return loss
    # pass 2: gradient = scale * (p * A - eps/C w) - scale (1-eps) w[y] onehot
    weight_part = (np.float32(1.0) - eps) * target_weight + smooth * total_weight
    coef = scale / sum_exp * (weight_part + np.float32(2.0) * z * lse)
    offset = scale * smooth
    for b in range(num_blocks):
        block = row[b * BLOCK : min((b + 1) * BLOCK, num)]
        block_coef = coef * _exp_nonpositive(partials[0, b] - peak)
        if has_weight:
            block_w = weight[b * BLOCK : min((b + 1) * BLOCK, num)]
            for c in range(block.shape[0]):
                block[c] = block[c] * block_coef - offset * block_w[c]
        else:
            for c in range(block.shape[0]):
                block[c] = block[c] * block_coef - offset
    row[y] -= scale * (np.float32(1.0) - eps) * target_weight
    return loss


@njit(inline="always", cache=True)
def _first_nan(row):
    """The first c with row[c] NaN, or -1: an OR over the row (vectorised), then the index
    only when there is one. The integer max of :func:`_row_max` orders a positive NaN
    above +inf and a negative one below -inf, so the statistics check for NaN apart."""
    found = False
    for c in range(row.shape[0]):
        found |= row[c] != row[c]
    if found:
        for c in range(row.shape[0]):
            if row[c] != row[c]:
                return c
    return -1


@njit(inline="always", cache=True)
def _nan_row_stats(stats, predicted, first_nan):
    """A row holding a NaN, as torch.argmax and logsumexp see it: the argmax is the first
    NaN, and lse and entropy are NaN (the row's loss is NaN anyway)."""
    stats[0] = np.float32(np.nan)
    stats[1] = np.float32(np.nan)
    predicted[0] = first_nan


@njit(inline="always", cache=True)
def _first_index_of(row, value):
    """The first c with row[c] == value (0 when none: a NaN row)."""
    for c in range(row.shape[0]):
        if row[c] == value:
            return c
    return 0


@njit(inline="always", cache=True)
def _block_scratch(num):
    """Scratch for :func:`_row_loss_grad_blocked`'s per-block values of a row of ``num``."""
    num_blocks = (num + BLOCK - 1) // BLOCK
    return np.empty((5, num_blocks), dtype=np.float32), np.empty(num_blocks, dtype=np.int64)


@njit(fastmath=FASTMATH, cache=True)
def _row_loss_grad(row, source, y, scale, weight, eps, z, cap, write, stats, predicted,
                   partials, partial_arg):  # fmt: skip
    """Loss of one float32 row with target y >= 0; overwrite the row with its gradient.

    ``source``: empty, or the logits row to read (out of place: ``row`` is then only
    written, and the copy is fused into the first pass when there is no softcap).

    ``weight`` is (C,) float32 or empty (unweighted); ``cap`` <= 0 means no softcap.
    ``stats``/``predicted``: None, or (2,) float32 and (1,) int64 views receiving
    (lse, entropy) and the argmax (a separate compiled specialisation).
    ``partials``/``partial_arg``: scratch from :func:`_block_scratch` for a row of this size.
    """
    if cap > np.float32(0.0):
        if source.shape[0] > 0:
            row[:] = source
        return _row_loss_grad_whole(row, y, scale, weight, eps, z, cap, write, stats, predicted)
    return _row_loss_grad_blocked(row, source, y, scale, weight, eps, z, write, stats,
                                  predicted, partials, partial_arg)  # fmt: skip


@njit(cache=True)
def _dropped_row_stats(stats, predicted, i):
    """Statistics of a dropped row: lse 0, entropy 0, predicted -1."""
    if stats is not None:
        stats[i, 0] = np.float32(0.0)
        stats[i, 1] = np.float32(0.0)
        predicted[i] = -1


@njit(inline="always", cache=True)
def _skips_row(y, num, i, dest, write, loss, bad_row):
    """Finish a row whose target drops it (y < 0: loss 0, gradient 0) or is out of range
    (y >= C: loss NaN, gradient 0, the row reported in ``bad_row``); False for a kept row."""
    if y >= 0 and y < num:
        return False
    if y >= num:
        bad_row[0] = i
    loss[i] = np.float32(0.0) if y < 0 else np.float32(np.nan)
    if write:
        dest[i, :] = 0  # the gradient's own type: fp32, or fp16/bf16 bits
    return True


@njit(fastmath=FASTMATH, cache=True)
def _short_rows_range(first, stop, source, dest, target, scale, weight, eps, z, copy_rows,
                      write, loss, bad_row):  # fmt: skip
    """Rows ``first`` to ``stop`` - 1 of at most ``BLOCK`` classes, without softcap or
    statistics: the passes of :func:`_row_loss_grad_whole` on the 2-D arrays themselves.

    A row this short fits in L1, so blocking buys nothing, and the general path's fixed
    cost per row (a view per row and per block, each a reference-count update, and the
    per-block partial sums) was over half of a 256-class row's time. Here every row is
    indexed in place, the loops are split on the class weight instead of selecting per
    element, and W = sum w is taken once per run of rows.

    In place the passes get ``dest`` as both the array they read and the one they write.
    Given two arrays, LLVM vectorises each loop behind a run-time test that they do not
    overlap; the same storage passed twice fails it, and the loops ran their scalar
    fallback: 0.92 ms in place against 0.17 ms out of place at 922 x 256 (the linear
    cross-entropy's chunks are in place).
    """
    if copy_rows or not write:
        _short_rows(first, stop, source, dest, target, scale, weight, eps, z, write, loss,
                    bad_row)  # fmt: skip
    else:
        _short_rows(first, stop, dest, dest, target, scale, weight, eps, z, write, loss,
                    bad_row)  # fmt: skip


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _short_rows(first, stop, values, dest, target, scale, weight, eps, z, write, loss,
                bad_row):  # fmt: skip
    """:func:`_short_rows_range` reading ``values`` (the logits: ``dest`` itself in place)."""
    _prefer_wide_vectors()
    num = values.shape[1]
    per_row_scale = scale.shape[0] > 1
    has_weight = weight.shape[0] > 0
    smooth = eps / np.float32(num)
    total_weight = np.float32(num)
    if has_weight:
        total_weight = np.float32(0.0)
        for c in range(num):
            total_weight += weight[c]
    for i in range(first, stop):
        y = target[i]
        if _skips_row(y, num, i, dest, write, loss, bad_row):
            continue
        s = scale[i] if per_row_scale else scale[0]
        best = np.int32(-2147483648)
        for c in range(num):
            best = max(best, _order_key(_float_as_int(values[i, c])))
        peak = _int_as_float(_order_key(best))
        if peak == _MINUS_INF:  # no finite logit: NaN loss and gradient, as F.cross_entropy
            loss[i] = np.float32(np.nan)
            if write:
                dest[i, :] = np.float32(np.nan)
            continue
        x_target = values[i, y]  # read before the exp pass may overwrite it (in place)
        sum_exp = np.float32(0.0)
        sum_t = np.float32(0.0)
        if write and has_weight:
            for c in range(num):
                t = values[i, c] - peak
                e = _exp_nonpositive(t)
                dest[i, c] = e  # kept for the gradient pass
                sum_exp += e
                sum_t += weight[c] * t
        elif write:
            for c in range(num):
                t = values[i, c] - peak
                e = _exp_nonpositive(t)
                dest[i, c] = e
                sum_exp += e
                sum_t += t
        elif has_weight:
            for c in range(num):
                t = values[i, c] - peak
                sum_exp += _exp_nonpositive(t)
                sum_t += weight[c] * t
        else:
            for c in range(num):
                t = values[i, c] - peak
                sum_exp += _exp_nonpositive(t)
                sum_t += t
        target_weight = weight[y] if has_weight else np.float32(1.0)
        row_loss, lse = _row_loss(
            peak, sum_exp, sum_t, x_target, target_weight, total_weight, smooth, eps, z
        )
        loss[i] = row_loss
        if not write:
            continue
        weight_part = (np.float32(1.0) - eps) * target_weight + smooth * total_weight
        coef = s / sum_exp * (weight_part + np.float32(2.0) * z * lse)
        offset = s * smooth
        if has_weight:
            for c in range(num):
                dest[i, c] = dest[i, c] * coef - offset * weight[c]
        else:
            for c in range(num):
                dest[i, c] = dest[i, c] * coef - offset
        dest[i, y] -= s * (np.float32(1.0) - eps) * target_weight


@njit(fastmath=FASTMATH, cache=True)
def _rows_f32_range(first, stop, source, dest, target, scale, weight, eps, z, cap, copy_rows,
                    write, loss, bad_row, stats, predicted):  # fmt: skip
    """Rows ``first`` to ``stop`` - 1 of :func:`rows_f32`, one after the other."""
    _prefer_wide_vectors()
    num = dest.shape[1] if write else source.shape[1]
    if stats is None and num <= BLOCK and cap <= np.float32(0.0):
        _short_rows_range(first, stop, source, dest, target, scale, weight, eps, z, copy_rows,
                          write, loss, bad_row)  # fmt: skip
        return
    per_row_scale = scale.shape[0] > 1
    no_source = np.empty(0, dtype=np.float32)
    partials, partial_arg = _block_scratch(num)
    for i in range(first, stop):
        y = target[i]
        if y < 0 or y >= num:
            _dropped_row_stats(stats, predicted, i)
        if _skips_row(y, num, i, dest, write, loss, bad_row):
            continue
        s = scale[i] if per_row_scale else scale[0]
        if not write:
            if stats is None:
                loss[i] = _row_loss_grad(source[i], no_source, y, s, weight, eps, z, cap, False,
                                         None, None, partials, partial_arg)  # fmt: skip
            else:
                loss[i] = _row_loss_grad(source[i], no_source, y, s, weight, eps, z, cap, False,
                                         stats[i], predicted[i : i + 1], partials,
                                         partial_arg)  # fmt: skip
            continue
        row = dest[i]
        row_source = source[i] if copy_rows else no_source  # the logits the kernel reads
        if stats is None:
            loss[i] = _row_loss_grad(row, row_source, y, s, weight, eps, z, cap, True, None, None,
                                     partials, partial_arg)  # fmt: skip
        else:
            loss[i] = _row_loss_grad(row, row_source, y, s, weight, eps, z, cap, True,
                                     stats[i], predicted[i : i + 1], partials,
                                     partial_arg)  # fmt: skip


MAX_RUNS = 256  # rows_f32 splits the rows into at most this many contiguous runs


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def rows_f32(source, dest, target, scale, weight, eps, z, cap, copy_rows, write, loss,
             bad_row, stats=None, predicted=None):  # fmt: skip
    """fp32 rows. write: gradient into ``dest`` (after copying ``source`` there if
    ``copy_rows``; in place when ``dest`` is the logits). Not write: read ``source`` only.
    ``stats`` (R, 2) float32 and ``predicted`` (R,) int64, or None (the plain loss is then
    compiled without them): per row (lse, entropy) and the argmax.

    A target >= C is never read: its row gets loss NaN and gradient 0 and its index goes
    to ``bad_row[0]`` (any one of them when several race), for the caller to raise.

    The threads take contiguous runs of rows, each with its own block scratch.
    """
    num_rows = target.shape[0]
    runs = min(num_rows, MAX_RUNS)
    for run in prange(runs):
        first = run * num_rows // runs
        stop = (run + 1) * num_rows // runs
        if stats is None:
            _rows_f32_range(first, stop, source, dest, target, scale, weight, eps, z, cap,
                            copy_rows, write, loss, bad_row, None, None)  # fmt: skip
        else:
            _rows_f32_range(first, stop, source, dest, target, scale, weight, eps, z, cap,
                            copy_rows, write, loss, bad_row, stats, predicted)  # fmt: skip


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def rows_f32_serial(source, dest, target, scale, weight, eps, z, cap, copy_rows, write, loss,
                    bad_row, stats=None, predicted=None):  # fmt: skip
    """:func:`rows_f32` in the calling thread, for problems too small to share out: a
    parallel launch hands the work to numba's pool and waits for it, a fixed cost larger
    than the whole kernel there (see ``SERIAL_ELEMENTS`` in ``xloss.ops.kernel``). It
    releases the GIL while it runs, so Python threads computing losses at once run their
    kernels at the same time (each writes only its own arrays)."""
    if stats is None:
        _rows_f32_range(0, target.shape[0], source, dest, target, scale, weight, eps, z, cap,
                        copy_rows, write, loss, bad_row, None, None)  # fmt: skip
    else:
        _rows_f32_range(0, target.shape[0], source, dest, target, scale, weight, eps, z, cap,
                        copy_rows, write, loss, bad_row, stats, predicted)  # fmt: skip


@njit(inline="always", cache=True)
def _half_to_float(bits):
    """IEEE fp16 bits (as int32) to float32: shift into place, rescale the exponent."""
    magnitude = (bits & np.int32(0x7FFF)) << np.int32(13)
    value = _int_as_float(magnitude) * np.float32(5.192296858534828e33)  # 2**112
    if (bits & np.int32(0x7C00)) == np.int32(0x7C00):  # inf / nan
        value = _int_as_float(magnitude | np.int32(0x7F800000))
    return -value if bits & np.int32(0x8000) else value


@njit(inline="always", cache=True)
def _float_to_half(value):
    """float32 to IEEE fp16 bits with round-to-nearest-even (subnormals, inf, nan)."""
    bits = _float_as_int(value)
    sign = (bits >> np.int32(16)) & np.int32(0x8000)
    magnitude = bits & np.int32(0x7FFFFFFF)
    if magnitude >= np.int32(0x47800000):  # >= 65536 after rounding: inf, or nan
        out = np.int32(0x7E00) if magnitude > np.int32(0x7F800000) else np.int32(0x7C00)
    elif magnitude < np.int32(0x38800000):  # fp16 subnormal: let the fp32 adder round
        rounded = _int_as_float(magnitude) + np.float32(0.5)
        out = _float_as_int(rounded) - np.int32(0x3F000000)
    else:
        odd = (magnitude >> np.int32(13)) & np.int32(1)
        out = (magnitude + np.int32(-0x37FFF001) + odd) >> np.int32(13)
    return np.uint16(out | sign)


@njit(inline="always", cache=True)
def _bf16_to_float(bits):
    return _int_as_float(bits << np.int32(16))


@njit(inline="always", cache=True)
def _float_to_bf16(value):
    bits = _float_as_int(value)
    if (bits & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000):  # nan stays a quiet nan
        return np.uint16(((bits >> np.int32(16)) | np.int32(0x40)) & np.int32(0xFFFF))
    rounded = bits + np.int32(0x7FFF) + ((bits >> np.int32(16)) & np.int32(1))
    return np.uint16((rounded >> np.int32(16)) & np.int32(0xFFFF))


@njit(inline="always", fastmath=FASTMATH)
def _widen_row(bits, row, is_bf16):
    """``row`` (fp32) = the fp16 / bf16 values whose uint16 bits are ``bits``."""
    if is_bf16:
        for c in range(row.shape[0]):
            row[c] = _bf16_to_float(np.int32(bits[c]))
    else:
        for c in range(row.shape[0]):
            row[c] = _half_to_float(np.int32(bits[c]))


@njit(inline="always", fastmath=FASTMATH)
def _narrow_row(row, bits, is_bf16):
    """``bits`` = the uint16 bits of ``row`` (fp32) rounded to fp16 / bf16."""
    if is_bf16:
        for c in range(row.shape[0]):
            bits[c] = _float_to_bf16(row[c])
    else:
        for c in range(row.shape[0]):
            bits[c] = _float_to_half(row[c])


HALF_BLOCKS = 64  # the parallel fp16 / bf16 kernels share the rows out in this many blocks


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def rows_half(source, dest, target, scale, weight, eps, z, cap, is_bf16, write, loss,
              bad_row, stats=None, predicted=None):  # fmt: skip
    """fp16 / bf16 rows as uint16 bits; the gradient goes to ``dest`` (may be ``source``).
    Targets >= C as in :func:`rows_f32`."""
    _half_blocks(source, dest, target, scale, weight, eps, z, cap, is_bf16, write, loss,
                 bad_row, stats, predicted, min(source.shape[0], HALF_BLOCKS))  # fmt: skip


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def rows_half_serial(source, dest, target, scale, weight, eps, z, cap, is_bf16, write, loss,
                     bad_row, stats=None, predicted=None):  # fmt: skip
    """:func:`rows_half` in the calling thread, for problems too small to share out (as
    :func:`rows_f32_serial`); it releases the GIL."""
    _half_blocks(source, dest, target, scale, weight, eps, z, cap, is_bf16, write, loss,
                 bad_row, stats, predicted, 1)  # fmt: skip


@njit(inline="always", fastmath=FASTMATH)
def _half_blocks(source, dest, target, scale, weight, eps, z, cap, is_bf16, write, loss,
                 bad_row, stats, predicted, num_blocks):  # fmt: skip
    """The rows of :func:`rows_half` in ``num_blocks`` interleaved blocks (``prange``: the
    pool's threads take blocks; in a serial kernel it runs as ``range``, and one block
    does: each block allocates its scratch, a widened fp32 row and the row's partials,
    which 64 blocks of a 64 x 256 call took about 15 us to do). Rows of at most ``BLOCK``
    classes without softcap or statistics take :func:`_half_short_blocks`."""
    num_rows, num = source.shape
    if stats is None and num <= BLOCK and cap <= np.float32(0.0):
        _half_short_blocks(source, dest, target, scale, weight, eps, z, is_bf16, write, loss,
                           bad_row, num_blocks)  # fmt: skip
        return
    per_row_scale = scale.shape[0] > 1
    no_source = np.empty(0, dtype=np.float32)
    for block in prange(num_blocks):
        _prefer_wide_vectors()  # the widening and narrowing loops
        scratch = np.empty(num, dtype=np.float32)  # one widened row per block
        partials, partial_arg = _block_scratch(num)
        for i in range(block, num_rows, num_blocks):
            y = target[i]
            if y < 0 or y >= num:
                _dropped_row_stats(stats, predicted, i)
            if _skips_row(y, num, i, dest, write, loss, bad_row):
                continue
            _widen_row(source[i], scratch, is_bf16)
            s = scale[i] if per_row_scale else scale[0]
            if stats is None:
                loss[i] = _row_loss_grad(scratch, no_source, y, s, weight, eps, z, cap, write,
                                         None, None, partials, partial_arg)  # fmt: skip
            else:
                loss[i] = _row_loss_grad(scratch, no_source, y, s, weight, eps, z, cap, write,
                                         stats[i], predicted[i : i + 1], partials,
                                         partial_arg)  # fmt: skip
            if write:
                _narrow_row(scratch, dest[i], is_bf16)


HALF_GROUP = 16  # fp16 / bf16 short rows widened at a time: 64 KiB of scratch at most


@njit(inline="always", fastmath=FASTMATH)
def _half_short_blocks(source, dest, target, scale, weight, eps, z, is_bf16, write, loss,
                       bad_row, num_blocks):  # fmt: skip
    """Short fp16 / bf16 rows (at most ``BLOCK`` classes, no softcap or statistics): each
    of ``num_blocks`` runs of consecutive rows (as in :func:`rows_f32`) widens up to
    ``HALF_GROUP`` rows at a time into fp32 scratch, runs the fp32 short-row passes
    (:func:`_short_rows`) on them in place, and narrows their gradient back. The general
    path's cost per row (a view per row and block, the per-block partials) made a
    64 x 256 bf16 call's kernel about twice the fp32 one's."""
    num_rows, num = source.shape
    per_row_scale = scale.shape[0] > 1
    for block in prange(num_blocks):
        _prefer_wide_vectors()  # the widening and narrowing loops
        start = block * num_rows // num_blocks
        end = (block + 1) * num_rows // num_blocks
        group = max(1, min(HALF_GROUP, end - start))
        scratch = np.empty((group, num), dtype=np.float32)
        group_bad = np.empty(1, dtype=np.int64)
        for first in range(start, end, group):
            stop = min(first + group, end)
            count = stop - first
            for k in range(count):
                _widen_row(source[first + k], scratch[k], is_bf16)
            rows_scale = scale[first:stop] if per_row_scale else scale[0:1]
            group_bad[0] = -1
            _short_rows(0, count, scratch, scratch, target[first:stop], rows_scale, weight,
                        eps, z, write, loss[first:stop], group_bad)  # fmt: skip
            if group_bad[0] >= 0:
                bad_row[0] = first + group_bad[0]
            if not write:
                continue
            for k in range(count):
                _narrow_row(scratch[k], dest[first + k], is_bf16)


# The eager host call (``xloss.ops.fused_cross_entropy.host_cross_entropy``): one numba
# call checks the targets, counts the kept rows, runs the rows and reduces them. Right
# after a model's forward every distinct Python or torch operation costs 10-60
# microseconds here (its code and data fell out of the caches), several times the
# operation itself, and the numpy steps this replaces were about ten of them.


@njit(inline="always", cache=True)
def _host_denominator(target, ignore_index, has_ignore, num, weight, weighted, bad_row):
    """The kept rows' count, or their class weights' sum when ``weighted``; the first kept
    target outside [0, C) goes to ``bad_row[0]`` (the count is then meaningless)."""
    total = 0.0
    for i in range(target.shape[0]):
        y = target[i]
        if has_ignore and y == ignore_index:
            continue
        if y < 0 or y >= num:
            bad_row[0] = i
            return total
        total += np.float64(weight[y]) if weighted else 1.0
    return total


@njit(inline="always", cache=True)
def _host_index(target, ignore_index, has_ignore):
    """The rows' targets as the row kernels read them (-1: dropped). A negative
    ``ignore_index`` needs no copy: the targets were checked, so the negative ones are
    exactly the ignored rows."""
    if not has_ignore or ignore_index < 0:
        return target
    index = target.copy()
    for i in range(index.shape[0]):
        if index[i] == ignore_index:
            index[i] = -1
    return index


@njit(inline="always", cache=True)
def _host_scale(denominator, fixed_scale, mean):
    """(1,) float32 factor: 1/denominator (0 for none) for a mean, else ``fixed_scale``."""
    scale = np.empty(1, dtype=np.float32)
    if not mean:
        scale[0] = fixed_scale
    elif denominator == 0.0:
        scale[0] = np.float32(0.0)
    else:
        scale[0] = np.float32(1.0) / np.float32(denominator)
    return scale


@njit(inline="always", cache=True)
def _host_prepare(target, ignore_index, has_ignore, num, weight, fixed_scale, mean, bad_row):
    """(index, scale) of a host call (see :func:`host_rows_f32`); a bad kept target goes to
    ``bad_row[0]`` (-1 before), and the two are then not to be used."""
    bad_row[0] = -1
    weighted = mean and weight.shape[0] > 0
    denominator = _host_denominator(target, ignore_index, has_ignore, num, weight, weighted,
                                    bad_row)  # fmt: skip
    return _host_index(target, ignore_index, has_ignore), _host_scale(denominator, fixed_scale,
                                                                       mean)  # fmt: skip


@njit(inline="always", cache=True)
def _host_total(loss, scale, out):
    """0-dim ``out`` = float32(float64 sum of the row losses times the float32 factor)."""
    total = 0.0
    for i in range(loss.shape[0]):
        total += np.float64(loss[i])
    out[()] = np.float32(total * np.float64(scale[0]))


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def host_rows_f32(source, dest, target, ignore_index, has_ignore, weight, eps, z, cap,
                  fixed_scale, mean, write, loss, out):  # fmt: skip
    """An eager host call on fp32 (R, C) ``source`` in the calling thread: check the
    (R,) int64 targets (``ignore_index`` counts when ``has_ignore``) and return a kept
    row whose target lies outside [0, C), computing nothing; else fill ``loss`` (R,),
    the gradient into ``dest`` when ``write`` (scaled by the mean's 1/denominator, or by
    ``fixed_scale`` when not ``mean``) and the 0-dim ``out`` with the reduced loss, and
    return -1. The class weights' sum is the mean's denominator when ``weight`` is not
    empty."""
    bad_row = np.empty(1, dtype=np.int64)
    index, scale = _host_prepare(target, ignore_index, has_ignore, source.shape[1], weight,
                                 fixed_scale, mean, bad_row)  # fmt: skip
    if bad_row[0] >= 0:
        return bad_row[0]
    _rows_f32_range(0, index.shape[0], source, dest, index, scale, weight, eps, z, cap, write,
                    write, loss, bad_row, None, None)  # fmt: skip
    _host_total(loss, scale, out)
    return bad_row[0]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def host_rows_f32_parallel(source, dest, target, ignore_index, has_ignore, weight, eps, z, cap,
                           fixed_scale, mean, write, loss, out):  # fmt: skip
    """:func:`host_rows_f32` with the rows shared out in contiguous runs, as in
    :func:`rows_f32`."""
    bad_row = np.empty(1, dtype=np.int64)
    index, scale = _host_prepare(target, ignore_index, has_ignore, source.shape[1], weight,
                                 fixed_scale, mean, bad_row)  # fmt: skip
    if bad_row[0] >= 0:
        return bad_row[0]
    num_rows = index.shape[0]
    runs = min(num_rows, MAX_RUNS)
    for run in prange(runs):
        _rows_f32_range(run * num_rows // runs, (run + 1) * num_rows // runs, source, dest,
                        index, scale, weight, eps, z, cap, write, write, loss, bad_row, None,
                        None)  # fmt: skip
    _host_total(loss, scale, out)
    return bad_row[0]


@njit(inline="always", fastmath=FASTMATH)
def _host_rows_half(source, dest, target, ignore_index, has_ignore, weight, eps, z, cap,
                    fixed_scale, mean, is_bf16, write, loss, out, num_blocks):  # fmt: skip
    """The body of :func:`host_rows_half` and its parallel twin (``_half_blocks`` runs
    its blocks in ``prange``: in parallel only in a parallel kernel)."""
    bad_row = np.empty(1, dtype=np.int64)
    index, scale = _host_prepare(target, ignore_index, has_ignore, source.shape[1], weight,
                                 fixed_scale, mean, bad_row)  # fmt: skip
    if bad_row[0] >= 0:
        return bad_row[0]
    _half_blocks(source, dest, index, scale, weight, eps, z, cap, is_bf16, write, loss,
                 bad_row, None, None, num_blocks)  # fmt: skip
    _host_total(loss, scale, out)
    return bad_row[0]


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def host_rows_half(source, dest, target, ignore_index, has_ignore, weight, eps, z, cap,
                   fixed_scale, mean, is_bf16, write, loss, out):  # fmt: skip
    """:func:`host_rows_f32` on fp16 / bf16 rows as uint16 bits (``is_bf16``: bf16)."""
    return _host_rows_half(source, dest, target, ignore_index, has_ignore, weight, eps, z,
                           cap, fixed_scale, mean, is_bf16, write, loss, out, 1)  # fmt: skip


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def host_rows_half_parallel(source, dest, target, ignore_index, has_ignore, weight, eps, z,
                            cap, fixed_scale, mean, is_bf16, write, loss, out):  # fmt: skip
    """:func:`host_rows_half` with the blocks shared out, as in :func:`rows_half`."""
    return _host_rows_half(source, dest, target, ignore_index, has_ignore, weight, eps, z,
                           cap, fixed_scale, mean, is_bf16, write, loss, out,
                           min(source.shape[0], HALF_BLOCKS))  # fmt: skip


# Start-up. numba refreshes its whole CPU target before it loads anything from the disk
# cache: it imports every implementation it has (arrays, linalg with scipy, random,
# typed containers...), 0.5-0.9 s measured here, more than the rest of a warm first call.
# Cached machine code needs none of that: it links against numba's runtime (NRT) only.
# So a cache hit initialises the runtime and loads; a miss refreshes as numba does, says
# once that a compile is under way, and compiles (which refreshes again, as always).
COLD_COMPILE_NOTICE = (
    "xloss: compiling the numba CPU kernels (once; about 15-30 s, then cached on disk)"
)
_notice_shown: list[bool] = []


@contextlib.contextmanager
def _environments_without_imports():
    """While a cached kernel loads, rebuild the runtime environment of each function it
    inlined from a numba module that is not imported yet (``numba.np.arrayobj`` for
    ``np.empty``, which imports numba's string and hashing code: about 50 ms of a
    0.5 s warm start) without importing that module. Such an environment holds the
    module's globals for object-mode code, which nopython kernels never run; the one made
    here is not registered, so a later compile that needs the real one builds it."""
    from numba.core import environment

    rebuild = getattr(environment, "_rebuild_env", None)
    if rebuild is None:  # another numba: nothing to change
        yield
        return

    def rebuild_without_import(modname, consts, env_name):
        if modname in sys.modules or environment.lookup_environment(env_name) is not None:
            return rebuild(modname, consts, env_name)
        env = environment.Environment({"__name__": modname})
        env.consts[:] = consts
        env.env_name = env_name
        return env

    environment._rebuild_env = rebuild_without_import  # pickle finds it by name
    try:
        yield
    finally:
        environment._rebuild_env = rebuild


def _load_cache_without_refresh(dispatcher) -> None:
    """Make ``dispatcher``'s cache hits skip numba's target refresh (see above)."""
    cache = getattr(dispatcher, "_cache", None)
    if not hasattr(cache, "_load_overload") or not hasattr(cache, "load_overload"):
        return  # another numba: keep its own loading

    def load_overload(sig, target_context):
        from numba.core.runtime import rtsys

        rtsys.initialize(target_context)
        with cache._guard_against_spurious_io_errors(), _environments_without_imports():
            compiled = cache._load_overload(sig, target_context)
        if compiled is None:
            if not _notice_shown:
                _notice_shown.append(True)
                print(COLD_COMPILE_NOTICE, file=sys.stderr, flush=True)
            target_context.refresh()
        return compiled

    cache.load_overload = load_overload


for _kernel in (rows_f32, rows_f32_serial, rows_half, rows_half_serial, host_rows_f32,
                host_rows_f32_parallel, host_rows_half, host_rows_half_parallel):
    _load_cache_without_refresh(_kernel)
