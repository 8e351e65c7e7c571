"""``synth-<target>.md`` and its picture: the per-layer table and a resource/cycle share chart.

The chart (``synth-<target>.svg``) has one row per pipeline stage and three bars: its share
of the design's LUTs and of its block RAM bits (Yosys, each stage synthesized on its
own) and its analytic cycles per frame relative to the bottleneck stage, so a balanced
folding shows as cycle bars of similar length and an unbalanced one as a single long bar.
"""

from html import escape

_COLORS = {"luts": "#4e79a7", "bram": "#f28e2b", "cycles": "#59a14f"}


def _bram_bits(actual, device):
    return actual["ebr"] * device["ebr_bits"] + actual["spram"] * device["spram_bits"]


def share_rows(rep):
    """Per stage: (name, LUT share, BRAM share, cycles / bottleneck cycles)."""
    dev = rep["device_blocks"]
    layers = [l for l in rep["layers"] if l["actual"] is not None]
    luts = sum(l["actual"]["luts"] for l in layers) or 1
    bram = sum(_bram_bits(l["actual"], dev) for l in layers) or 1
    cpf = rep["cycles_per_frame"] or 1
    return [(l["name"], l["actual"]["luts"] / luts, _bram_bits(l["actual"], dev) / bram,
             l["cycles_per_frame"] / cpf) for l in layers]


def share_svg(rep):
    """The chart as an SVG document (no plotting library needed)."""
    rows = share_rows(rep)
    label_w, bar_w, row_h, top = 150, 420, 42, 40
    height = top + row_h * len(rows) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 80}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="4" y="14" font-size="13">{escape(rep["model"])} on {escape(rep["target"])}: share per stage</text>']
    x = label_w
    for k, (key, text) in enumerate((("luts", "LUTs"), ("bram", "block RAM bits"), ("cycles", "cycles / bottleneck"))):
        out.append(f'<rect x="{x}" y="22" width="10" height="10" fill="{_COLORS[key]}"/>'
                   f'<text x="{x + 14}" y="31">{text}</text>')
        x += 150
    for i, (name, lut, bram, cyc) in enumerate(rows):
        y = top + i * row_h
        out.append(f'<text x="4" y="{y + 20}">{escape(name)}</text>')
        for j, (key, v) in enumerate((("luts", lut), ("bram", bram), ("cycles", cyc))):
            w = max(0.0, min(1.0, v)) * bar_w
            out.append(f'<rect x="{label_w}" y="{y + 2 + j * 12}" width="{w:.1f}" height="10" fill="{_COLORS[key]}"/>'
                       f'<text x="{label_w + w + 4:.1f}" y="{y + 11 + j * 12}">{100 * v:.0f}%</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _load_text(load):
    if not load or not load["layers"]:
        return "all initialised in the bitstream"
    return (f"{load['bits']:,} bits loaded at run time ('W' + {load['bytes']:,} bytes over the UART) for "
            + ", ".join(f"`{n}`" for n in load["layers"]))


def synth_markdown(rep, svg_name):
    """The human-readable synthesis report."""
    dev = rep["device_blocks"]
    rows = []
    for l in rep["layers"]:
        a, e = l["actual"] or {}, l["estimated"]
        rows.append((l["name"], l["engine"], l["pe"], l["simd"], l.get("weights"), l["cycles_per_frame"], e["luts"],
                     a.get("luts"),
                     e["ffs"], a.get("ffs"), _bram_bits(a, dev) if a else None))
    fmax = rep["fmax_mhz"]
    lines = [
        f"# {rep['model']} on {rep['target']} ({rep['device']})",
        "",
        *([f"Folding: `{rep['folding_file']}`.", ""] if rep.get("folding_file") else []),
        f"- fits: **{'yes' if rep['fits'] else 'NO'}**" + (f" ({rep['failure']})" if rep.get("failure") else ""),
        f"- LUTs {rep['luts']:,} / {rep['budget']['luts']:,}, FFs {rep['ffs']:,} / {rep['budget']['ffs']:,}, "
        f"block RAM {rep['bram_bits']:,} / {rep['budget']['bram_bits']:,} bits "
        f"({rep['bram_blocks']['ebr']} EBR, {rep['bram_blocks']['spram']} SPRAM), DSP {rep['dsp']} / {rep['budget']['dsp']}",
        (f"- Fmax (nextpnr): **{fmax} MHz**" + (f" (target {rep['target_mhz']:g} MHz: "
                                                 f"{'met' if rep['timing_met'] else 'NOT met'})"
                                                 if rep.get("target_mhz") else "")
         if fmax else "- Fmax: not available (place-and-route did not finish)"),
        f"- cycles per frame (analytic): {rep['cycles_per_frame']:,}, bottleneck `{rep['bottleneck']}`",
        f"- frames/s at Fmax: **{rep['fps']:,.0f}**" if rep.get("fps") else "- frames/s: n/a",
        f"- weights: {rep['weight_bits']:,} bits; " + _load_text(rep.get("weight_load")),
        "",
        "## Per layer",
        "",
        "Estimated: the analytic model of `hw/report.py`; actual: Yosys, each stage's engine synthesized on its own.",
        "",
        _table(["stage", "engine", "PE", "SIMD", "weights", "cycles/frame", "LUTs est.", "LUTs", "FFs est.", "FFs",
                "BRAM bits"], rows),
        "",
        f"![resource and cycle share per stage]({svg_name})",
        "",
        f"Tools: {rep['tools']['yosys']}; {rep['tools']['nextpnr']}. Time: {rep['seconds']}.",
        "",
    ]
    if rep.get("bitstream"):
        after = next(k for k, l in enumerate(lines) if l.startswith("- weights:"))
        lines.insert(after + 1, f"- bitstream: `{rep['bitstream']}`")
    return "\n".join(lines)
