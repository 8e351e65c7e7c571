"""Shift-add (ShiftCNN) MVTU in Amaranth's simulator against numpy: random codebook indices,
signs, term counts, code widths, exponent offsets, input kinds and widths, thresholds and
random valid/ready stalls; worst-case accumulators; throughput; parameter checks."""

import numpy as np
import pytest
from amaranth.hdl import signed, unsigned

from hw.shift_mvtu import ShiftMVTU
from models.qmd import pow2_code, pow2_codebook_max, pow2_decode
from models.synthetic import random_pow2_codes
from sim.amaranth_stream import pack, run_stream, unpack

# input kinds: (raw shape, (scale, offset) of the code, value range)
INPUTS = {
    "binary": (unsigned(1), (2, -1), (-1, 1)),
    "ternary": (unsigned(2), (1, -1), (-1, 1)),
    "uint2": (unsigned(2), (1, 0), (0, 3)),
    "uint4": (unsigned(4), (1, 0), (0, 15)),
    "uint8": (unsigned(8), (1, 0), (0, 255)),
    "int8": (signed(8), (1, 0), (-128, 127)),
    "int3": (signed(3), (1, 0), (-4, 3)),
}


def _divisor(rng, n):
    return int(rng.choice([d for d in range(1, n + 1) if n % d == 0]))


def _values(rng, kind, shape):
    lo, hi = INPUTS[kind][2]
    v = rng.integers(lo, hi + 1, shape)
    return np.where(v == 0, 1, v) if kind == "binary" else v


def _shift_add(x, codes, code_bits, e):
    """The spec's shift-add form, term by term, in Python integers (not via Wq)."""
    frames, (m, terms, n) = len(x), codes.shape
    out = np.zeros((frames, m), dtype=object)
    half = 1 << (code_bits - 1)
    for f in range(frames):
        for o in range(m):
            acc = 0
            for t in range(terms):
                for k in range(n):
                    c = int(codes[o, t, k])
                    j, sign = c & (half - 1), c >> (code_bits - 1)
                    if j:
                        v = int(x[f, k]) << (e - t - (j - 1))
                        acc += -v if sign else v
            out[f, o] = acc
    return out.astype(np.int64)


def _thresholded(dot, thr, direction):
    if thr is None:
        return dot
    met = np.where(direction[None, :, None] > 0, dot[:, :, None] >= thr[None], dot[:, :, None] <= thr[None])
    return met.sum(-1)


def _random_thresholds(rng, dots, count):
    m = dots.shape[1]
    thr = np.sort(dots[rng.integers(0, len(dots), (m, count)), np.arange(m)[:, None]]
                  + rng.integers(-2, 3, (m, count)), axis=1)
    direction = rng.choice([-1, 1], m)
    thr[direction < 0] = thr[direction < 0, ::-1]
    return thr, direction


