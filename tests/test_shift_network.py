"""Power-of-two (ShiftCNN) networks through the hardware flow: planning onto the shift-add
engine, the report's keys, whole pipelines in Amaranth's simulator and the generated
Verilog in Verilator, compared integer by integer with the reference; the multiplier-free
check and the LUT-per-MAC comparison with Yosys; the multiplier twin used for it."""

import json

import numpy as np
import pytest
from amaranth.hdl import unsigned

from boards.shift_cost import MulMVTU, multiplier_twin, shift_layer_costs
from hw.network import Accelerator, frame_cycles, plan_network
from hw.report import design_markdown, design_report
from hw.resource_model import estimate_stage
from hw.shift_mvtu import ShiftMVTU
from models.qmd import pow2_decode
from models.reference import ReferenceModel
from models.synthetic import random_multi_thresholds, random_pow2_cnn, random_pow2_codes, random_pow2_mlp
from qnnfab.cli import main
from sim.amaranth_stream import pack, run_stream, unpack
from sim.rtl import simulate


def _simulate(qmd, folding, images, stall, seed):
    acc = Accelerator(qmd, folding)
    acc.i, acc.o = acc.pixels, acc.result
    lanes = acc.stages[0].in_lanes
    flat = images.reshape(len(images), -1)
    beats = [pack(f[b * lanes:(b + 1) * lanes], 8) for f in flat for b in range(flat.shape[1] // lanes)]
    out, _ = run_stream(acc, beats, len(images), in_stall=stall, out_stall=stall, seed=seed,
                        max_cycles=200 * len(beats) + 20 * frame_cycles(acc.stages) * len(images))
    last = acc.stages[-1]
    cls_w = acc.result.payload.cls.shape().width
    classes, lw = last.params["classes"], last.params["logit_shape"].width
    cls = np.array([w & ((1 << cls_w) - 1) for w in out])
    logits = np.array([unpack(w >> cls_w, lw, classes, signed=True) for w in out])
    return cls, logits, acc


MLP_CASES = [
    # (sizes, pow2 (N, B, E), act, folding)
    ([16, 12, 8, 4], (2, 4, 7), "uint4", {"fc0": {"pe": 3, "simd": 4}, "fc1": {"pe": 2, "simd": 3},
                                          "fc2": {"pe": 2, "simd": 4}}),
    ([12, 8, 4], (1, 3, 2), "uint2", {"fc0": {"pe": 2, "simd": 3}, "fc1": {"pe": 4, "simd": 2}}),
    ([10, 6, 4], (3, 2, 2), "ternary", {"fc0": {"pe": 1, "simd": 5}, "fc1": {"pe": 2, "simd": 6}}),
    ([12, 8, 6, 4], (2, 4, 7), "sint4", {"fc0": {"pe": 2, "simd": 4}, "fc1": {"pe": 3, "simd": 2},
                                         "fc2": {"pe": 4, "simd": 3}}),
]


@pytest.mark.parametrize("case", range(len(MLP_CASES)))
def test_random_pow2_mlp_matches_reference(tmp_path, case):
    sizes, pow2, act, folding = MLP_CASES[case]
    qmd = random_pow2_mlp(tmp_path, sizes, pow2=pow2, act=act, seed=case)
    images = np.random.default_rng(case).integers(0, 256, (4, sizes[0])).astype(np.uint8)
    cls, logits, acc = _simulate(qmd, folding, images, stall=0.25, seed=case)
    assert [s.engine for s in acc.stages if s.layers and s.layers[0].kind == "dense"] == ["shift_mvtu"] * (
        len(sizes) - 1)
    trace = ReferenceModel(qmd).trace(images)
    assert np.array_equal(logits, trace[qmd.layers[-2].name].numpy())
    assert np.array_equal(cls, trace["class"].numpy())


@pytest.mark.parametrize("act", ["uint3", "sint3"])
def test_random_pow2_cnn_matches_reference(tmp_path, act):
    """Sliding window -> shift engine on 8-bit pixels -> 3-bit activations (unsigned, or signed in
    offset binary) -> max-pool -> shift engine on 3-bit codes (padding with a 3-bit value) ->
    dense -> argmax, under stalls."""
    qmd = random_pow2_cnn(tmp_path, input_shape=(6, 6, 2), convs=((4, 3, 1, 1, True), (4, 3, 1, 1, False)),
                          act=act, seed=3)
    folding = {"conv0": {"pe": 2, "simd": 2}, "conv1": {"pe": 1, "simd": 4}, "fc": {"pe": 5, "simd": 4}}
    images = np.random.default_rng(3).integers(0, 256, (3, 6, 6, 2)).astype(np.uint8)
    cls, logits, acc = _simulate(qmd, folding, images, stall=0.2, seed=3)
    assert {"sliding_window", "shift_mvtu", "maxpool", "argmax_output"} <= {s.engine for s in acc.stages}
    trace = ReferenceModel(qmd).trace(images)
    assert np.array_equal(logits, trace["fc"].numpy())
    assert np.array_equal(cls, trace["class"].numpy())


def test_plan_report_and_estimate(tmp_path):
    qmd = random_pow2_mlp(tmp_path, [64, 32, 10], pow2=(2, 4, 7), act="uint4", seed=4)
    folding = {"fc0": {"pe": 4, "simd": 8}, "fc1": {"pe": 2, "simd": 8}}
    stages = plan_network(qmd, folding)
    shift = [s for s in stages if s.engine == "shift_mvtu"]
    assert [s.name for s in shift] == ["fc0", "fc1"]
    for s in shift:
        m, n = s.layers[0].weights.shape
        assert s.cycles_per_frame == (m // s.pe) * (n // s.simd)
        est = estimate_stage(s)
        assert est["weight_bits"] == m * n * 2 * 4                    # N codes of B bits per weight
        assert est["luts"] > 0 and est["bram_blocks"] >= 0
    rep = design_report(qmd, folding, stages, tmp_path / "x.v", "x")
    fc0 = next(l for l in rep["layers"] if l["name"] == "fc0")
    assert (fc0["engine"], fc0["terms"], fc0["code_bits"], fc0["exponent_offset"]) == ("shift_mvtu", 2, 4, 7)
    assert "multipliers" not in fc0                                  # not measured: no synthesis in make verilog
    assert "Shift-add engines" in design_markdown(rep)


def test_generated_verilog_bit_exact_and_cycles_match(tmp_path):
    """Generated Verilog in Verilator: a random pow2 CNN (8-bit pixels, 4-bit activations), every
    inner stream compared at full rate, then under stalls; measured frame interval = analytic."""
    qmd = random_pow2_cnn(tmp_path / "qmd", input_shape=(8, 8, 3), convs=((8, 3, 1, 1, True), (8, 3, 1, 0, False)),
                          act="uint4", seed=12)
    folding = {"conv0": {"pe": 2, "simd": 3}, "conv1": {"pe": 2, "simd": 4}, "fc": {"pe": 1, "simd": 8}}
    images = np.random.default_rng(3).integers(0, 256, (8, 8, 8, 3)).astype(np.uint8)
    rep = simulate(qmd, folding, images, tmp_path / "rtl")
    assert rep["mismatches"] == 0 and rep["images"] == 8
    assert rep["layers_compared"] == 5        # conv0_act, pool0, conv1_act, fc, class
    assert all(s["mismatches"] == 0 for s in rep["per_stage"])
    assert [s["engine"] for s in rep["per_stage"] if s["stage"] in ("conv0", "conv1", "fc")] == ["shift_mvtu"] * 3
    conv0 = next(s for s in rep["per_stage"] if s["stage"] == "conv0")
    assert conv0["cycles_per_frame_analytic"] == rep["cycles_per_frame_analytic"] == 64 * (8 // 2) * (27 // 3)
    assert rep["cycles_per_frame_measured"] == rep["cycles_per_frame_analytic"]
    stalled = simulate(qmd, folding, images[:4], tmp_path / "rtl_stall", in_stall=0.3, out_stall=0.3, seed=5)
    assert stalled["mismatches"] == 0 and stalled["images"] == 4


def test_multiplier_twin_computes_the_same_layer():
    """The MAC engine the cost comparison synthesizes computes exactly what the shift engine does."""
    rng = np.random.default_rng(8)
    m, n, pe, simd = 6, 12, 3, 4
    codes = random_pow2_codes(rng, m, n, 2, 4, 7)
    wq = pow2_decode(codes, 4, 7)
    thr = random_multi_thresholds(rng, wq, 0, 15, 15)
    for thresholds in (None, thr):
        shift = ShiftMVTU(codes, code_bits=4, exponent_offset=7, pe=pe, simd=simd, in_shape=unsigned(4),
                          thresholds=None if thresholds is None else thresholds["thresholds"],
                          direction=None if thresholds is None else thresholds["direction"])
        twin = multiplier_twin(shift)
        assert isinstance(twin, MulMVTU) and twin.weight_bits == 9 and twin.out_elem == shift.out_elem
        x = rng.integers(0, 16, (3, n))
        beats = [pack(v[s * simd:(s + 1) * simd], 4) for v in x for s in range(n // simd)]
        outs = []
        for dut in (shift, twin):
            out, _ = run_stream(dut, beats, 3 * (m // pe), in_stall=0.2, out_stall=0.2, seed=1)
            e = dut.out_elem
            outs.append(np.array([v for b in out for v in unpack(b, e.width, pe, e.signed)]).reshape(3, m))
        assert np.array_equal(outs[0], outs[1])
        if thresholds is None:
            assert np.array_equal(outs[0], x @ wq.T)


def test_cli_synth_costs_no_multipliers_and_cached(tmp_path, monkeypatch):
    """`verilog --synth-costs`: every shift layer of the report carries multipliers = 0 and its LUTs
    per MAC next to the multiplier twin's (Yosys, ECP5); a plain `verilog` reuses the cache."""
    d = tmp_path / "tiny"
    random_pow2_mlp(d, [8, 4, 2], pow2=(2, 3, 4), act="uint2", seed=9, name="tiny")
    (d / "folding.json").write_text(json.dumps(
        {"format": "qnnfab-folding", "layers": {"fc0": {"pe": 2, "simd": 2}, "fc1": {"pe": 1, "simd": 2}}}))
    monkeypatch.setattr("qnnfab.paths.BUILD_DIR", tmp_path / "build")
    assert main(["verilog", "--model", str(d), "--synth-costs"]) == 0
    rep = json.loads((tmp_path / "build" / "tiny" / "report.json").read_text())
    shift = [l for l in rep["layers"] if l["engine"] == "shift_mvtu"]
    assert len(shift) == 2
    for l in shift:
        c = l["synth_costs"]
        assert l["multipliers"] == 0 == c["shift_engine"]["mul_cells"] == c["shift_engine"]["dsp"]
        assert c["macs"] == l["pe"] * l["simd"]
        assert l["luts_per_mac"] == round(c["shift_engine"]["luts"] / c["macs"], 2) > 0
        mul = c["multiplier_engine"]
        assert mul["lut_mapped"]["mul_cells"] == c["macs"] and mul["lut_mapped"]["dsp"] == 0
        assert mul["dsp_mapped"]["dsp"] >= 1
        assert l["luts_per_mac_multiplier"] == round(mul["lut_mapped"]["luts"] / c["macs"], 2) > 0
    assert main(["verilog", "--model", str(d)]) == 0                  # no synthesis: the cached figures
    again = json.loads((tmp_path / "build" / "tiny" / "report.json").read_text())
    assert [l.get("synth_costs") for l in again["layers"]] == [l.get("synth_costs") for l in rep["layers"]]
    md = (tmp_path / "build" / "tiny" / "report.md").read_text()
    assert f"| fc0 | 2 | 2 | N=2 B=3 E=4 | 0 | {shift[0]['luts_per_mac']} |" in md


def test_reference_computes_the_specs_shift_add_sum(tmp_path):
    """models/reference.py on pow2 layers = docs/qmd-spec.md's sum of +-(x << shift(t, j)) over the
    non-zero terms, evaluated here term by term in Python integers, for every dense layer."""
    qmd = random_pow2_mlp(tmp_path, [10, 7, 5, 3], pow2=(3, 3, 5), act="sint3", seed=21)
    x = np.random.default_rng(21).integers(0, 256, (3, 10))
    trace = ReferenceModel(qmd).trace(x)
    inp = x
    for layer in qmd.layers:
        if layer.kind == "dense":
            e, b = layer.attrs["exponent_offset"], layer.attrs["code_bits"]
            want = np.zeros((len(inp), layer.attrs["out_features"]), dtype=np.int64)
            for f in range(len(inp)):
                for o in range(want.shape[1]):
                    for t in range(layer.attrs["terms"]):
                        for k in range(inp.shape[1]):
                            c = int(layer.codes[o, t, k])
                            j, neg = c & ((1 << (b - 1)) - 1), c >> (b - 1)
                            if j:
                                v = int(inp[f, k]) << (e - t - (j - 1))
                                want[f, o] += -v if neg else v
            assert np.array_equal(trace[layer.name].numpy(), want), layer.name
        inp = trace[layer.name].numpy().reshape(len(x), -1) if layer.kind != "argmax" else inp
