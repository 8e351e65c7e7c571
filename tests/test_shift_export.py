"""ShiftCNN CNV (shift_cifar's topology) and its float baseline: export of power-of-two weights
and 4-bit activations with the float QAT model == integer reference exactly, layer by layer;
INQ-trained layers; the registry entries; fine-tuning from a float checkpoint; the float
baseline's accuracy in the export and in `eval`."""

import json

import numpy as np
import pytest
import torch

from models import nets
from models.data import load_dataset
from models.export import export, float_model_trace, qmd_layers, reference_predictions
from models.nets import CNV, build_model, model_config
from models.qmd import load_qmd, pow2_decode, save_qmd
from models.quant import Pow2Conv2d, Pow2Linear, SintActivation, UintActivation, inq_freeze
from models.reference import ReferenceModel
from models.train import load_checkpoint, train
from qnnfab.errors import QnnfabError

torch.set_num_threads(1)

SMALL = {"channels": (8, 8, 16, 16, 32, 32), "pool_after": (1, 3), "hidden": (32, 32), "weight": "pow2",
         "act": "uint4", "act_step": 0.25, "scale": True}
CFG = {"net": "CNV", "input_shape": (32, 32, 3)}


@pytest.fixture(scope="module")
def cifar_test():
    return load_dataset("cifar10", "test")


