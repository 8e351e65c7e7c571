"""Threshold unit, width converter and argmax output in Amaranth's simulator, against numpy,
with random valid/ready stalls (nothing lost, duplicated or reordered)."""

import numpy as np
import pytest
from amaranth.hdl import signed, unsigned

from hw.argmax_output import ArgmaxOutput
from hw.threshold_unit import ThresholdUnit
from hw.width_converter import StreamWidthConverter
from sim.amaranth_stream import pack, run_stream, unpack


@pytest.mark.parametrize("seed", range(6))
def test_threshold_unit_matches_spec(seed):
    rng = np.random.default_rng(seed)
    channels = int(rng.choice([1, 2, 3, 4]))
    lanes = int(rng.choice([d * channels for d in (1, 2)] + [c for c in (1, 2) if channels % c == 0]))
    n_thr = int(rng.choice([1, 3]))
    thr = rng.integers(-1, 257, (channels, n_thr))
    direction = rng.choice([-1, 1], channels)
    thr = np.where(direction[:, None] > 0, np.sort(thr, 1), -np.sort(-thr, 1))
    frames, elems = 3, channels * 4
    x = rng.integers(0, 256, (frames, elems))
    x[0, :2] = thr[0, 0]                      # equality with a threshold
    dut = ThresholdUnit(unsigned(8), thr, direction, lanes=lanes, in_range=(0, 255))
    beats = [pack(row[b * lanes:(b + 1) * lanes], 8) for row in x for b in range(elems // lanes)]
    out, _ = run_stream(dut, beats, len(beats), in_stall=0.3, out_stall=0.3, seed=seed)
    width = dut.o.payload.shape().elem_shape.width
    got = np.array([e for b in out for e in unpack(b, width, lanes)]).reshape(frames, elems)
    ch = np.arange(elems) % channels
    xe = x[:, :, None]
    expect = np.where(direction[ch][None, :, None] > 0, xe >= thr[ch][None], xe <= thr[ch][None]).sum(-1)
    assert np.array_equal(got, expect)


@pytest.mark.parametrize("in_count, out_count", [(1, 4), (4, 1), (2, 6), (6, 3), (5, 5), (3, 12)])
@pytest.mark.parametrize("stall", [0.0, 0.4])
def test_width_converter_preserves_order(in_count, out_count, stall):
    rng = np.random.default_rng(in_count * 31 + out_count)
    total = np.lcm(in_count, out_count) * 5
    elems = rng.integers(0, 8, total)
    dut = StreamWidthConverter(unsigned(3), in_count, out_count)
    beats = [pack(elems[i:i + in_count], 3) for i in range(0, total, in_count)]
    out, cycles = run_stream(dut, beats, total // out_count, in_stall=stall, out_stall=stall)
    got = [e for b in out for e in unpack(b, 3, out_count)]
    assert got == elems.tolist()
    if stall == 0.0:   # one beat per cycle on the wider side's partner: no bubbles
        gaps = np.diff(cycles)
        assert gaps.max() == max(1, out_count // in_count)


def test_width_converter_rejects_non_dividing_widths():
    with pytest.raises(ValueError, match="must divide one another"):
        StreamWidthConverter(unsigned(1), 4, 6)


@pytest.mark.parametrize("classes, lanes", [(10, 1), (10, 2), (10, 5), (10, 10), (6, 3)])
def test_argmax_output_first_maximum_and_logits(classes, lanes):
    rng = np.random.default_rng(classes * lanes)
    frames = 12
    logits = rng.integers(-6, 7, (frames, classes))       # small range: many ties
    logits[0] = 3                                          # all equal: class 0
    logits[1, -1] = logits[1].max() + 1                    # maximum in the last lane
    dut = ArgmaxOutput(signed(5), classes, lanes=lanes)
    beats = [pack(f[b * lanes:(b + 1) * lanes], 5) for f in logits for b in range(classes // lanes)]
    out, _ = run_stream(dut, beats, frames, in_stall=0.3, out_stall=0.3)
    cls_w = dut.o.payload.cls.shape().width
    got_cls = [w & ((1 << cls_w) - 1) for w in out]
    got_logits = [unpack(w >> cls_w, 5, classes, signed=True) for w in out]
    assert got_cls == np.argmax(logits, axis=1).tolist()
    assert got_logits == logits.tolist()


@pytest.mark.parametrize("in_stall, out_stall", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.5), (0.4, 0.4)])
def test_register_slice_passes_every_beat_in_order_at_full_rate(in_stall, out_stall):
    from hw.register_slice import StreamRegisterSlice
    rng = np.random.default_rng(int(in_stall * 10 + out_stall * 100))
    beats = rng.integers(0, 1 << 12, 200).tolist()
    out, cycles = run_stream(StreamRegisterSlice(unsigned(12)), beats, len(beats),
                             in_stall=in_stall, out_stall=out_stall, seed=3)
    assert out == beats
    if in_stall == out_stall == 0.0:      # one beat a cycle: no bubbles
        assert np.diff(cycles).max() == 1
