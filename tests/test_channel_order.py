"""The lane-balancing channel order (models/channel_order.py): the reordered description
computes the same network integer for integer, and its zero-skip cycles are exact, fewer in
all and no worse in the worst layer than with the training order."""

import json

import numpy as np
import pytest

from hw.ternary_mvtu import ternary_schedule
from models.channel_order import balance_channels, lane_cycles, layer_dicts
from models.qmd import load_qmd, save_qmd
from models.reference import ReferenceModel
from models.synthetic import random_multi_thresholds, random_ternary_cnn
from qnnfab.errors import QnnfabError

FOLDING = {"conv0": {"pe": 4, "simd": 1}, "conv1": {"pe": 4, "simd": 4}, "fc": {"pe": 1, "simd": 8}}


def _skewed_cnn(tmp_path, seed):
    """A random ternary CNN whose sparsity is per input channel, as in a trained network:
    some channels of conv1 and fc keep most weights, others almost none."""
    q = random_ternary_cnn(tmp_path / "orig", input_shape=(8, 8, 3), convs=((8, 3, 1, 0, True), (16, 3, 1, 0, False)),
                           classes=5, density=0.9, act="uint2", seed=seed)
    rng = np.random.default_rng(seed)
    layers = layer_dicts(q)
    for d in layers:
        if d["name"] in ("conv1", "fc"):
            w = np.array(d["arrays"]["weights"])
            cin = d["in_channels"] if d["kind"] == "conv2d" else 16
            keep = rng.uniform(0.05, 1.0, size=cin)[np.arange(w.shape[1]) % cin]
            w[rng.random(w.shape) > keep] = 0
            d["arrays"]["weights"] = w
        if d["name"] == "conv1_act":        # thresholds inside the sparser layer's dot range
            d["arrays"] = random_multi_thresholds(rng, layers[layers.index(d) - 1]["arrays"]["weights"], 0, 3, 3)
    return save_qmd(tmp_path / "skewed", q.name, q.input_shape, "uint8", layers, provenance={}), layers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_order_is_the_same_network_and_not_slower(tmp_path, seed):
    q, layers = _skewed_cnn(tmp_path, seed)
    fpath = tmp_path / "folding.json"
    fpath.write_text(json.dumps({"format": "qnnfab-folding", "layers": FOLDING}))
    new, summary = balance_channels(layers, fpath, iterations=2000, seed=seed)
    b = save_qmd(tmp_path / "balanced", q.name, q.input_shape, "uint8", new, provenance={})

    x = np.random.default_rng(seed).integers(0, 256, size=(32, 8, 8, 3))
    t0, t1 = ReferenceModel(q).trace(x), ReferenceModel(b).trace(x)
    assert np.array_equal(t0["fc"].numpy(), t1["fc"].numpy())          # logits, integer for integer
    assert np.array_equal(t0["class"].numpy(), t1["class"].numpy())
    for name in ("conv0", "conv0_act", "pool0", "conv1", "conv1_act"):  # hidden maps: the same, reordered
        order = summary["layers"][name.split("_")[0].replace("pool", "conv")].get("channel_order")
        if order is not None:
            assert np.array_equal(t0[name].numpy()[..., order], t1[name].numpy()), name

    assert any("channel_order" in v for v in summary["layers"].values())
    excess = []
    for layer in b.layers:
        if layer.kind in ("conv2d", "dense"):
            f = FOLDING[layer.name]
            sched = ternary_schedule(layer.weights, f["pe"], f["simd"])
            entry = summary["layers"][layer.name]
            assert sched.cycles_per_vector == entry["cycles_per_vector_after"]   # the cost model is exact
            dense = (layer.weights.shape[0] // f["pe"]) * (layer.weights.shape[1] // f["simd"])
            density = float((layer.weights != 0).mean())
            excess.append([entry[f"cycles_per_vector_{k}"] / dense - density for k in ("before", "after")])
    # each step reorders one layer's rows and the next one's columns without raising the worse
    # of their two excesses over density, so the worst layer's never grows
    assert max(e[1] for e in excess) <= max(e[0] for e in excess) + 1e-12
    before = sum(v["cycles_per_vector_before"] for v in summary["layers"].values())
    after = sum(v["cycles_per_vector_after"] for v in summary["layers"].values())
    assert after < before


def test_lane_cycles_matches_the_schedule_on_random_layers():
    rng = np.random.default_rng(3)
    for _ in range(20):
        cin, k = int(rng.choice([4, 8, 16])), int(rng.choice([1, 9]))
        m = int(rng.choice([4, 8, 16]))
        w = rng.choice([-1, 0, 1], size=(m, k * cin), p=[0.2, 0.6, 0.2])
        pe = int(rng.choice([d for d in (1, 2, 4) if m % d == 0]))
        simd = int(rng.choice([d for d in (1, 2, 4) if cin % d == 0]))
        counts = (w.reshape(m, k, cin) != 0).sum(axis=1)
        assert lane_cycles(counts, pe, simd, k * cin // simd) == ternary_schedule(w, pe, simd).cycles_per_vector


def test_bad_folding_names_the_file_and_field(tmp_path):
    q, layers = _skewed_cnn(tmp_path, 0)
    fpath = tmp_path / "folding.json"
    fpath.write_text(json.dumps({"format": "qnnfab-folding", "layers": dict(FOLDING, conv1={"pe": 3, "simd": 4})}))
    with pytest.raises(QnnfabError, match="conv1.*'pe'"):
        balance_channels(layers, fpath)
    with pytest.raises(QnnfabError, match="no such folding file"):
        balance_channels(layers, tmp_path / "missing.json")
    fpath.write_text(json.dumps({"format": "qnnfab-folding", "layers": {"conv0": {"pe": 4, "simd": 1}}}))
    with pytest.raises(QnnfabError, match="conv1.*missing folding entry"):
        balance_channels(layers, fpath)
