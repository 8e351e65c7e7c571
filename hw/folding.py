"""Per-layer folding (PE, SIMD, weight storage): reading, validating and defaulting ``folding.json``.

Format (``models/zoo/<model>/folding.json``)::

    {"format": "qnnfab-folding", "layers": {"fc0": {"pe": 16, "simd": 49, "weights": "rom"}, ...}}

Every ``dense`` and ``conv2d`` layer needs an entry: ``pe`` must divide its outputs
(features or channels) and ``simd`` its fan-in (features, or K*K*Cin window elements;
for a convolution SIMD must also divide Cin). ``weights`` is optional: ``"rom"`` (the
default: weights initialised in block RAM by the bitstream), ``"lut"`` (initialised too, but
built from LUTs, which moves a ROM deeper than 64 words out of block RAM; binary-weight engines) or ``"ram"`` (an
uninitialised single-port RAM, SPRAM on an iCE40 UltraPlus, loaded at run time).
Errors name the file, the layer and the field.

A model may ship one folding per device, ``folding-<device>.json`` (device names of
:mod:`boards.targets`: ``up5k``, ``25f``, ``85f``); :func:`default_folding_path` picks it
when it exists.
"""

from pathlib import Path

from qnnfab.errors import QnnfabError, read_json

FORMAT = "qnnfab-folding"
FILENAME = "folding.json"
FOLDED_KINDS = ("dense", "conv2d")
WEIGHT_STORAGE = ("rom", "ram", "lut")
ENTRY_FIELDS = ("pe", "simd", "weights", "register_output")


def default_folding_path(model_dir, device=None):
    """``<model_dir>/folding-<device>.json`` if ``device`` is given and that file exists,
    else ``<model_dir>/folding.json``."""
    model_dir = Path(model_dir)
    if device is not None:
        specific = model_dir / f"folding-{device}.json"
        if specific.is_file():
            return specific
    return model_dir / FILENAME


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def load_folding(path, qmd):
    """Read ``path`` and validate it against ``qmd``; returns ``{layer: {"pe", "simd", "weights"}}``."""
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
        unknown = sorted(set(entry) - set(ENTRY_FIELDS))
        if unknown:
            raise QnnfabError(f"layer '{layer.name}' field '{unknown[0]}': unknown field (known: "
                              f"{', '.join(ENTRY_FIELDS)})", where=where)
        storage = entry.get("weights", "rom")
        if storage not in WEIGHT_STORAGE:
            raise QnnfabError(f"layer '{layer.name}' field 'weights': must be \"rom\" (initialised block RAM), "
                              f"\"lut\" (initialised, built from LUTs) or \"ram\" (loaded at run time), "
                              f"got {storage!r}", where=where)
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
        out[layer.name] = {"pe": entry["pe"], "simd": entry["simd"], "weights": storage}
        reg = entry.get("register_output", False)
        if not isinstance(reg, bool):
            raise QnnfabError(f"layer '{layer.name}' field 'register_output': must be true or false, got {reg!r}",
                              where=where)
        if reg:     # a register slice (hw.register_slice) on the layer's engine output stream
            out[layer.name]["register_output"] = True
    return out

