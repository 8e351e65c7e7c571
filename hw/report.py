"""The design report written next to every generated accelerator.

``report.json`` keys (stable; later tools and users read them):

* ``model``, ``qmd_version``, ``verilog``, ``top``, ``folding``
* ``layers``: one entry per pipeline stage, in order: ``name``, ``kind`` (QMD layer kind,
  or ``width_converter``), ``engine``, ``pe``, ``simd``, ``cycles_per_frame`` (analytic),
  ``fused`` (the QMD layers the stage implements), ``in_lanes``/``out_lanes``, and an
  ``estimated`` resource dict for an ECP5 (``weight_bits``, ``buffer_bits``, ``luts``,
  ``ffs``, ``bram_blocks``, ``bram_bits``, ``spram_blocks``, ``calibrated``).
  Zero-skip ternary engines (``engine`` = ``ternary_mvtu``) add ``weight_density`` (the
  fraction of non-zero weights), ``cycles_per_frame_dense`` (what a dense engine of the
  same PE/SIMD needs) and ``zero_skip_ratio`` (``cycles_per_frame / cycles_per_frame_dense``);
  their ``cycles_per_frame`` is exact, computed from the weight pattern, and their
  ``weight_bits`` are the compressed schedule's (``weight_bits_dense``: 2 bits a weight).
  Shift-add engines (``engine`` = ``shift_mvtu``, pow2 weights) add ``terms``,
  ``code_bits`` and ``exponent_offset``, and, when synthesis costs were measured
  (``python -m qnnfab verilog --synth-costs``, ``make verilog SYNTH_COSTS=1``, or a cached
  measurement of the same engine; :mod:`boards.shift_cost`), ``multipliers`` (``$mul`` cells
  of the elaborated engine plus mapped DSP multipliers: 0), ``luts_per_mac`` (Yosys' LUTs /
  (PE*SIMD)), ``luts_per_mac_multiplier`` (the same layer on a LUT-multiplier MAC engine of the
  same PE/SIMD) and ``synth_costs`` (every count, both engines, also the multiplier engine
  mapped onto DSPs)
* ``cycles_per_frame``: analytic frame interval = the slowest stage's cycles
* ``bottleneck``: that stage's name
* ``estimated``: the totals of the per-stage estimates
* ``weight_load``: the run-time loaded weights: ``layers`` (names of the ``"ram"`` layers,
  in load order), ``bytes`` (length of the byte image after ``'W'``), ``bits``; every
  MVTU entry in ``layers`` has ``weights`` (``"rom"`` or ``"ram"``)

The resource estimate is the analytic model of :mod:`hw.resource_model`, calibrated
against Yosys (``make calibrate``); synthesis reports carry the measured figures next to it.
"""

import json

from hw import resource_model
from hw.network import frame_cycles, loaded_stages, stage_weight_layout, weight_image_bytes


def estimate_stage(s, family="ecp5"):
    """Estimated resources of one stage (see :mod:`hw.resource_model`)."""
    return resource_model.estimate_stage(s, family)


def design_report(qmd, folding, stages, verilog_path, top, shift_costs=None):
    """The report dict; ``shift_costs`` maps shift stages' names to their
    :func:`boards.shift_cost.shift_layer_costs` results (None: not measured)."""
    layers = []
    shift_costs = shift_costs or {}
    for s in stages:
        entry = {
            "name": s.name, "kind": s.kind, "engine": s.engine, "pe": s.pe, "simd": s.simd,
            "cycles_per_frame": s.cycles_per_frame, "fused": [l.name for l in s.layers],
            "in_lanes": s.in_lanes, "out_lanes": s.out_lanes, "estimated": estimate_stage(s),
        }
        if s.weights is not None:
            entry["weights"] = s.weights
        if s.engine == "ternary_mvtu":
            dense = s.params["cycles_per_frame_dense"]
            entry.update(weight_density=round(s.params["weight_density"], 6), cycles_per_frame_dense=dense,
                         zero_skip_ratio=round(s.cycles_per_frame / dense, 6))
        if s.engine == "shift_mvtu":
            entry.update({k: s.params[k] for k in ("terms", "code_bits", "exponent_offset")})
            if shift_costs.get(s.name):
                entry.update(shift_costs[s.name])
        layers.append(entry)
    cpf = frame_cycles(stages)
    totals = {}
    for l in layers:
        for k, v in l["estimated"].items():
            if not isinstance(v, bool) and k != "weight_bits_dense":
                totals[k] = totals.get(k, 0) + v
    return {
        "model": qmd.name, "qmd_version": 1, "top": top, "verilog": str(verilog_path),
        "folding": folding, "input_lanes": stages[0].in_lanes,
        "layers": layers, "cycles_per_frame": cpf,
        "bottleneck": next(s.name for s in stages if s.cycles_per_frame == cpf),
        "estimated": totals,
        "weight_load": weight_load(stages),
    }


