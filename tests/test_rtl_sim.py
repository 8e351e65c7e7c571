"""Generated Verilog in Verilator through cocotb, compared integer by integer with the
integer reference: a random QMD under random valid/ready stalls (also with run-time
loaded "ram" weights), and the shipped bnn_mnist on real MNIST test images."""

import numpy as np

from hw.folding import load_folding
from models.data import load_dataset
from models.qmd import load_qmd
from models.synthetic import random_binary_cnn, random_binary_mlp
from qnnfab.paths import ZOO_DIR
from sim.rtl import simulate


def test_random_network_under_stalls_is_bit_exact(tmp_path):
    qmd = random_binary_mlp(tmp_path / "qmd", [24, 12, 8, 6], seed=11)
    folding = {"fc0": {"pe": 4, "simd": 12}, "fc1": {"pe": 1, "simd": 2}, "fc2": {"pe": 3, "simd": 8}}
    images = np.random.default_rng(1).integers(0, 256, (24, 24, 1)).astype(np.uint8)
    rep = simulate(qmd, folding, images, tmp_path / "rtl", in_stall=0.3, out_stall=0.3, seed=3)
    assert rep["images"] == 24
    assert rep["layers_compared"] == 5            # binarize, fc0_act, fc1_act, fc2, class
    assert rep["integers_compared"] > 24 * (24 + 12 + 8 + 6)
    assert rep["mismatches"] == 0
    assert all(s["mismatches"] == 0 for s in rep["per_stage"])


def test_random_network_with_run_time_weights_is_bit_exact(tmp_path):
    """Two of three layers loaded at run time (12- and 24-bit words: 2 and 3 bytes each) through
    the ``weights`` byte stream, which starts with the images under stalls: every stream bit-exact
    and no result before the last weight byte."""
    qmd = random_binary_mlp(tmp_path / "qmd", [24, 12, 8, 6], seed=12)
    folding = {"fc0": {"pe": 2, "simd": 6, "weights": "ram"}, "fc1": {"pe": 1, "simd": 2},
               "fc2": {"pe": 3, "simd": 8, "weights": "ram"}}
    images = np.random.default_rng(5).integers(0, 256, (8, 24, 1)).astype(np.uint8)
    rep = simulate(qmd, folding, images, tmp_path / "rtl", in_stall=0.3, out_stall=0.3, seed=4)
    assert rep["weight_bytes"] == 24 * 2 + 2 * 3          # fc0: 6*4 words of 12 bits; fc2: 2*1 of 24
    assert rep["weights_loaded_cycle"] > 0 and rep["results_before_weights"] == 0
    assert rep["first_result_cycle"] > rep["weights_loaded_cycle"]
    assert rep["images"] == 8 and rep["layers_compared"] == 5
    assert rep["mismatches"] == 0 and all(s["mismatches"] == 0 for s in rep["per_stage"])


def test_bnn_mnist_real_images_bit_exact_at_full_rate(tmp_path):
    qmd = load_qmd(ZOO_DIR / "bnn_mnist")
    folding = load_folding(ZOO_DIR / "bnn_mnist" / "folding.json", qmd)
    images, _ = load_dataset("mnist", "test")
    rep = simulate(qmd, folding, images[:12], tmp_path / "rtl")
    assert rep["mismatches"] == 0
    assert rep["layers_compared"] == len(qmd.layers) - 3      # dense+threshold pairs fuse into one stream
    measured, analytic = rep["cycles_per_frame_measured"], rep["cycles_per_frame_analytic"]
    assert abs(measured - analytic) <= 0.05 * analytic


def test_random_cnn_every_stream_bit_exact(tmp_path):
    """Conv path in Verilog: sliding windows, add/subtract and XNOR engines, max-pool, under stalls."""
    qmd = random_binary_cnn(tmp_path / "qmd", input_shape=(8, 8, 3),
                            convs=((4, 3, 1, 1, True), (6, 3, 1, 0, False)), seed=7)
    folding = {"conv0": {"pe": 2, "simd": 3}, "conv1": {"pe": 3, "simd": 2}, "fc": {"pe": 5, "simd": 6}}
    images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3)).astype(np.uint8)
    rep = simulate(qmd, folding, images, tmp_path / "rtl", in_stall=0.2, out_stall=0.2, seed=1)
    engines = {s["engine"] for s in rep["per_stage"]}
    assert {"sliding_window", "addsub_mvtu", "maxpool", "xnor_mvtu"} <= engines
    assert rep["layers_compared"] == 5        # conv0_act, pool0, conv1_act, fc, class
    assert rep["mismatches"] == 0


def test_cpp_harness_whole_set_path_is_bit_exact(tmp_path):
    """The C++ Verilator harness behind `make sim-full`, on a random CNN: every class and logit."""
    from sim.fast import simulate_all
    qmd = random_binary_cnn(tmp_path / "qmd", input_shape=(8, 8, 3),
                            convs=((4, 3, 1, 1, True), (6, 3, 1, 0, False)), seed=9)
    folding = {"conv0": {"pe": 4, "simd": 3}, "conv1": {"pe": 2, "simd": 4}, "fc": {"pe": 5, "simd": 6}}
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (200, 8, 8, 3)).astype(np.uint8)
    labels = rng.integers(0, 5, 200)
    rep = simulate_all(qmd, folding, images, labels, tmp_path / "full")
    assert rep["images"] == 200 and rep["integers_compared"] == 200 * 6
    assert rep["mismatches"] == 0
    assert rep["hardware_accuracy"] == rep["reference_accuracy"]
    assert abs(rep["cycles_per_frame_measured"] - rep["cycles_per_frame_analytic"]) <= \
        0.05 * rep["cycles_per_frame_analytic"]


def test_cpp_harness_loads_run_time_weights(tmp_path):
    """The C++ harness feeds the weight byte image of a design with "ram" layers (two processes,
    each loading it); every class and logit equals the reference."""
    from sim.fast import simulate_all
    qmd = random_binary_mlp(tmp_path / "qmd", [16, 12, 6], seed=21)
    folding = {"fc0": {"pe": 3, "simd": 8, "weights": "ram"}, "fc1": {"pe": 2, "simd": 3, "weights": "ram"}}
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (60, 16, 1)).astype(np.uint8)
    rep = simulate_all(qmd, folding, images, rng.integers(0, 6, 60), tmp_path / "full", jobs=2)
    assert rep["processes"] == 2 and rep["integers_compared"] == 60 * 7
    assert rep["mismatches"] == 0
