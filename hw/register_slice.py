"""Stream register slice: a two-entry skid buffer that cuts both handshake directions.

``o.valid``, ``o.payload`` and ``i.ready`` all come straight from registers, so no
combinational path crosses the slice: not the payload/valid path downstream, and, more
important in a dataflow pipeline, not the ``ready`` path upstream (without slices, a stall
ripples combinationally from the last stage to the first and into every engine's pipeline
enable). Throughput stays one beat per cycle; the slice adds one cycle of latency and
2 x payload-width flip-flops.

Stream interface: ``i`` and ``o`` carry the same payload shape; beats leave in order.
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out


class StreamRegisterSlice(wiring.Component):
    def __init__(self, payload_shape):
        self.payload_shape = payload_shape
        super().__init__({"i": In(stream.Signature(payload_shape)), "o": Out(stream.Signature(payload_shape))})

    def elaborate(self, platform):
        m = Module()
        main_valid, skid_valid = Signal(), Signal()
        main = Signal(self.payload_shape)
        skid = Signal(self.payload_shape)
        m.d.comb += [self.o.valid.eq(main_valid), self.o.payload.eq(main), self.i.ready.eq(~skid_valid)]
        with m.If(self.o.ready | ~main_valid):          # the output register is free this cycle
            with m.If(skid_valid):                      # the held beat goes first
                m.d.sync += [main.eq(skid), main_valid.eq(1), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [main.eq(self.i.payload), main_valid.eq(self.i.valid)]
        with m.Elif(self.i.valid & ~skid_valid):        # output held: park the arriving beat
            m.d.sync += [skid.eq(self.i.payload), skid_valid.eq(1)]
        return m
