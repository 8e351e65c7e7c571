"""UART receiver and transmitter in Amaranth's simulator: loopback under random
back-pressure, the receiver against a bit-banged line (baud off by up to 2%, glitches),
framing errors, overruns, and parameter validation."""

import random

import pytest
from amaranth.hdl import Elaboratable, Module
from amaranth.sim import Simulator

from boards.uart import UARTReceiver, UARTTransmitter, uart_divisor
from qnnfab.errors import QnnfabError


class _Loopback(Elaboratable):
    def __init__(self, divisor):
        self.tx, self.rx = UARTTransmitter(divisor), UARTReceiver(divisor)

    def elaborate(self, platform):
        m = Module()
        m.submodules.tx, m.submodules.rx = self.tx, self.rx
        m.d.comb += self.rx.rx.eq(self.tx.tx)
        return m


def _simulate(top, *testbenches, monitors=()):
    sim = Simulator(top)
    sim.add_clock(1e-8)
    for tb in testbenches:
        sim.add_testbench(tb)
    for tb in monitors:
        sim.add_testbench(tb, background=True)
    sim.run()


def _collector(rx, n, out, rng, ready_p, max_cycles):
    """Take ``n`` bytes from ``rx.o`` with ``ready`` high with probability ``ready_p``."""
    async def consumer(ctx):
        for cycle in range(max_cycles):
            ready = int(rng.random() < ready_p)
            ctx.set(rx.o.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(rx.o.valid, rx.o.payload)
            if ready and valid:
                out.append(payload)
                if len(out) == n:
                    ctx.set(rx.o.ready, 0)
                    return
        raise AssertionError(f"only {len(out)} of {n} bytes received in {max_cycles} cycles")
    return consumer


def _strobe_counter(rx, counts):
    async def monitor(ctx):
        async for _, _, fe, ov in ctx.tick().sample(rx.framing_error, rx.overrun):
            counts["framing_error"] += fe
            counts["overrun"] += ov
    return monitor


@pytest.mark.parametrize("seed", range(6))
def test_loopback_random_bytes_divisors_and_backpressure(seed):
    rng = random.Random(seed)
    divisor = rng.choice([4, 5, 6, 7]) if seed < 3 else rng.randint(8, 40)
    data = [rng.randrange(256) for _ in range(24)] + [0x00, 0xFF, 0x55, 0xAA]
    gaps = seed % 2 == 1                  # odd seeds: random idle time between bytes
    top = _Loopback(divisor)
    got, accepted = [], []

    async def producer(ctx):
        cycle = 0
        for byte in data:
            if gaps:
                k = rng.randrange(3 * divisor)
                if k:
                    await ctx.tick().repeat(k)
                    cycle += k
            ctx.set(top.tx.i.valid, 1)
            ctx.set(top.tx.i.payload, byte)
            while True:
                _, _, ready = await ctx.tick().sample(top.tx.i.ready)
                cycle += 1
                if ready:
                    accepted.append(cycle)
                    break
            ctx.set(top.tx.i.valid, 0)

    counts = {"framing_error": 0, "overrun": 0}
    _simulate(top, producer, _collector(top.rx, len(data), got, rng, 0.4, 12 * divisor * len(data) + 100),
              monitors=[_strobe_counter(top.rx, counts)])
    assert got == data
    assert counts == {"framing_error": 0, "overrun": 0}
    if not gaps:     # back to back: one byte every 10 bit times exactly
        assert {b - a for a, b in zip(accepted, accepted[1:])} == {10 * divisor}


def _line_driver(rx, frames, divisor, rng, *, skew=0.0, glitches=False, done=None):
    """Bit-bang ``frames`` (lists of 10 line levels: start, 8 data LSB first, stop) onto
    ``rx`` with a bit period of ``divisor * (1 + skew)`` cycles, idle gaps in between."""
    period = divisor * (1 + skew)

    async def driver(ctx):
        ctx.set(rx, 1)
        await ctx.tick().repeat(3 * divisor)
        for levels in frames:
            if glitches and rng.random() < 0.5:   # a one-cycle low pulse on the idle line is no start bit
                ctx.set(rx, 0)
                await ctx.tick()
                ctx.set(rx, 1)
                await ctx.tick().repeat(divisor)
            idle = rng.randrange(0, 2 * divisor)
            if idle:
                await ctx.tick().repeat(idle)
            t = 0.0
            for level in levels:
                ctx.set(rx, level)
                n = round(t + period) - round(t)
                t += period
                await ctx.tick().repeat(n)
            ctx.set(rx, 1)
        await ctx.tick().repeat(4 * divisor)
        if done is not None:
            done.append(True)
    return driver


def _levels(byte, stop=1):
    return [0] + [(byte >> k) & 1 for k in range(8)] + [stop]


@pytest.mark.parametrize("seed", range(6))
def test_receiver_against_bitbanged_line(seed):
    rng = random.Random(100 + seed)
    divisor = [4, 5, 7, 16, 33, 104][seed]
    skew = rng.choice([-1, 1]) * (0.02 if divisor >= 16 else 0.01)
    data = [rng.randrange(256) for _ in range(20)]
    dut = UARTReceiver(divisor)
    got, counts = [], {"framing_error": 0, "overrun": 0}
    _simulate(dut, _line_driver(dut.rx, [_levels(b) for b in data], divisor, rng, skew=skew, glitches=True),
              _collector(dut, len(data), got, rng, 0.5, 14 * divisor * len(data) + 200),
              monitors=[_strobe_counter(dut, counts)])
    assert got == data
    assert counts == {"framing_error": 0, "overrun": 0}


@pytest.mark.parametrize("divisor", [4, 9])
def test_framing_error_drops_the_byte_and_is_counted(divisor):
    rng = random.Random(divisor)
    dut = UARTReceiver(divisor)
    frames = [_levels(0x3C), _levels(0xA5, stop=0) + [0] * 12, _levels(0x81), _levels(0x00, stop=0),
              _levels(0x7E)]
    got, counts, done = [], {"framing_error": 0, "overrun": 0}, []
    errors = []

    async def consumer(ctx):
        ctx.set(dut.o.ready, 1)
        while not done:
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid, dut.o.payload)
            if valid:
                got.append(payload)
        errors.append(ctx.get(dut.errors))

    _simulate(dut, _line_driver(dut.rx, frames, divisor, rng, done=done), consumer,
              monitors=[_strobe_counter(dut, counts)])
    assert got == [0x3C, 0x81, 0x7E]
    assert counts == {"framing_error": 2, "overrun": 0}
    assert errors == [2]


