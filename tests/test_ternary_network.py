"""Ternary networks through the whole hardware flow: planning onto the zero-skip engine,
the report's dense vs. zero-skip cycles, whole pipelines in Amaranth's simulator and the
generated Verilog in Verilator, compared integer by integer with the reference."""

import numpy as np
import pytest

from hw.network import Accelerator, frame_cycles, plan_network
from hw.report import design_markdown, design_report
from models.reference import ReferenceModel
from models.synthetic import random_ternary_cnn, random_ternary_mlp
from sim.amaranth_stream import pack, run_stream, unpack
from sim.rtl import simulate


def _simulate(qmd, folding, images, stall, seed):
    acc = Accelerator(qmd, folding)
    acc.i, acc.o = acc.pixels, acc.result
    lanes = acc.stages[0].in_lanes
    flat = images.reshape(len(images), -1)
    beats = [pack(f[b * lanes:(b + 1) * lanes], 8) for f in flat for b in range(flat.shape[1] // lanes)]
    out, cycles = run_stream(acc, beats, len(images), in_stall=stall, out_stall=stall, seed=seed,
                             max_cycles=200 * len(beats) + 20 * frame_cycles(acc.stages) * len(images))
    last = acc.stages[-1]
    cls_w = acc.result.payload.cls.shape().width
    classes, lw = last.params["classes"], last.params["logit_shape"].width
    cls = np.array([w & ((1 << cls_w) - 1) for w in out])
    logits = np.array([unpack(w >> cls_w, lw, classes, signed=True) for w in out])
    return cls, logits, cycles, acc


MLP_CASES = [
    # (sizes, act, ttq, zero_layer, folding)
    ([16, 12, 8, 4], "ternary", False, None, {"fc0": {"pe": 3, "simd": 4}, "fc1": {"pe": 2, "simd": 3},
                                               "fc2": {"pe": 2, "simd": 4}}),
    ([12, 8, 6, 4], "uint2", True, 1, {"fc0": {"pe": 2, "simd": 3}, "fc1": {"pe": 3, "simd": 2},
                                        "fc2": {"pe": 1, "simd": 3}}),
    ([18, 6, 4], "ternary", True, None, {"fc0": {"pe": 1, "simd": 6}, "fc1": {"pe": 4, "simd": 1}}),
]


@pytest.mark.parametrize("case", range(len(MLP_CASES)))
def test_random_ternary_mlp_matches_reference(tmp_path, case):
    sizes, act, ttq, zero_layer, folding = MLP_CASES[case]
    qmd = random_ternary_mlp(tmp_path, sizes, density=0.4, act=act, ttq=ttq, zero_layer=zero_layer, seed=case)
    images = np.random.default_rng(case).integers(0, 256, (5, sizes[0])).astype(np.uint8)
    cls, logits, _, acc = _simulate(qmd, folding, images, stall=0.25, seed=case)
    assert [s.engine for s in acc.stages if s.layers and s.layers[0].kind == "dense"] == ["ternary_mvtu"] * (
        len(sizes) - 1)
    trace = ReferenceModel(qmd).trace(images)
    assert np.array_equal(logits, trace[qmd.layers[-2].name].numpy())
    assert np.array_equal(cls, trace["class"].numpy())


CNN_CASES = [
    # (input shape, convs (cout, k, stride, pad, pool), act, ttq, folding)
    ((8, 8, 3), ((4, 3, 1, 1, True), (6, 3, 1, 0, False)), "ternary", False,
     {"conv0": {"pe": 2, "simd": 3}, "conv1": {"pe": 3, "simd": 4}, "fc": {"pe": 5, "simd": 6}}),
    ((6, 6, 2), ((4, 3, 1, 1, False), (4, 3, 2, 1, True)), "uint2", True,
     {"conv0": {"pe": 4, "simd": 1}, "conv1": {"pe": 1, "simd": 2}, "fc": {"pe": 1, "simd": 4}}),
]


@pytest.mark.parametrize("case", range(len(CNN_CASES)))
def test_random_ternary_cnn_matches_reference(tmp_path, case):
    """Sliding window -> zero-skip engine (uint8 x ternary) -> max-pool of ternary/2-bit codes ->
    zero-skip engine -> dense -> argmax; padding with a value of the ternary/2-bit input."""
    shape, convs, act, ttq, folding = CNN_CASES[case]
    qmd = random_ternary_cnn(tmp_path, input_shape=shape, convs=convs, act=act, ttq=ttq, seed=case)
    images = np.random.default_rng(case).integers(0, 256, (3,) + shape).astype(np.uint8)
    cls, logits, _, acc = _simulate(qmd, folding, images, stall=0.2, seed=case)
    assert {"sliding_window", "ternary_mvtu", "argmax_output"} <= {s.engine for s in acc.stages}
    trace = ReferenceModel(qmd).trace(images)
    assert np.array_equal(logits, trace["fc"].numpy())
    assert np.array_equal(cls, trace["class"].numpy())


def test_plan_and_report_carry_dense_and_zero_skip_cycles(tmp_path):
    qmd = random_ternary_mlp(tmp_path, [288, 64, 32, 4], density=0.3, act="ternary", seed=4)
    folding = {"fc0": {"pe": 4, "simd": 4}, "fc1": {"pe": 4, "simd": 2}, "fc2": {"pe": 2, "simd": 4}}
    stages = plan_network(qmd, folding)
    rep = design_report(qmd, folding, stages, tmp_path / "x.v", "x")
    entries = [l for l in rep["layers"] if l["engine"] == "ternary_mvtu"]
    assert [l["name"] for l in entries] == ["fc0", "fc1", "fc2"]
    for l in entries:
        layer = qmd.layer(l["name"])
        m, n = layer.weights.shape
        w = layer.weights.reshape(m // l["pe"], l["pe"], n // l["simd"], l["simd"])
        lane = np.maximum(1, (w != 0).sum(axis=2)).sum(axis=0)       # slots per lane and vector
        assert l["cycles_per_frame"] == max(int(lane.max()), n // l["simd"])
        assert l["cycles_per_frame_dense"] == (m // l["pe"]) * (n // l["simd"])
        assert l["weight_density"] == pytest.approx(float((layer.weights != 0).mean()), abs=1e-6)
        assert l["cycles_per_frame"] < l["cycles_per_frame_dense"]
        if m // l["pe"] >= 8:          # enough neuron folds to skip into (NF * (density + 0.1) > 1)
            assert l["cycles_per_frame"] <= (l["weight_density"] + 0.10) * l["cycles_per_frame_dense"]
        assert l["estimated"]["weight_bits"] < l["estimated"]["weight_bits_dense"] * 2
    md = design_markdown(rep)
    assert "Zero-skip ternary engines" in md and "| fc0 |" in md


def test_resource_model_counts_every_lane_memory_of_the_zero_skip_engine(tmp_path):
    """The zero-skip engine's memories as the generator builds them: one schedule memory per
    lane (as deep as its slots: together the schedule bits), one input-bank copy and one
    partial-sum FIFO per lane, an output FIFO and a parameter memory per PE; the logic terms
    go through the same (calibrated) coefficients as the other engines."""
    from hw.resource_model import estimate_stage, logic_features, memories
    from hw.ternary_mvtu import ternary_schedule
    qmd = random_ternary_cnn(tmp_path / "q", input_shape=(8, 8, 3), convs=((8, 3, 1, 0, False), (16, 3, 1, 0, False)),
                             act="ternary", ttq=True, density=0.4, seed=3)
    folding = {"conv0": {"pe": 2, "simd": 3}, "conv1": {"pe": 4, "simd": 4}, "fc": {"pe": 1, "simd": 8}}
    stages = plan_network(qmd, folding)
    k, s = next((k, st) for k, st in enumerate(stages) if st.name == "conv1")
    layer = qmd.layer("conv1")
    sched = ternary_schedule(layer.weights, s.pe, s.simd)
    mems = memories(s)
    sched_mems = [d for name, w, d, _ in mems if name == "weights"]
    assert sorted(sched_mems) == sorted(int(d) for d in sched.lane_steps.ravel() if d)
    assert sum(w * d for name, w, d, _ in mems if name == "weights") == sched.schedule_bits
    lanes, sf, nf = s.pe * s.simd, sched.sf, sched.nf
    assert [(w, d) for name, w, d, _ in mems if name == "input"] == [(2, 2 * sf)] * lanes   # 2-bit ternary codes
    fifos = [d for name, _, d, _ in mems if name == "fifo"]
    assert fifos == [sched.lane_fifo_depth()] * lanes + [2 * nf + 2] * s.pe     # lanes shallow, PE outputs not
    assert Accelerator(qmd, folding).engine(k).lane_fifo_depth == sched.lane_fifo_depth() < 2 * nf + 2
    assert sum(1 for name, *_ in mems if name == "thresholds") == s.pe
    est = estimate_stage(s, "ecp5", calibration={})
    assert est["weight_bits"] == sched.schedule_bits and est["weight_bits_dense"] == 2 * layer.weights.size
    assert (est["luts"], est["ffs"]) == logic_features(s) and not est["calibrated"]
    fitted = {"ecp5": {"ternary_mvtu": {"luts": {"lanes": 2.0}, "ffs": {"lanes": 1.0}}}}
    cal = estimate_stage(s, "ecp5", calibration=fitted)
    assert cal["calibrated"] and cal["luts"] != est["luts"]


def test_ternary_network_rtl_bit_exact_and_cycles_match(tmp_path):
    """Generated Verilog in Verilator: a random ternary CNN (8-bit pixels, ternary activations,
    TTQ scales), every inner stream compared at full rate; the zero-skip conv0 is the
    bottleneck and the measured frame interval equals its analytic cycles (from its weights).
    (Random stalls on the ternary engine and whole networks: the Amaranth-simulator tests.)"""
    qmd = random_ternary_cnn(tmp_path / "qmd", input_shape=(8, 8, 3),
                             convs=((8, 3, 1, 1, True), (8, 3, 1, 0, False)), act="ternary", ttq=True,
                             density=0.3, seed=12)
    folding = {"conv0": {"pe": 2, "simd": 3}, "conv1": {"pe": 2, "simd": 4}, "fc": {"pe": 1, "simd": 8}}
    images = np.random.default_rng(3).integers(0, 256, (8, 8, 8, 3)).astype(np.uint8)
    rep = simulate(qmd, folding, images, tmp_path / "rtl")
    assert rep["mismatches"] == 0 and rep["images"] == 8
    assert rep["layers_compared"] == 5        # conv0_act, pool0, conv1_act, fc, class
    assert all(s["mismatches"] == 0 for s in rep["per_stage"])
    stages = {s["stage"]: s for s in rep["per_stage"]}
    assert [s["engine"] for s in rep["per_stage"] if s["stage"] in ("conv0", "conv1", "fc")] == ["ternary_mvtu"] * 3
    conv0 = stages["conv0"]
    dense = 64 * (8 // 2) * (27 // 3)             # 8x8 windows, NF = 4, SF = 9
    assert conv0["cycles_per_frame_analytic"] == rep["cycles_per_frame_analytic"] < 0.5 * dense
    measured, analytic = rep["cycles_per_frame_measured"], rep["cycles_per_frame_analytic"]
    assert abs(measured - analytic) <= 0.05 * analytic, (measured, analytic)


def test_sparsity_sweep_rows(tmp_path):
    """models.sweep: one folding, models of different density -> accuracy and cycles per model."""
    from models.reference import accuracy
    from models.sweep import sweep_entry, sweep_markdown
    rng = np.random.default_rng(8)
    folding = {"fc0": {"pe": 4, "simd": 4}, "fc1": {"pe": 2, "simd": 4}, "fc2": {"pe": 1, "simd": 4}}
    images = rng.integers(0, 256, (40, 96)).astype(np.uint8)
    labels = rng.integers(0, 4, 40)
    rows = []
    for k, density in enumerate((0.6, 0.35, 0.15)):
        qmd = random_ternary_mlp(tmp_path / f"m{k}", [96, 32, 16, 4], density=density, zero_rows=0,
                                 seed=20 + k, name=f"m{k}")
        if k:      # as an export records a sweep model fine-tuned from tnn_cifar
            qmd.provenance.update({"epochs": 10, "recipe": {"init_from": "tnn_cifar"}})
        row = sweep_entry(qmd, folding, images, labels)
        assert row["training"] == ("10 epochs from tnn_cifar" if k else "unknown")
        stages = plan_network(qmd, folding)
        assert row["cycles_per_frame"] == frame_cycles(stages)
        assert row["ternary_cycles_sum"] == sum(s.cycles_per_frame for s in stages if s.engine == "ternary_mvtu")
        assert row["integer_accuracy"] == accuracy(qmd, images, labels)
        assert row["weight_density"] == pytest.approx(density, abs=0.08)
        rows.append(row)
    assert rows[0]["ternary_cycles_sum"] > rows[1]["ternary_cycles_sum"] > rows[2]["ternary_cycles_sum"]
    assert rows[0]["ternary_cycles_sum_dense"] == rows[2]["ternary_cycles_sum_dense"]
    assert sweep_markdown(rows).count("\n| m") == 3


@pytest.mark.parametrize("model", ["tnn_cifar", "tnn_cifar_d10", "tnn_cifar_d14"])
def test_zoo_ternary_models_skip_within_density_plus_a_tenth(model, tmp_path):
    """The committed tnn_cifar QMDs at tnn_cifar's zoo folding (the one their channel order was
    chosen for): every ternary layer's report entry within (density + 0.10) x dense."""
    from hw.folding import load_folding
    from models.qmd import load_qmd
    from qnnfab.paths import ZOO_DIR
    qmd = load_qmd(ZOO_DIR / model)
    folding = load_folding(ZOO_DIR / "tnn_cifar" / "folding.json", qmd)
    rep = design_report(qmd, folding, plan_network(qmd, folding), tmp_path / "x.v", model)
    entries = [l for l in rep["layers"] if l["engine"] == "ternary_mvtu"]
    assert len(entries) == 9
    for l in entries:
        assert l["cycles_per_frame"] <= (l["weight_density"] + 0.10) * l["cycles_per_frame_dense"], l["name"]
    assert "channel_order" in qmd.provenance
