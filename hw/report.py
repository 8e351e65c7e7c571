"""The design report written next to every generated accelerator.

``report.json`` keys (stable; later tools and users read them):

* ``model``, ``qmd_version``, ``verilog``, ``top``, ``folding``
* ``layers``: one entry per pipeline stage, in order: ``name``, ``kind`` (QMD layer kind,
  or ``width_converter``), ``engine``, ``pe``, ``simd``, ``cycles_per_frame`` (analytic),
  ``fused`` (the QMD layers the stage implements), ``in_lanes``/``out_lanes``, and an
  ``estimated`` resource dict (``weight_bits``, ``buffer_bits``, ``luts``, ``ffs``).
  Zero-skip ternary engines (``engine`` = ``ternary_mvtu``) add ``weight_density`` (the
  fraction of non-zero weights), ``cycles_per_frame_dense`` (what a dense engine of the
  same PE/SIMD needs) and ``zero_skip_ratio`` (``cycles_per_frame / cycles_per_frame_dense``);
  their ``cycles_per_frame`` is exact, computed from the weight pattern, and their
  ``weight_bits`` are the compressed schedule's (``weight_bits_dense``: 2 bits a weight)
* ``cycles_per_frame``: analytic frame interval = the slowest stage's cycles
* ``bottleneck``: that stage's name
* ``estimated``: the totals of the per-stage estimates

The resource estimate is an analytic first-order model (documented in docs/architecture.md),
not yet calibrated against Yosys; synthesis reports carry the measured figures.
"""

import json

import numpy as np

from hw.arith import bits_for
from hw.network import code_shape, frame_cycles


def _estimate_ternary(s):
    """Zero-skip engine: compressed schedule memory, per-PE input bank copies, partial-sum and
    output FIFOs; per lane an accumulator (+ select/negate), per PE an adder tree and comparators."""
    layer = s.layers[0]
    m, n = layer.weights.shape
    nf, sf = m // s.pe, n // s.simd
    act = layer.in_act
    in_bits = code_shape(act).width
    xmax = max(abs(act.lo), abs(act.hi))
    ttq = "pos_scale" in layer.arrays
    parts = 2 if ttq else 1
    part = bits_for(sf * xmax) + 1
    wq = layer.int_weights
    dot = bits_for(int(np.abs(wq).sum(axis=1).max()) * xmax) + 1
    n_thr = len(s.layers[1].arrays["thresholds"][0]) if len(s.layers) > 1 else 0
    scale_bits = bits_for(int(max(layer.arrays["pos_scale"].max(), layer.arrays["neg_scale"].max()))) if ttq else 0
    param_bits = m * (n_thr * (dot + 1) + (1 if n_thr else 0) + 2 * scale_bits)
    lanes = s.pe * s.simd
    fifo_bits = (2 * nf + 2) * (lanes * parts * part + s.pe * s.out_shape.width)
    ptr = bits_for(max(1, s.params["busiest_lane_slots"]))
    luts = lanes * (parts * part + in_bits + 2 * ptr + 4) + s.pe * (s.simd * parts * (part + 2) + n_thr * dot
                                                                    + 2 * scale_bits * part)
    ffs = lanes * (parts * part + ptr + bits_for(nf) + 8) + s.pe * (2 * bits_for(2 * nf + 2) + bits_for(nf)) + 16
    return {"weight_bits": s.params["schedule_bits"], "weight_bits_dense": 2 * m * n,
            "buffer_bits": s.pe * 2 * n * in_bits + param_bits + fifo_bits, "luts": luts, "ffs": ffs}


