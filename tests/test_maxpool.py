"""Streaming max-pool in Amaranth's simulator against torch's max_pool2d (floor mode),
binary (bits as -1/+1) and unsigned, frames back to back, random valid/ready stalls."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from amaranth.hdl import signed, unsigned

from hw.maxpool import MaxPool
from sim.amaranth_stream import pack, run_stream, unpack


def expected_pool(x, k, binary):
    """x [H, W, C] (bits if binary) -> [H//K, W//K, C] via torch.max_pool2d."""
    v = np.where(x > 0, 1, -1) if binary else x
    t = torch.tensor(v, dtype=torch.float64).permute(2, 0, 1)[None]        # [1, C, H, W]
    y = F.max_pool2d(t, kernel_size=k)[0].permute(1, 2, 0).round().long().numpy()
    return (y > 0).astype(np.int64) if binary else y


def run_frames(dut, frames, *, stall=0.0, seed=0, max_cycles=None):
    shape, lanes = dut.elem_shape, dut.lanes
    beats = [pack(f.reshape(-1)[b:b + lanes], shape.width)
             for f in frames for b in range(0, f.size, lanes)]
    out, cycles = run_stream(dut, beats, len(frames) * dut.out_beats, in_stall=stall,
                             out_stall=stall, seed=seed, max_cycles=max_cycles)
    got = np.array([e for b in out for e in unpack(b, shape.width, lanes, signed=shape.signed)])
    return got.reshape(len(frames), *dut.out_shape), cycles


@pytest.mark.parametrize("seed", range(24))
def test_maxpool_matches_torch(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    c, k = int(rng.integers(1, 7)), int(rng.choice([2, 3]))
    if h < k or w < k:
        h, w = max(h, k), max(w, k)
    lanes = int(rng.choice([d for d in range(1, c + 1) if c % d == 0]))
    kind = seed % 3
    if kind == 0:
        shape, binary, lo, hi = unsigned(1), True, 0, 1
    elif kind == 1:
        shape, binary, lo, hi = unsigned(4), False, 0, 15
    else:
        shape, binary, lo, hi = signed(4), False, -8, 7
    dut = MaxPool(shape, h, w, c, k, lanes=lanes, binary=binary)
    frames = [rng.integers(lo, hi + 1, (h, w, c)) for _ in range(2)]
    got, _ = run_frames(dut, frames, stall=0.3, seed=seed)
    for f, x in enumerate(frames):
        assert np.array_equal(got[f], expected_pool(x, k, binary)), \
            f"frame {f}: H={h} W={w} C={c} K={k} lanes={lanes} {shape}"


@pytest.mark.parametrize("h, w, c, k, lanes", [
    (6, 6, 2, 2, 1),       # consecutive beats read-modify-write the same word
    (7, 5, 3, 2, 3),       # trailing row and column dropped
    (9, 8, 4, 3, 2),       # trailing columns only, K=3
])
def test_back_to_back_frames_at_full_rate(h, w, c, k, lanes):
    rng = np.random.default_rng(h * w)
    dut = MaxPool(unsigned(4), h, w, c, k, lanes=lanes)
    frames = [rng.integers(0, 16, (h, w, c)) for _ in range(3)]
    got, cycles = run_frames(dut, frames)
    for f, x in enumerate(frames):
        assert np.array_equal(got[f], expected_pool(x, k, False))
    per = dut.out_beats
    ends = [cycles[(f + 1) * per - 1] for f in range(3)]
    assert (ends[2] - ends[0]) / 2 == dut.cycles_per_frame


def test_cnv_pool_binary_throughput():
    """CNV pool after conv1: 28x28x64 bits, K=2, 64 lanes; two frames without stalls."""
    rng = np.random.default_rng(3)
    dut = MaxPool(unsigned(1), 28, 28, 64, 2, lanes=64, binary=True)
    assert dut.out_shape == (14, 14, 64) and dut.cycles_per_frame == 28 * 28
    frames = [rng.integers(0, 2, (28, 28, 64)) for _ in range(2)]
    frames[0][::2, ::2, :] = 0            # force some all-(-1) windows ...
    frames[0][1::2, :, :] = 0
    frames[0][:, 1::2, :5] = 0
    frames[0][:4, :, :] = 0               # ... including whole output rows
    got, cycles = run_frames(dut, frames)
    for f, x in enumerate(frames):
        assert np.array_equal(got[f], expected_pool(x, 2, True))
    assert (got[0][:2] == 0).all() and got[0].any()
    per = dut.out_beats
    assert cycles[2 * per - 1] - cycles[per - 1] == dut.cycles_per_frame


def test_bad_parameters_rejected():
    with pytest.raises(ValueError, match=r"stride=1 != kernel=2: only non-overlapping"):
        MaxPool(unsigned(1), 8, 8, 4, 2, lanes=4, binary=True, stride=1)
    with pytest.raises(ValueError, match=r"lanes=4 does not divide channels=6"):
        MaxPool(unsigned(1), 8, 8, 6, 2, lanes=4, binary=True)
    with pytest.raises(ValueError, match=r"output size 0x2 < 1"):
        MaxPool(unsigned(4), 2, 8, 4, 3, lanes=4)
    with pytest.raises(ValueError, match=r"binary max-pool needs 1-bit unsigned elements"):
        MaxPool(unsigned(4), 8, 8, 4, 2, lanes=4, binary=True)
    with pytest.raises(ValueError, match=r"kernel must be a positive integer"):
        MaxPool(unsigned(4), 8, 8, 4, 0, lanes=4)
