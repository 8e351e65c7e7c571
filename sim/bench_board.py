"""cocotb bench for the board-level UART core (:class:`boards.top.UartAccelerator`).

A UART model bit-bangs the host's bytes into ``rx`` and decodes ``tx`` back into bytes;
nothing is compared here (:mod:`sim.board` decodes and compares). Configuration comes from
the JSON file named by ``$QNNFAB_BENCH``:

* ``divisor``: clock cycles per bit; ``period_ns``: the clock period,
* ``script``: items sent in order, ``{"bytes": hex}`` back to back, or ``{"idle_bits": n}``,
* ``reply_bytes``: how many bytes to collect from ``tx`` before stopping,
* ``max_ns``: stop waiting for reply bytes at this simulated time,
* ``captured``: where to write ``{"reply": hex, "reply_ns", "sent_ns", "status"}``.

The host side changes ``rx`` half a clock period away from the clock's rising edges and
samples ``tx`` in the middle of each bit, like a real UART: asynchronously to the board.
"""

import json
import os

import cocotb
from cocotb.clock import Clock
from cocotb.simtime import get_sim_time
from cocotb.triggers import ClockCycles, FallingEdge, SimTimeoutError, Timer, with_timeout


@cocotb.test()
async def uart_session(dut):
    with open(os.environ["QNNFAB_BENCH"]) as f:
        cfg = json.load(f)
    period = cfg["period_ns"]
    bit_ns = cfg["divisor"] * period
    Clock(dut.clk, period, unit="ns").start()
    dut.rst.value = 1
    dut.rx.value = 1
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 4)
    await FallingEdge(dut.clk)

    sent_ns = []        # per script item: [start, end]

    async def host_tx():
        for item in cfg["script"]:
            start = get_sim_time("ns")
            if "idle_bits" in item:
                await Timer(item["idle_bits"] * bit_ns, unit="ns")
            for byte in bytes.fromhex(item.get("bytes", "")):
                for level in [0] + [(byte >> k) & 1 for k in range(8)] + [1]:
                    dut.rx.value = level
                    await Timer(bit_ns, unit="ns")
            sent_ns.append([start, get_sim_time("ns")])

    cocotb.start_soon(host_tx())
    reply, reply_ns = bytearray(), []
    deadline = cfg["max_ns"]
    while len(reply) < cfg["reply_bytes"]:
        if int(dut.tx.value):
            try:
                await with_timeout(FallingEdge(dut.tx), max(1, deadline - get_sim_time("ns")), "ns")
            except SimTimeoutError:
                break                      # sim.board reports the missing bytes
        t0 = get_sim_time("ns")
        await Timer(bit_ns // 2, unit="ns")
        assert int(dut.tx.value) == 0, f"start bit at {t0} ns shorter than half a bit"
        byte = 0
        for k in range(8):
            await Timer(bit_ns, unit="ns")
            byte |= int(dut.tx.value) << k
        await Timer(bit_ns, unit="ns")
        assert int(dut.tx.value) == 1, f"stop bit of the byte starting at {t0} ns is low"
        reply.append(byte)
        reply_ns.append(t0)
    await Timer(4 * bit_ns, unit="ns")
    status = {"frames": int(dut.frames.value), "errors": int(dut.errors.value), "busy": int(dut.busy.value),
              "loaded": int(dut.loaded.value)}
    with open(cfg["captured"], "w") as f:
        json.dump({"reply": reply.hex(), "reply_ns": reply_ns, "sent_ns": sent_ns, "status": status}, f)
