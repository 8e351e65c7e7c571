"""Random but valid QMDs, for tests of the whole flow (engines, reference, RTL).

``random_binary_mlp`` draws an input-binarized binary MLP of the given widths, with
thresholds spread over the whole legal range (both comparison directions, thresholds
that are always or never met included), so every corner of the integer semantics is
exercised, not only the ones a trained model happens to use. ``random_ternary_mlp`` and
``random_ternary_cnn`` do the same for ternary weights (unstructured sparsity, all-zero
rows, optional TTQ scales) with ternary or n-bit activations.
"""

import numpy as np

from models.qmd import save_qmd


def random_binary_mlp(directory, sizes, *, input_shape=None, seed=0, name="random_mlp"):
    """Write a QMD ``input threshold -> dense/threshold ... -> dense -> argmax`` and load it.

    ``sizes`` = [in_features, hidden..., classes]; ``input_shape`` defaults to
    ``[in_features]`` with uint8 values (one channel per feature is avoided: the input
    threshold is per channel of the channels-last shape).
    """
    rng = np.random.default_rng(seed)
    input_shape = list(input_shape or [sizes[0], 1])
    channels = input_shape[-1]
    layers = [{"name": "binarize", "kind": "threshold", "out": {"kind": "binary"},
               "arrays": {"thresholds": rng.integers(-1, 257, (channels, 1)),
                          "direction": rng.choice([-1, 1], channels)}}]
    for k, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append({"name": f"fc{k}", "kind": "dense", "in_features": n, "out_features": m,
                       "weight": "binary", "arrays": {"weights": rng.choice([-1, 1], (m, n))}})
        if k < len(sizes) - 2:
            # mostly near the middle of [-n-1, n+1], sometimes at its ends
            thr = np.clip(np.round(rng.normal(0, np.sqrt(n), (m, 1))), -n - 1, n + 1)
            ends = rng.random((m, 1)) < 0.05
            thr[ends] = rng.choice([-n - 1, n + 1], int(ends.sum()))
            layers.append({"name": f"fc{k}_act", "kind": "threshold", "out": {"kind": "binary"},
                           "arrays": {"thresholds": thr.astype(np.int64), "direction": rng.choice([-1, 1], m)}})
    layers.append({"name": "class", "kind": "argmax"})
    return save_qmd(directory, name, input_shape, "uint8", layers,
                    provenance={"synthetic": True, "seed": seed})


def _thresholds(rng, n, channels, fan_in_range):
    lo, hi = fan_in_range
    mid, spread = (lo + hi) / 2, max(1.0, (hi - lo) / 6)
    thr = np.clip(np.round(rng.normal(mid, spread, (channels, 1))), lo - 1, hi + 1)
    return {"thresholds": thr.astype(np.int64), "direction": rng.choice([-1, 1], channels)}


