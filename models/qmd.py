"""Quantized model description (QMD), format ``qnnfab-qmd`` version 1.

A QMD is a directory holding ``qmd.json`` (the manifest: input, ordered layers,
their attributes, provenance) and ``qmd.npz`` (the integer arrays, keyed
``<layer>.<field>``). The integer semantics of every layer kind are written in
``docs/qmd-spec.md``; this module reads, validates and writes the format, and
derives each layer's input/output shape and value range (interval arithmetic),
which the reference model and the hardware generator both rely on.

Every violation raises :class:`QnnfabError` naming the file, the layer and the field.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qnnfab.errors import QnnfabError, read_json

FORMAT = "qnnfab-qmd"
VERSION = 1
MANIFEST = "qmd.json"
ARRAYS = "qmd.npz"

INPUT_DTYPES = {"uint8": (0, 255), "int8": (-128, 127)}
LAYER_KINDS = ("threshold", "dense", "conv2d", "maxpool", "argmax")
WEIGHT_KINDS = ("binary", "ternary")
SCALE_MAX = 32767           # largest TTQ pos_scale / neg_scale


# --------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class Act:
    """How a tensor's integers are encoded: ``binary`` (values -1/+1, one bit each,
    bit 1 = +1), ``ternary`` (values -1/0/+1, two bits holding ``value + 1``), ``uint``
    (0 .. 2^bits-1) or ``int`` (accumulators, two's complement).

    The hardware stores a value ``v`` as the unsigned (``int``: two's complement) code
    ``r`` with ``v = scale*r + offset`` (:attr:`code`): binary ``(2, -1)``, ternary
    ``(1, -1)``, the others ``(1, 0)``. A threshold stage's output code is the number of
    met thresholds in every case."""

    kind: str
    bits: int
    lo: int
    hi: int

    @staticmethod
    def binary():
        return Act("binary", 1, -1, 1)

    @staticmethod
    def ternary():
        return Act("ternary", 2, -1, 1)

    @staticmethod
    def uint(bits):
        return Act("uint", bits, 0, 2**bits - 1)

    @staticmethod
    def int_range(lo, hi):
        bits = max(int(lo).bit_length(), int(hi).bit_length()) + 1
        bits = max(bits, 1)
        return Act("int", bits, int(lo), int(hi))

    def to_json(self):
        return {"kind": self.kind} if self.kind in ("binary", "ternary") else {"kind": self.kind, "bits": self.bits}

    @property
    def code(self):
        """``(scale, offset)`` of the hardware encoding: value = scale * code + offset."""
        return {"binary": (2, -1), "ternary": (1, -1)}.get(self.kind, (1, 0))

    @property
    def n_thresholds(self):
        """Thresholds per channel of a threshold layer producing this kind (binary 1,
        ternary 2, uint 2^bits - 1)."""
        return {"binary": 1, "ternary": 2}.get(self.kind, 2**self.bits - 1)

    def encode(self, values):
        """The hardware codes of ``values`` (an integer array): ``(values - offset) / scale``."""
        scale, offset = self.code
        return (np.asarray(values, dtype=np.int64) - offset) // scale

    def from_count(self, count):
        """The value of a threshold stage's output: ``count`` met thresholds decoded."""
        scale, offset = self.code
        return scale * count + offset


# --------------------------------------------------------------------------- layers

@dataclass
class Layer:
    """One layer of a QMD, with everything derived at load time."""

    name: str
    kind: str
    attrs: dict
    arrays: dict
    in_shape: tuple = ()
    out_shape: tuple = ()
    in_act: Act = None
    out_act: Act = None

    @property
    def weights(self):
        """Weights as an int8 matrix ``[outputs, fan-in]`` of -1/+1 (binary) or -1/0/+1
        (ternary); for conv2d the fan-in is flattened in (ky, kx, c) order."""
        return self.arrays["weights"]

    @property
    def int_weights(self):
        """The integer weights the dot product uses, int64 ``[outputs, fan-in]``: the
        signs, times ``pos_scale[o]`` where +1 and ``neg_scale[o]`` where -1 (TTQ)."""
        w = self.arrays["weights"].astype(np.int64)
        if "pos_scale" not in self.arrays:
            return w
        pos, neg = self.arrays["pos_scale"][:, None], self.arrays["neg_scale"][:, None]
        return np.where(w > 0, pos, np.where(w < 0, -neg, 0))


@dataclass
class Qmd:
    """A loaded, validated description."""

    name: str
    input_shape: tuple
    input_dtype: str
    layers: list
    provenance: dict = field(default_factory=dict)
    description: str = ""
    dataset: str = None
    path: Path = None

    @property
    def input_act(self):
        lo, hi = INPUT_DTYPES[self.input_dtype]
        return Act("uint" if lo == 0 else "int", 8, lo, hi)

    def layer(self, name):
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# --------------------------------------------------------------------------- loading

class _Where:
    """Builds the ``file: layer 'x' field 'y'`` prefix of error messages."""

    def __init__(self, path):
        self.path = str(path)

    def __call__(self, layer=None, fld=None):
        parts = [self.path]
        if layer is not None:
            parts.append(f"layer '{layer}'")
        if fld is not None:
            parts.append(f"field '{fld}'")
        return ": ".join([parts[0], " ".join(parts[1:])]) if len(parts) > 1 else parts[0]


def _resolve(path):
    path = Path(path)
    if path.is_dir():
        return path / MANIFEST, path / ARRAYS
    if path.name == MANIFEST:
        return path, path.with_name(ARRAYS)
    raise QnnfabError(f"not a QMD directory (expected {MANIFEST} and {ARRAYS} inside)", where=str(path))


def load_qmd(path):
    """Read and validate the QMD at ``path`` (its directory or its ``qmd.json``)."""
    manifest_path, arrays_path = _resolve(path)
    where = _Where(manifest_path)
    manifest = read_json(manifest_path, missing="manifest not found")
    if not arrays_path.is_file():
        raise QnnfabError("array file not found", where=str(arrays_path))
    try:
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # zipfile/ValueError: a corrupt archive
        raise QnnfabError(f"cannot read arrays: {e}", where=str(arrays_path)) from None
    qmd = parse_qmd(manifest, arrays, where)
    qmd.path = manifest_path.parent
    return qmd


def _field(obj, key, types, where, layer=None):
    if not isinstance(obj, dict) or key not in obj:
        raise QnnfabError("missing", where=where(layer, key))
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise QnnfabError(f"expected {_typename(types)}, got {type(value).__name__} {value!r}",
                          where=where(layer, key))
    return value


def _typename(types):
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "integer", str: "string", list: "list", dict: "object"}.get(t, t.__name__) for t in types)


