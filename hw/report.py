"""The design report written next to every generated accelerator.

``report.json`` keys (stable; later tools and users read them):

* ``model``, ``qmd_version``, ``verilog``, ``top``, ``folding``
* ``layers``: one entry per pipeline stage, in order: ``name``, ``kind`` (QMD layer kind,
  or ``width_converter``), ``engine``, ``pe``, ``simd``, ``cycles_per_frame`` (analytic),
  ``fused`` (the QMD layers the stage implements), ``in_lanes``/``out_lanes``, and an
  ``estimated`` resource dict (``weight_bits``, ``buffer_bits``, ``luts``, ``ffs``)
* ``cycles_per_frame``: analytic frame interval = the slowest stage's cycles
* ``bottleneck``: that stage's name
* ``estimated``: the totals of the per-stage estimates
* ``weight_load``: the run-time loaded weights: ``layers`` (names of the ``"ram"`` layers,
  in load order), ``bytes`` (length of the byte image after ``'W'``), ``bits``; every
  MVTU entry in ``layers`` has ``weights`` (``"rom"`` or ``"ram"``)

The resource estimate is an analytic first-order model (documented in docs/architecture.md),
not yet calibrated against Yosys; synthesis reports carry the measured figures.
"""

import json

from hw.arith import bits_for
from hw.network import frame_cycles, loaded_stages, weight_image_bytes


def estimate_stage(s):
    """First-order resources of one stage: memory bits, LUTs and flip-flops."""
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
        ffs = s.pe * (acc + s.out_shape.width) + 2 * bits_for(m * n) + 8 + (thr_bits // m * s.pe if n_thr else 0)
        if s.weights == "ram":      # load counter shares the read counter; the loader is counted at the top
            luts += 4
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
        if s.weights is not None:
            entry["weights"] = s.weights
        layers.append(entry)
    cpf = frame_cycles(stages)
    totals = {}
    for l in layers:
        for k, v in l["estimated"].items():
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
            "bits": sum(estimate_stage(s)["weight_bits"] for s in loaded)}


def _table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def weight_load_line(load):
    """One markdown line saying which layers are loaded at run time and how much."""
    if not load["layers"]:
        return "Weights: all in initialised block RAM (nothing to load at run time)."
    return (f"Weights loaded at run time (`'W'` + {load['bytes']:,} bytes over the UART, {load['bits']:,} bits): "
            + ", ".join(f"`{n}`" for n in load["layers"]) + "; the other layers' weights are in the bitstream.")


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
        f"Frame interval (analytic): **{rep['cycles_per_frame']} cycles**, set by `{rep['bottleneck']}`; "
        f"at 100 MHz that is {100e6 / rep['cycles_per_frame']:,.0f} frames/s.",
        "",
        f"Estimated totals: {rep['estimated']['weight_bits']:,} weight bits, {rep['estimated']['luts']:,} LUTs, "
        f"{rep['estimated']['ffs']:,} FFs (analytic model, not yet calibrated against Yosys).",
        "",
    ])


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")
