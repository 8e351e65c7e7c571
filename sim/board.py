"""Board-level RTL simulation: the UART core's Verilog in Verilator under cocotb.

``simulate_board(qmd, folding, script, ...)`` generates :class:`boards.top.UartAccelerator`
as Verilog, builds and runs it with the same Verilator runner as :mod:`sim.rtl`, lets
:mod:`sim.bench_board` bit-bang ``script`` (the host's bytes, from
:mod:`boards.protocol`) into ``rx`` and collect ``tx``, and decodes the replies with the
host's own code. The caller compares them with the reference.
"""

import json
from pathlib import Path

from boards.top import UartAccelerator
from qnnfab.errors import QnnfabError
from sim.rtl import _run_cocotb, write_verilog

TOP = "uart_accelerator"
PERIOD_NS = 10       # simulated clock period


def simulate_board(qmd, folding, script, reply_bytes, work_dir, *, divisor=4, timeout_bits=64, max_ns=None):
    """Run ``script`` (items: ``bytes`` sent back to back, or an ``int`` of idle bit times)
    through the core; return ``(replies, captured)`` where ``replies`` are
    :class:`boards.protocol.Reply` and ``captured`` has the raw ``reply`` hex, the
    times each script item was sent (``sent_ns``), each reply byte's start (``reply_ns``)
    and the final ``status`` outputs (``frames``, ``errors``, ``busy``)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    core = UartAccelerator(qmd, folding, divisor, timeout_bits=timeout_bits)
    vfile = write_verilog(core, work_dir / f"{TOP}.v", name=TOP)
    items = [{"idle_bits": x} if isinstance(x, int) else {"bytes": bytes(x).hex()} for x in script]
    bits = sum(x if isinstance(x, int) else 10 * len(x) for x in script) + 10 * reply_bytes
    captured = work_dir / "captured.json"
    if captured.exists():
        captured.unlink()
    cfg = {"divisor": divisor, "period_ns": PERIOD_NS, "script": items, "reply_bytes": reply_bytes, "captured": str(captured),
           "max_ns": max_ns or 2 * bits * divisor * PERIOD_NS + 10 * core.frame_cycles * PERIOD_NS + 100_000}
    (work_dir / "bench.json").write_text(json.dumps(cfg, indent=1))
    _run_cocotb(vfile, work_dir, top=TOP, test_module="sim.bench_board")
    if not captured.exists():
        raise QnnfabError("the board simulation ended without writing its results; see cocotb.log",
                          where=str(work_dir))
    got = json.loads(captured.read_text())
    raw = bytes.fromhex(got["reply"])
    if len(raw) != reply_bytes:
        raise QnnfabError(f"the board sent {len(raw)} of the {reply_bytes} reply bytes expected: {raw.hex()}",
                          where=str(work_dir))
    return core.format.decode_replies(raw), got
