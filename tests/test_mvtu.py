"""MVTU (XNOR-popcount and add/subtract datapaths) in Amaranth's simulator against numpy,
on random shapes, foldings, thresholds and valid/ready stalls; weights in ROM and in a
run-time loaded RAM (load, then compute; nothing before the load completes; reload)."""

import numpy as np
import pytest

from amaranth.hdl import signed, unsigned
from amaranth.sim import Simulator

from hw.mvtu import MVTU, weight_bits
from sim.amaranth_stream import Feed, pack, run_stream, unpack


def _divisor(rng, n):
    return int(rng.choice([d for d in range(1, n + 1) if n % d == 0]))


def _reference(x, w, thr, direction):
    dot = x @ w.T                                         # [frames, M], the spec's dot product
    if thr is None:
        return dot
    met = np.where(direction[None, :, None] > 0, dot[:, :, None] >= thr[None], dot[:, :, None] <= thr[None])
    return met.sum(-1)


def _run(w, x, pe, simd, thr=None, direction=None, stall=0.0, seed=0, in_shape=None, pipelined=True,
         weights_storage="rom"):
    m, n = w.shape
    dut = MVTU(w, pe=pe, simd=simd, thresholds=thr, direction=direction, in_shape=in_shape, pipelined=pipelined,
               weights_storage=weights_storage)
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


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "combinational"])
@pytest.mark.parametrize("in_shape", [None, unsigned(8)], ids=["xnor", "addsub"])
def test_wide_simd_with_and_without_the_pipeline(in_shape, pipelined):
    """SIMD wider than one registered chunk (16 popcount / 4 add-subtract lanes), with a
    ragged last chunk, thresholded, under stalls; the same with the combinational datapath."""
    rng = np.random.default_rng(3 if in_shape is None else 4)
    m, n, pe, simd = 6, 2 * 38, 3, 38
    w = rng.choice([-1, 1], (m, n))
    x = rng.choice([-1, 1], (4, n)) if in_shape is None else rng.integers(0, 256, (4, n))
    dots = x @ w.T
    thr = np.sort(rng.choice(dots.ravel(), (m, 3)), 1)
    direction = np.ones(m, dtype=int)
    got, _, dut = _run(w, x, pe, simd, thr, direction, stall=0.3, seed=9, in_shape=in_shape, pipelined=pipelined)
    assert dut.partial_stages == (2 if pipelined else 0)
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


def _thresholds(rng, m, n):
    thr = rng.integers(-n - 1, n + 2, (m, int(rng.choice([1, 3]))))
    direction = rng.choice([-1, 1], m)
    return np.where(direction[:, None] > 0, np.sort(thr, 1), -np.sort(-thr, 1)), direction


