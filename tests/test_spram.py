"""SinglePortRAM (hw/spram.py) as Verilog in Verilator: the behavioural lib.memory model and
the SB_SPRAM256KA grid it becomes on an iCE40 UltraPlus (simulated with Yosys' model of
the primitive), 2 x 2 blocks for a 20-bit x 20,000-word RAM, against a Python model of the
port: writes, reads the next cycle, data held while idle."""

import json
import random

import pytest
from amaranth.back import verilog

from boards.targets import get_device
from hw.spram import SinglePortRAM, has_spram, spram_tiles
from sim.primitives import primitive_models
from sim.rtl import _run_cocotb


def _ops(width, depth, n, seed):
    rng = random.Random(seed)
    written, ops = [], []
    hot = [rng.randrange(depth) for _ in range(8)] + [0, depth - 1, 16383, 16384 % depth]
    for _ in range(n):
        r = rng.random()
        if r < 0.4 or not written:
            addr = rng.choice(hot) if rng.random() < 0.5 else rng.randrange(depth)
            ops.append([1, rng.random() < 0.5, addr, rng.randrange(1 << width)])   # we wins over re
            written.append(addr)
        elif r < 0.8:
            ops.append([0, 1, rng.choice(written), rng.randrange(1 << width)])
        else:
            ops.append([0, 0, rng.randrange(depth), rng.randrange(1 << width)])      # idle: rdata holds
    return ops


def _expected(ops):
    mem, rdata, out = {}, None, []
    for we, re, addr, wdata in ops:
        if we:
            mem[addr] = wdata
            rdata = None            # undefined after a write until the next read
        elif re:
            rdata = mem[addr]
        out.append(rdata)
    return out


@pytest.mark.parametrize("spram", [False, True], ids=["lib.memory", "SB_SPRAM256KA"])
def test_single_port_ram_matches_its_model(tmp_path, spram):
    width, depth = 20, 20000
    assert spram_tiles(width, depth) == (2, 2)
    platform = get_device("up5k").bare_platform() if spram else None
    assert has_spram(platform) == spram
    v = verilog.convert(SinglePortRAM(width, depth), name="ram", platform=platform, emit_src=False)
    assert v.count("SB_SPRAM256KA ") == (4 if spram else 0)
    vfile = tmp_path / "ram.v"
    vfile.write_text(v)
    ops = _ops(width, depth, 600, seed=int(spram))
    (tmp_path / "bench.json").write_text(json.dumps({"ops": ops, "captured": str(tmp_path / "seen.json")}))
    _run_cocotb(vfile, tmp_path, top="ram", test_module="sim.bench_ram",
                extra_sources=primitive_models(v, tmp_path))
    seen = json.loads((tmp_path / "seen.json").read_text())
    expect = _expected(ops)
    checked = [(s, e) for s, e in zip(seen, expect) if e is not None]
    assert len(seen) == len(ops) and len(checked) > 200
    assert all(s == e for s, e in checked)


def test_single_port_ram_rejects_bad_sizes():
    with pytest.raises(ValueError, match="width must be a positive integer, got 0"):
        SinglePortRAM(0, 16)
    with pytest.raises(ValueError, match="depth must be a positive integer, got 2.5"):
        SinglePortRAM(8, 2.5)
