"""Whole accelerators from random QMDs and foldings, in Amaranth's simulator, against the
integer reference; run-time loaded ("ram") weights through the ``weights`` byte stream;
stage planning and folding validation."""

import json

import numpy as np
import pytest

from hw.folding import load_folding
from hw.mvtu import MVTU
from hw.network import Accelerator, frame_cycles, plan_network, weight_image, weight_image_bytes
from models.reference import ReferenceModel
from models.synthetic import random_binary_cnn, random_binary_mlp
from qnnfab.errors import QnnfabError
from sim.amaranth_stream import Feed, pack, run_stream, unpack


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _random_folding(rng, qmd):
    """PE/SIMD per dense layer such that neighbouring widths divide one another."""
    folding, prev_pe = {}, None
    for layer in qmd.layers:
        if layer.kind != "dense":
            continue
        n, m = layer.attrs["in_features"], layer.attrs["out_features"]
        simds = [d for d in _divisors(n) if prev_pe is None or d % prev_pe == 0 or prev_pe % d == 0]
        simd = int(rng.choice(simds))
        pe = int(rng.choice(_divisors(m)))
        folding[layer.name] = {"pe": pe, "simd": simd}
        prev_pe = pe
    return folding


def _simulate(qmd, folding, images, stall, seed, feeds=()):
    acc = Accelerator(qmd, folding)
    acc.i, acc.o = acc.pixels, acc.result          # run_stream drives .i / .o
    lanes = acc.stages[0].in_lanes
    flat = images.reshape(len(images), -1)
    beats = [pack(f[b * lanes:(b + 1) * lanes], 8) for f in flat for b in range(flat.shape[1] // lanes)]
    feeds = [Feed(getattr(acc, port), beats_, start=start, stall=stall) for port, beats_, start in feeds]
    out, cycles = run_stream(acc, beats, len(images), in_stall=stall, out_stall=stall, seed=seed,
                             max_cycles=200 * len(beats) + 20 * frame_cycles(acc.stages) * len(images)
                             + 20 * sum(len(f.beats) for f in feeds), feeds=feeds)
    acc.feeds = feeds
    last = acc.stages[-1]
    cls_w = acc.result.payload.cls.shape().width
    classes, lw = last.params["classes"], last.params["logit_shape"].width
    cls = np.array([w & ((1 << cls_w) - 1) for w in out])
    logits = np.array([unpack(w >> cls_w, lw, classes, signed=True) for w in out])
    return cls, logits, cycles, acc


@pytest.mark.parametrize("seed", range(8))
def test_random_network_matches_reference(tmp_path, seed):
    rng = np.random.default_rng(100 + seed)
    depth = int(rng.integers(1, 4))
    sizes = [int(rng.choice([8, 12, 16, 24]))] + [int(rng.choice([4, 6, 8, 12])) for _ in range(depth)]
    qmd = random_binary_mlp(tmp_path, sizes, seed=seed)
    folding = _random_folding(rng, qmd)
    images = rng.integers(0, 256, (5, sizes[0], 1)).astype(np.uint8)
    cls, logits, _, _ = _simulate(qmd, folding, images, stall=0.25, seed=seed)
    trace = ReferenceModel(qmd).trace(images)
    assert np.array_equal(logits, trace[qmd.layers[-2].name].numpy())
    assert np.array_equal(cls, trace["class"].numpy())


@pytest.mark.parametrize("seed", range(4))
def test_run_time_loaded_weights_match_reference(tmp_path, seed):
    """Some layers' weights loaded at run time (random folding, random layers marked "ram"):
    bytes arrive late and with stalls while images are already queued; every logit and
    class equals the reference, and no result leaves before the last weight byte."""
    rng = np.random.default_rng(400 + seed)
    sizes = [int(rng.choice([8, 12, 16]))] + [int(rng.choice([4, 6, 8, 12])) for _ in range(int(rng.integers(1, 4)))]
    qmd = random_binary_mlp(tmp_path, sizes, seed=seed)
    folding = _random_folding(rng, qmd)
    names = list(folding)
    for name in rng.choice(names, int(rng.integers(1, len(names) + 1)), replace=False):
        folding[name]["weights"] = "ram"
    image = weight_image(qmd, folding)
    stages = plan_network(qmd, folding)
    assert len(image) == weight_image_bytes(stages) > 0
    images = rng.integers(0, 256, (3, sizes[0], 1)).astype(np.uint8)
    cls, logits, cycles, acc = _simulate(qmd, folding, images, stall=0.25, seed=seed,
                                         feeds=[("weights", list(image), int(rng.integers(0, 40)))])
    trace = ReferenceModel(qmd).trace(images)
    assert np.array_equal(logits, trace[qmd.layers[-2].name].numpy())
    assert np.array_equal(cls, trace["class"].numpy())
    assert cycles[0] > acc.feeds[0].cycles[-1], "a result left before the weights were loaded"


def test_weight_image_layout(tmp_path):
    """Per "ram" layer in network order: its MVTU words, ceil(PE*SIMD/8) little-endian bytes each."""
    qmd = random_binary_mlp(tmp_path, [16, 12, 8, 4], seed=3)
    folding = {"fc0": {"pe": 3, "simd": 4, "weights": "ram"}, "fc1": {"pe": 1, "simd": 12},
               "fc2": {"pe": 2, "simd": 8, "weights": "ram"}}
    image = weight_image(qmd, folding)
    expect = b""
    for name in ("fc0", "fc2"):
        layer, f = qmd.layer(name), folding[name]
        width = f["pe"] * f["simd"]
        for word in MVTU(layer.weights, pe=f["pe"], simd=f["simd"]).weight_words():
            expect += word.to_bytes((width + 7) // 8, "little")
    assert image == expect and len(image) == 16 * 2 + 2 * 2      # fc0: 16 words of 12 bits, fc2: 2 of 16
    assert weight_image(qmd, {k: dict(v, weights="rom") for k, v in folding.items()}) == b""
    acc = Accelerator(qmd, folding)
    assert acc.weight_bytes == 36 and [s.name for s in acc.loaded_stages] == ["fc0", "fc2"]
    assert not hasattr(Accelerator(qmd, {"fc0": {"pe": 3, "simd": 4}, "fc1": {"pe": 1, "simd": 12},
                                         "fc2": {"pe": 2, "simd": 8}}), "weights")


def test_steady_state_interval_is_the_slowest_stage(tmp_path):
    qmd = random_binary_mlp(tmp_path, [32, 16, 8, 4], seed=5)
    folding = {"fc0": {"pe": 4, "simd": 8}, "fc1": {"pe": 2, "simd": 8}, "fc2": {"pe": 2, "simd": 2}}
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 1)).astype(np.uint8)
    _, _, cycles, acc = _simulate(qmd, folding, images, stall=0.0, seed=0)
    analytic = frame_cycles(acc.stages)
    assert analytic == 16 == (16 // 4) * (32 // 8)
    assert np.diff(cycles)[2:].tolist() == [analytic] * (len(images) - 3)


def test_plan_fuses_dense_and_threshold_and_joins_widths(tmp_path):
    qmd = random_binary_mlp(tmp_path, [16, 8, 4], seed=1)
    stages = plan_network(qmd, {"fc0": {"pe": 2, "simd": 4}, "fc1": {"pe": 1, "simd": 8}})
    assert [(s.name, s.engine) for s in stages] == [
        ("binarize", "threshold_unit"), ("fc0", "xnor_mvtu"), ("dwc_fc0_fc1", "width_converter"),
        ("fc1", "xnor_mvtu"), ("class", "argmax_output")]
    assert [l.name for l in stages[1].layers] == ["fc0", "fc0_act"]
    assert stages[0].in_lanes == 4 and stages[1].cycles_per_frame == 4 * 4


def _write_folding(d, layers):
    (d / "folding.json").write_text(json.dumps({"format": "qnnfab-folding", "layers": layers}))


@pytest.mark.parametrize("layers, message", [
    ({"fc0": {"pe": 3, "simd": 4}}, "layer 'fc0' field 'pe': 8 output features are not divisible by PE=3"),
    ({"fc0": {"pe": 2, "simd": 5}, "fc1": {"pe": 1, "simd": 1}},
     "layer 'fc0' field 'simd': 16 input features are not divisible by SIMD=5"),
    ({"fc0": {"pe": 2, "simd": 4}}, "layer 'fc1': missing folding entry"),
    ({"fc0": {"pe": 2, "simd": 4}, "fc1": {"pe": 1, "simd": 1}, "fc9": {"pe": 1, "simd": 1}},
     "layer 'fc9': no such layer"),
    ({"fc0": {"pe": "2", "simd": 4}, "fc1": {"pe": 1, "simd": 1}}, "field 'pe': must be a positive integer"),
    ({"fc0": {"pe": 2, "simd": 4, "weights": "flash"}, "fc1": {"pe": 1, "simd": 1}},
     "layer 'fc0' field 'weights': must be \"rom\" (initialised block RAM), \"lut\" (initialised, built from "
     "LUTs) or \"ram\" (loaded at run time), got 'flash'"),
    ({"fc0": {"pe": 2, "simd": 4}, "fc1": {"pe": 1, "simd": 1, "weight": "ram"}},
     "layer 'fc1' field 'weight': unknown field (known: pe, simd, weights, register_output)"),
    ({"fc0": {"pe": 2, "simd": 4, "register_output": 1}, "fc1": {"pe": 1, "simd": 1}},
     "layer 'fc0' field 'register_output': must be true or false, got 1"),
])
def test_bad_folding_is_one_clear_error(tmp_path, layers, message):
    qmd = random_binary_mlp(tmp_path, [16, 8, 4], seed=1)
    _write_folding(tmp_path, layers)
    with pytest.raises(QnnfabError) as info:
        load_folding(tmp_path / "folding.json", qmd)
    assert message in str(info.value) and str(tmp_path / "folding.json") in str(info.value)
    assert "\n" not in str(info.value)


def test_folding_weights_field_defaults_to_rom(tmp_path):
    qmd = random_binary_mlp(tmp_path, [16, 8, 4], seed=1)
    _write_folding(tmp_path, {"fc0": {"pe": 2, "simd": 4, "weights": "ram"}, "fc1": {"pe": 1, "simd": 1}})
    folding = load_folding(tmp_path / "folding.json", qmd)
    assert folding == {"fc0": {"pe": 2, "simd": 4, "weights": "ram"}, "fc1": {"pe": 1, "simd": 1, "weights": "rom"}}
    assert [s.weights for s in plan_network(qmd, folding) if s.engine == "xnor_mvtu"] == ["ram", "rom"]


def test_lut_weights_are_logic_not_block_ram(tmp_path):
    """``"weights": "lut"``: planned and estimated as logic (no block RAM, a LUT per bit per 16
    words on top of the ROM engine), and not counted against a device's EBR."""
    from boards.synth import check_weights_fit
    from boards.targets import get_device
    from hw.report import estimate_stage
    qmd = random_binary_mlp(tmp_path, [288, 64, 10], seed=2)
    rom = {"fc0": {"pe": 4, "simd": 32, "weights": "rom"}, "fc1": {"pe": 2, "simd": 8}}
    lut = {"fc0": rom["fc0"] | {"weights": "lut"}, "fc1": rom["fc1"]}
    s_rom, s_lut = (next(s for s in plan_network(qmd, f) if s.name == "fc0") for f in (rom, lut))
    assert s_lut.weights == "lut" and s_lut.cycles_per_frame == s_rom.cycles_per_frame
    e_rom, e_lut = estimate_stage(s_rom), estimate_stage(s_lut)
    assert e_rom["bram_blocks"] > 0 and e_lut["bram_blocks"] == 0
    assert e_lut["weight_bits"] == e_rom["weight_bits"] == 288 * 64
    assert e_lut["luts"] - e_rom["luts"] == pytest.approx(1.25 * 4 * 32 * 9, abs=2)    # 144 words: 9 LUT4s a bit
    # fc1 (64 bits x 40 words) is logic either way: "lut" changes nothing there
    f1 = [next(s for s in plan_network(qmd, f) if s.name == "fc1") for f in (rom, lut | {"fc1": rom["fc1"] | {"weights": "lut"}})]
    assert estimate_stage(f1[0]) == estimate_stage(f1[1])
    tiny = get_device("25f").__class__("x", "ecp5", "TINY", "p", "6", luts=10, ffs=10, ebr_blocks=1, ebr_bits=1024)
    with pytest.raises(QnnfabError, match="ROM weights"):
        check_weights_fit(plan_network(qmd, rom), tiny, "m")
    lut["fc1"] = lut["fc1"] | {"weights": "lut"}
    assert check_weights_fit(plan_network(qmd, lut), tiny, "m") == 288 * 64 + 64 * 10


def test_neighbouring_widths_that_do_not_divide_are_rejected(tmp_path):
    qmd = random_binary_mlp(tmp_path, [8, 12, 4], seed=1)
    with pytest.raises(QnnfabError, match="layer 'fc1' field 'simd': SIMD=6 and the previous stage's 4 elements"):
        plan_network(qmd, {"fc0": {"pe": 4, "simd": 8}, "fc1": {"pe": 1, "simd": 6}})


CNN_CASES = [
    # (input shape, convs (cout, k, stride, pad, pool), folding)
    ((8, 8, 3), ((4, 3, 1, 0, True), (6, 3, 1, 0, False)),
     {"conv0": {"pe": 2, "simd": 3}, "conv1": {"pe": 3, "simd": 4}, "fc": {"pe": 5, "simd": 6}}),
    ((6, 6, 2), ((4, 3, 1, 1, False), (4, 3, 2, 1, True)),
     {"conv0": {"pe": 4, "simd": 1}, "conv1": {"pe": 1, "simd": 2}, "fc": {"pe": 1, "simd": 4}}),
]


@pytest.mark.parametrize("case", range(len(CNN_CASES)))
def test_random_cnn_matches_reference(tmp_path, case):
    """Sliding window -> add/subtract MVTU (uint8 x binary) -> max-pool -> XNOR MVTU -> dense -> argmax."""
    shape, convs, folding = CNN_CASES[case]
    qmd = random_binary_cnn(tmp_path, input_shape=shape, convs=convs, seed=case)
    images = np.random.default_rng(case).integers(0, 256, (3,) + shape).astype(np.uint8)
    cls, logits, cycles, acc = _simulate(qmd, folding, images, stall=0.2, seed=case)
    engines = [s.engine for s in acc.stages]
    assert {"sliding_window", "addsub_mvtu", "xnor_mvtu", "argmax_output"} <= set(engines)
    trace = ReferenceModel(qmd).trace(images)
    assert np.array_equal(logits, trace["fc"].numpy())
    assert np.array_equal(cls, trace["class"].numpy())


def test_cnn_frame_interval_is_the_slowest_stage(tmp_path):
    shape, convs, folding = CNN_CASES[0]
    qmd = random_binary_cnn(tmp_path, input_shape=shape, convs=convs, seed=0)
    images = np.random.default_rng(1).integers(0, 256, (6,) + shape).astype(np.uint8)
    _, _, cycles, acc = _simulate(qmd, folding, images, stall=0.0, seed=0)
    analytic = frame_cycles(acc.stages)
    measured = np.diff(cycles)[2:]
    assert abs(measured.mean() - analytic) <= 0.05 * analytic, (measured, analytic)


def test_run_time_weights_on_a_ternary_layer_are_refused(tmp_path):
    from models.synthetic import random_ternary_mlp
    qmd = random_ternary_mlp(tmp_path, [16, 8, 4], density=0.5, seed=1)
    folding = {"fc0": {"pe": 2, "simd": 4, "weights": "ram"}, "fc1": {"pe": 1, "simd": 2}}
    for storage in ("ram", "lut"):
        folding["fc0"]["weights"] = storage
        with pytest.raises(QnnfabError, match=rf"layer 'fc0' field 'weights': '{storage}' weights are supported "
                                              r"for binary weights only"):
            plan_network(qmd, folding)
    folding["fc0"]["weights"] = "rom"
    assert [s.weights for s in plan_network(qmd, folding) if s.engine == "ternary_mvtu"] == ["rom", "rom"]


def test_run_time_weights_on_a_pow2_layer_are_refused(tmp_path):
    from models.synthetic import random_pow2_mlp
    qmd = random_pow2_mlp(tmp_path, [16, 8, 4], seed=1)
    folding = {"fc0": {"pe": 2, "simd": 4, "weights": "ram"}, "fc1": {"pe": 1, "simd": 2}}
    with pytest.raises(QnnfabError, match=r"layer 'fc0' field 'weights': .* binary weights only; "
                                          r"the shift-add engine keeps its weights in ROM"):
        plan_network(qmd, folding)


def test_register_slices_keep_results_exact_and_the_frame_interval(tmp_path):
    """``register_output`` puts a register slice on every engine's output stream: the same
    integers under random stalls, and no bubbles (the interval is still the slowest stage's)."""
    shape, convs, folding = CNN_CASES[0]
    sliced = {k: dict(v, register_output=True) for k, v in folding.items()}
    qmd = random_binary_cnn(tmp_path, input_shape=shape, convs=convs, seed=0)
    images = np.random.default_rng(2).integers(0, 256, (6,) + shape).astype(np.uint8)
    cls, logits, _, acc = _simulate(qmd, sliced, images, stall=0.3, seed=4)
    assert acc.sliced == {"conv0", "conv1", "fc"}
    trace = ReferenceModel(qmd).trace(images)
    assert np.array_equal(logits, trace["fc"].numpy()) and np.array_equal(cls, trace["class"].numpy())
    _, _, cycles, acc = _simulate(qmd, sliced, images, stall=0.0, seed=0)
    analytic = frame_cycles(acc.stages)
    measured = np.diff(cycles)[2:]
    assert abs(measured.mean() - analytic) <= 0.05 * analytic, (measured, analytic)
