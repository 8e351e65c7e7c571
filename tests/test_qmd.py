"""QMD loading and validation: every malformed description gets one clear error naming
the file, the layer and the field."""

import json

import numpy as np
import pytest

from models.qmd import load_qmd, pack_binary, pack_ternary
from models.synthetic import random_binary_mlp, random_ternary_mlp
from qnnfab.errors import QnnfabError


@pytest.fixture
def qmd_dir(tmp_path):
    random_binary_mlp(tmp_path, [16, 8, 4], seed=3)
    return tmp_path


def _edit_manifest(d, fn):
    p = d / "qmd.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def _edit_arrays(d, fn):
    p = d / "qmd.npz"
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    fn(arrays)
    np.savez(p, **arrays)


def _layer(m, name):
    return next(l for l in m["layers"] if l["name"] == name)


def test_round_trip_keeps_every_integer(qmd_dir, tmp_path):
    q = load_qmd(qmd_dir)
    assert [l.name for l in q.layers] == ["binarize", "fc0", "fc0_act", "fc1", "class"]
    assert q.layers[1].weights.shape == (8, 16)
    assert set(np.unique(q.layers[1].weights)) <= {-1, 1}
    with np.load(qmd_dir / "qmd.npz") as z:
        assert np.array_equal(pack_binary(q.layers[1].weights), z["fc0.weights"])
    # derived ranges: the dense output of 16 binary inputs lies in [-16, 16]
    assert (q.layers[1].out_act.lo, q.layers[1].out_act.hi) == (-16, 16)


CASES = [
    # (what to break, expected fragment of the one-line message)
    ("manifest", lambda m: m.update(version=7), "field 'version': unsupported version 7"),
    ("manifest", lambda m: m.update(format="onnx"), "field 'format': unknown format 'onnx'"),
    ("manifest", lambda m: m.pop("layers"), "field 'layers': missing"),
    ("manifest", lambda m: _layer(m, "fc0").update(in_features=15),
     "layer 'fc0' field 'in_features': is 15 but the incoming tensor [16, 1] has 16 elements"),
    ("manifest", lambda m: _layer(m, "fc0").update(out_features=9),
     "layer 'fc0' field 'weights': array 'fc0.weights' has shape (8, 2), expected (9, 2)"),
    ("manifest", lambda m: _layer(m, "fc0").update(weight="pow2"),
     "layer 'fc0' field 'weight': unsupported weight kind 'pow2'"),
    ("manifest", lambda m: _layer(m, "fc0").update(weight="ternary"),
     "layer 'fc0' field 'weights': array 'fc0.weights' has shape (8, 2), expected (8, 2, 2)"),
    ("manifest", lambda m: _layer(m, "fc0").update(kind="conv3d"),
     "layer 'fc0' field 'kind': unsupported layer kind 'conv3d'"),
    ("manifest", lambda m: _layer(m, "fc0").update(in_features="16"),
     "layer 'fc0' field 'in_features': expected integer, got str"),
    ("manifest", lambda m: m["input"].update(dtype="float32"), "field 'input.dtype': unsupported input dtype"),
    ("manifest", lambda m: m["layers"].append({"name": "x", "kind": "argmax"}),
     "layer 'x' field 'kind': no layer may follow 'argmax'"),
    ("arrays", lambda a: a.pop("fc0_act.thresholds"),
     "layer 'fc0_act' field 'thresholds': missing array 'fc0_act.thresholds'"),
    ("arrays", lambda a: a.update({"fc0_act.thresholds": np.full((8, 1), 99, np.int32)}),
     "layer 'fc0_act' field 'thresholds': threshold out of range [-17, 17]"),
    ("arrays", lambda a: a.update({"fc0_act.direction": np.array([1, 0, 1, 1, 1, 1, 1, 1], np.int8)}),
     "layer 'fc0_act' field 'direction': values must be +1 or -1, channel 1 has 0"),
    ("arrays", lambda a: a.update({"fc0.weights": a["fc0.weights"].astype(np.int16)}),
     "layer 'fc0' field 'weights': array 'fc0.weights' has dtype int16"),
    ("arrays", lambda a: a.update({"fc0.weights": a["fc0.weights"][:, :1]}),
     "layer 'fc0' field 'weights': array 'fc0.weights' has shape (8, 1), expected (8, 2)"),
    ("arrays", lambda a: a.update({"fc0_act.thresholds": np.zeros((8, 1), np.float32)}),
     "expected an integer type"),
    ("arrays", lambda a: a.update({"stray.weights": np.zeros(3, np.int8)}), "arrays not used by any layer"),
]


@pytest.mark.parametrize("part, breaker, message", CASES, ids=[c[2][:40] for c in CASES])
def test_malformed_description_is_one_clear_error(qmd_dir, part, breaker, message):
    (_edit_manifest if part == "manifest" else _edit_arrays)(qmd_dir, breaker)
    with pytest.raises(QnnfabError) as info:
        load_qmd(qmd_dir)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(str(qmd_dir))
    assert message in text


def test_padding_bits_must_be_zero(tmp_path):
    random_binary_mlp(tmp_path, [12, 4, 2], seed=0)       # 12 inputs: 4 padding bits per row
    def set_padding(a):
        w = a["fc0.weights"].copy()
        w[0, 1] |= 0x80
        a["fc0.weights"] = w
    _edit_arrays(tmp_path, set_padding)
    with pytest.raises(QnnfabError, match="padding bits beyond the fan-in must be zero"):
        load_qmd(tmp_path)


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(QnnfabError, match="not a QMD directory|manifest not found"):
        load_qmd(tmp_path / "nowhere")
    (tmp_path / "qmd.json").write_text("{not json")
    with pytest.raises(QnnfabError, match="array file not found|not valid JSON"):
        load_qmd(tmp_path)
    np.savez(tmp_path / "qmd.npz", x=np.zeros(1))
    with pytest.raises(QnnfabError, match="not valid JSON"):
        load_qmd(tmp_path)


