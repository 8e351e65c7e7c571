"""Output stage: collects a frame's integer logits and emits them with the argmax class.

Computes ``cls = the first index of the maximum logit`` (ties go to the lower index,
as the QMD spec's ``argmax`` says) and passes the logits through unchanged.

Stream interface
  ``i``: ``LANES`` signed logits per beat; a frame = ``M/LANES`` beats in class order.
  ``o``: one beat per frame, ``{"cls": class index, "logits": M signed logits}``.
The frame buffer and the output register are separate, so the next frame is collected
while the previous result waits to be taken.
"""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.arith import bits_for


def result_layout(classes, logit_shape):
    return data.StructLayout({"cls": unsigned(bits_for(classes - 1)),
                              "logits": data.ArrayLayout(logit_shape, classes)})


class ArgmaxOutput(wiring.Component):
    def __init__(self, logit_shape, classes, *, lanes):
        if not isinstance(lanes, int) or lanes < 1 or classes % lanes:
            raise ValueError(f"{classes} classes are not divisible by {lanes!r} lanes per beat")
        self.logit_shape, self.classes, self.lanes = logit_shape, classes, lanes
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(logit_shape, lanes))),
            "o": Out(stream.Signature(result_layout(classes, logit_shape))),
        })

    def elaborate(self, platform):
        m = Module()
        lanes, beats = self.lanes, self.classes // self.lanes
        buf = Signal(data.ArrayLayout(self.logit_shape, self.classes - lanes))
        best_val = Signal(self.logit_shape)
        best_idx = Signal(range(self.classes))
        beat = Signal(range(beats))
        last = beat == beats - 1

        # running maximum through this beat's lanes; strict '>' keeps the first maximum
        val, idx = best_val, best_idx
        for k in range(lanes):
            x = self.i.payload[k]
            here = beat * lanes + k
            take = ((beat == 0) | (x > val)) if k == 0 else (x > val)
            val, idx = Mux(take, x, val), Mux(take, here, idx)

        m.d.comb += self.i.ready.eq(~last | ~self.o.valid | self.o.ready)
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [best_val.eq(val), best_idx.eq(idx)]
            with m.If(last):
                m.d.sync += [beat.eq(0), self.o.valid.eq(1), self.o.payload.cls.eq(idx)]
                m.d.sync += [self.o.payload.logits[e].eq(buf[e]) for e in range(self.classes - lanes)]
                m.d.sync += [self.o.payload.logits[self.classes - lanes + k].eq(self.i.payload[k])
                             for k in range(lanes)]
            with m.Else():
                m.d.sync += beat.eq(beat + 1)
                with m.Switch(beat):
                    for b in range(beats - 1):
                        with m.Case(b):
                            m.d.sync += [buf[b * lanes + k].eq(self.i.payload[k]) for k in range(lanes)]
        return m