def random_binary_cnn(directory, *, input_shape=(8, 8, 3), convs=((4, 3, 1, 1, True), (6, 3, 1, 0, False)),
                      classes=5, seed=0, name="random_cnn"):
    """Write a QMD ``conv2d(uint8 x binary) -> threshold [-> maxpool] -> conv2d(binary) ... -> dense -> argmax``.

    ``convs``: per conv layer ``(out_channels, kernel, stride, padding, maxpool_after)``.
    The first conv takes the uint8 input directly (no binarization), like CNV's first layer.
    """
    rng = np.random.default_rng(seed)
    h, w, c = input_shape
    layers, in_range = [], (0, 255)
    for k, (cout, ks, stride, pad, pool) in enumerate(convs):
        fan_in = ks * ks * c
        spec = {"name": f"conv{k}", "kind": "conv2d", "in_channels": c, "out_channels": cout, "kernel": ks,
                "stride": stride, "padding": pad, "weight": "binary",
                "arrays": {"weights": rng.choice([-1, 1], (cout, fan_in))}}
        if pad:
            spec["pad_value"] = int(rng.integers(0, 256)) if k == 0 else int(rng.choice([-1, 1]))
        layers.append(spec)
        reach = fan_in * max(abs(in_range[0]), abs(in_range[1]))
        layers.append({"name": f"conv{k}_act", "kind": "threshold", "out": {"kind": "binary"},
                       "arrays": _thresholds(rng, fan_in, cout, (-reach // 4, reach // 4))})
        h, w, c = (h + 2 * pad - ks) // stride + 1, (w + 2 * pad - ks) // stride + 1, cout
        if pool:
            layers.append({"name": f"pool{k}", "kind": "maxpool", "kernel": 2, "stride": 2})
            h, w = h // 2, w // 2
        in_range = (-1, 1)
    n = h * w * c
    layers.append({"name": "fc", "kind": "dense", "in_features": n, "out_features": classes, "weight": "binary",
                   "arrays": {"weights": rng.choice([-1, 1], (classes, n))}})
    layers.append({"name": "class", "kind": "argmax"})
    return save_qmd(directory, name, list(input_shape), "uint8", layers, provenance={"synthetic": True, "seed": seed})


# --------------------------------------------------------------------------- ternary networks

def random_ternary(rng, rows, fan_in, density, zero_rows=0):
    """A -1/0/+1 matrix with about ``density`` non-zeros, unstructured; the first
    ``zero_rows`` rows (at random positions) all zero."""
    w = rng.choice([-1, 1], (rows, fan_in)) * (rng.random((rows, fan_in)) < density)
    if zero_rows:
        w[rng.choice(rows, min(zero_rows, rows), replace=False)] = 0
    return w.astype(np.int64)


def random_multi_thresholds(rng, w, lo, hi, count):
    """``count`` sorted thresholds per row of the integer weights ``w`` (sorted in each
    channel's direction), drawn around the dot product's mean for inputs uniform in
    ``[lo, hi]`` with its standard deviation, a few beyond the reachable range (always or
    never met); and random directions."""
    w = np.asarray(w, dtype=np.float64)
    mean = w.sum(axis=1) * (lo + hi) / 2
    std = np.sqrt((w ** 2).sum(axis=1) * ((hi - lo + 1) ** 2 - 1) / 12) + 0.5
    dlo, dhi = np.minimum(w * lo, w * hi).sum(1), np.maximum(w * lo, w * hi).sum(1)
    thr = np.round(rng.normal(mean[:, None], std[:, None], (len(w), count)))
    thr = np.clip(thr, dlo[:, None] - 1, dhi[:, None] + 1).astype(np.int64)
    rows, cols = np.nonzero(rng.random(thr.shape) < 0.05)
    thr[rows, cols] = np.where(rng.random(len(rows)) < 0.5, dlo[rows] - 1, dhi[rows] + 1)
    direction = rng.choice([-1, 1], len(w))
    thr = np.sort(thr, axis=1)
    thr[direction < 0] = thr[direction < 0, ::-1]
    return {"thresholds": thr, "direction": direction}


def _act_json(act):
    return {"kind": "ternary"} if act == "ternary" else {"kind": "uint", "bits": int(act[4:])}


def _int_weights(spec):
    w, a = spec["arrays"]["weights"], spec["arrays"]
    if "pos_scale" not in a:
        return w
    return np.where(w > 0, a["pos_scale"][:, None], np.where(w < 0, -a["neg_scale"][:, None], 0))


def _ttq_scales(rng, rows):
    return {"pos_scale": rng.integers(1, 9, rows), "neg_scale": rng.integers(1, 9, rows)}


def random_ternary_mlp(directory, sizes, *, density=0.4, act="ternary", ttq=False, zero_rows=1,
                       zero_layer=None, input_shape=None, seed=0, name="random_tnn"):
    """Write a QMD ``dense(uint8 x ternary) -> threshold -> dense(ternary) ... -> dense -> argmax``.

    ``sizes`` = [in_features, hidden..., classes]; ``act`` is the hidden activation
    (``ternary`` or ``uint<b>``); ``ttq`` gives every dense layer random ``pos_scale``/
    ``neg_scale``; ``zero_rows`` rows of each layer are all zero; layer index
    ``zero_layer`` (if given) is all zero. The first layer reads the uint8 input directly.
    """
    from models.qmd import Act
    rng = np.random.default_rng(seed)
    input_shape = list(input_shape or [sizes[0]])
    out_act = Act.ternary() if act == "ternary" else Act.uint(int(act[4:]))
    layers, lo, hi = [], 0, 255
    for k, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = random_ternary(rng, m, n, 0.0 if k == zero_layer else density, zero_rows)
        spec = {"name": f"fc{k}", "kind": "dense", "in_features": n, "out_features": m, "weight": "ternary",
                "arrays": {"weights": w}}
        if ttq:
            spec["arrays"].update(_ttq_scales(rng, m))
        layers.append(spec)
        if k < len(sizes) - 2:
            layers.append({"name": f"fc{k}_act", "kind": "threshold", "out": _act_json(act),
                           "arrays": random_multi_thresholds(rng, _int_weights(spec), lo, hi,
                                                             out_act.n_thresholds)})
            lo, hi = out_act.lo, out_act.hi
    layers.append({"name": "class", "kind": "argmax"})
    return save_qmd(directory, name, input_shape, "uint8", layers, provenance={"synthetic": True, "seed": seed})


def random_ternary_cnn(directory, *, input_shape=(8, 8, 3), convs=((4, 3, 1, 1, True), (6, 3, 1, 0, False)),
                       classes=5, density=0.4, act="ternary", ttq=False, seed=0, name="random_tcnn"):
    """Write a QMD ``conv2d(uint8 x ternary) -> threshold [-> maxpool] -> conv2d(ternary) ... ->
    dense(ternary) -> argmax``; ``convs`` as for :func:`random_binary_cnn`, ``act`` the
    activation between layers (``ternary`` or ``uint<b>``)."""
    from models.qmd import Act
    rng = np.random.default_rng(seed)
    out_act = Act.ternary() if act == "ternary" else Act.uint(int(act[4:]))
    h, w, c = input_shape
    layers, lo, hi = [], 0, 255
    for k, (cout, ks, stride, pad, pool) in enumerate(convs):
        fan_in = ks * ks * c
        wm = random_ternary(rng, cout, fan_in, density, zero_rows=1)
        spec = {"name": f"conv{k}", "kind": "conv2d", "in_channels": c, "out_channels": cout, "kernel": ks,
                "stride": stride, "padding": pad, "weight": "ternary", "arrays": {"weights": wm}}
        if ttq:
            spec["arrays"].update(_ttq_scales(rng, cout))
        if pad:
            spec["pad_value"] = int(rng.integers(lo, hi + 1))
        layers.append(spec)
        layers.append({"name": f"conv{k}_act", "kind": "threshold", "out": _act_json(act),
                       "arrays": random_multi_thresholds(rng, _int_weights(spec), lo, hi, out_act.n_thresholds)})
        h, w, c = (h + 2 * pad - ks) // stride + 1, (w + 2 * pad - ks) // stride + 1, cout
        if pool:
            layers.append({"name": f"pool{k}", "kind": "maxpool", "kernel": 2, "stride": 2})
            h, w = h // 2, w // 2
        lo, hi = out_act.lo, out_act.hi
    n = h * w * c
    spec = {"name": "fc", "kind": "dense", "in_features": n, "out_features": classes, "weight": "ternary",
            "arrays": {"weights": random_ternary(rng, classes, n, density)}}
    if ttq:
        spec["arrays"].update(_ttq_scales(rng, classes))
    layers.append(spec)
    layers.append({"name": "class", "kind": "argmax"})
    return save_qmd(directory, name, list(input_shape), "uint8", layers, provenance={"synthetic": True, "seed": seed})
