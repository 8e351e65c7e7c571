"""Board-level RTL simulation: the UART core's Verilog in Verilator under cocotb.

``simulate_board(qmd, folding, script, ...)`` generates :class:`boards.top.UartAccelerator`
as Verilog, builds and runs it with the same Verilator runner as :mod:`sim.rtl`, lets
:mod:`sim.bench_board` bit-bang ``script`` (the host's bytes, from
:mod:`boards.protocol`) into ``rx`` and collect ``tx``, and decodes the replies with the
host's own code. The caller compares them with the reference. With ``platform`` (e.g. the
bare iCE40UP5K of :meth:`boards.targets.Device.bare_platform`) the core is elaborated as
for that device, SB_SPRAM256KA weight RAMs included, and simulated with Yosys' models of
those primitives (:mod:`sim.primitives`).
"""

import json
from pathlib import Path

from boards.top import UartAccelerator
from qnnfab.errors import QnnfabError
from sim.primitives import primitive_models
from sim.rtl import _run_cocotb

TOP = "uart_accelerator"
PERIOD_NS = 10       # simulated clock period


def simulate_board(qmd, folding, script, reply_bytes, work_dir, *, divisor=4, timeout_bits=64, max_ns=None,
                   platform=None):
    """Run ``script`` (items: ``bytes`` sent back to back, or an ``int`` of idle bit times)
    through the core; return ``(replies, captured)`` where ``replies`` are
    :class:`boards.protocol.Reply` and ``captured`` has the raw ``reply`` hex, the
    times each script item was sent (``sent_ns``), each reply byte's start (``reply_ns``)
    the final ``status`` outputs (``frames``, ``errors``, ``busy``, ``loaded``) and the
    ``primitive_models`` simulated."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    from amaranth.back import verilog
    core = UartAccelerator(qmd, folding, divisor, timeout_bits=timeout_bits)
    vfile = work_dir / f"{TOP}.v"
    vfile.write_text(verilog.convert(core, name=TOP, platform=platform, emit_src=False))
    models = primitive_models(vfile.read_text(), work_dir)
    items = [{"idle_bits": x} if isinstance(x, int) else {"bytes": bytes(x).hex()} for x in script]
    bits = sum(x if isinstance(x, int) else 10 * len(x) for x in script) + 10 * reply_bytes
    captured = work_dir / "captured.json"
    if captured.exists():
        captured.unlink()
    cfg = {"divisor": divisor, "period_ns": PERIOD_NS, "script": items, "reply_bytes": reply_bytes, "captured": str(captured),
           "max_ns": max_ns or 2 * bits * divisor * PERIOD_NS + 10 * core.frame_cycles * PERIOD_NS + 100_000}
    (work_dir / "bench.json").write_text(json.dumps(cfg, indent=1))
    _run_cocotb(vfile, work_dir, top=TOP, test_module="sim.bench_board", extra_sources=models)
    got_models = [m.stem for m in models]
    if not captured.exists():
        raise QnnfabError("the board simulation ended without writing its results; see cocotb.log",
                          where=str(work_dir))
    got = json.loads(captured.read_text())
    raw = bytes.fromhex(got["reply"])
    if len(raw) != reply_bytes:
        raise QnnfabError(f"the board sent {len(raw)} of the {reply_bytes} reply bytes expected: {raw.hex()}",
                          where=str(work_dir))
    got["primitive_models"] = got_models
    return core.format.decode_replies(raw), got