@pytest.mark.parametrize("seed", range(8))
def test_ram_weights_load_then_compute_under_stalls(seed):
    """Vectors arrive from cycle 0, the weight words later and with stalls: every output is
    bit-exact and the first one leaves only after the last weight word was taken."""
    rng = np.random.default_rng(300 + seed)
    m, n = int(rng.integers(1, 17)), int(rng.integers(1, 41))
    pe, simd = _divisor(rng, m), _divisor(rng, n)
    w = rng.choice([-1, 1], (m, n))
    x = rng.choice([-1, 1], (int(rng.integers(1, 5)), n))
    thr, direction = _thresholds(rng, m, n) if seed % 2 else (None, None)
    dut = MVTU(w, pe=pe, simd=simd, thresholds=thr, direction=direction, weights_storage="ram")
    words = dut.weight_words()
    assert len(words) == dut.nf * dut.sf and all(0 <= v < 1 << (pe * simd) for v in words)
    load = Feed(dut.load, words, start=int(rng.integers(0, 3 * n)), stall=0.4)
    beats = [pack((v[s * simd:(s + 1) * simd] + 1) // 2, 1) for v in x for s in range(n // simd)]
    out, cycles = run_stream(dut, beats, len(x) * dut.nf, in_stall=0.3, out_stall=0.3, seed=seed, feeds=[load])
    got = np.array([e for b in out for e in unpack(b, dut.out_elem.width, pe, dut.out_elem.signed)])
    assert np.array_equal(got.reshape(len(x), m), _reference(x, w, thr, direction))
    assert cycles[0] > load.cycles[-1], "an output left before the weights were loaded"


def test_ram_weights_addsub_datapath_and_full_rate_after_load():
    """Integer inputs on a loaded RAM; once loaded, one vector every NF*SF cycles like ROM."""
    rng = np.random.default_rng(9)
    m, n, pe, simd = 6, 12, 3, 4
    w = rng.choice([-1, 1], (m, n))
    x = rng.integers(0, 256, (5, n))
    dut = MVTU(w, pe=pe, simd=simd, in_shape=unsigned(8), weights_storage="ram")
    load = Feed(dut.load, dut.weight_words())
    beats = [pack(v[s * simd:(s + 1) * simd], 8) for v in x for s in range(n // simd)]
    out, cycles = run_stream(dut, beats, len(x) * dut.nf, feeds=[load])
    got = np.array([e for b in out for e in unpack(b, dut.out_elem.width, pe, True)]).reshape(len(x), m)
    assert np.array_equal(got, x @ w.T)
    assert cycles[0] > load.cycles[-1]
    assert np.diff(cycles[::dut.nf]).tolist() == [dut.nf * dut.sf] * (len(x) - 1)


def test_weight_words_layout():
    """Word f*SF+s, bit p*SIMD+k = W[f*PE+p, s*SIMD+k]; the same for ROM and the load stream."""
    rng = np.random.default_rng(3)
    w = rng.choice([-1, 1], (6, 10))
    dut = MVTU(w, pe=2, simd=5)
    words = dut.weight_words()
    for f in range(3):
        for s in range(2):
            for p in range(2):
                for k in range(5):
                    assert (words[f * 2 + s] >> (p * 5 + k)) & 1 == int(w[f * 2 + p, s * 5 + k] > 0)
    assert weight_bits(w, 2, 5).shape == (6, 10)


def test_ram_weights_reload_replaces_them():
    """Load W1 and compute, pulse ``reload``, load W2 and compute: outputs follow each load;
    no extra load word is accepted once loaded."""
    rng = np.random.default_rng(11)
    m, n, pe, simd = 4, 8, 2, 4
    w1, w2 = rng.choice([-1, 1], (m, n)), rng.choice([-1, 1], (m, n))
    x = rng.choice([-1, 1], (2, n))
    dut = MVTU(w1, pe=pe, simd=simd, weights_storage="ram")
    words = {1: dut.weight_words(), 2: MVTU(w2, pe=pe, simd=simd).weight_words()}
    beats = [pack((v[s * simd:(s + 1) * simd] + 1) // 2, 1) for v in x for s in range(n // simd)]
    got = {}

    async def bench(ctx):
        ctx.set(dut.o.ready, 1)
        for phase in (1, 2):
            if phase == 2:
                ctx.set(dut.reload, 1)
                await ctx.tick()
                ctx.set(dut.reload, 0)
                assert not ctx.get(dut.loaded)
            for word in words[phase]:
                ctx.set(dut.load.valid, 1)
                ctx.set(dut.load.payload, word)
                await ctx.tick().until(dut.load.ready)
            ctx.set(dut.load.valid, 0)
            await ctx.tick()
            assert ctx.get(dut.loaded) and not ctx.get(dut.load.ready)
            outs = []
            for beat in beats:
                ctx.set(dut.i.valid, 1)
                ctx.set(dut.i.payload.as_value(), beat)
                await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            while len(outs) < len(x) * (m // pe):
                _, _, valid, payload = await ctx.tick().sample(dut.o.valid, dut.o.payload.as_value())
                if valid:
                    outs.append(payload)
            got[phase] = np.array([e for b in outs for e in unpack(b, dut.out_elem.width, pe, True)]).reshape(len(x), m)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert np.array_equal(got[1], x @ w1.T) and np.array_equal(got[2], x @ w2.T)


def test_bad_weight_storage_is_rejected():
    with pytest.raises(ValueError, match="weights_storage must be 'rom', 'lut' or 'ram', got 'flash'"):
        MVTU(np.ones((4, 4), dtype=int), pe=2, simd=2, weights_storage="flash")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("in_shape", [None, signed(4)])
def test_lut_weights_are_bit_exact_and_marked_for_logic(seed, in_shape):
    """``"lut"`` weights: the same initialised memory, marked ``rom_style = "logic"`` so Yosys
    builds it from LUTs; the engine computes the same integers under stalls."""
    from amaranth.back import rtlil
    rng = np.random.default_rng(90 + seed)
    m, n = int(rng.choice([4, 6, 8])), int(rng.choice([8, 12, 16]))
    pe, simd = _divisor(rng, m), _divisor(rng, n)
    w = rng.choice([-1, 1], size=(m, n))
    x = rng.choice([-1, 1], size=(5, n)) if in_shape is None else rng.integers(-8, 8, (5, n))
    got, _, dut = _run(w, x, pe, simd, stall=0.3, seed=seed, in_shape=in_shape, weights_storage="lut")
    assert np.array_equal(got, x @ w.T)
    text = rtlil.convert(dut)
    assert 'attribute \\rom_style "logic"' in text
    plain = rtlil.convert(MVTU(w, pe=pe, simd=simd, in_shape=in_shape))
    assert "rom_style" not in plain


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