def _array(arrays, layer, fld, where, shape, dtype_kind="i"):
    key = f"{layer}.{fld}"
    if key not in arrays:
        raise QnnfabError(f"missing array '{key}' in {ARRAYS}", where=where(layer, fld))
    a = arrays[key]
    if a.dtype.kind not in dtype_kind:
        raise QnnfabError(f"array '{key}' has dtype {a.dtype}, expected an integer type", where=where(layer, fld))
    if tuple(a.shape) != tuple(shape):
        raise QnnfabError(f"array '{key}' has shape {tuple(a.shape)}, expected {tuple(shape)}",
                          where=where(layer, fld))
    return a


def _act_from_json(obj, where, layer, fld):
    if not isinstance(obj, dict) or "kind" not in obj:
        raise QnnfabError("expected an object with 'kind'", where=where(layer, fld))
    if obj["kind"] == "binary":
        return Act.binary()
    if obj["kind"] == "uint":
        bits = obj.get("bits")
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise QnnfabError(f"'bits' must be an integer in 1..8, got {bits!r}", where=where(layer, fld))
        return Act.uint(bits)
    if obj["kind"] == "ternary":
        return Act.ternary()
    raise QnnfabError(f"unsupported activation kind {obj['kind']!r} (supported: binary, ternary, uint)",
                      where=where(layer, fld))


