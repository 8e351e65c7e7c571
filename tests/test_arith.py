"""Exactness of the threshold conversion and the popcount tree (property-based)."""

from amaranth.back import rtlil
from amaranth.hdl import Module, Signal
from amaranth.sim import Simulator
from hypothesis import given, settings
from hypothesis import strategies as st

from hw.arith import mul_const, popcount, to_ge_thresholds


@given(n=st.integers(1, 300), t=st.integers(-302, 302), up=st.booleans(),
       scale=st.integers(1, 4), offset=st.integers(-300, 300))
def test_ge_form_is_exact_for_every_value(n, t, up, scale, offset):
    """x = scale*h + offset: 'x >= t' / 'x <= t' equal the hardware's '(h >= ge) ^ invert'."""
    (ge,), (inv,) = to_ge_thresholds([[t]], [1 if up else -1], scale=scale, offset=offset)
    for h in range(0, n + 1):
        x = scale * h + offset
        spec = x >= t if up else x <= t
        assert spec == ((h >= ge[0]) != inv)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=70))
def test_popcount_tree(bits):
    value = Signal(len(bits))
    count = Signal(8)
    word = sum(int(b) << i for i, b in enumerate(bits))

    async def bench(ctx):
        ctx.set(value, word)
        assert ctx.get(count) == sum(bits)

    m = Module()
    m.d.comb += count.eq(popcount(value))
    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()


@settings(max_examples=25, deadline=None)
@given(x=st.integers(0, 255), k=st.integers(0, 300))
def test_mul_const_is_a_product_without_a_multiplier(x, k):
    value = Signal(8)
    prod = Signal(18)

    async def bench(ctx):
        ctx.set(value, x)
        assert ctx.get(prod) == x * k

    m = Module()
    m.d.comb += prod.eq(mul_const(value, k))
    assert "$mul" not in rtlil.convert(m, ports=[value, prod])
    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()


def test_window_and_pool_addresses_use_no_multiplier():
    """Row bases and column offsets with constants that are not powers of two (30 words per
    row, 3 channel blocks) must not become $mul cells (Yosys would map them to DSPs)."""
    from amaranth.hdl import unsigned

    from hw.maxpool import MaxPool
    from hw.sliding_window import SlidingWindow
    window = SlidingWindow(unsigned(1), 10, 10, 6, 3, stride=1, padding=0, pad_value=0, simd=2)
    pool = MaxPool(unsigned(1), 10, 10, 6, 2, lanes=2, binary=True)
    for dut in (window, pool):
        assert "$mul" not in rtlil.convert(dut)
