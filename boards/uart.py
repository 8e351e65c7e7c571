"""8N1 UART receiver and transmitter with ``lib.stream`` byte interfaces.

Both run in the ``sync`` domain at ``divisor`` clock cycles per bit (``divisor >= 4``;
a board computes it as ``round(f_clk / baud)``, see :func:`uart_divisor`). The line idles
high; a frame is one low start bit, 8 data bits LSB first, one high stop bit.
"""

from amaranth.hdl import Cat, Const, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

from qnnfab.errors import QnnfabError

MIN_DIVISOR = 4
BAUD_TOLERANCE = 0.02       # the largest relative baud error a board top accepts


def check_divisor(divisor):
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < MIN_DIVISOR:
        raise ValueError(f"divisor must be an integer >= {MIN_DIVISOR} clock cycles per bit, not {divisor!r}")


def uart_divisor(clk_hz, baud, where="baud"):
    """Clock cycles per bit for ``baud`` at ``clk_hz``: ``round(clk_hz / baud)``; a one-line
    :class:`QnnfabError` naming ``where`` if it is below 4 or misses the baud by more than 2%."""
    if isinstance(baud, bool) or not isinstance(baud, (int, float)) or not baud > 0:
        raise QnnfabError(f"baud must be a positive number, not {baud!r}", where=where)
    divisor = round(clk_hz / baud)
    if divisor < MIN_DIVISOR:
        raise QnnfabError(f"{baud} baud is unreachable at {clk_hz / 1e6:g} MHz: the UART needs at least "
                          f"{MIN_DIVISOR} clock cycles per bit (at most {clk_hz / MIN_DIVISOR:.0f} baud)", where=where)
    actual = clk_hz / divisor
    if abs(actual - baud) > BAUD_TOLERANCE * baud:
        raise QnnfabError(f"{baud} baud is unreachable at {clk_hz / 1e6:g} MHz: the nearest divisor {divisor} "
                          f"gives {actual:.0f} baud ({100 * (actual - baud) / baud:+.1f}%, more than "
                          f"{100 * BAUD_TOLERANCE:.0f}% off)", where=where)
    return divisor


class UARTReceiver(wiring.Component):
    """8N1 receiver.

    ``rx``: the serial line (asynchronous; synchronised here by two flip-flops).
    ``o``: stream of received bytes. Its register holds one byte; if the next byte is
    complete before ``o`` took the previous one, the new byte is dropped (``overrun``).
    ``framing_error``: one-cycle strobe when a stop bit reads low; that byte is dropped
    and the receiver waits for the line to return high before looking for a start bit.
    ``overrun``: one-cycle strobe when a byte is dropped because ``o`` was not ready.
    ``errors``: framing errors plus overruns so far, saturating at 255.

    Bits are sampled in their middle: half a bit after the falling edge of the start bit
    (which must still read low there, or it was a glitch), then every ``divisor`` cycles.
    """

    def __init__(self, divisor):
        check_divisor(divisor)
        self.divisor = divisor
        super().__init__({
            "rx": In(1, init=1),
            "o": Out(stream.Signature(8)),
            "framing_error": Out(1),
            "overrun": Out(1),
            "errors": Out(8),
        })

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        rx = Signal(init=1)
        m.submodules.sync_rx = FFSynchronizer(self.rx, rx, init=1, reset_less=False, stages=2)

        timer = Signal(range(d))
        bit = Signal(range(8))
        shreg = Signal(8)
        tick = timer == 0
        with m.If(~tick):
            m.d.sync += timer.eq(timer - 1)

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        bad = self.framing_error | self.overrun
        with m.If(bad & (self.errors != 255)):
            m.d.sync += self.errors.eq(self.errors + 1)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    m.d.sync += timer.eq(d // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(tick):
                    with m.If(rx):
                        m.next = "IDLE"                     # a glitch, not a start bit
                    with m.Else():
                        m.d.sync += [timer.eq(d - 1), bit.eq(0)]
                        m.next = "DATA"
            with m.State("DATA"):
                with m.If(tick):
                    m.d.sync += [shreg.eq(Cat(shreg[1:], rx)), timer.eq(d - 1), bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(tick):
                    with m.If(rx):
                        with m.If(self.o.valid & ~self.o.ready):
                            m.d.comb += self.overrun.eq(1)
                        with m.Else():
                            m.d.sync += [self.o.payload.eq(shreg), self.o.valid.eq(1)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.comb += self.framing_error.eq(1)
                        m.next = "BREAK"
            with m.State("BREAK"):
                with m.If(rx):
                    m.next = "IDLE"
        return m


class UARTTransmitter(wiring.Component):
    """8N1 transmitter.

    ``i``: stream of bytes to send; ``ready`` is high while the line is idle and in the
    last cycle of a stop bit, so bytes go out back to back at exactly ``10 * divisor``
    cycles each.
    ``tx``: the serial line, driven straight from a flip-flop (idle high).
    """

    def __init__(self, divisor):
        check_divisor(divisor)
        self.divisor = divisor
        super().__init__({"i": In(stream.Signature(8)), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        shreg = Signal(10, init=0x3FF)       # stop, data[7:0], start: bit 0 is on the line
        timer = Signal(range(d))
        bits = Signal(range(11))             # bits still to send, counting the current one
        last_cycle = (bits == 1) & (timer == 0)      # of the stop bit: the next start bit may follow
        m.d.comb += [self.tx.eq(shreg[0]), self.i.ready.eq((bits == 0) | last_cycle)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [shreg.eq(Cat(Const(0, 1), self.i.payload, Const(1, 1))), bits.eq(10), timer.eq(d - 1)]
        with m.Elif(bits != 0):
            with m.If(timer == 0):
                m.d.sync += [shreg.eq(Cat(shreg[1:], Const(1, 1))), bits.eq(bits - 1), timer.eq(d - 1)]
            with m.Else():
                m.d.sync += timer.eq(timer - 1)
        return m
