"""Per-layer folding (PE, SIMD): reading, validating and defaulting ``folding.json``.

Format (``models/zoo/<model>/folding.json``)::

    {"format": "qnnfab-folding", "layers": {"fc0": {"pe": 16, "simd": 49}, ...}}

Every ``dense`` and ``conv2d`` layer needs an entry: ``pe`` must divide its outputs
(features or channels) and ``simd`` its fan-in (features, or K*K*Cin window elements;
for a convolution SIMD must also divide Cin). Errors name the file, the layer and the field.
"""

from pathlib import Path

from qnnfab.errors import QnnfabError, read_json

FORMAT = "qnnfab-folding"
FILENAME = "folding.json"
FOLDED_KINDS = ("dense", "conv2d")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def load_folding(path, qmd):
    """Read ``path`` and validate it against ``qmd``; returns ``{layer: {"pe", "simd"}}``."""
    path = Path(path)
    doc = read_json(path, missing="folding file not found")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise QnnfabError(f"field 'format' must be {FORMAT!r}", where=str(path))
    return validate_folding(doc.get("layers"), qmd, where=str(path))


def validate_folding(layers, qmd, where="<folding>"):
    if not isinstance(layers, dict):
        raise QnnfabError("field 'layers' must be an object of layer name -> {pe, simd}", where=where)
    known = {l.name: l for l in qmd.layers}
    for name in layers:
        if name not in known:
            raise QnnfabError(f"layer '{name}': no such layer in model '{qmd.name}'", where=where)
        if known[name].kind not in FOLDED_KINDS:
            raise QnnfabError(f"layer '{name}': a {known[name].kind} layer takes no folding", where=where)
    out = {}
    for layer in qmd.layers:
        if layer.kind not in FOLDED_KINDS:
            continue
        entry = layers.get(layer.name)
        if not isinstance(entry, dict):
            raise QnnfabError(f"layer '{layer.name}': missing folding entry {{\"pe\": .., \"simd\": ..}}",
                              where=where)
        m, n = layer.weights.shape     # outputs (channels) and fan-in (K*K*Cin for a convolution)
        for fld, total, what in (("pe", m, "output features" if layer.kind == "dense" else "output channels"),
                                 ("simd", n, "input features" if layer.kind == "dense" else "window elements")):
            v = entry.get(fld)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise QnnfabError(f"layer '{layer.name}' field '{fld}': must be a positive integer, got {v!r}",
                                  where=where)
            if total % v:
                raise QnnfabError(f"layer '{layer.name}' field '{fld}': {total} {what} are not divisible by "
                                  f"{fld.upper()}={v} (divisors: {_divisors(total)})", where=where)
        out[layer.name] = {"pe": entry["pe"], "simd": entry["simd"]}
    return out

