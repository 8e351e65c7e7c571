"""Uninitialised single-port RAM for weights loaded at run time (iCE40 UltraPlus SPRAM).

:class:`SinglePortRAM` has one address for reads and writes, like the iCE40UP5K's four
SB_SPRAM256KA blocks (16 bits x 16K words each, not initialisable from the bitstream).

Why an explicit primitive: Yosys 0.50's ``synth_ice40 -spram`` does *not* infer SPRAM
from an Amaranth 0.5 ``lib.memory.Memory``, even with one shared address. Amaranth
always emits the memory's (all-zero) initial contents as a ``$meminit_v2`` cell, and
``memory_libmap`` rejects SPRAM for an initialised memory ("does not support
initialization"); without the init it still prefers block RAM by cost (SPRAM cost 4096
vs. 3541 for 52 EBRs on a 32 x 6272 memory) unless the memory carries ``ram_style =
"huge"``. So, elaborated for an iCE40 UltraPlus platform (:func:`has_spram`), the RAM
is a grid of SB_SPRAM256KA instances; for any other platform, or none (simulation,
ECP5), it is a behaviourally identical ``lib.memory`` with one write and one read port
on the same address.

Interface (all synchronous to ``sync``)::

    addr  In(range(depth))   the word address, for reads and writes
    we    In(1)              write ``wdata`` to ``addr`` this cycle
    wdata In(width)
    re    In(1)              read ``addr`` this cycle (ignored while ``we``)
    rdata Out(width)         the word read, from the cycle after ``re``; holds while
                             neither ``re`` nor ``we``; undefined after a write until
                             the next read
"""

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, Signal, unsigned
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

SPRAM_WIDTH = 16
SPRAM_DEPTH = 16384


def has_spram(platform):
    """True when ``platform`` is an iCE40 UltraPlus (SB_SPRAM256KA available)."""
    try:
        from amaranth.vendor import SiliconBluePlatform
    except ImportError:      # pragma: no cover - amaranth without vendor support
        return False
    return isinstance(platform, SiliconBluePlatform) and str(platform.device).upper().startswith("ICE40UP")


def spram_tiles(width, depth):
    """SB_SPRAM256KA blocks for a ``width`` x ``depth`` RAM: ``(columns, rows)``."""
    return -(-width // SPRAM_WIDTH), -(-depth // SPRAM_DEPTH)


class SinglePortRAM(wiring.Component):
    """``depth`` words of ``width`` bits, one address, no initial contents; see the module docstring."""

    def __init__(self, width, depth):
        for what, v in (("width", width), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        self.width, self.depth = width, depth
        super().__init__({
            "addr": In(range(depth)) if depth > 1 else In(1),
            "we": In(1),
            "wdata": In(width),
            "re": In(1),
            "rdata": Out(width),
        })

    def elaborate(self, platform):
        if has_spram(platform):
            return self._spram(platform)
        m = Module()
        m.submodules.mem = mem = memory.Memory(shape=unsigned(self.width), depth=self.depth, init=[])
        wr, rd = mem.write_port(), mem.read_port()
        m.d.comb += [
            wr.addr.eq(self.addr), wr.data.eq(self.wdata), wr.en.eq(self.we),
            rd.addr.eq(self.addr), rd.en.eq(self.re & ~self.we),
            self.rdata.eq(rd.data),
        ]
        return m

    def _spram(self, platform):
        m = Module()
        cols, rows = spram_tiles(self.width, self.depth)
        addr = Signal(14)
        m.d.comb += addr.eq(self.addr[:14])
        row = Signal(range(rows), name="row") if rows > 1 else None   # the row whose data is on rdata
        if row is not None:
            with m.If(self.re & ~self.we):
                m.d.sync += row.eq(self.addr[14:])
        outs = []
        for r in range(rows):
            sel = (self.addr[14:] == r) if rows > 1 else Const(1)
            data = []
            for c in range(cols):
                din, dout = Signal(16, name=f"din_{r}_{c}"), Signal(16, name=f"dout_{r}_{c}")
                m.d.comb += din.eq(self.wdata[c * 16:(c + 1) * 16])
                m.submodules[f"spram_{r}_{c}"] = Instance(
                    "SB_SPRAM256KA",
                    i_ADDRESS=addr, i_DATAIN=din, i_MASKWREN=Const(0b1111, 4), i_WREN=self.we,
                    i_CHIPSELECT=(self.we | self.re) & sel, i_CLOCK=ClockSignal("sync"),
                    i_STANDBY=Const(0, 1), i_SLEEP=Const(0, 1), i_POWEROFF=Const(1, 1),
                    o_DATAOUT=dout)
                data.append(dout)
            outs.append(Cat(*data)[:self.width])
        if row is None:
            m.d.comb += self.rdata.eq(outs[0])
        else:
            with m.Switch(row):
                for r, value in enumerate(outs):
                    with m.Case(r):
                        m.d.comb += self.rdata.eq(value)
        return m
