"""qnnfab: streaming dataflow accelerators for quantized neural networks.

The flow: ``models`` (QAT, export, QMD, integer reference) -> ``hw`` (Amaranth
generators) -> ``sim`` (cocotb + Verilator, bit-exact against the reference) ->
``boards`` (Yosys / nextpnr). This package holds the command line and the pieces
shared by all of them (errors, paths, tool discovery, reports).
"""

__version__ = "0.1.0"