def _run(codes, code_bits, e, x, pe, simd, kind, thr=None, direction=None, stall=0.0, seed=0, pipelined=True):
    shape, code, rng_ = INPUTS[kind]
    dut = ShiftMVTU(codes, code_bits=code_bits, exponent_offset=e, pe=pe, simd=simd, thresholds=thr,
                    direction=direction, in_shape=shape, in_code=code, in_range=rng_, pipelined=pipelined)
    raw = (x - code[1]) // code[0]
    m, _, n = codes.shape
    beats = [pack(v[s * simd:(s + 1) * simd], shape.width) for v in raw for s in range(n // simd)]
    out, cycles = run_stream(dut, beats, len(x) * (m // pe), in_stall=stall, out_stall=stall, seed=seed)
    el = dut.out_elem
    got = np.array([v for b in out for v in unpack(b, el.width, pe, el.signed)]).reshape(len(x), m)
    return got, cycles, dut


@pytest.mark.parametrize("seed", range(16))
def test_random_codes_inputs_thresholds_and_stalls(seed):
    rng = np.random.default_rng(700 + seed)
    kind = list(INPUTS)[seed % len(INPUTS)]
    terms, code_bits = int(rng.integers(1, 4)), int(rng.integers(2, 6))
    e = int(rng.integers(0, terms + (1 << (code_bits - 1)) - 2))      # may cut the finest indices off
    m, n = int(rng.integers(1, 11)), int(rng.integers(1, 25))
    pe, simd = _divisor(rng, m), _divisor(rng, n)
    codes = random_pow2_codes(rng, m, n, terms, code_bits, e, zero=float(rng.choice([0.0, 0.3, 0.8])),
                              zero_rows=int(rng.integers(0, 2)))
    x = _values(rng, kind, (int(rng.integers(2, 5)), n))
    dots = _shift_add(x, codes, code_bits, e)
    assert np.array_equal(dots, x @ pow2_decode(codes, code_bits, e).T)      # the spec's two forms agree
    count = int(rng.choice([0, 1, 3, 15]))
    thr, direction = _random_thresholds(rng, dots, count) if count else (None, None)
    got, _, dut = _run(codes, code_bits, e, x, pe, simd, kind, thr, direction, stall=0.3, seed=seed,
                       pipelined=seed % 4 != 3)
    assert np.array_equal(got, _thresholded(dots, thr, direction)), (kind, terms, code_bits, e)
    assert dut.partial_stages == (0 if seed % 4 == 3 else 1 + (dut._n_terms() - 1).bit_length())


@pytest.mark.parametrize("kind", ["uint8", "int8", "uint4"])
def test_worst_case_accumulator_cannot_overflow(kind):
    """Every weight at the codebook's largest magnitude (term t at index 1), inputs at both ends
    of their range: the dot products reach the derived bound and are exact."""
    terms, code_bits, e, m, n, pe, simd = 2, 4, 7, 4, 24, 2, 6
    neg = np.zeros((m, terms, n), bool)
    neg[1] = True                                     # row 1: all negative
    neg[3, :, ::2] = True                             # row 3: alternating
    codes = pow2_code(neg, np.ones((m, terms, n), int), code_bits)
    lo, hi = INPUTS[kind][2]
    x = np.array([[hi] * n, [lo] * n, [hi, lo] * (n // 2)])
    got, _, dut = _run(codes, code_bits, e, x, pe, simd, kind)
    wq = pow2_decode(codes, code_bits, e)
    assert np.abs(wq).max() == pow2_codebook_max(terms, code_bits, e) == 128 + 64
    assert np.array_equal(got, x @ wq.T)
    bound = n * max(abs(lo), abs(hi)) * 192
    assert np.abs(got).max() == bound                                  # reached, not exceeded
    assert dut.acc_shape.width == bound.bit_length() + 1


def test_zero_terms_add_nothing_and_an_all_zero_layer_gives_zero():
    rng = np.random.default_rng(3)
    codes = np.zeros((4, 2, 8), np.uint8)
    x = _values(rng, "uint4", (3, 8))
    got, _, _ = _run(codes, 4, 7, x, 2, 4, "uint4")
    assert not got.any()
    thr = np.array([[-1], [0], [1], [0]])
    direction = np.array([1, 1, 1, -1])
    got, _, _ = _run(codes, 4, 7, x, 4, 2, "uint4", thr, direction)
    assert got[:, :].tolist() == [[1, 1, 0, 1]] * 3


def test_full_rate_takes_nf_times_sf_cycles_per_vector():
    rng = np.random.default_rng(4)
    m, n, pe, simd = 8, 24, 2, 4
    codes = random_pow2_codes(rng, m, n, 2, 4, 7)
    x = _values(rng, "uint4", (6, n))
    got, cycles, dut = _run(codes, 4, 7, x, pe, simd, "uint4")
    assert np.array_equal(got, x @ dut.weights.T)
    per_vector = np.diff(cycles[::m // pe])[1:]
    assert per_vector.tolist() == [(m // pe) * (n // simd)] * (len(x) - 2)


def test_weight_words_layout():
    rng = np.random.default_rng(5)
    m, n, pe, simd, t, b = 4, 6, 2, 3, 2, 4
    codes = random_pow2_codes(rng, m, n, t, b, 7)
    dut = ShiftMVTU(codes, code_bits=b, exponent_offset=7, pe=pe, simd=simd, in_shape=unsigned(4))
    words = dut.weight_words()
    assert len(words) == (m // pe) * (n // simd) and dut.weight_bits == t * b
    for f in range(m // pe):
        for s in range(n // simd):
            for p in range(pe):
                for k in range(simd):
                    for term in range(t):
                        bit = ((p * simd + k) * t + term) * b
                        assert (words[f * (n // simd) + s] >> bit) & 0xF == codes[f * pe + p, term, s * simd + k]


@pytest.mark.parametrize("bad, message", [
    (dict(codes=np.zeros((4, 2))), "codes must be an integer array \\[M, terms"),
    (dict(codes=np.full((4, 2, 4), 16)), "codes must be in 0..15"),
    (dict(codes=np.full((4, 2, 4), 8)), "a zero term \\(index 0\\) must not have its sign bit set"),
    (dict(exponent_offset=2, codes=np.full((4, 2, 4), 7)), "a term is finer than 2\\^-2"),
    (dict(code_bits=9), "code_bits must be an integer in 2..8, got 9"),
    (dict(exponent_offset=-1), "exponent_offset must be an integer in 0..24, got -1"),
    (dict(pe=3), "output channels: 4 is not divisible by PE=3"),
    (dict(simd=0), "SIMD must be a positive integer, got 0"),
    (dict(thresholds=np.zeros((4, 1))), "thresholds need 4 comparison directions"),
    (dict(thresholds=np.zeros((3, 1)), direction=np.ones(4)), "thresholds must have shape \\[4, T\\], got \\[3, 1\\]"),
    (dict(in_code=(3, 0)), "in_code must be a pair \\(scale, offset\\) of integers with scale a power of two"),
    (dict(in_range=(3, 1)), "in_range must be \\(lo, hi\\) with lo <= hi"),
])
def test_bad_parameters_are_rejected(bad, message):
    args = dict(codes=np.ones((4, 2, 4), np.uint8), code_bits=4, exponent_offset=7, pe=2, simd=2)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        ShiftMVTU(args.pop("codes"), **args)
