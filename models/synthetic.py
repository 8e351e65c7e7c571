"""Random but valid QMDs, for tests of the whole flow (engines, reference, RTL).

``random_binary_mlp`` draws an input-binarized binary MLP of the given widths, with
thresholds spread over the whole legal range (both comparison directions, thresholds
that are always or never met included), so every corner of the integer semantics is
exercised, not only the ones a trained model happens to use.
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
