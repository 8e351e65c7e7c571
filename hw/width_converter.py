"""Stream width converter: joins a stage emitting ``IN`` elements per beat to one
consuming ``OUT`` per beat, where one of the two divides the other.

Element order is preserved: the elements of the output beats, read in order, are the
elements of the input beats, read in order (element 0 of a beat first).

* ``OUT = k*IN`` (gather): ``k`` input beats make one output beat; accepts one beat per
  cycle, including the cycle in which a completed beat leaves.
* ``IN = k*OUT`` (scatter): one input beat leaves as ``k`` output beats, one per cycle;
  the next input beat is accepted in the cycle the last piece leaves.

Stream interface: ``i`` carries ``ArrayLayout(elem, IN)``, ``o`` carries ``ArrayLayout(elem, OUT)``.
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out


class StreamWidthConverter(wiring.Component):
    def __init__(self, elem_shape, in_count, out_count):
        for what, v in (("in_count", in_count), ("out_count", out_count)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        if in_count % out_count and out_count % in_count:
            raise ValueError(f"{in_count} and {out_count} elements per beat must divide one another")
        self.elem_shape, self.in_count, self.out_count = elem_shape, in_count, out_count
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(elem_shape, in_count))),
            "o": Out(stream.Signature(data.ArrayLayout(elem_shape, out_count))),
        })

    def elaborate(self, platform):
        m = Module()
        if self.in_count == self.out_count:
            wiring.connect(m, wiring.flipped(self.i), wiring.flipped(self.o))
        elif self.out_count > self.in_count:
            self._gather(m, self.out_count // self.in_count)
        else:
            self._scatter(m, self.in_count // self.out_count)
        return m

    def _gather(self, m, k):
        n = self.in_count
        held = Signal(data.ArrayLayout(self.elem_shape, n * (k - 1)))   # the first k-1 beats
        count = Signal(range(k))
        last = count == k - 1
        m.d.comb += self.i.ready.eq(~last | ~self.o.valid | self.o.ready)
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            with m.If(last):
                m.d.sync += [count.eq(0), self.o.valid.eq(1)]
                m.d.sync += [self.o.payload[e].eq(held[e]) for e in range(n * (k - 1))]
                m.d.sync += [self.o.payload[n * (k - 1) + e].eq(self.i.payload[e]) for e in range(n)]
            with m.Else():
                m.d.sync += count.eq(count + 1)
                with m.Switch(count):
                    for c in range(k - 1):
                        with m.Case(c):
                            m.d.sync += [held[c * n + e].eq(self.i.payload[e]) for e in range(n)]

    def _scatter(self, m, k):
        n = self.out_count
        word = Signal(data.ArrayLayout(self.elem_shape, n * k))
        full = Signal()
        piece = Signal(range(k))
        last = piece == k - 1
        m.d.comb += self.o.valid.eq(full)
        with m.Switch(piece):
            for c in range(k):
                with m.Case(c):
                    m.d.comb += [self.o.payload[e].eq(word[c * n + e]) for e in range(n)]
        m.d.comb += self.i.ready.eq(~full | (self.o.ready & last))
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += piece.eq(Mux(last, 0, piece + 1))
            with m.If(last):
                m.d.sync += full.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [word.eq(self.i.payload), full.eq(1), piece.eq(0)]
