"""Small combinational building blocks shared by the engines."""

import numpy as np
from amaranth.hdl import Cat, Const, Shape, signed, unsigned


def bits_for(value):
    """Bits of an unsigned number able to hold ``0 .. value``."""
    return max(1, int(value).bit_length())


def popcount(value):
    """Number of set bits of ``value``, as a balanced adder tree (width grows per level)."""
    terms = [value[i] for i in range(len(value))]
    if not terms:
        return Const(0, 1)
    while len(terms) > 1:
        nxt = []
        for i in range(0, len(terms) - 1, 2):
            a, b = terms[i], terms[i + 1]
            width = max(Shape.cast(a.shape()).width, Shape.cast(b.shape()).width) + 1
            nxt.append((a + b).as_unsigned()[:width])
        if len(terms) % 2:
            nxt.append(terms[-1])
        terms = nxt
    return terms[0]


def mul_const(value, k):
    """``value * k`` for a constant ``k >= 0`` as a sum of shifted copies of ``value`` (one per
    set bit of ``k``), so that synthesis never spends a DSP multiplier on an address."""
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"mul_const needs a constant integer k >= 0, got {k!r}")
    terms = [value << i for i in range(k.bit_length()) if k >> i & 1]
    return sum_tree(terms) if terms else Const(0, 1)


def sum_tree(terms):
    """Sum of (signed or unsigned) values as a balanced adder tree."""
    terms = list(terms)
    while len(terms) > 1:
        nxt = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        if len(terms) % 2:
            nxt.append(terms[-1])
        terms = nxt
    return terms[0]


def ge_threshold_count(value, thresholds, invert):
    """How many of ``thresholds`` are met: sum over i of ``(value >= thresholds[i]) ^ invert``.

    This is the hardware form of a QMD threshold: a ``x <= t`` comparison is stored as
    ``not (x >= t + 1)`` (``invert`` set), so one kind of comparator serves both directions.
    """
    met = Cat(*[(value >= t) ^ invert for t in thresholds])
    return popcount(met)


def to_ge_thresholds(thresholds, direction, scale=1, offset=0):
    """Convert QMD thresholds to the ``>=``-only form used by the hardware.

    The hardware compares ``h`` where the spec's value is ``x = scale*h + offset``
    (``scale`` > 0). Returns ``(ge [C][T] ints, invert [C] bools)`` such that
    ``x >= t  <=>  h >= ge`` for direction +1 and ``x <= t  <=>  not (h >= ge)`` for -1.
    Exact integer arithmetic (floor/ceil of rationals).
    """
    assert scale > 0
    ge, inv = [], []
    for row, d in zip(thresholds, direction):
        if d > 0:   # scale*h + offset >= t  <=>  h >= ceil((t - offset)/scale)
            ge.append([-((offset - int(t)) // scale) for t in row])
            inv.append(False)
        else:       # scale*h + offset <= t  <=>  h <= floor((t - offset)/scale)  <=> not h >= floor(..)+1
            ge.append([(int(t) - offset) // scale + 1 for t in row])
            inv.append(True)
    return ge, inv


def code_range(shape, in_code, in_range=None):
    """The ``(lo, hi)`` of input values whose codes have Amaranth ``shape`` and stand for
    ``scale*r + offset`` (``in_code = (scale, offset)``, ``scale >= 1``): ``in_range`` when
    given (validated), else every code's value."""
    if in_range is None:
        w = Shape.cast(shape).width
        lo_r, hi_r = (-(1 << (w - 1)), (1 << (w - 1)) - 1) if Shape.cast(shape).signed else (0, (1 << w) - 1)
        in_range = (in_code[0] * lo_r + in_code[1], in_code[0] * hi_r + in_code[1])
    lo, hi = (int(v) for v in in_range)
    if lo > hi:
        raise ValueError(f"in_range must be (lo, hi) with lo <= hi, got {in_range!r}")
    return lo, hi


def dot_range(weights, lo, hi):
    """The exact ``(min, max)`` over rows of ``sum_n W[m,n] * x[n]`` for integer weights ``W``
    and every input ``x[n]`` in ``[lo, hi]``."""
    w = np.asarray(weights, dtype=np.int64)
    return (int(np.minimum(w * lo, w * hi).sum(axis=1).min()),
            int(np.maximum(w * lo, w * hi).sum(axis=1).max()))


def dot_thresholds(thresholds, direction, m, dots):
    """The comparison side of an engine whose dot products lie in ``dots = (lo, hi)``.

    ``thresholds`` ``[M, T]`` and ``direction`` ``[M]`` of +1/-1 (QMD ``threshold``
    semantics), or ``None`` for an engine that emits the dot products. Returns
    ``(n_thresholds, ge, invert, thr_shape, out_elem)``: the ``>=`` thresholds clamped to
    ``[lo, hi + 1]`` (beyond it a threshold is always or never met), the invert flags, the
    shape that holds them, and the output element (a count, or the signed dot product)."""
    dlo, dhi = dots
    if thresholds is None:
        return 0, None, None, None, signed(bits_for(max(abs(dlo), abs(dhi))) + 1)
    thr = np.asarray(thresholds, dtype=np.int64)
    if thr.ndim != 2 or thr.shape[0] != m or thr.shape[1] < 1:
        raise ValueError(f"thresholds must have shape [{m}, T], got {list(thr.shape)}")
    if direction is None or len(direction) != m or not np.isin(direction, (-1, 1)).all():
        raise ValueError(f"thresholds need {m} comparison directions of +1/-1")
    ge, invert = to_ge_thresholds(thr, direction)
    return (thr.shape[1], np.clip(np.asarray(ge, dtype=np.int64), dlo, dhi + 1), [bool(v) for v in invert],
            Shape.cast(range(dlo, dhi + 2)), unsigned(bits_for(thr.shape[1])))


def threshold_shape(ge_rows, lo, hi):
    """Shape able to hold every ``>=`` threshold and every compared value in ``[lo, hi]``."""
    flat = [v for r in ge_rows for v in r] + [lo, hi]
    return Shape.cast(range(min(flat), max(flat) + 1))