def parse_qmd(manifest, arrays, where=None):
    """Validate a manifest dict and its arrays; return a :class:`Qmd`."""
    where = where or _Where("<qmd>")
    if not isinstance(manifest, dict):
        raise QnnfabError("manifest must be a JSON object", where=where())
    fmt = _field(manifest, "format", str, where)
    if fmt != FORMAT:
        raise QnnfabError(f"unknown format {fmt!r}, expected {FORMAT!r}", where=where(None, "format"))
    version = _field(manifest, "version", int, where)
    if version != VERSION:
        raise QnnfabError(f"unsupported version {version} (this qnnfab reads version {VERSION})",
                          where=where(None, "version"))
    name = _field(manifest, "name", str, where)
    inp = _field(manifest, "input", dict, where)
    shape = _field(inp, "shape", list, lambda l=None, f=None: where(None, f"input.{f}"))
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise QnnfabError(f"must be a non-empty list of positive integers, got {shape!r}",
                          where=where(None, "input.shape"))
    dtype = _field(inp, "dtype", str, lambda l=None, f=None: where(None, f"input.{f}"))
    if dtype not in INPUT_DTYPES:
        raise QnnfabError(f"unsupported input dtype {dtype!r} (supported: {', '.join(INPUT_DTYPES)})",
                          where=where(None, "input.dtype"))
    layers_json = _field(manifest, "layers", list, where)
    if not layers_json:
        raise QnnfabError("a model needs at least one layer", where=where(None, "layers"))

    qmd = Qmd(name=name, input_shape=tuple(shape), input_dtype=dtype, layers=[],
              provenance=manifest.get("provenance", {}), description=manifest.get("description", ""),
              dataset=manifest.get("dataset"))
    if qmd.dataset is not None and not isinstance(qmd.dataset, str):
        raise QnnfabError(f"expected a data set name, got {qmd.dataset!r}", where=where(None, "dataset"))
    cur_shape, cur_act = qmd.input_shape, qmd.input_act
    seen = set()
    for i, lj in enumerate(layers_json):
        if not isinstance(lj, dict):
            raise QnnfabError("each layer must be an object", where=where(f"#{i}"))
        lname = _field(lj, "name", str, lambda l=None, f=None: where(f"#{i}", f))
        if lname in seen:
            raise QnnfabError("duplicate layer name", where=where(lname, "name"))
        seen.add(lname)
        kind = _field(lj, "kind", str, where, lname)
        if kind not in LAYER_KINDS:
            raise QnnfabError(f"unsupported layer kind {kind!r} (supported: {', '.join(LAYER_KINDS)})",
                              where=where(lname, "kind"))
        if cur_shape == ():
            raise QnnfabError("no layer may follow 'argmax'", where=where(lname, "kind"))
        layer = Layer(name=lname, kind=kind, attrs={}, arrays={}, in_shape=cur_shape, in_act=cur_act)
        _PARSERS[kind](layer, lj, arrays, where)
        qmd.layers.append(layer)
        cur_shape, cur_act = layer.out_shape, layer.out_act

    used = {f"{l.name}.{k}" for l in qmd.layers for k in l.arrays}
    extra = sorted(set(arrays) - used)
    if extra:
        raise QnnfabError(f"arrays not used by any layer: {', '.join(extra)}", where=where(None, ARRAYS))
    return qmd


def _parse_threshold(layer, lj, arrays, where):
    n = layer.name
    if layer.in_act.kind == "binary":
        raise QnnfabError("a threshold needs an integer input, got binary activations", where=where(n, "kind"))
    out = _act_from_json(_field(lj, "out", dict, where, n), where, n, "out")
    channels = layer.in_shape[-1]
    nthr = out.n_thresholds
    thr = _array(arrays, n, "thresholds", where, (channels, nthr)).astype(np.int64)
    direction = _array(arrays, n, "direction", where, (channels,)).astype(np.int64)
    if not np.isin(direction, (-1, 1)).all():
        bad = int(np.flatnonzero(~np.isin(direction, (-1, 1)))[0])
        raise QnnfabError(f"values must be +1 or -1, channel {bad} has {int(direction[bad])}",
                          where=where(n, "direction"))
    lo, hi = layer.in_act.lo - 1, layer.in_act.hi + 1
    if thr.size and (thr.min() < lo or thr.max() > hi):
        c = int(np.argwhere((thr < lo) | (thr > hi))[0][0])
        raise QnnfabError(f"threshold out of range [{lo}, {hi}] (input range +-1), channel {c}: {thr[c].tolist()}",
                          where=where(n, "thresholds"))
    if nthr > 1:
        d = np.diff(thr, axis=1)
        ok = np.where(direction[:, None] > 0, d >= 0, d <= 0)
        if not ok.all():
            c = int(np.argwhere(~ok)[0][0])
            raise QnnfabError(f"thresholds of channel {c} must be sorted in the comparison direction: {thr[c].tolist()}",
                              where=where(n, "thresholds"))
    layer.arrays = {"thresholds": thr, "direction": direction}
    layer.attrs = {"out": out.to_json()}
    layer.out_shape, layer.out_act = layer.in_shape, out


def _positive(lj, key, where, layer, minimum=1):
    v = _field(lj, key, int, where, layer)
    if v < minimum:
        raise QnnfabError(f"must be an integer >= {minimum}, got {v}", where=where(layer, key))
    return v


