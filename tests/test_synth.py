"""Synthesis flow: target and fit checks, the calibrated resource model, and real Yosys +
nextpnr runs of a small network for an ECP5 and an iCE40 (the pip-installed YoWASP tools)."""

import json

import pytest

from boards.synth import check_weights_fit, count_cells, synthesize
from boards.synth_report import share_svg, synth_markdown
from boards.targets import TARGETS, get_device, get_target
from hw.network import frame_cycles, plan_network
from hw.resource_model import bram_blocks, estimate_stage, load_calibration
from models.synthetic import random_binary_mlp
from qnnfab.cli import main
from qnnfab.errors import QnnfabError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "tiny"
    qmd = random_binary_mlp(d, [64, 32, 10], seed=5, name="tiny")
    folding = {"fc0": {"pe": 4, "simd": 16}, "fc1": {"pe": 2, "simd": 8}}
    (d / "folding.json").write_text(json.dumps({"format": "qnnfab-folding", "layers": folding}))
    return qmd, folding


def test_unknown_board_and_device_are_one_line_errors():
    with pytest.raises(QnnfabError, match="unknown BOARD 'nope'; known: icebreaker"):
        get_target("nope")
    with pytest.raises(QnnfabError, match="unknown device"):
        get_device("xc7")
    assert {"icebreaker", "ulx3s-85f", "orangecrab-25f", "ooc-up5k", "ooc-85f"} <= set(TARGETS)


def test_cli_synth_unknown_board_exits_2(tiny, capsys):
    qmd, _ = tiny
    assert main(["synth", "--model", str(qmd.path), "--board", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: BOARD: unknown BOARD")


def test_weights_that_cannot_fit_are_rejected_with_numbers(tiny):
    qmd, folding = tiny
    stages = plan_network(qmd, folding)
    small = get_device("up5k").__class__("x", "ecp5", "TINY", "p", "6", luts=10, ffs=10, ebr_blocks=1, ebr_bits=512)
    with pytest.raises(QnnfabError, match=r"2,368 weight bits but the TINY holds 512 bits"):
        check_weights_fit(stages, small, "tiny")
    assert check_weights_fit(stages, get_device("25f"), "tiny") == 64 * 32 + 32 * 10


def test_bram_block_model():
    assert bram_blocks(784, 256, "ecp5") == (22, 18432)      # PDPW16KD 36 x 512
    assert bram_blocks(16, 160, "ecp5") == (1, 18432)
    assert bram_blocks(49, 32, "ecp5")[0] == 0                # shallow: LUT RAM
    assert bram_blocks(16, 4096, "ice40") == (16, 4096)      # 16 x 256 per SB_RAM40_4K
    assert bram_blocks(32, 6272, "ice40", kind="ram") == (2, 262144)   # SPRAM 16 x 16K


def test_calibration_file_is_used(tiny):
    qmd, folding = tiny
    cal = load_calibration()
    assert {"ecp5", "ice40"} <= set(cal)
    s = next(s for s in plan_network(qmd, folding) if s.engine == "xnor_mvtu")
    est = estimate_stage(s, "ecp5")
    raw = estimate_stage(s, "ecp5", calibration={})
    assert est["calibrated"] and not raw["calibrated"]
    from hw.resource_model import logic_terms
    coef = cal["ecp5"]["xnor_mvtu"]["luts"]
    assert all(c >= 0 for c in coef.values())
    assert est["luts"] == max(0, round(sum(coef[k] * v for k, v in logic_terms(s)[0].items())))


def test_cell_counting():
    assert count_cells({"LUT4": 10, "CCU2C": 3, "TRELLIS_FF": 7, "DP16KD": 2}, "ecp5") == \
        {"luts": 16, "lutram": 0, "ffs": 7, "ebr": 2, "spram": 0, "dsp": 0}
    assert count_cells({"SB_LUT4": 5, "SB_DFFE": 2, "SB_DFFSR": 1, "SB_RAM40_4K": 3}, "ice40")["ffs"] == 3


@pytest.mark.parametrize("board", ["ooc-25f", "ooc-up5k"])
def test_real_synthesis_small_network(tiny, tmp_path, board):
    qmd, folding = tiny
    rep = synthesize(qmd, folding, get_target(board), tmp_path / board)
    assert rep["fits"], rep["failure"]
    assert rep["fmax_mhz"] > 10
    assert rep["luts"] > 50 and rep["ffs"] > 20
    assert rep["cycles_per_frame"] == frame_cycles(plan_network(qmd, folding)) == 32
    assert rep["fps"] == pytest.approx(rep["fmax_mhz"] * 1e6 / 32, rel=1e-3)
    for layer in rep["layers"]:      # every stage was synthesized on its own
        assert layer["actual"] is not None and layer["estimated"]["luts"] >= 0
    mvtu = [l for l in rep["layers"] if l["engine"] == "xnor_mvtu"]
    assert all(l["actual"]["luts"] > 0 for l in mvtu)
    md = synth_markdown(rep, "x.svg")
    assert "| fc0 | xnor_mvtu | 4 | 16 | 32 |" in md and "fits: **yes**" in md
    assert share_svg(rep).startswith("<svg") and "fc0" in share_svg(rep)
