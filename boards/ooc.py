"""A pin-light harness for place-and-route of the bare accelerator on an iCE40.

nextpnr-ice40 has no out-of-context mode, and the accelerator's stream ports are far wider
than the 39 I/O pins of an iCE40UP5K-SG48, so an out-of-context iCE40 run wraps the
accelerator in :class:`PinHarness`: the ``pixels`` payload is a shift register loaded one
bit per cycle from pin ``din``, ``pixels.valid`` and ``result.ready`` come from pins, and
every output bit (``pixels.ready``, ``result.valid`` and the result payload) is XOR-reduced
into one registered pin ``dout``. Nothing can be optimized away, and the overhead (one
flip-flop per pixel-beat bit, an XOR tree over the result) is small and the same for
every folding. An accelerator with run-time loaded weights also gets pins
``weights_valid`` and ``weights_reload``; its ``weights`` byte is the low byte of the
same shift register, and ``weights.ready`` and ``weights_loaded`` join the XOR. ECP5 runs
use nextpnr's ``--out-of-context`` mode on the accelerator itself.
"""

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out


class PinHarness(wiring.Component):
    """Wraps ``acc`` (an :class:`hw.network.Accelerator`) behind four (six with run-time
    weights) one-bit pins."""

    def __init__(self, acc):
        self.acc = acc
        members = {"din": In(1), "pixels_valid": In(1), "result_ready": In(1), "dout": Out(1)}
        self.has_weights = bool(acc.loaded_stages)
        if self.has_weights:
            members.update({"weights_valid": In(1), "weights_reload": In(1)})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.accelerator = acc = self.acc
        width = len(acc.pixels.payload.as_value())
        shift = Signal(width)
        m.d.sync += shift.eq(Cat(self.din, shift[:-1]))
        m.d.comb += [
            acc.pixels.payload.eq(shift),
            acc.pixels.valid.eq(self.pixels_valid),
            acc.result.ready.eq(self.result_ready),
        ]
        observed = [acc.pixels.ready, acc.result.valid, acc.result.payload.as_value()]
        if self.has_weights:
            m.d.comb += [acc.weights.payload.eq(shift[:8]), acc.weights.valid.eq(self.weights_valid),
                         acc.weights_reload.eq(self.weights_reload)]
            observed += [acc.weights.ready, acc.weights_loaded]
        m.d.sync += self.dout.eq(Cat(*observed).xor())
        return m
