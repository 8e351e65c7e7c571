"""Zero-skip ternary MVTU in Amaranth's simulator against numpy: random sparsity patterns
(all-zero rows, an all-zero layer, fully dense), every input kind, thresholds, TTQ scales,
random valid/ready stalls; the compressed schedule and its exact cycle counts."""

import numpy as np
import pytest
from amaranth.hdl import signed, unsigned

from hw.ternary_mvtu import TernaryMVTU, ternary_schedule
from models.synthetic import random_ternary
from sim.amaranth_stream import pack, run_stream, unpack

# input kinds: (raw shape, (scale, offset) of the code, value range)
INPUTS = {
    "binary": (unsigned(1), (2, -1), (-1, 1)),
    "ternary": (unsigned(2), (1, -1), (-1, 1)),
    "uint2": (unsigned(2), (1, 0), (0, 3)),
    "uint8": (unsigned(8), (1, 0), (0, 255)),
    "int8": (signed(8), (1, 0), (-128, 127)),
}


def _divisor(rng, n):
    return int(rng.choice([d for d in range(1, n + 1) if n % d == 0]))


def _values(rng, kind, shape):
    lo, hi = INPUTS[kind][2]
    v = rng.integers(lo, hi + 1, shape)
    return np.where(v == 0, 1, v) if kind == "binary" else v


def _reference(x, wq, thr, direction):
    dot = x @ wq.T
    if thr is None:
        return dot
    met = np.where(direction[None, :, None] > 0, dot[:, :, None] >= thr[None], dot[:, :, None] <= thr[None])
    return met.sum(-1)


def _random_thresholds(rng, x, wq, count):
    """Sorted thresholds near the dot products that occur (some exactly on one), both directions."""
    dots = x @ wq.T
    m = wq.shape[0]
    thr = np.sort(dots[rng.integers(0, len(x), (m, count)), np.arange(m)[:, None]]
                  + rng.integers(-2, 3, (m, count)), axis=1)
    direction = rng.choice([-1, 1], m)
    thr[direction < 0] = thr[direction < 0, ::-1]
    return thr, direction


