"""Stand-alone multi-threshold stage: integers in, low-bit activations out.

Computes, element by element, the QMD ``threshold`` layer: output = number of the
channel's thresholds met (``x >= t``, or ``x <= t`` for channels with direction -1);
with one threshold the output is one bit (1 = +1). Used where a threshold does not
follow an engine, e.g. binarizing uint8 input pixels.

Stream interface
  ``i``: ``LANES`` input integers per beat (element ``k`` of beat ``b`` is flat element
  ``b*LANES + k`` of the channels-last tensor, so its channel is that index mod ``C``).
  ``o``: ``LANES`` outputs per beat, same order. One registered stage with back-pressure.
"""

from amaranth.hdl import Array, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.arith import bits_for, ge_threshold_count, threshold_shape, to_ge_thresholds


class ThresholdUnit(wiring.Component):
    """Per-channel multi-threshold on a stream; see the module docstring.

    Parameters
    ----------
    in_shape : shape of each input integer (e.g. ``unsigned(8)``)
    thresholds, direction : the QMD arrays, ``[C][T]`` and ``[C]``
    lanes : elements per beat; ``C`` must divide ``lanes`` or ``lanes`` must divide ``C``
    in_range : ``(lo, hi)`` of the input values
    """

    def __init__(self, in_shape, thresholds, direction, *, lanes, in_range):
        self.channels = len(thresholds)
        self.n_thresholds = len(thresholds[0])
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"lanes must be a positive integer, got {lanes!r}")
        if self.channels % lanes and lanes % self.channels:
            raise ValueError(f"{self.channels} channels and {lanes} lanes per beat must divide one another")
        self.lanes = lanes
        self.ge, self.invert = to_ge_thresholds(thresholds, direction)
        self.cmp_shape = threshold_shape(self.ge, *in_range)
        self.in_shape = in_shape
        out_elem = unsigned(bits_for(self.n_thresholds))
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(in_shape, lanes))),
            "o": Out(stream.Signature(data.ArrayLayout(out_elem, lanes))),
        })

    def elaborate(self, platform):
        m = Module()
        c, lanes = self.channels, self.lanes
        groups = max(1, c // lanes)        # beats before the channel pattern repeats
        beat = Signal(range(groups))
        if groups > 1:
            with m.If(self.i.valid & self.i.ready):
                m.d.sync += beat.eq(Mux(beat == groups - 1, 0, beat + 1))

        results = []
        for k in range(lanes):
            # channels of lane k over the repeating beat pattern
            chans = [(g * lanes + k) % c for g in range(groups)]
            thr = [Array([Const(self.ge[ch][t], self.cmp_shape) for ch in chans])[beat]
                   for t in range(self.n_thresholds)]
            inv = Array([Const(int(self.invert[ch]), 1) for ch in chans])[beat]
            results.append(ge_threshold_count(self.i.payload[k], thr, inv))

        m.d.comb += self.i.ready.eq(~self.o.valid | self.o.ready)
        with m.If(self.i.ready):
            m.d.sync += self.o.valid.eq(self.i.valid)
            with m.If(self.i.valid):
                m.d.sync += [self.o.payload[k].eq(results[k]) for k in range(lanes)]
        return m

