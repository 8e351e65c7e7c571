"""Automatic folding: every layer meets the target with the least parallelism, the
result is a valid folding, and the device-budget search returns the fastest fitting one."""

import pytest

from boards.targets import get_device
from hw.autofold import (_candidates, estimate_totals, fits, fold_for_budget, fold_for_cycles, fold_for_fps,
                         layer_cycles)
from hw.folding import validate_folding
from hw.network import frame_cycles, plan_network
from models.qmd import load_qmd
from models.synthetic import random_binary_cnn
from qnnfab.errors import QnnfabError
from qnnfab.paths import ZOO_DIR


@pytest.fixture(scope="module")
def mnist():
    return load_qmd(ZOO_DIR / "bnn_mnist")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return random_binary_cnn(tmp_path_factory.mktemp("cnn") / "q", input_shape=(12, 12, 3), seed=4, classes=10,
                             convs=((16, 3, 1, 1, True), (32, 3, 1, 0, False), (32, 3, 2, 1, False)))


@pytest.mark.parametrize("target", [1, 10, 256, 1000, 4096, 50_000, 10**9])
@pytest.mark.parametrize("which", ["mnist", "cnn"])
def test_each_layer_meets_target_with_least_parallelism(request, which, target):
    qmd = request.getfixturevalue(which)
    folding = fold_for_cycles(qmd, target)
    validate_folding(folding, qmd)
    stages = plan_network(qmd, folding)          # raises if the stream widths do not fit together
    prev_pe = None
    for layer in qmd.layers:
        if layer.kind not in ("dense", "conv2d"):
            continue
        f = folding[layer.name]
        cyc = layer_cycles(layer, f["pe"], f["simd"])
        cands = _candidates(layer, prev_pe)
        best = min(layer_cycles(layer, *c) for c in cands)
        if best <= target:
            assert cyc <= target
            lanes = f["pe"] * f["simd"]
            assert all(pe * simd >= lanes for pe, simd in cands if layer_cycles(layer, pe, simd) <= target)
        else:
            assert cyc == best          # cannot reach the target: as fast as it can go
        prev_pe = f["pe"]
    if target >= 4096:
        assert frame_cycles(stages) <= target


def test_fps_mode_and_known_mnist_folding(mnist):
    f = fold_for_fps(mnist, 390_625, 100.0)   # 256 cycles/frame, the shipped folding's rate
    assert frame_cycles(plan_network(mnist, f)) == 256
    assert f["fc0"] == {"pe": 16, "simd": 49}
    with pytest.raises(QnnfabError, match="positive"):
        fold_for_fps(mnist, 0, 100.0)


def test_budget_search_is_fastest_that_fits(cnn):
    dev = get_device("25f")
    # 1.3x the fully folded design's estimate: tight enough that a faster folding exists and does not fit
    util = 1.3 * estimate_totals(cnn, fold_for_cycles(cnn, 1 << 62), dev.family)["luts"] / dev.luts
    folding = fold_for_budget(cnn, dev, utilization=util)
    t = estimate_totals(cnn, folding, dev.family)
    assert fits(t, dev, util)
    faster = fold_for_cycles(cnn, t["cycles_per_frame"] - 1)
    assert frame_cycles(plan_network(cnn, faster)) < t["cycles_per_frame"]
    assert not fits(estimate_totals(cnn, faster, dev.family), dev, util)


def test_up5k_budget_puts_the_largest_weights_in_spram(mnist):
    dev = get_device("up5k")
    folding = fold_for_budget(mnist, dev)
    validate_folding(folding, mnist)
    t = estimate_totals(mnist, folding, dev.family)
    assert fits(t, dev, 0.8) and t["spram_blocks"] >= 1
    assert folding["fc0"].get("weights") == "ram"     # 200,704 bits never fit the 30 EBRs
    for name, f in folding.items():
        if f.get("weights") == "ram":
            layer = next(l for l in mnist.layers if l.name == name)
            assert layer.weights.size // (f["pe"] * f["simd"]) <= 16384   # one SPRAM deep


def test_budget_that_cannot_fit_is_one_line_error(mnist):
    tiny = get_device("up5k").__class__("t", "ecp5", "TINY", "p", "6", luts=100, ffs=100, ebr_blocks=2,
                                        ebr_bits=18432)
    with pytest.raises(QnnfabError, match=r"does not fit the TINY even fully folded: .*EBR"):
        fold_for_budget(mnist, tiny)


def test_register_outputs_are_set_on_every_layer_and_counted_in_the_estimate(cnn):
    plain = fold_for_cycles(cnn, 1000)
    sliced = fold_for_cycles(cnn, 1000, register_output=True)
    validate_folding(sliced, cnn)
    assert all(f["register_output"] for f in sliced.values())
    assert {k: {"pe": f["pe"], "simd": f["simd"]} for k, f in sliced.items()} == plain
    stages = plan_network(cnn, sliced)
    widths = [s.out_lanes * s.out_shape.width for s in stages if s.register_output]
    assert len(widths) == len(sliced)
    a, b = estimate_totals(cnn, plain, "ecp5"), estimate_totals(cnn, sliced, "ecp5")
    assert b["ffs"] - a["ffs"] == sum(2 * w + 2 for w in widths)   # two payload registers, two valid bits
    assert b["luts"] - a["luts"] == sum(widths)                     # the output register's 2:1 multiplexer
    assert b["cycles_per_frame"] == a["cycles_per_frame"]
    budget = fold_for_budget(cnn, get_device("25f"), utilization=0.5, register_output=True)
    assert all(f["register_output"] for f in budget.values())
