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