def estimate_stage(s):
    """First-order resources of one stage: memory bits, LUTs and flip-flops."""
    if s.engine == "ternary_mvtu":
        return _estimate_ternary(s)
    if s.engine in ("xnor_mvtu", "addsub_mvtu"):
        layer = s.layers[0]
        m, n = layer.weights.shape
        in_bits = 1 if s.engine == "xnor_mvtu" else layer.in_act.bits
        acc = bits_for(n) + in_bits
        n_thr = len(s.layers[1].arrays["thresholds"][0]) if len(s.layers) > 1 else 0
        thr_bits = m * (n_thr * bits_for(n + 1) + 1) if n_thr else 0
        # per PE: SIMD XNOR + popcount tree (~SIMD LUT4), accumulator adder + mux (2/bit),
        # comparators (1/bit each); out register and accumulator flip-flops
        # add/subtract of in_bits-wide inputs costs ~in_bits LUTs per element instead of ~2 per bit
        luts = s.pe * (2 * s.simd * in_bits + 2 * acc + n_thr * acc) + 4 * bits_for(m * n)
        ffs = s.pe * (acc + s.out_shape.width) + 2 * bits_for(m * n) + 8
        return {"weight_bits": m * n, "buffer_bits": 2 * n * in_bits + thr_bits, "luts": luts, "ffs": ffs}
    lanes = max(s.in_lanes, s.out_lanes)
    width = s.out_shape.width if s.out_shape is not None else 8
    if s.engine == "threshold_unit":
        t = len(s.layers[0].arrays["thresholds"][0])
        return {"weight_bits": 0, "buffer_bits": 0, "luts": lanes * t * 8, "ffs": lanes * width + 2}
    if s.engine == "sliding_window":
        p = s.params
        rows = 2 * p["kernel"] + p["stride"]
        return {"weight_bits": 0, "buffer_bits": rows * p["width"] * p["channels"] * width,
                "luts": lanes * width + 60, "ffs": lanes * width + 60}
    if s.engine == "maxpool":
        p = s.params
        return {"weight_bits": 0, "buffer_bits": p["width"] // p["kernel"] * p["channels"] * width,
                "luts": lanes * width * 2 + 30, "ffs": lanes * width * 2 + 30}
    if s.engine == "width_converter":
        return {"weight_bits": 0, "buffer_bits": 0, "luts": lanes * width, "ffs": 2 * lanes * width + 4}
    if s.engine == "argmax_output":
        c, w = s.params["classes"], s.params["logit_shape"].width
        return {"weight_bits": 0, "buffer_bits": 0, "luts": s.in_lanes * 2 * w + c * w // 2, "ffs": 2 * c * w + w + 8}
    raise AssertionError(s.engine)


def design_report(qmd, folding, stages, verilog_path, top):
    layers = []
    for s in stages:
        entry = {
            "name": s.name, "kind": s.kind, "engine": s.engine, "pe": s.pe, "simd": s.simd,
            "cycles_per_frame": s.cycles_per_frame, "fused": [l.name for l in s.layers],
            "in_lanes": s.in_lanes, "out_lanes": s.out_lanes, "estimated": estimate_stage(s),
        }
        if s.engine == "ternary_mvtu":
            dense = s.params["cycles_per_frame_dense"]
            entry.update(weight_density=round(s.params["weight_density"], 6), cycles_per_frame_dense=dense,
                         zero_skip_ratio=round(s.cycles_per_frame / dense, 6))
        layers.append(entry)
    cpf = frame_cycles(stages)
    totals = {}
    for l in layers:
        for k, v in l["estimated"].items():
            if k != "weight_bits_dense":
                totals[k] = totals.get(k, 0) + v
    return {
        "model": qmd.name, "qmd_version": 1, "top": top, "verilog": str(verilog_path),
        "folding": folding, "input_lanes": stages[0].in_lanes,
        "layers": layers, "cycles_per_frame": cpf,
        "bottleneck": next(s.name for s in stages if s.cycles_per_frame == cpf),
        "estimated": totals,
    }


def _table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


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


def design_markdown(rep):
    rows = [(l["name"], l["kind"], l["engine"], l["pe"], l["simd"], l["cycles_per_frame"],
             l["estimated"]["weight_bits"], l["estimated"]["luts"], l["estimated"]["ffs"]) for l in rep["layers"]]
    return "\n".join([
        f"# {rep['model']}: generated accelerator",
        "",
        f"Verilog: `{rep['verilog']}` (top `{rep['top']}`), input {rep['input_lanes']} values per beat.",
        "",
        _table(["stage", "kind", "engine", "PE", "SIMD", "cycles/frame", "weight bits", "LUTs (est.)", "FFs (est.)"],
               rows),
        "",
        *_zero_skip_section(rep),
        f"Frame interval (analytic): **{rep['cycles_per_frame']} cycles**, set by `{rep['bottleneck']}`; "
        f"at 100 MHz that is {100e6 / rep['cycles_per_frame']:,.0f} frames/s.",
        "",
        f"Estimated totals: {rep['estimated']['weight_bits']:,} weight bits, {rep['estimated']['luts']:,} LUTs, "
        f"{rep['estimated']['ffs']:,} FFs (analytic model, not yet calibrated against Yosys).",
        "",
    ])


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")