def _calibrated(model, images, seed):
    """Random latent weights, then batch-norm statistics from one batch (so every activation level
    occurs), random gammas (some negative, some zero) and betas."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in list(model.convs) + list(model.fcs) + [model.out]:
            mod.weight.normal_(0, 1, generator=g)
        bns = list(model.conv_bns) + list(model.bns)
        for bn in bns:
            bn.momentum = None              # cumulative: one batch sets the running statistics
            bn.reset_running_stats()
        model.train()
        model(torch.as_tensor(images))
        for bn in bns:
            c = bn.num_features
            gamma = torch.rand(c, generator=g) * 2 + 0.5
            gamma[::3] *= -1
            gamma[1] = 0.0                  # a constant channel
            bn.weight.copy_(gamma)
            bn.bias.copy_(torch.rand(c, generator=g) * 2)
    model.eval()
    return model


def _check_equal(qmd, model, images):
    names = [l.name for l in qmd.layers]
    ref = ReferenceModel(qmd).trace(images)
    flt = float_model_trace(model, images, batch=8)
    for name in names:
        r, f = ref[name].numpy(), flt[name]
        assert r.shape == f.shape, name
        assert np.array_equal(r, f), f"{name}: {(r != f).sum()} of {r.size} elements differ"
    last = [n for n in names if n.startswith("fc")][-1]
    logits = flt["logits"].astype(np.float64) / model.logit_scale
    assert np.array_equal(np.round(logits).astype(np.int64), ref[last].numpy())
    assert np.array_equal(reference_predictions(qmd, images, batch=5), flt["class"])
    return ref


@pytest.mark.parametrize("seed", [0, 1])
def test_small_shift_cnv_integer_reference_equals_float_model(tmp_path, cifar_test, seed):
    torch.manual_seed(seed)
    images = cifar_test[0][:16]
    model = _calibrated(CNV(**SMALL), images, seed=20 + seed)
    qmd = save_qmd(tmp_path / "cnv", "cnv", (32, 32, 3), "uint8", qmd_layers(model, CFG), dataset="cifar10")
    weights = [l for l in qmd.layers if l.kind in ("dense", "conv2d")]
    assert [l.attrs["weight"] for l in weights] == ["pow2"] * 9
    for layer, mod in zip(weights, list(model.convs) + list(model.fcs) + [model.out]):
        assert (layer.attrs["terms"], layer.attrs["code_bits"]) == (2, 4)
        assert layer.attrs["exponent_offset"] == mod.exponent_offset() <= 7
        assert np.array_equal(pow2_decode(layer.codes, 4, layer.attrs["exponent_offset"]), layer.weights)
        assert np.abs(layer.weights).max() == 2 ** layer.attrs["exponent_offset"]    # max|W| -> 2^E exactly
    ref = _check_equal(qmd, model, images)
    for name in [n.name for n in qmd.layers if n.name.endswith("_act")]:
        a = ref[name].numpy()
        assert qmd.layer(name).out_act.bits == 4 and a.min() >= 0 and a.max() <= 15
        assert len(np.unique(a)) >= 8, (name, np.unique(a))             # the 4-bit range is in use
    # the first conv computes on the raw pixels; its thresholds are folded with (q - 128)/128
    assert qmd.layer("conv0").in_act.hi == 255


def test_fc0_reads_channels_last_and_the_conv_weights_are_in_ky_kx_c_order(tmp_path, cifar_test):
    torch.manual_seed(3)
    images = cifar_test[0][16:28]
    model = _calibrated(CNV(channels=(4, 4, 8, 8), pool_after=(1, 3), hidden=(16,), weight="pow2", act="uint3",
                            scale=True), images, seed=3)
    qmd = save_qmd(tmp_path / "c", "c", (32, 32, 3), "uint8", qmd_layers(model, CFG))
    assert qmd.layer("fc0").attrs["in_features"] == 200
    wq = model.convs[1].qmd_weight()["int_weights"]                  # [Cout, Cin, K, K]
    assert np.array_equal(qmd.layer("conv1").weights, wq.transpose(0, 2, 3, 1).reshape(4, -1))
    _check_equal(qmd, model, images)


def test_inq_trained_layers_export_exactly(tmp_path, cifar_test):
    torch.manual_seed(4)
    images = cifar_test[0][40:52]
    model = _calibrated(CNV(**SMALL), images, seed=4)
    inq_freeze(model, 0.5)
    with pytest.raises(ValueError, match="INQ has frozen only 50.0%"):
        qmd_layers(model, CFG)
    with torch.no_grad():                 # the float half moves; the frozen half must not
        for mod in model.modules():
            if isinstance(mod, (Pow2Conv2d, Pow2Linear)):
                mod.weight.mul_(0.5)
    inq_freeze(model, 1.0)
    qmd = save_qmd(tmp_path / "inq", "inq", (32, 32, 3), "uint8", qmd_layers(model, CFG))
    _check_equal(qmd, model, images)


def test_signed_activations_export_exactly(tmp_path, cifar_test):
    torch.manual_seed(6)
    images = cifar_test[0][60:72]
    model = _calibrated(CNV(**(SMALL | {"act": "int4", "act_step": 0.5})), images, seed=6)
    qmd = save_qmd(tmp_path / "s", "s", (32, 32, 3), "uint8", qmd_layers(model, CFG))
    act = qmd.layer("conv1_act")
    assert (act.out_act.kind, act.out_act.lo, act.out_act.hi) == ("sint", -8, 7)
    ref = _check_equal(qmd, model, images)
    assert ref["conv1_act"].min() < 0 < ref["conv1_act"].max()


def test_sint_activation_levels():
    act = SintActivation(3, step=0.5)
    y = torch.tensor([-9.0, -1.76, -1.74, -0.26, -0.24, 0.24, 0.26, 1.24, 1.26, 5.0], requires_grad=True)
    out = act(y)
    assert out.tolist() == [-4, -4, -3, -1, 0, 0, 1, 2, 3, 3]
    assert torch.equal(out, torch.clamp(torch.floor(y.detach() / 0.5 + 0.5), -4, 3))
    out.sum().backward()
    assert torch.equal(y.grad, ((y.detach() >= -2.25) & (y.detach() <= 1.75)).float())
    assert act.qmd_out == {"kind": "sint", "bits": 3} and len(act.levels) == 7


def test_uint_activation_step():
    act = UintActivation(4, step=0.25)
    y = torch.tensor([-1.0, 0.12, 0.13, 0.37, 0.38, 3.62, 3.63, 9.0])
    assert act(y).tolist() == [0, 0, 1, 1, 2, 14, 15, 15]
    assert act.levels[0] == 0.125 and act.levels[-1] == 3.625 and len(act.levels) == 15
    with pytest.raises(ValueError, match="step must be positive"):
        UintActivation(2, step=0)


def test_registry_entries_and_float_baseline_refuses_export(tmp_path):
    f, s = model_config("float_cifar"), model_config("shift_cifar")
    for key in ("in_shape", "channels", "pool_after", "kernel", "hidden", "classes", "in_zero", "in_scale"):
        assert f["net_args"][key] == s["net_args"][key]                 # the same CNV topology
    assert (s["net_args"]["weight"], s["net_args"]["pow2_terms"], s["net_args"]["pow2_bits"]) == ("pow2", 2, 4)
    assert s["float_baseline"] == s["init_from"] == "float_cifar"
    # a smaller logit scale (the last layer's dot products are ~2^9 x the float logits), a power of two
    assert s["net_args"]["logit_scale"] == 2.0 ** -13 < f["net_args"]["logit_scale"]
    fm, sm = build_model(f), build_model(s)
    assert [c.out_channels for c in sm.convs] == [64, 64, 128, 128, 256, 256] and sm.feature_shape == (1, 1, 256)
    assert isinstance(sm.convs[0], Pow2Conv2d) and isinstance(sm.fcs[0], Pow2Linear)
    assert isinstance(fm.act, torch.nn.ReLU) and not any(isinstance(m, Pow2Conv2d) for m in fm.modules())
    assert set(fm.state_dict()) <= set(sm.state_dict())                 # shift_cifar starts from float_cifar
    x = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    assert fm(x).shape == sm(x).shape == (2, 10)
    with pytest.raises(QnnfabError, match="a float CNV \\(a float baseline\\) has no integer description"):
        qmd_layers(fm, CFG)


def test_finetune_from_float_checkpoint_export_and_eval(tmp_path, monkeypatch, cifar_test):
    """A tiny float baseline and a tiny ShiftCNN fine-tuned from it: the export measures the baseline's
    accuracy (not quoted) and `eval` reports it as float_baseline_accuracy."""
    from qnnfab.cli import main
    tiny = {"in_shape": [32, 32, 3], "channels": [8, 8, 16, 16, 32, 32], "pool_after": [1, 3], "hidden": [32, 32],
            "logit_scale": 0.125}
    common = {"net": "CNV", "dataset": "cifar10", "input_shape": (32, 32, 3), "epochs": 1, "batch_size": 64,
              "lr_min": 0.0, "weight_decay": 0.0, "train_limit": 256, "test_limit": 200}
    monkeypatch.setitem(nets.MODELS, "tiny_float", common | {
        "net_args": tiny | {"weight": "float", "act": "relu"}, "lr": 0.01, "description": "tiny float"})
    monkeypatch.setitem(nets.MODELS, "tiny_shift", common | {
        "net_args": tiny | {"weight": "pow2", "act": "uint4", "act_step": 0.25, "scale": True},
        "init_from": "tiny_float", "float_baseline": "tiny_float", "lr": 0.001, "description": "tiny shift"})
    runs = tmp_path / "runs"
    monkeypatch.setattr("models.train.default_run_dir", lambda name: runs / name)
    train("tiny_float", run_dir=runs / "tiny_float", progress=False)
    with pytest.raises(QnnfabError, match="'tiny_float' is a float baseline"):
        export("tiny_float", run_dir=runs / "tiny_float", out_dir=tmp_path / "nope")
    float_ck = load_checkpoint(runs / "tiny_float" / "ckpt.pt")
    model = build_model(model_config("tiny_shift"))
    from models.train import init_from_checkpoint
    assert init_from_checkpoint(model, runs / "tiny_float" / "ckpt.pt") == len(float_ck["model"])
    # the first conv as trained; after an activation of step 1/4 (codes = 4x the ReLU) weights x 1/4
    assert torch.equal(model.convs[0].weight, float_ck["model"]["convs.0.weight"])
    assert torch.equal(model.convs[2].weight, float_ck["model"]["convs.2.weight"] * 0.25)
    assert torch.equal(model.conv_bns[2].running_mean, float_ck["model"]["conv_bns.2.running_mean"])
    train("tiny_shift", run_dir=runs / "tiny_shift", progress=False)
    # a quantized source (as tnn_cifar is for its sweep) is copied as it is, not rescaled again
    shift_ck = load_checkpoint(runs / "tiny_shift" / "ckpt.pt")
    again = build_model(model_config("tiny_shift"))
    assert init_from_checkpoint(again, runs / "tiny_shift" / "ckpt.pt") == len(again.state_dict())
    assert torch.equal(again.convs[2].weight, shift_ck["model"]["convs.2.weight"])
    import models.export as ex
    test = tuple(a[:300] for a in cifar_test)
    monkeypatch.setattr(ex, "load_dataset", lambda name, split: test)
    summary = export("tiny_shift", run_dir=runs / "tiny_shift", out_dir=tmp_path / "q")
    qmd = load_qmd(tmp_path / "q")
    fb = qmd.provenance["float_baseline"]
    fmodel = ex.load_trained("tiny_float", runs / "tiny_float")[0]
    want = float((ex.float_model_predictions(fmodel, test[0]) == test[1]).mean())
    assert fb["model"] == "tiny_float" and fb["accuracy"] == qmd.provenance["float_baseline_accuracy"] == want
    assert summary["mismatches"] <= 1
    monkeypatch.setattr("qnnfab.paths.BUILD_DIR", tmp_path / "build")
    monkeypatch.setattr("qnnfab.cli._dataset", lambda q: test)
    assert main(["eval", "--model", str(tmp_path / "q")]) == 0
    rep = json.loads((tmp_path / "build" / "tiny_shift" / "eval.json").read_text())
    assert rep["float_baseline"] == "tiny_float" and rep["float_baseline_accuracy"] == want
    assert rep["float_baseline_measured"] == "now"
    assert rep["integer_minus_float_baseline_points"] == round(100 * (rep["integer_accuracy"] - want), 2)


def test_finetune_without_the_init_checkpoint_names_the_model_to_train_first(tmp_path, monkeypatch):
    monkeypatch.setattr("models.train.default_run_dir", lambda name: tmp_path / name)
    with pytest.raises(QnnfabError, match="shift_cifar starts from float_cifar's trained checkpoint .*"
                                          "make train MODEL=float_cifar first"):
        train("shift_cifar", run_dir=tmp_path / "shift_cifar", progress=False)
    assert not (tmp_path / "shift_cifar" / "ckpt.pt").exists()


def test_exported_shift_cnv_runs_bit_exact_in_the_generated_rtl(tmp_path, cifar_test):
    """Float ShiftCNN CNV (1/8 of shift_cifar's width) -> export -> QMD -> generated Verilog (C++
    Verilator harness) on 24 real CIFAR-10 test images: classes and logits equal the integer
    reference, which equals the float model; measured frame interval = analytic."""
    from sim.fast import simulate_all
    images, labels = cifar_test[0][:24], cifar_test[1][:24]
    model = _calibrated(CNV(**SMALL), images, seed=21)
    qmd = save_qmd(tmp_path / "cnv", "cnv", (32, 32, 3), "uint8", qmd_layers(model, CFG), dataset="cifar10")
    _check_equal(qmd, model, images[:8])
    folding = {"conv0": {"pe": 4, "simd": 3}, "conv1": {"pe": 8, "simd": 8}, "conv2": {"pe": 4, "simd": 8},
               "conv3": {"pe": 8, "simd": 4}, "conv4": {"pe": 8, "simd": 8}, "conv5": {"pe": 4, "simd": 8},
               "fc0": {"pe": 4, "simd": 4}, "fc1": {"pe": 2, "simd": 4}, "fc2": {"pe": 2, "simd": 2}}
    from hw.network import plan_network
    assert {s.engine for s in plan_network(qmd, folding) if s.layers and s.layers[0].kind in ("conv2d", "dense")} \
        == {"shift_mvtu"}
    rep = simulate_all(qmd, folding, images, labels, tmp_path / "rtl")
    assert rep["images"] == 24 and rep["mismatches"] == 0
    assert rep["hardware_accuracy"] == rep["reference_accuracy"]
    assert rep["cycles_per_frame_measured"] == rep["cycles_per_frame_analytic"]