def _weights(layer, lj, arrays, where, rows, fan_in):
    """The packed ``weights`` array (binary or ternary) -> int8 matrix ``[rows, fan_in]``;
    for ternary weights also the optional TTQ ``pos_scale``/``neg_scale`` (int64 ``[rows]``).
    Returns ``(kind, {array name: array})``."""
    n = layer.name
    wkind = _field(lj, "weight", str, where, n)
    if wkind not in WEIGHT_KINDS:
        raise QnnfabError(f"unsupported weight kind {wkind!r} (supported: {', '.join(WEIGHT_KINDS)})",
                          where=where(n, "weight"))
    nbytes = (fan_in + 7) // 8
    shape = (rows, nbytes) if wkind == "binary" else (rows, 2, nbytes)
    packed = _array(arrays, n, "weights", where, shape, dtype_kind="u")
    if packed.dtype != np.uint8:
        raise QnnfabError(f"{wkind} weights must be packed bits of dtype uint8, got {packed.dtype}",
                          where=where(n, "weights"))
    bits = np.unpackbits(packed, axis=-1, bitorder="little")
    if bits[..., fan_in:].any():
        raise QnnfabError("padding bits beyond the fan-in must be zero", where=where(n, "weights"))
    bits = bits[..., :fan_in].astype(np.int8)
    present = {f for f in ("pos_scale", "neg_scale") if f"{n}.{f}" in arrays}
    if wkind == "binary":
        if present:
            raise QnnfabError("pos_scale/neg_scale are only defined for ternary weights",
                              where=where(n, sorted(present)[0]))
        return wkind, {"weights": bits * 2 - 1}
    both = bits[:, 0] & bits[:, 1]
    if both.any():
        r, k = (int(v) for v in np.argwhere(both)[0])
        raise QnnfabError(f"row {r}, fan-in index {k} is set in both the +1 and the -1 plane",
                          where=where(n, "weights"))
    out = {"weights": bits[:, 0] - bits[:, 1]}
    if present:
        if len(present) == 1:
            missing = ({"pos_scale", "neg_scale"} - present).pop()
            raise QnnfabError(f"missing array '{n}.{missing}' (pos_scale and neg_scale come together)",
                              where=where(n, missing))
        for f in ("pos_scale", "neg_scale"):
            a = _array(arrays, n, f, where, (rows,)).astype(np.int64)
            if a.size and (a.min() < 1 or a.max() > SCALE_MAX):
                r = int(np.flatnonzero((a < 1) | (a > SCALE_MAX))[0])
                raise QnnfabError(f"scales must be integers in 1..{SCALE_MAX}, row {r} has {int(a[r])}",
                                  where=where(n, f))
            out[f] = a
    return wkind, out


def dot_range(w, lo, hi):
    """Interval arithmetic: per output ``o``, the range ``(lo[o], hi[o])`` (int64 arrays)
    of ``sum_k w[o,k]*x[k]`` over inputs ``x`` in ``[lo, hi]``."""
    w = np.asarray(w, dtype=np.int64)
    a, b = w * int(lo), w * int(hi)
    return np.minimum(a, b).sum(axis=1), np.maximum(a, b).sum(axis=1)


def _dot_act(w, in_act):
    """The range of sum_k w[o,k]*x[k] over x in the input's range, hulled over o."""
    lo, hi = dot_range(w, in_act.lo, in_act.hi)
    return Act.int_range(int(lo.min()), int(hi.max()))


def _parse_dense(layer, lj, arrays, where):
    n = layer.name
    in_f = _positive(lj, "in_features", where, n)
    out_f = _positive(lj, "out_features", where, n)
    flat = int(np.prod(layer.in_shape))
    if flat != in_f:
        raise QnnfabError(f"is {in_f} but the incoming tensor {list(layer.in_shape)} has {flat} elements",
                          where=where(n, "in_features"))
    wkind, layer.arrays = _weights(layer, lj, arrays, where, out_f, in_f)
    layer.attrs = {"in_features": in_f, "out_features": out_f, "weight": wkind}
    layer.out_shape = (out_f,)
    layer.out_act = _dot_act(layer.int_weights, layer.in_act)


def _spatial_input(layer, where):
    if len(layer.in_shape) != 3:
        raise QnnfabError(f"needs an [H, W, C] input, got shape {list(layer.in_shape)}",
                          where=where(layer.name, "kind"))
    return layer.in_shape


