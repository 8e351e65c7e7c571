"""MVTU (XNOR-popcount and add/subtract datapaths) in Amaranth's simulator against numpy,
on random shapes, foldings, thresholds and valid/ready stalls."""

import numpy as np
import pytest

from amaranth.hdl import signed, unsigned

from hw.mvtu import MVTU
from sim.amaranth_stream import pack, run_stream, unpack


def _divisor(rng, n):
    return int(rng.choice([d for d in range(1, n + 1) if n % d == 0]))


def _reference(x, w, thr, direction):
    dot = x @ w.T                                         # [frames, M], the spec's dot product
    if thr is None:
        return dot
    met = np.where(direction[None, :, None] > 0, dot[:, :, None] >= thr[None], dot[:, :, None] <= thr[None])
    return met.sum(-1)


def _run(w, x, pe, simd, thr=None, direction=None, stall=0.0, seed=0, in_shape=None):
    m, n = w.shape
    dut = MVTU(w, pe=pe, simd=simd, thresholds=thr, direction=direction, in_shape=in_shape)
    enc = (lambda v: (v + 1) // 2) if in_shape is None else (lambda v: v)
    width = 1 if in_shape is None else in_shape.width
    beats = [pack(enc(v[s * simd:(s + 1) * simd]), width) for v in x for s in range(n // simd)]
    out, cycles = run_stream(dut, beats, len(x) * (m // pe), in_stall=stall, out_stall=stall, seed=seed)
    elem = dut.out_elem
    got = np.array([e for b in out for e in unpack(b, elem.width, pe, elem.signed)]).reshape(len(x), m)
    return got, cycles, dut


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("thresholded", [False, True])
def test_random_shapes_foldings_and_stalls(seed, thresholded):
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(1, 17)), int(rng.integers(1, 41))
    pe, simd = _divisor(rng, m), _divisor(rng, n)
    w = rng.choice([-1, 1], (m, n))
    x = rng.choice([-1, 1], (int(rng.integers(1, 5)), n))
    thr = direction = None
    if thresholded:
        thr = rng.integers(-n - 1, n + 2, (m, int(rng.choice([1, 3]))))
        direction = rng.choice([-1, 1], m)
        thr = np.where(direction[:, None] > 0, np.sort(thr, 1), -np.sort(-thr, 1))
    got, _, _ = _run(w, x, pe, simd, thr, direction, stall=0.3, seed=seed)
    assert np.array_equal(got, _reference(x, w, thr, direction))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("in_shape", [unsigned(8), signed(4)], ids=["uint8", "int4"])
def test_addsub_datapath_on_integer_inputs(seed, in_shape):
    """Binary weights x multi-bit inputs (the first layer's 8-bit pixels): add/subtract, no multipliers."""
    rng = np.random.default_rng(50 + seed)
    m, n = int(rng.integers(1, 13)), int(rng.choice([3, 9, 12, 27]))
    pe, simd = _divisor(rng, m), _divisor(rng, n)
    lo, hi = (0, 255) if not in_shape.signed else (-8, 7)
    w = rng.choice([-1, 1], (m, n))
    x = rng.integers(lo, hi + 1, (3, n))
    thr = direction = None
    if seed % 2:
        reach = n * max(abs(lo), hi)
        thr = rng.integers(-reach // 3, reach // 3 + 1, (m, 1))
        thr[0, 0] = int((x[0] @ w[0]))                       # a dot product exactly on its threshold
        direction = rng.choice([-1, 1], m)
    got, _, _ = _run(w, x, pe, simd, thr, direction, stall=0.3, seed=seed, in_shape=in_shape)
    assert np.array_equal(got, _reference(x, w, thr, direction))


def test_extreme_thresholds_always_and_never_met():
    n = 8
    w = np.ones((4, n), dtype=int)
    x = np.array([[1] * n, [-1] * n])          # dot = +n and -n
    thr = np.array([[-n - 1], [n + 1], [-n - 1], [n + 1]])
    direction = np.array([1, 1, -1, -1])
    got, _, _ = _run(w, x, 2, 4, thr, direction)
    assert got.tolist() == [[1, 0, 0, 1], [1, 0, 0, 1]]


def test_full_throughput_without_stalls():
    """Back-to-back vectors: one output beat every SF cycles, NF*SF cycles per vector."""
    rng = np.random.default_rng(7)
    m, n, pe, simd = 8, 24, 2, 6
    w = rng.choice([-1, 1], (m, n))
    x = rng.choice([-1, 1], (6, n))
    got, cycles, dut = _run(w, x, pe, simd)
    assert np.array_equal(got, x @ w.T)
    per_vector = np.diff(cycles[::dut.nf])
    assert per_vector.tolist() == [dut.nf * dut.sf] * (len(x) - 1)


@pytest.mark.parametrize("bad, message", [
    (dict(pe=3), "not divisible by PE=3"),
    (dict(simd=5), "not divisible by SIMD=5"),
    (dict(pe=0), "PE must be a positive integer"),
])
def test_folding_that_does_not_divide_is_rejected(bad, message):
    args = dict(pe=2, simd=4)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        MVTU(np.ones((8, 8), dtype=int), **args)


@pytest.mark.parametrize("seed", range(3))
def test_addsub_datapath_on_ternary_codes(seed):
    """Binary weights after ternary activations: the stream carries codes value + 1, the
    add/subtract datapath decodes them with in_offset = -1."""
    rng = np.random.default_rng(70 + seed)
    m, n = int(rng.integers(2, 9)), int(rng.choice([6, 8, 12]))
    pe, simd = _divisor(rng, m), _divisor(rng, n)
    w = rng.choice([-1, 1], (m, n))
    x = rng.integers(-1, 2, (4, n))
    thr = rng.integers(-n // 2, n // 2 + 1, (m, 1))
    direction = rng.choice([-1, 1], m)
    dut = MVTU(w, pe=pe, simd=simd, thresholds=thr, direction=direction, in_shape=unsigned(2), in_range=(-1, 1),
               in_offset=-1)
    beats = [pack(v[s * simd:(s + 1) * simd] + 1, 2) for v in x for s in range(n // simd)]
    out, _ = run_stream(dut, beats, len(x) * (m // pe), in_stall=0.3, out_stall=0.3, seed=seed)
    got = np.array([e for b in out for e in unpack(b, dut.out_elem.width, pe)]).reshape(len(x), m)
    assert np.array_equal(got, _reference(x, w, thr, direction))