# --------------------------------------------------------------------------- ternary

@pytest.fixture
def tnn_dir(tmp_path):
    random_ternary_mlp(tmp_path, [12, 8, 4], density=0.5, act="ternary", ttq=True, seed=3)
    return tmp_path


def test_ternary_round_trip_planes_scales_and_ranges(tnn_dir):
    q = load_qmd(tnn_dir)
    fc0, act, fc1 = q.layer("fc0"), q.layer("fc0_act"), q.layer("fc1")
    w = fc0.weights
    assert w.shape == (8, 12) and set(np.unique(w)) == {-1, 0, 1}
    with np.load(tnn_dir / "qmd.npz") as z:
        planes = z["fc0.weights"]
        assert planes.shape == (8, 2, 2) and planes.dtype == np.uint8
        assert np.array_equal(pack_ternary(w), planes)
        bits = np.unpackbits(planes, axis=2, bitorder="little")[:, :, :12]
        assert np.array_equal(bits[:, 0] - bits[:, 1].astype(np.int64), w)
    pos, neg = fc0.arrays["pos_scale"], fc0.arrays["neg_scale"]
    weff = np.where(w > 0, pos[:, None], np.where(w < 0, -neg[:, None], 0))
    assert np.array_equal(fc0.int_weights, weff)
    # interval arithmetic on uint8 inputs with the TTQ integer weights
    assert fc0.out_act.hi == int(np.where(weff > 0, weff * 255, 0).sum(1).max())
    assert fc0.out_act.lo == int(np.where(weff < 0, weff * 255, 0).sum(1).min())
    assert (act.out_act.kind, act.out_act.lo, act.out_act.hi) == ("ternary", -1, 1)
    assert act.arrays["thresholds"].shape == (8, 2)
    # ternary inputs: range from -1..1, zero weights contribute nothing
    w1 = fc1.int_weights
    assert fc1.out_act.hi == int(np.abs(w1).sum(1).max()) and fc1.out_act.lo == -fc1.out_act.hi


def _set_both_planes(a):
    w = a["fc0.weights"].copy()
    w[2, :, 0] |= 0x01
    a["fc0.weights"] = w


TERNARY_CASES = [
    ("arrays", _set_both_planes, "layer 'fc0' field 'weights': row 2, fan-in index 0 is set in both"),
    ("arrays", lambda a: a.update({"fc0.weights": a["fc0.weights"] | np.uint8(0x80)}),
     "layer 'fc0' field 'weights': padding bits beyond the fan-in must be zero"),
    ("arrays", lambda a: a.pop("fc1.neg_scale"),
     "layer 'fc1' field 'neg_scale': missing array 'fc1.neg_scale' (pos_scale and neg_scale come together)"),
    ("arrays", lambda a: a.update({"fc1.pos_scale": np.array([1, 0, 2, 3], np.int32)}),
     "layer 'fc1' field 'pos_scale': scales must be integers in 1..32767, row 1 has 0"),
    ("arrays", lambda a: a.update({"fc1.neg_scale": np.array([1, 2], np.int32)}),
     "layer 'fc1' field 'neg_scale': array 'fc1.neg_scale' has shape (2,), expected (4,)"),
    ("arrays", lambda a: a.update({"fc0_act.thresholds": np.zeros((8, 3), np.int32)}),
     "layer 'fc0_act' field 'thresholds': array 'fc0_act.thresholds' has shape (8, 3), expected (8, 2)"),
    ("arrays", lambda a: a.update({"fc0_act.thresholds": np.tile([[5, -5]], (8, 1)).astype(np.int32),
                                   "fc0_act.direction": np.ones(8, np.int8)}),
     "layer 'fc0_act' field 'thresholds': thresholds of channel 0 must be sorted"),
    ("manifest", lambda m: _layer(m, "fc0_act").update(out={"kind": "quaternary"}),
     "layer 'fc0_act' field 'out': unsupported activation kind 'quaternary' (supported: binary, ternary, uint)"),
    ("manifest", lambda m: _layer(m, "fc1").update(weight="binary"),
     "layer 'fc1' field 'weights': array 'fc1.weights' has shape (4, 2, 1), expected (4, 1)"),
]


@pytest.mark.parametrize("part, breaker, message", TERNARY_CASES, ids=[c[2][:50] for c in TERNARY_CASES])
def test_malformed_ternary_description_is_one_clear_error(tnn_dir, part, breaker, message):
    (_edit_manifest if part == "manifest" else _edit_arrays)(tnn_dir, breaker)
    with pytest.raises(QnnfabError) as info:
        load_qmd(tnn_dir)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(tnn_dir))
    assert message in text


def test_scales_on_binary_weights_are_rejected(qmd_dir):
    _edit_arrays(qmd_dir, lambda a: a.update({"fc1.pos_scale": np.ones(4, np.int32),
                                              "fc1.neg_scale": np.ones(4, np.int32)}))
    with pytest.raises(QnnfabError, match="layer 'fc1' field 'neg_scale': pos_scale/neg_scale are only defined "
                                          "for ternary weights"):
        load_qmd(qmd_dir)


def test_pack_ternary_rejects_other_values():
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        pack_ternary(np.array([[0, 2]]))