def _parse_conv2d(layer, lj, arrays, where):
    n = layer.name
    h, w_, c = _spatial_input(layer, where)
    cin = _positive(lj, "in_channels", where, n)
    if cin != c:
        raise QnnfabError(f"is {cin} but the incoming tensor {list(layer.in_shape)} has {c} channels",
                          where=where(n, "in_channels"))
    cout = _positive(lj, "out_channels", where, n)
    k = _positive(lj, "kernel", where, n)
    stride = _positive(lj, "stride", where, n)
    pad = _positive(lj, "padding", where, n, minimum=0)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
    if oh < 1 or ow < 1:
        raise QnnfabError(f"a {k}x{k} kernel does not fit the {h}x{w_} input with padding {pad}",
                          where=where(n, "kernel"))
    attrs = {"in_channels": cin, "out_channels": cout, "kernel": k, "stride": stride, "padding": pad}
    if pad:
        pv = _field(lj, "pad_value", int, where, n)
        allowed = (-1, 1) if layer.in_act.kind == "binary" else range(layer.in_act.lo, layer.in_act.hi + 1)
        if pv not in allowed:
            raise QnnfabError(f"{pv} is not a value of the {layer.in_act.kind} input", where=where(n, "pad_value"))
        attrs["pad_value"] = pv
    wkind, layer.arrays = _weights(layer, lj, arrays, where, cout, k * k * cin)
    layer.attrs = attrs | {"weight": wkind}
    layer.out_shape = (oh, ow, cout)
    layer.out_act = _dot_act(layer.int_weights, layer.in_act)


def _parse_maxpool(layer, lj, arrays, where):
    n = layer.name
    h, w_, c = _spatial_input(layer, where)
    k = _positive(lj, "kernel", where, n)
    stride = _positive(lj, "stride", where, n)
    if k > h or k > w_:
        raise QnnfabError(f"a {k}x{k} window does not fit the {h}x{w_} input", where=where(n, "kernel"))
    layer.attrs = {"kernel": k, "stride": stride}
    layer.out_shape = ((h - k) // stride + 1, (w_ - k) // stride + 1, c)
    layer.out_act = layer.in_act


def _parse_argmax(layer, lj, arrays, where):
    if len(layer.in_shape) != 1:
        raise QnnfabError(f"argmax needs a vector input, got shape {list(layer.in_shape)}",
                          where=where(layer.name, "kind"))
    layer.out_shape = ()
    layer.out_act = Act.int_range(0, layer.in_shape[0] - 1)


_PARSERS = {"threshold": _parse_threshold, "dense": _parse_dense, "conv2d": _parse_conv2d,
            "maxpool": _parse_maxpool, "argmax": _parse_argmax}


# --------------------------------------------------------------------------- writing

def pack_binary(w):
    """-1/+1 matrix ``[out, in]`` -> packed bits as stored in the npz (bit 1 = +1)."""
    w = np.asarray(w)
    if not np.isin(w, (-1, 1)).all():
        raise ValueError("binary weights must be -1 or +1")
    return np.packbits((w > 0).astype(np.uint8), axis=1, bitorder="little")


def pack_ternary(w):
    """-1/0/+1 matrix ``[out, in]`` -> the two packed bit planes stored in the npz,
    uint8 ``[out, 2, ceil(in/8)]``: plane 0 marks the +1 weights, plane 1 the -1 weights."""
    w = np.asarray(w)
    if not np.isin(w, (-1, 0, 1)).all():
        raise ValueError("ternary weights must be -1, 0 or +1")
    planes = np.stack([(w > 0), (w < 0)], axis=1).astype(np.uint8)
    return np.packbits(planes, axis=2, bitorder="little")


def save_qmd(directory, name, input_shape, input_dtype, layers, provenance=None, description="", dataset=None):
    """Write a QMD. ``layers`` is a list of dicts: manifest fields plus an ``arrays``
    dict of integer numpy arrays (binary weights as -1/+1, ternary as -1/0/+1, packed
    here). The result is
    read back and validated, so an exporter can never write a description it cannot load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "name": name, "description": description,
                **({"dataset": dataset} if dataset else {}),
                "input": {"shape": list(input_shape), "dtype": input_dtype}, "layers": [],
                "provenance": provenance or {}}
    arrays = {}
    for spec in layers:
        spec = dict(spec)
        for k, a in spec.pop("arrays", {}).items():
            if k == "weights" and spec.get("weight") == "binary":
                a = pack_binary(a)
            elif k == "weights" and spec.get("weight") == "ternary":
                a = pack_ternary(a)
            elif k == "direction":
                a = np.asarray(a, dtype=np.int8)
            else:
                a = np.asarray(a, dtype=np.int32)
            arrays[f"{spec['name']}.{k}"] = a
        manifest["layers"].append(spec)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    np.savez_compressed(directory / ARRAYS, **arrays)
    return load_qmd(directory)