def test_overrun_keeps_the_first_byte_and_counts():
    divisor = 6
    dut = UARTReceiver(divisor)
    got, counts, done = [], {"framing_error": 0, "overrun": 0}, []

    async def consumer(ctx):
        ctx.set(dut.o.ready, 0)
        while not done:                      # nobody takes the bytes while three arrive
            await ctx.tick()
        ctx.set(dut.o.ready, 1)
        for _ in range(4):
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid, dut.o.payload)
            if valid:
                got.append(payload)
        assert ctx.get(dut.errors) == 2

    _simulate(dut, _line_driver(dut.rx, [_levels(b) for b in (0x11, 0x22, 0x33)], divisor, random.Random(0),
                                done=done), consumer, monitors=[_strobe_counter(dut, counts)])
    assert got == [0x11]
    assert counts == {"framing_error": 0, "overrun": 2}


@pytest.mark.parametrize("cls", [UARTReceiver, UARTTransmitter])
@pytest.mark.parametrize("bad", [3, 0, -8, 4.0, True, "16"])
def test_divisor_is_validated(cls, bad):
    with pytest.raises(ValueError, match=r"divisor must be an integer >= 4 clock cycles per bit"):
        cls(bad)


def test_uart_divisor_from_clock_and_baud():
    assert uart_divisor(12e6, 115200) == 104          # iCEBreaker, 0.16% off
    assert uart_divisor(25e6, 115200) == 217          # ULX3S
    assert uart_divisor(48e6, 3_000_000) == 16        # OrangeCrab
    with pytest.raises(QnnfabError, match=r"^baud: 4000000 baud is unreachable at 12 MHz: .* at least 4"):
        uart_divisor(12e6, 4_000_000)
    with pytest.raises(QnnfabError, match=r"nearest divisor 9 gives 1333333 baud \(-4.8%"):
        uart_divisor(12e6, 1_400_000)
    with pytest.raises(QnnfabError, match=r"^baud: baud must be a positive number"):
        uart_divisor(12e6, 0)