def _run(w, x, pe, simd, kind, thr=None, direction=None, scales=None, stall=0.0, seed=0, lane_fifo_depth=None):
    shape, code, rng_ = INPUTS[kind]
    pos, neg = scales if scales is not None else (None, None)
    dut = TernaryMVTU(w, pe=pe, simd=simd, thresholds=thr, direction=direction, pos_scale=pos, neg_scale=neg,
                      in_shape=shape, in_code=code, in_range=rng_, lane_fifo_depth=lane_fifo_depth)
    raw = (x - code[1]) // code[0]
    n = w.shape[1]
    beats = [pack(v[s * simd:(s + 1) * simd], shape.width) for v in raw for s in range(n // simd)]
    out, cycles = run_stream(dut, beats, len(x) * (w.shape[0] // pe), in_stall=stall, out_stall=stall, seed=seed)
    e = dut.out_elem
    got = np.array([v for b in out for v in unpack(b, e.width, pe, e.signed)]).reshape(len(x), w.shape[0])
    return got, cycles, dut


def _wq(w, scales):
    if scales is None:
        return w
    pos, neg = scales
    return np.where(w > 0, pos[:, None], np.where(w < 0, -neg[:, None], 0))


@pytest.mark.parametrize("seed", range(16))
def test_random_sparsity_inputs_thresholds_and_stalls(seed):
    rng = np.random.default_rng(300 + seed)
    kind = list(INPUTS)[seed % len(INPUTS)]
    m, n = int(rng.integers(1, 13)), int(rng.integers(1, 37))
    pe, simd = _divisor(rng, m), _divisor(rng, n)
    density = float(rng.choice([0.05, 0.2, 0.4, 0.7, 1.0]))
    w = random_ternary(rng, m, n, density, zero_rows=int(rng.integers(0, 2)))
    scales = (rng.integers(1, 9, m), rng.integers(1, 9, m)) if seed % 3 == 1 else None
    x = _values(rng, kind, (int(rng.integers(2, 5)), n))
    count = int(rng.choice([0, 1, 2, 3]))
    thr, direction = _random_thresholds(rng, x, _wq(w, scales), count) if count else (None, None)
    got, _, _ = _run(w, x, pe, simd, kind, thr, direction, scales, stall=0.3, seed=seed)
    assert np.array_equal(got, _reference(x, _wq(w, scales), thr, direction))


@pytest.mark.parametrize("kind", ["ternary", "uint8"])
def test_all_zero_layer(kind):
    """No weight at all: every lane holds one empty slot per neuron; dot = 0 everywhere."""
    rng = np.random.default_rng(1)
    m, n, pe, simd = 6, 12, 3, 4
    w = np.zeros((m, n), dtype=int)
    x = _values(rng, kind, (4, n))
    thr = np.array([[-1, 0], [0, 1], [1, 2], [0, 0], [2, -1], [1, 1]])
    direction = np.array([1, 1, 1, -1, -1, -1])
    thr[direction < 0] = np.sort(thr[direction < 0], axis=1)[:, ::-1]
    got, _, dut = _run(w, x, pe, simd, kind, thr, direction, stall=0.2, seed=1)
    assert np.array_equal(got, _reference(x, w, thr, direction))
    s = dut.sched
    assert s.nonzeros == 0 and (s.lane_steps == m // pe).all()
    assert s.cycles_per_vector == max(m // pe, n // simd)
    logits, _, _ = _run(w, x, pe, simd, kind)
    assert not logits.any()


def test_fully_dense_matches_and_takes_the_dense_cycles():
    rng = np.random.default_rng(2)
    m, n, pe, simd = 8, 24, 2, 6
    w = rng.choice([-1, 1], (m, n))
    x = _values(rng, "ternary", (6, n))
    got, cycles, dut = _run(w, x, pe, simd, "ternary")
    assert np.array_equal(got, x @ w.T)
    assert dut.sched.density == 1.0
    assert dut.sched.cycles_per_vector == dut.sched.dense_cycles_per_vector == (m // pe) * (n // simd)
    per_vector = np.diff(cycles[::m // pe])[1:]
    assert per_vector.tolist() == [dut.sched.cycles_per_vector] * (len(x) - 2)


@pytest.mark.parametrize("seed", range(4))
def test_throughput_follows_the_nonzero_count(seed):
    """Back to back vectors without stalls: the steady interval is the analytic
    max(busiest lane, SF), far below the dense NF*SF on a sparse layer."""
    rng = np.random.default_rng(40 + seed)
    m, n, pe, simd = [(16, 48, 4, 4), (12, 60, 3, 5), (8, 64, 2, 8), (16, 32, 8, 2)][seed]
    w = random_ternary(rng, m, n, 0.3, zero_rows=1)
    x = _values(rng, "uint2", (8, n))
    got, cycles, dut = _run(w, x, pe, simd, "uint2")
    assert np.array_equal(got, x @ w.T)
    per_vector = np.diff(cycles[::m // pe])[2:]
    s = dut.sched
    assert per_vector.tolist() == [s.cycles_per_vector] * len(per_vector), (per_vector, s.lane_steps)
    assert s.cycles_per_vector < 0.7 * s.dense_cycles_per_vector


def test_lanes_and_pes_run_independently():
    """One PE's neurons all sit in its first neuron fold, the other's in its last: the
    FIFOs absorb the skew, so the interval is still the busiest lane's count."""
    n, simd = 32, 4
    w = np.zeros((8, n), dtype=int)
    w[0] = 1                    # PE 0 (rows 0, 2, 4, 6): heavy first neuron
    w[7] = -1                   # PE 1 (rows 1, 3, 5, 7): heavy last neuron
    rng = np.random.default_rng(5)
    x = _values(rng, "ternary", (6, n))
    got, cycles, dut = _run(w, x, 2, simd, "ternary")
    assert np.array_equal(got, x @ w.T)
    assert dut.sched.cycles_per_vector == 8 + 3          # 8 slots for the heavy neuron, 1 for each other
    assert np.diff(cycles[::4])[2:].tolist() == [11] * 3


def _skewed_lanes():
    """PE 1 x SIMD 2, 16 neurons of 8 beats: lane 0 is full for neurons 0-7, lane 1 for 8-15."""
    w = np.zeros((16, 16), dtype=int)
    w[:8, 0::2] = 1
    w[8:, 1::2] = -1
    return w


def test_lane_fifos_are_as_shallow_as_costs_no_cycle():
    """Random layers need only a few partial-sum entries per lane (the model's choice, far below
    2*NF + 2), and the model of unbounded FIFOs gives each PE's busiest lane."""
    for seed, (m, n, pe, simd) in enumerate([(64, 576, 8, 8), (256, 2304, 2, 8), (512, 256, 16, 16)]):
        s = ternary_schedule(random_ternary(np.random.default_rng(seed), m, n, 0.4), pe, simd)
        assert s.pe_intervals(None).tolist() == s.lane_steps.max(axis=1).tolist()
        d = s.lane_fifo_depth()
        assert 4 <= d <= 8 < 2 * s.nf + 2
        assert (s.pe_intervals(d - 2) <= s.pe_intervals(None)).all()


def test_skewed_lanes_get_a_deeper_fifo_and_the_model_predicts_the_rtl():
    """Lane 0's work sits in the first half of the neurons, lane 1's in the second: lane 0 must
    run several neurons ahead to keep the 72-cycle busiest-lane rate. The default depth does
    (measured in the RTL); shallower FIFOs cost exactly the cycles the max-plus model predicts."""
    w = _skewed_lanes()
    s = ternary_schedule(w, 1, 2)
    assert s.cycles_per_vector == 72 and s.dense_cycles_per_vector == 128
    x = _values(np.random.default_rng(8), "ternary", (6, 16))
    got, cycles, dut = _run(w, x, 1, 2, "ternary")
    assert np.array_equal(got, x @ w.T) and dut.lane_fifo_depth == s.lane_fifo_depth() == 6
    assert np.diff(cycles[::16])[2:].tolist() == [72] * 3
    for depth, predicted in ((1, 116), (2, 100), (3, 84), (4, 72)):
        assert s.pe_intervals(depth)[0] == predicted
        got, cycles, _ = _run(w, x, 1, 2, "ternary", lane_fifo_depth=depth)
        assert np.array_equal(got, x @ w.T)
        assert np.diff(cycles[::16])[2:].tolist() == [predicted] * 3, depth


def test_every_lane_reads_its_own_input_bank_copy():
    """One write and one read port per bank memory: Yosys maps that to LUT RAM, where one bank
    read by PE ports was kept in flip-flops with a multiplexer per port (docs/architecture.md)."""
    w = random_ternary(np.random.default_rng(4), 6, 12, 0.5)
    dut = TernaryMVTU(w, pe=3, simd=4, in_shape=unsigned(2), in_code=(1, -1), in_range=(-1, 1))
    m = dut.elaborate(None)
    for p in range(3):
        for j in range(4):
            bank = m.submodules[f"bank_{p}_{j}"]
            assert (len(bank.read_ports), len(bank.write_ports), bank.depth) == (1, 1, 2 * 3)


def test_schedule_stores_exactly_the_nonzeros():
    rng = np.random.default_rng(6)
    m, n, pe, simd = 12, 40, 3, 5
    w = random_ternary(rng, m, n, 0.35, zero_rows=2)
    s = ternary_schedule(w, pe, simd, gap_bits=3)                    # SF = 8: full-width gaps
    back = np.zeros_like(w)
    for (p, j), nz in s.nz.items():
        f = np.concatenate([[0], np.cumsum(s.last[p, j])[:-1]])       # neuron fold of each slot
        rows, cols = f[nz] * pe + p, s.addr[p, j][nz] * simd + j
        back[rows, cols] = np.where(s.neg[p, j][nz], -1, 1)
        assert s.last[p, j].sum() == m // pe                           # every neuron ends once per lane
    assert np.array_equal(back, w)
    assert sum(int(v.sum()) for v in s.nz.values()) == s.nonzeros == int((w != 0).sum())
    counts = (w.reshape(m // pe, pe, n // simd, simd) != 0).sum(axis=2)     # [f, p, j]
    assert np.array_equal(s.lane_steps, np.maximum(1, counts).sum(axis=0))   # no escapes
    # the stored gaps rebuild the addresses: a running sum restarted at every neuron
    for key in s.nz:
        start = np.append(True, s.last[key][:-1])
        run, prev = [], 0
        for st, g in zip(start, s.gap[key]):
            prev = (0 if st else prev) + int(g)
            run.append(prev)
        assert np.array_equal(np.array(run)[s.nz[key]], s.addr[key][s.nz[key]])
        assert (s.gap[key] < (1 << s.gap_bits)).all()


@pytest.mark.parametrize("gap_bits", [1, 2])
def test_narrow_gaps_use_escape_slots(gap_bits):
    """Forced narrow address gaps: long gaps become escape slots, which cost cycles but not
    correctness (the engine is checked against numpy under stalls)."""
    rng = np.random.default_rng(9 + gap_bits)
    m, n, pe, simd = 6, 60, 2, 3
    w = random_ternary(rng, m, n, 0.15)
    s = ternary_schedule(w, pe, simd, gap_bits=gap_bits)
    free = ternary_schedule(w, pe, simd, gap_bits=5)
    assert s.lane_steps.sum() > free.lane_steps.sum()
    assert sum(int(v.sum()) for v in s.nz.values()) == s.nonzeros
    x = _values(rng, "ternary", (3, n))
    dut = TernaryMVTU(w, pe=pe, simd=simd, in_shape=unsigned(2), in_code=(1, -1), in_range=(-1, 1),
                      gap_bits=gap_bits)
    assert np.array_equal(dut.sched.lane_steps, s.lane_steps)
    raw = x + 1
    beats = [pack(v[k * simd:(k + 1) * simd], 2) for v in raw for k in range(n // simd)]
    out, _ = run_stream(dut, beats, len(x) * (m // pe), in_stall=0.3, out_stall=0.3, seed=gap_bits)
    e = dut.out_elem
    got = np.array([v for b in out for v in unpack(b, e.width, pe, e.signed)]).reshape(len(x), m)
    assert np.array_equal(got, x @ w.T)


def test_default_gap_width_saves_memory_without_costing_cycles():
    w = random_ternary(np.random.default_rng(3), 64, 576, 0.4)
    s = ternary_schedule(w, 8, 8)
    full = ternary_schedule(w, 8, 8, gap_bits=s.addr_bits)
    assert s.gap_bits < s.addr_bits and s.schedule_bits <= 0.8 * full.schedule_bits
    assert s.cycles_per_vector == full.cycles_per_vector


@pytest.mark.parametrize("m, n, pe, simd", [
    (64, 576, 8, 8), (128, 1152, 16, 8), (256, 2304, 8, 16), (512, 256, 16, 16), (10, 512, 1, 8),
])
@pytest.mark.parametrize("density", [0.25, 0.5, 0.9])
def test_zero_skip_cycles_within_density_plus_ten_percent_of_dense(m, n, pe, simd, density):
    """Unstructured random sparsity at CNV-like sizes: cycles <= (density + 0.10) x dense."""
    w = random_ternary(np.random.default_rng(m + n + pe), m, n, density)
    s = ternary_schedule(w, pe, simd)
    assert s.cycles_per_vector <= (s.density + 0.10) * s.dense_cycles_per_vector


@pytest.mark.parametrize("bad, message", [
    (dict(weights=np.full((4, 4), 2)), "weights must be a 2-D array of -1/0/\\+1"),
    (dict(pe=3), "output channels: 4 is not divisible by PE=3"),
    (dict(simd=0), "SIMD must be a positive integer, got 0"),
    (dict(thresholds=np.zeros((4, 1))), "thresholds need 4 comparison directions"),
    (dict(thresholds=np.zeros((3, 1)), direction=np.ones(4)), "thresholds must have shape \\[4, T\\], got \\[3, 1\\]"),
    (dict(pos_scale=np.ones(4)), "pos_scale and neg_scale must be given together"),
    (dict(pos_scale=np.ones(4), neg_scale=np.zeros(4)), "neg_scale must be 4 positive integers"),
    (dict(in_code=(0, 1)), "in_code must be a pair"),
    (dict(in_range=(3, 1)), "in_range must be \\(lo, hi\\) with lo <= hi"),
    (dict(gap_bits=9), "gap_bits must be an integer in 1..1, got 9"),
    (dict(lane_fifo_depth=0), "lane_fifo_depth must be a positive integer, got 0"),
])
def test_bad_parameters_are_rejected(bad, message):
    args = dict(weights=np.eye(4, dtype=int), pe=2, simd=2)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        TernaryMVTU(args.pop("weights"), **args)
