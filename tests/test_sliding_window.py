"""Sliding-window generator in Amaranth's simulator against torch's unfold on the padded
map, frames back to back, random valid/ready stalls; CNV shapes and throughput."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from amaranth.hdl import signed, unsigned

from hw.sliding_window import SlidingWindow
from sim.amaranth_stream import pack, run_stream, unpack


def expected_windows(x, k, s, p, pad_value):
    """x [H, W, C] -> [OH*OW*K*K*C] in the order (oy, ox, ky, kx, c), via torch.unfold."""
    h, w, c = x.shape
    t = torch.tensor(x, dtype=torch.float64).permute(2, 0, 1)[None]          # [1, C, H, W]
    t = F.pad(t, (p, p, p, p), value=float(pad_value))
    cols = F.unfold(t, kernel_size=k, stride=s)                              # [1, C*K*K, L]
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    cols = cols.reshape(c, k, k, oh, ow).permute(3, 4, 1, 2, 0)              # (oy, ox, ky, kx, c)
    return cols.reshape(-1).round().long().numpy()


def run_frames(dut, frames, *, stall=0.0, seed=0, max_cycles=None):
    shape = dut.elem_shape
    simd = dut.simd
    beats = [pack(f.reshape(-1)[b:b + simd], shape.width)
             for f in frames for b in range(0, f.size, simd)]
    n_out = len(frames) * dut.out_beats
    out, cycles = run_stream(dut, beats, n_out, in_stall=stall, out_stall=stall, seed=seed,
                             max_cycles=max_cycles)
    got = np.array([e for b in out for e in unpack(b, shape.width, simd, signed=shape.signed)])
    return got.reshape(len(frames), -1), cycles


def random_case(seed):
    rng = np.random.default_rng(seed)
    while True:
        h, w = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        c = int(rng.choice([1, 2, 3, 4, 6]))
        k, s, p = int(rng.choice([1, 2, 3])), int(rng.choice([1, 2])), int(rng.choice([0, 1]))
        if h + 2 * p >= k and w + 2 * p >= k:
            break
    simd = int(rng.choice([d for d in range(1, c + 1) if c % d == 0]))
    shape, lo, hi, pad_value = [
        (unsigned(1), 0, 1, 0),
        (unsigned(8), 0, 255, int(rng.integers(0, 256))),
        (signed(4), -8, 7, int(rng.integers(-8, 8))),
    ][seed % 3]
    return rng, dict(h=h, w=w, c=c, k=k, s=s, p=p, simd=simd, shape=shape, lo=lo, hi=hi,
                     pad_value=pad_value)


@pytest.mark.parametrize("seed", range(24))
def test_sliding_window_matches_unfold(seed):
    rng, q = random_case(seed)
    rows = None if seed % 4 else q["k"] + 1       # every 4th case: the smallest line buffer
    dut = SlidingWindow(q["shape"], q["h"], q["w"], q["c"], q["k"], stride=q["s"], padding=q["p"],
                        pad_value=q["pad_value"], simd=q["simd"], rows=rows)
    n_frames = 2 + seed % 2
    frames = [rng.integers(q["lo"], q["hi"] + 1, (q["h"], q["w"], q["c"])) for _ in range(n_frames)]
    got, _ = run_frames(dut, frames, stall=0.3, seed=seed)
    for f, x in enumerate(frames):
        assert np.array_equal(got[f], expected_windows(x, q["k"], q["s"], q["p"], q["pad_value"])), \
            f"frame {f} differs: {q}"


def frame_interval(cycles, per_frame, n_frames):
    """Steady-state cycles between the last beats of frames 1 .. n_frames-1 (0-based)."""
    ends = [cycles[(f + 1) * per_frame - 1] for f in range(n_frames)]
    return (ends[-1] - ends[0]) / (n_frames - 1)


def test_cnv_first_layer_and_throughput():
    """CNV conv0: 32x32x3, K=3, S=1, no padding, SIMD=3; three frames without stalls."""
    rng = np.random.default_rng(1)
    dut = SlidingWindow(unsigned(8), 32, 32, 3, 3, stride=1, padding=0, pad_value=0, simd=3)
    assert dut.out_shape == (30, 30, 27)
    assert dut.cycles_per_frame == 30 * 30 * 9
    frames = [rng.integers(0, 256, (32, 32, 3)) for _ in range(3)]
    got, cycles = run_frames(dut, frames, max_cycles=40000)
    for f, x in enumerate(frames):
        assert np.array_equal(got[f], expected_windows(x, 3, 1, 0, 0))
    interval = frame_interval(cycles, dut.out_beats, 3)
    assert abs(interval - dut.cycles_per_frame) <= 0.02 * dut.cycles_per_frame, interval


@pytest.mark.parametrize("h, w, c, k, s, p, simd", [
    (8, 8, 4, 3, 1, 1, 2),      # same padding
    (9, 7, 4, 3, 2, 1, 4),      # stride 2 with padding
    (8, 8, 2, 2, 2, 0, 1),      # reader and writer equally busy
    (8, 6, 2, 1, 2, 0, 2),      # writer-bound: rows skipped entirely
    (5, 5, 8, 3, 1, 0, 8),      # small map (CNV's last convs)
])
def test_shapes_and_steady_state_interval(h, w, c, k, s, p, simd):
    rng = np.random.default_rng(h * 100 + w * 10 + k)
    dut = SlidingWindow(unsigned(1), h, w, c, k, stride=s, padding=p, pad_value=0, simd=simd)
    frames = [rng.integers(0, 2, (h, w, c)) for _ in range(4)]
    got, cycles = run_frames(dut, frames)
    for f, x in enumerate(frames):
        assert np.array_equal(got[f], expected_windows(x, k, s, p, 0))
    interval = frame_interval(cycles, dut.out_beats, 4)
    assert dut.cycles_per_frame <= interval <= dut.cycles_per_frame + 4, interval
    # and the same shape under stalls
    got, _ = run_frames(dut, frames[:2], stall=0.3, seed=h + w)
    for f, x in enumerate(frames[:2]):
        assert np.array_equal(got[f], expected_windows(x, k, s, p, 0))


def test_map_smaller_than_kernel_with_padding():
    rng = np.random.default_rng(5)
    dut = SlidingWindow(unsigned(4), 1, 2, 3, 3, stride=1, padding=1, pad_value=7, simd=3)
    assert dut.out_shape == (1, 2, 27)
    frames = [rng.integers(0, 16, (1, 2, 3)) for _ in range(3)]
    got, _ = run_frames(dut, frames, stall=0.3, seed=5)
    for f, x in enumerate(frames):
        assert np.array_equal(got[f], expected_windows(x, 3, 1, 1, 7))


def test_bad_parameters_rejected():
    with pytest.raises(ValueError, match=r"simd=4 does not divide channels=6"):
        SlidingWindow(unsigned(1), 8, 8, 6, 3, simd=4)
    with pytest.raises(ValueError, match=r"output size .* < 1"):
        SlidingWindow(unsigned(1), 2, 8, 4, 3, padding=0, simd=4)
    with pytest.raises(ValueError, match=r"output size .* < 1"):
        SlidingWindow(unsigned(1), 8, 1, 4, 4, padding=1, simd=4)
    with pytest.raises(ValueError, match=r"stride must be a positive integer"):
        SlidingWindow(unsigned(1), 8, 8, 4, 3, stride=0)
    with pytest.raises(ValueError, match=r"padding must be an integer >= 0"):
        SlidingWindow(unsigned(1), 8, 8, 4, 3, padding=-1)
    with pytest.raises(ValueError, match=r"pad_value=2 does not fit"):
        SlidingWindow(unsigned(1), 8, 8, 4, 3, padding=1, pad_value=2)
    with pytest.raises(ValueError, match=r"rows=3: the line buffer needs at least kernel\+1=4 rows"):
        SlidingWindow(unsigned(1), 8, 8, 4, 3, rows=3)
