"""QMD loading and validation: every malformed description gets one clear error naming
the file, the layer and the field."""

import json

import numpy as np
import pytest

from models.qmd import load_qmd, pack_binary
from models.synthetic import random_binary_mlp
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
    ("manifest", lambda m: _layer(m, "fc0").update(weight="ternary"),
     "layer 'fc0' field 'weight': unsupported weight kind 'ternary'"),
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