def weight_load(stages):
    """What is loaded at run time: the ``"ram"`` layers in load order, the image's bytes and bits."""
    loaded = loaded_stages(stages)
    return {"layers": [s.name for s in loaded], "bytes": weight_image_bytes(stages),
            "bits": sum(width * words for width, words in map(stage_weight_layout, loaded))}


def _table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def weight_load_line(load):
    """One markdown line saying which layers are loaded at run time and how much."""
    if not load["layers"]:
        return "Weights: all initialised in the bitstream (nothing to load at run time)."
    return (f"Weights loaded at run time (`'W'` + {load['bytes']:,} bytes over the UART, {load['bits']:,} bits): "
            + ", ".join(f"`{n}`" for n in load["layers"]) + "; the other layers' weights are in the bitstream.")


def _zero_skip_section(rep):
    rows = [(l["name"], f"{100 * l['weight_density']:.1f}%", l["cycles_per_frame_dense"], l["cycles_per_frame"],
             f"{l['zero_skip_ratio']:.3f}", f"{l['weight_density'] + 0.10:.3f}",
             f"{l['estimated']['weight_bits']:,}", f"{l['estimated']['weight_bits_dense']:,}")
            for l in rep["layers"] if l["engine"] == "ternary_mvtu"]
    if not rows:
        return []
    return ["Zero-skip ternary engines (cycles exact, from the weight pattern):", "",
            _table(["stage", "weight density", "cycles/frame dense", "cycles/frame", "ratio", "density + 0.10",
                    "schedule bits", "dense 2-bit bits"], rows), ""]


def _shift_section(rep):
    rows = [(l["name"], l["pe"], l["simd"], f"N={l['terms']} B={l['code_bits']} E={l['exponent_offset']}",
             l.get("multipliers", "not measured"), l.get("luts_per_mac", ""), l.get("luts_per_mac_multiplier", ""),
             l["synth_costs"]["multiplier_engine"]["dsp_mapped"]["dsp"] if "synth_costs" in l else "")
            for l in rep["layers"] if l["engine"] == "shift_mvtu"]
    if not rows:
        return []
    return ["Shift-add engines (pow2 weights; Yosys figures with `--synth-costs`, boards/shift_cost.py):", "",
            _table(["stage", "PE", "SIMD", "codebooks", "multipliers", "LUTs/MAC", "LUTs/MAC, LUT-multiplier MAC",
                    "DSPs of a DSP-multiplier MAC"], rows), ""]


def design_markdown(rep):
    rows = [(l["name"], l["kind"], l["engine"], l["pe"], l["simd"], l.get("weights"), l["cycles_per_frame"],
             l["estimated"]["weight_bits"], l["estimated"]["luts"], l["estimated"]["ffs"]) for l in rep["layers"]]
    return "\n".join([
        f"# {rep['model']}: generated accelerator",
        "",
        f"Verilog: `{rep['verilog']}` (top `{rep['top']}`), input {rep['input_lanes']} values per beat.",
        "",
        _table(["stage", "kind", "engine", "PE", "SIMD", "weights", "cycles/frame", "weight bits", "LUTs (est.)",
                "FFs (est.)"], rows),
        "",
        weight_load_line(rep["weight_load"]),
        "",
        *_zero_skip_section(rep),
        *_shift_section(rep),
        f"Frame interval (analytic): **{rep['cycles_per_frame']} cycles**, set by `{rep['bottleneck']}`; "
        f"at 100 MHz that is {100e6 / rep['cycles_per_frame']:,.0f} frames/s.",
        "",
        f"Estimated totals: {rep['estimated']['weight_bits']:,} weight bits, {rep['estimated']['luts']:,} LUTs, "
        f"{rep['estimated']['ffs']:,} FFs, {rep['estimated']['bram_blocks']} ECP5 EBR blocks "
        "(analytic model calibrated against Yosys, hw/resource_model.py).",
        "",
    ])


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")
