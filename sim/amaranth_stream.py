"""Drive a one-input, one-output stream component in Amaranth's simulator.

Used by the unit tests of every engine: pushes a list of input beats through ``dut.i``
and collects ``n_out`` beats from ``dut.o``, with optional random valid/ready stalls on
both sides, and reports the beats and the cycle each output beat was taken. Extra input
streams (e.g. an engine's weight ``load`` stream) are driven alongside as :class:`Feed`.
"""

import random
from dataclasses import dataclass, field

from amaranth.hdl import Elaboratable, Module, Signal
from amaranth.sim import Simulator


def pack(elems, width):
    """Elements (ints, two's complement for negatives) -> one payload integer, element 0 lowest."""
    mask = (1 << width) - 1
    word = 0
    for k, e in enumerate(elems):
        word |= (int(e) & mask) << (k * width)
    return word


def unpack(word, width, count, signed=False):
    """Inverse of :func:`pack`."""
    mask = (1 << width) - 1
    out = []
    for k in range(count):
        v = (word >> (k * width)) & mask
        if signed and v >> (width - 1):
            v -= 1 << width
        out.append(v)
    return out


class _WithClock(Elaboratable):
    """Ensures a ``sync`` domain exists, so purely combinational stages simulate too."""

    def __init__(self, dut):
        self.dut = dut

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = self.dut
        tick = Signal()
        m.d.sync += tick.eq(~tick)
        return m


@dataclass
class Feed:
    """An extra input stream: ``beats`` (ints) pushed into the stream port ``port`` from
    cycle ``start`` on, holding ``valid`` low with probability ``stall`` per cycle. After
    the run, ``cycles`` holds the cycle in which each beat was taken (the same count as
    :func:`run_stream`'s output cycles)."""

    port: object
    beats: list
    start: int = 0
    stall: float = 0.0
    cycles: list = field(default_factory=list)


def run_stream(dut, in_beats, n_out, *, in_stall=0.0, out_stall=0.0, seed=0, max_cycles=None, feeds=()):
    """Simulate ``dut``; returns ``(out_beats, out_cycles)`` (payloads as ints).

    ``in_stall``/``out_stall`` are the probabilities of holding ``valid``/``ready`` low
    on a cycle. Fails if fewer than ``n_out`` beats appear, or if some input beat is not
    accepted, within ``max_cycles``. ``feeds``: extra input streams (:class:`Feed`).
    """
    rng = random.Random(seed)
    out, cycles = [], []
    max_cycles = max_cycles or 50 * (len(in_beats) + n_out) + 2000
    i_payload, o_payload = dut.i.payload, dut.o.payload
    i_payload = getattr(i_payload, "as_value", lambda: i_payload)()
    o_payload = getattr(o_payload, "as_value", lambda: o_payload)()

    async def producer(ctx):
        waited = 0
        for k, beat in enumerate(in_beats):
            while rng.random() < in_stall:
                await ctx.tick()
            ctx.set(dut.i.valid, 1)
            ctx.set(i_payload, beat)
            while not (await ctx.tick().sample(dut.i.ready))[2]:
                waited += 1
                if waited > max_cycles:
                    raise AssertionError(f"input beat {k} of {len(in_beats)} not accepted after {waited} cycles")
            ctx.set(dut.i.valid, 0)

    async def consumer(ctx):
        cycle = 0
        while len(out) < n_out:
            ready = int(rng.random() >= out_stall)
            ctx.set(dut.o.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid, o_payload)
            cycle += 1
            if ready and valid:
                out.append(payload)
                cycles.append(cycle)
            if cycle > max_cycles:
                raise AssertionError(f"only {len(out)} of {n_out} output beats after {cycle} cycles")
        ctx.set(dut.o.ready, 0)

    def feeder(feed, k):
        frng = random.Random(seed * 1000 + k + 1)
        payload = getattr(feed.port.payload, "as_value", lambda: feed.port.payload)()

        async def run(ctx):
            cycle = 0
            for _ in range(feed.start):
                await ctx.tick()
                cycle += 1
            for j, beat in enumerate(feed.beats):
                while frng.random() < feed.stall:
                    await ctx.tick()
                    cycle += 1
                ctx.set(feed.port.valid, 1)
                ctx.set(payload, beat)
                while True:
                    _, _, ready = await ctx.tick().sample(feed.port.ready)
                    cycle += 1
                    if ready:
                        feed.cycles.append(cycle)
                        break
                    if cycle > max_cycles:
                        raise AssertionError(f"feed beat {j} of {len(feed.beats)} not accepted after {cycle} cycles")
                ctx.set(feed.port.valid, 0)
        return run

    sim = Simulator(_WithClock(dut))
    sim.add_clock(1e-8)
    for k, feed in enumerate(feeds):
        sim.add_testbench(feeder(feed, k), background=True)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    for feed in feeds:
        if len(feed.cycles) != len(feed.beats):
            raise AssertionError(f"only {len(feed.cycles)} of {len(feed.beats)} feed beats were taken")
    return out, cycles
