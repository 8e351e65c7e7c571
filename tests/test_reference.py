"""The integer reference against a direct, loop-by-loop reading of docs/qmd-spec.md."""

import numpy as np
import pytest

from models.reference import ReferenceModel
from models.synthetic import random_binary_cnn, random_binary_mlp, random_ternary_cnn, random_ternary_mlp


def _spec_threshold(x, layer):
    thr, d = layer.arrays["thresholds"], layer.arrays["direction"]
    c = np.arange(x.shape[-1])
    xe = x[..., None]
    count = np.where(d[c][:, None] > 0, xe >= thr[c], xe <= thr[c]).sum(-1)
    kind = layer.out_act.kind
    return 2 * count - 1 if kind == "binary" else count - 1 if kind == "ternary" else count


def _spec_weights(layer):
    """The dot product's integer weights, read from the spec: the signs, and for TTQ
    pos_scale[o] where +1 and -neg_scale[o] where -1."""
    w = layer.weights.astype(np.int64)
    if "pos_scale" in layer.arrays:
        for o in range(w.shape[0]):
            w[o] = [layer.arrays["pos_scale"][o] if v > 0 else -layer.arrays["neg_scale"][o] if v < 0 else 0
                    for v in w[o]]
    return w


def _spec_conv(x, layer):
    a = layer.attrs
    k, s, p = a["kernel"], a["stride"], a["padding"]
    w = _spec_weights(layer).reshape(-1, k, k, a["in_channels"])
    h, wd, _ = x.shape
    xp = np.full((h + 2 * p, wd + 2 * p, x.shape[2]), a.get("pad_value", 0), dtype=np.int64)
    xp[p:p + h, p:p + wd] = x
    oh, ow = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    y = np.zeros((oh, ow, w.shape[0]), dtype=np.int64)
    for oy in range(oh):
        for ox in range(ow):
            win = xp[oy * s:oy * s + k, ox * s:ox * s + k]
            for o in range(w.shape[0]):
                y[oy, ox, o] = int((w[o] * win).sum())
    return y


def _spec_maxpool(x, layer):
    k, s = layer.attrs["kernel"], layer.attrs["stride"]
    oh, ow = (x.shape[0] - k) // s + 1, (x.shape[1] - k) // s + 1
    return np.array([[x[oy * s:oy * s + k, ox * s:ox * s + k].max(axis=(0, 1)) for ox in range(ow)]
                     for oy in range(oh)])


def _spec_run(qmd, image):
    x, outs = image.astype(np.int64), {}
    for layer in qmd.layers:
        if layer.kind == "threshold":
            x = _spec_threshold(x, layer)
        elif layer.kind == "dense":
            x = _spec_weights(layer) @ x.reshape(-1)
        elif layer.kind == "conv2d":
            x = _spec_conv(x, layer)
        elif layer.kind == "maxpool":
            x = _spec_maxpool(x, layer)
        elif layer.kind == "argmax":
            x = np.int64(int(np.argmax(x)))
        outs[layer.name] = x
    return outs


@pytest.mark.parametrize("make", [
    lambda d: random_binary_mlp(d, [20, 12, 6], input_shape=[5, 4, 1], seed=4),
    lambda d: random_binary_cnn(d, seed=5),
    lambda d: random_binary_cnn(d, input_shape=(9, 7, 2), convs=((3, 3, 2, 1, False), (4, 2, 1, 1, True)), seed=6),
    lambda d: random_ternary_mlp(d, [20, 12, 8, 6], input_shape=[5, 4], act="ternary", seed=7),
    lambda d: random_ternary_mlp(d, [20, 12, 8, 6], act="uint2", ttq=True, zero_layer=1, seed=8),
    lambda d: random_ternary_cnn(d, act="ternary", ttq=True, seed=9),
    lambda d: random_ternary_cnn(d, input_shape=(9, 7, 2), convs=((3, 3, 2, 1, True), (4, 2, 1, 1, False)),
                                 act="uint2", density=0.2, seed=10),
], ids=["mlp", "cnn-pad-pool", "cnn-stride2", "tnn-mlp", "ttq-mlp-uint2-zero-layer", "ttq-cnn", "tnn-cnn-uint2"])
def test_reference_equals_the_spec_read_literally(tmp_path, make):
    qmd = make(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4,) + tuple(qmd.input_shape)).astype(np.uint8)
    trace = ReferenceModel(qmd).trace(images)
    for i, image in enumerate(images):
        for name, expect in _spec_run(qmd, image).items():
            assert np.array_equal(trace[name][i].numpy(), expect), name


def test_argmax_takes_the_first_maximum(tmp_path):
    qmd = random_binary_mlp(tmp_path, [8, 4], seed=0)
    ref = ReferenceModel(qmd)
    assert int(ref._argmax(None, __import__("torch").tensor([[3, 5, 5, 1]]))[0]) == 1


def test_input_out_of_range_is_rejected(tmp_path):
    qmd = random_binary_mlp(tmp_path, [8, 4], seed=0)
    with pytest.raises(ValueError, match="expected"):
        ReferenceModel(qmd).trace(np.zeros((2, 9, 1)))


def test_products_run_in_float32_only_where_the_bound_makes_it_exact(tmp_path, monkeypatch):
    """Every product layer of these models is bounded below 2^24, so it runs in float32; with
    the float32 limit lowered to nothing the same layers run in float64, and both equal the spec."""
    import torch
    import models.reference as reference
    qmd = random_ternary_cnn(tmp_path, act="uint2", ttq=True, seed=11)
    images = np.random.default_rng(1).integers(0, 256, (3,) + tuple(qmd.input_shape)).astype(np.uint8)
    fast = ReferenceModel(qmd)
    assert {w.dtype for w in fast._weights.values()} == {torch.float32}
    monkeypatch.setattr(reference, "_EXACT_F32", 0)
    wide = ReferenceModel(qmd)
    assert {w.dtype for w in wide._weights.values()} == {torch.float64}
    a, b = fast.trace(images), wide.trace(images)
    for i, image in enumerate(images):
        for name, expect in _spec_run(qmd, image).items():
            assert np.array_equal(a[name][i].numpy(), expect) and np.array_equal(b[name][i].numpy(), expect), name
