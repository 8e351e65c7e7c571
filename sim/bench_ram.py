"""cocotb bench for :class:`hw.spram.SinglePortRAM` (runs inside Verilator).

Configuration (JSON named by ``$QNNFAB_BENCH``): ``ops``, one ``[we, re, addr, wdata]`` per
clock cycle, and ``captured``, where the ``rdata`` seen after each cycle's clock edge is
written. Nothing is compared here (the test compares with a Python model).
"""

import json
import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly, RisingEdge


@cocotb.test()
async def ram_ops(dut):
    with open(os.environ["QNNFAB_BENCH"]) as f:
        cfg = json.load(f)
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    dut.we.value = dut.re.value = 0
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0
    seen = []
    for we, re, addr, wdata in cfg["ops"]:
        await FallingEdge(dut.clk)
        dut.we.value, dut.re.value, dut.addr.value, dut.wdata.value = we, re, addr, wdata
        await RisingEdge(dut.clk)
        await ReadOnly()
        seen.append(int(dut.rdata.value))
    with open(cfg["captured"], "w") as f:
        json.dump(seen, f)
