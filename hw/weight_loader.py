"""Distributes a byte stream of weights over the run-time loaded engines, in order.

The byte image (:func:`hw.network.weight_image`) is, for each loaded engine in network
order, its weight words in memory order, each word as ``ceil(width/8)`` little-endian
bytes (bits above ``width`` in the last byte are ignored).

Stream interface
  ``i``: ``In``, one byte per beat.
  ``o<k>``: ``Out``, engine ``k``'s words (``width_k`` bits per beat, ``words_k`` beats).
  ``reload``: ``In(1)``, a one-cycle pulse: drop any partial word and start again at
  engine 0's first word.

``i`` is back-pressured while a completed word waits for its engine, and once every word
has been delivered (until ``reload``).
"""

from amaranth.hdl import Cat, Module, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out


def word_bytes(width):
    """Bytes per word of ``width`` bits in the byte image."""
    return (width + 7) // 8


class WeightLoader(wiring.Component):
    """``layers``: a list of ``(width, words)``, one per loaded engine, in load order."""

    def __init__(self, layers):
        layers = [tuple(l) for l in layers]
        if not layers:
            raise ValueError("WeightLoader needs at least one layer")
        for width, words in layers:
            for what, v in (("width", width), ("words", words)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"layer {what} must be a positive integer, got {v!r}")
        self.layers = layers
        members = {"i": In(stream.Signature(unsigned(8))), "reload": In(1)}
        for k, (width, _) in enumerate(layers):
            members[f"o{k}"] = Out(stream.Signature(unsigned(width)))
        super().__init__(members)

    @property
    def total_bytes(self):
        return sum(word_bytes(w) * n for w, n in self.layers)

    def elaborate(self, platform):
        m = Module()
        n = len(self.layers)
        nbytes = [word_bytes(w) for w, _ in self.layers]
        maxb = max(nbytes)
        sel = Signal(range(n + 1))                  # the engine being loaded; n = done
        nbyte = Signal(range(maxb))
        nword = Signal(range(max(words for _, words in self.layers)))
        word = Signal(8 * maxb)                     # bytes shift in at the top: little-endian
        full = Signal()                             # a complete word waits for its engine

        m.d.comb += self.i.ready.eq(~full & (sel != n))
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += word.eq(Cat(word[8:], self.i.payload) if maxb > 1 else self.i.payload)
            last_byte = Signal()
            with m.Switch(sel):
                for k, b in enumerate(nbytes):
                    with m.Case(k):
                        m.d.comb += last_byte.eq(nbyte == b - 1)
            with m.If(last_byte):
                m.d.sync += [nbyte.eq(0), full.eq(1)]
            with m.Else():
                m.d.sync += nbyte.eq(nbyte + 1)

        for k, (width, words) in enumerate(self.layers):
            o = getattr(self, f"o{k}")
            lsb = 8 * (maxb - nbytes[k])            # where this engine's first byte ends up
            m.d.comb += [o.valid.eq(full & (sel == k)), o.payload.eq(word[lsb:lsb + width])]
            with m.If(o.valid & o.ready):
                m.d.sync += full.eq(0)
                with m.If(nword == words - 1):
                    m.d.sync += [nword.eq(0), sel.eq(k + 1)]
                with m.Else():
                    m.d.sync += nword.eq(nword + 1)

        with m.If(self.reload):
            m.d.sync += [sel.eq(0), nbyte.eq(0), nword.eq(0), full.eq(0)]
        return m
