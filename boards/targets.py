"""Synthesis targets: boards (an amaranth-boards platform, a UART top and a bitstream)
and out-of-context devices (the bare accelerator, no pins), with each device's budget.

``TARGETS[name]`` is a :class:`Target`. Device budgets are the vendor data sheet figures
(iCE40 UltraPlus family data sheet FPGA-DS-02008; ECP5 family data sheet FPGA-DS-02012):
LUT4s, flip-flops, block RAM bits (iCE40 EBR 4 kbit blocks and 256 kbit SPRAMs; ECP5
EBR 18 kbit blocks) and DSP blocks.
"""

import dataclasses
from dataclasses import dataclass

from qnnfab.errors import QnnfabError


@dataclass(frozen=True)
class Device:
    """An FPGA and what it offers."""

    name: str            # as users write it: up5k, 25f, 85f
    family: str          # ice40 | ecp5
    part: str            # vendor part number
    package: str         # nextpnr package name
    speed: str           # ECP5 speed grade (nextpnr --speed); unused for iCE40
    luts: int
    ffs: int
    ebr_blocks: int
    ebr_bits: int        # bits per EBR block
    spram_blocks: int = 0
    spram_bits: int = 0  # bits per SPRAM block
    dsp: int = 0

    @property
    def bram_bits(self):
        """Block RAM capacity (EBR and SPRAM) in bits."""
        return self.ebr_blocks * self.ebr_bits + self.spram_blocks * self.spram_bits

    @property
    def nextpnr(self):
        """The nextpnr executable name (YoWASP build)."""
        return f"yowasp-nextpnr-{self.family}"

    def bare_platform(self):
        """An Amaranth platform object for the bare device, passed to ``elaborate`` when the
        accelerator is converted out of context so that engines use the device's primitives
        (SB_SPRAM256KA for run-time loaded weights on an iCE40 UltraPlus); ``None`` where
        plain ``lib.memory`` maps by itself (ECP5). It has no pins and is never built."""
        if self.family != "ice40":
            return None
        from amaranth.vendor import SiliconBluePlatform

        class BareICE40(SiliconBluePlatform):
            device = self.part
            package = self.package.upper()
            resources, connectors = [], []
        return BareICE40()

    def nextpnr_device_args(self):
        if self.family == "ice40":
            return [f"--{self.name}", "--package", self.package]
        return [f"--{self.name[:-1]}k", "--package", self.package, "--speed", self.speed]


DEVICES = {
    "up5k": Device("up5k", "ice40", "iCE40UP5K", "sg48", "", luts=5280, ffs=5280, ebr_blocks=30,
                   ebr_bits=4096, spram_blocks=4, spram_bits=262144, dsp=8),
    "25f": Device("25f", "ecp5", "LFE5U-25F", "CSFBGA285", "8", luts=24288, ffs=24288, ebr_blocks=56,
                  ebr_bits=18432, dsp=28),
    "85f": Device("85f", "ecp5", "LFE5U-85F", "CABGA381", "6", luts=83640, ffs=83640, ebr_blocks=208,
                  ebr_bits=18432, dsp=156),
}


@dataclass(frozen=True)
class Target:
    """A ``BOARD=`` value: a board (platform class name in amaranth_boards) or a bare device."""

    name: str
    device: Device
    board: str = None          # amaranth-boards platform, None for out-of-context
    target_mhz: float = None   # timing target for an out-of-context run (boards use their clock)

    @property
    def out_of_context(self):
        return self.board is None


TARGETS = {
    "icebreaker": Target("icebreaker", DEVICES["up5k"], board="icebreaker"),
    "ulx3s-85f": Target("ulx3s-85f", DEVICES["85f"], board="ulx3s-85f"),
    "orangecrab-25f": Target("orangecrab-25f", DEVICES["25f"], board="orangecrab-25f"),
    "ooc-up5k": Target("ooc-up5k", DEVICES["up5k"], target_mhz=48.0),
    "ooc-25f": Target("ooc-25f", DEVICES["25f"], target_mhz=100.0),
    "ooc-85f": Target("ooc-85f", DEVICES["85f"], target_mhz=100.0),
}


def get_target(name, target_mhz=None):
    """The :class:`Target` called ``name``, or a one-line error listing the known ones;
    ``target_mhz`` replaces an out-of-context target's timing goal (nextpnr ``--freq``: router2
    and the placer work toward it, so a goal far above what the design reaches costs routing time)."""
    if name not in TARGETS:
        raise QnnfabError(f"unknown BOARD '{name}'; known: {', '.join(TARGETS)}", where="BOARD")
    if target_mhz is not None:
        if not TARGETS[name].out_of_context:
            raise QnnfabError(f"TARGET_MHZ applies to out-of-context targets (ooc-*); {name} runs at its board clock",
                              where="TARGET_MHZ")
        if not target_mhz > 0:
            raise QnnfabError(f"TARGET_MHZ must be a positive frequency in MHz, got {target_mhz:g}", where="TARGET_MHZ")
        return dataclasses.replace(TARGETS[name], target_mhz=float(target_mhz))
    return TARGETS[name]


def get_device(name):
    """The :class:`Device` called ``name`` (``up5k``, ``25f``, ``85f``)."""
    if name not in DEVICES:
        raise QnnfabError(f"unknown device '{name}'; known: {', '.join(DEVICES)}", where="device")
    return DEVICES[name]
