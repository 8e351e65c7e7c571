"""Export of the CIFAR-10 CNV topology: binary convolutions, the first layer's input
normalisation folded exactly into integer thresholds, max-pooling of binary values, the
channels-last flatten; float model == integer reference, layer by layer."""

import json

import numpy as np
import pytest
import torch

from models import nets
from models.data import load_dataset
from models.export import export, float_model_trace, qmd_layers, reference_predictions
from models.nets import CNV, build_model, model_config
from models.qmd import load_qmd, save_qmd
from models.quant import BinaryConv2d, clip_latent_weights
from models.reference import ReferenceModel
from models.train import augment, flip_images, load_checkpoint, train

torch.set_num_threads(1)

SMALL = {"channels": (8, 8, 16, 16, 32, 32), "pool_after": (1, 3), "hidden": (32, 32)}


@pytest.fixture(scope="module")
def cifar_test():
    return load_dataset("cifar10", "test")


def _randomize(model, seed):
    """Random latent weights and random BN statistics, including zero and negative gammas
    and channels whose threshold is outside the reachable range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        first = True
        for lin, bn in list(zip(model.convs, model.conv_bns)) + list(zip(model.fcs, model.bns)):
            lin.weight.uniform_(-1, 1, generator=g)
            c = lin.weight.shape[0]
            n = lin.weight[0].numel()
            # the float layer's output scale: (q-128)/128 is within [-1, 1) for the first layer
            spread = n ** 0.5 * (0.5 if first else 1.0)
            bn.running_mean.copy_(torch.randn(c, generator=g) * spread)
            bn.running_var.copy_(torch.rand(c, generator=g) * spread ** 2 + 0.5)
            gamma = torch.randn(c, generator=g)
            gamma[0], gamma[1] = 0.0, 0.0          # constant +1 / -1
            bn.weight.copy_(gamma)
            beta = torch.randn(c, generator=g)
            beta[0], beta[1] = 0.7, -0.7
            bn.bias.copy_(beta)
            bn.running_mean[2] = 10.0 * n          # never / always met
            bn.running_mean[3] = -10.0 * n
            first = False
        model.out.weight.uniform_(-1, 1, generator=g)
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
    assert np.array_equal(np.round(logits), logits)
    assert np.array_equal(np.round(logits).astype(np.int64), ref[last].numpy())
    assert np.array_equal(ref["class"].numpy(), np.argmax(flt["logits"], axis=1))
    assert np.array_equal(reference_predictions(qmd, images, batch=5), flt["class"])
    return ref


@pytest.mark.parametrize("seed", [0, 1])
def test_small_cnv_integer_reference_equals_float_model(tmp_path, cifar_test, seed):
    torch.manual_seed(seed)
    model = _randomize(CNV(**SMALL), seed=10 + seed)
    images = cifar_test[0][:16]
    cfg = {"net": "CNV", "input_shape": (32, 32, 3)}
    qmd = save_qmd(tmp_path / "cnv", "cnv", (32, 32, 3), "uint8", qmd_layers(model, cfg), dataset="cifar10")
    names = [l.name for l in qmd.layers]
    assert names == ["conv0", "conv0_act", "conv1", "conv1_act", "pool1", "conv2", "conv2_act", "conv3",
                     "conv3_act", "pool3", "conv4", "conv4_act", "conv5", "conv5_act", "fc0", "fc0_act",
                     "fc1", "fc1_act", "fc2", "class"]
    assert qmd.layer("fc0").attrs["in_features"] == 32
    assert qmd.layer("conv0").in_shape == (32, 32, 3) and qmd.layer("conv5").out_shape == (1, 1, 32)
    ref = _check_equal(qmd, model, images)
    acts = [n for n in names if n.endswith("_act")]
    directions = np.concatenate([qmd.layer(n).arrays["direction"] for n in acts])
    assert (directions == 1).any() and (directions == -1).any()
    for name in acts:
        a = ref[name].numpy()
        assert set(np.unique(a)) == {-1, 1}, name
        assert (a[..., 0] == 1).all() and (a[..., 1] == -1).all(), name     # zero gamma
        assert len(np.unique(a[..., 2])) == 1 and len(np.unique(a[..., 3])) == 1, name
    # the first conv computes on the raw pixels
    thr = qmd.layer("conv0_act").arrays["thresholds"]
    assert np.abs(thr).max() <= 255 * 27 + 1 and np.abs(thr[4:]).max() > 27


def test_first_layer_fold_is_exact_next_to_the_threshold(tmp_path, cifar_test):
    """Put every conv0 channel's float threshold a hair (0.128 of one pixel step) above or
    below a dot product of the raw pixels that occurs: the folded integer threshold must
    land on the right side (ceil/floor of the affine-folded value), and the float model
    and the integer reference must agree on every element. (Exact ties are not used: the
    float BatchNorm may evaluate ``x*scale + shift`` with a fused multiply-add, whose sign
    at ``x == mean`` is a rounding accident, not the formula.)"""
    torch.manual_seed(4)
    model = _randomize(CNV(**SMALL), seed=4)
    images = cifar_test[0][32:40]
    conv, bn = model.convs[0], model.conv_bns[0]
    with torch.no_grad():
        q = torch.as_tensor(images).float().permute(0, 3, 1, 2)
        dots = conv.dot(q)                                        # [B, C, 30, 30]
        c = dots.shape[1]
        d = dots.permute(1, 0, 2, 3).reshape(c, -1).median(dim=1).values
        sw = torch.where(conv.weight >= 0, 1.0, -1.0).sum(dim=(1, 2, 3))
        delta = torch.tensor([1e-3, 1e-3, -1e-3, -1e-3] * (c // 4))
        bn.running_mean.copy_((d - 128 * sw) / 128 + delta)
        bn.bias.zero_()
        gamma = torch.rand(c) + 0.5
        gamma[::2] *= -1
        bn.weight.copy_(gamma)
    qmd = save_qmd(tmp_path / "e", "e", (32, 32, 3), "uint8", qmd_layers(model, {"net": "CNV",
                   "input_shape": (32, 32, 3)}))
    act = qmd.layer("conv0_act").arrays
    up = gamma > 0
    expect = d.to(torch.int64) + torch.where(delta > 0, torch.where(up, 1, 0), torch.where(up, 0, -1))
    assert act["thresholds"][:, 0].tolist() == expect.tolist()
    assert act["direction"].tolist() == torch.where(up, 1, -1).tolist()
    ref = _check_equal(qmd, model, images)
    near = np.abs(ref["conv0"].numpy() - d.numpy().astype(np.int64)) <= 1
    assert near.sum() > 100                  # the boundary is exercised


def test_flatten_is_channels_last_when_the_features_are_spatial(tmp_path, cifar_test):
    # four convolutions: 32-30-28-14-12-10-5, so the dense layer sees 5x5x8 features
    torch.manual_seed(3)
    model = _randomize(CNV(channels=(4, 4, 8, 8), pool_after=(1, 3), hidden=(16,)), seed=3)
    assert model.feature_shape == (5, 5, 8)
    qmd = save_qmd(tmp_path / "c", "c", (32, 32, 3), "uint8", qmd_layers(model, {"net": "CNV",
                   "input_shape": (32, 32, 3)}))
    assert [l.name for l in qmd.layers][-6:] == ["conv3_act", "pool3", "fc0", "fc0_act", "fc1", "class"]
    assert qmd.layer("fc0").attrs["in_features"] == 200
    _check_equal(qmd, model, cifar_test[0][16:32])


def test_binary_conv2d_uses_signs_and_is_clipped():
    torch.manual_seed(0)
    conv = BinaryConv2d(3, 5, 3)
    with torch.no_grad():
        conv.weight.mul_(10)
    x = torch.randn(2, 3, 7, 7)
    expect = torch.nn.functional.conv2d(x, torch.where(conv.weight >= 0, 1.0, -1.0))
    assert torch.allclose(conv(x), expect)
    assert conv.bias is None
    model = torch.nn.Sequential(conv, torch.nn.Flatten())
    assert clip_latent_weights(model) == 1 and conv.weight.abs().max() <= 1.0
    y = conv(x.requires_grad_())
    y.sum().backward()
    assert conv.weight.grad is not None and x.grad is not None


def test_flip_augmentation():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    y = flip_images(x)
    flipped = [torch.equal(y[i], x[i].flip(1)) for i in range(len(x))]
    same = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54
    assert torch.equal(augment(x, {}), x)


def test_bnn_cifar_registry_entry():
    cfg = model_config("bnn_cifar")
    assert cfg["dataset"] == "cifar10" and tuple(cfg["input_shape"]) == (32, 32, 3)
    model = build_model(cfg)
    assert model.feature_shape == (1, 1, 256)
    assert [c.out_channels for c in model.convs] == [64, 64, 128, 128, 256, 256]
    assert [f.out_features for f in model.fcs] + [model.out.out_features] == [512, 512, 10]
    x = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    assert model(x).shape == (2, 10)
    # the committed snapshot (past the 50-epoch cycle) resumes under the recipe as it is now
    # (warm restarts and distillation from float_cifar, both from epoch 50 on)
    from models.train import _recipe, _resumable, _validate_distill
    from qnnfab.paths import REPO_ROOT
    _validate_distill("bnn_cifar", cfg)
    assert cfg["distill"]["teacher"] == "float_cifar" and cfg["distill"]["from_epoch"] == 50
    ck = load_checkpoint(REPO_ROOT / "models" / "checkpoints" / "bnn_cifar.pt")
    assert ck["epoch"] >= 50 and _resumable(ck["recipe"], json.loads(json.dumps(_recipe(cfg))), ck["epoch"])
    # the snapshot is the finished run with the recipe's top fine-tuning applied, and the committed
    # QMD was exported from it
    assert ck["top_finetune"]["settings"] == cfg["top_finetune"] and ck["top_finetune"]["epoch"] == ck["epoch"]
    from models.qmd import load_qmd
    prov = load_qmd(REPO_ROOT / "models" / "zoo" / "bnn_cifar").provenance
    assert prov["recipe"]["top_finetune"]["settings"] == cfg["top_finetune"]
    assert prov["qat_accuracy"] == ck["top_finetune"]["test_accuracy"] == prov["integer_accuracy_at_export"]


def test_small_cnv_train_and_export(tmp_path, monkeypatch, cifar_test):
    entry = {"net": "CNV", "dataset": "cifar10", "input_shape": (32, 32, 3),
             "net_args": {"in_shape": [32, 32, 3], "channels": [8, 8, 16, 16, 32, 32], "pool_after": [1, 3],
                          "hidden": [32, 32], "logit_scale": 0.125},
             "epochs": 1, "batch_size": 64, "lr": 0.01, "lr_min": 0.0, "weight_decay": 0.0,
             "augment_shift": 4, "augment_flip": True, "train_limit": 512, "test_limit": 200,
             "description": "tiny cnv"}
    monkeypatch.setitem(nets.MODELS, "tiny_cnv", entry)
    run = tmp_path / "run"
    s = train("tiny_cnv", run_dir=run, seed=0, progress=False)
    assert s["epochs_done"] == 1
    ck = load_checkpoint(run / "ckpt.pt")
    assert ck["recipe"]["augment_flip"] is True
    for k, v in ck["model"].items():
        if k.startswith(("convs.", "fcs.", "out.")) and k.endswith("weight"):
            assert v.abs().max() <= 1.0, k
    import models.export as ex
    monkeypatch.setattr(ex, "load_dataset", lambda name, split: tuple(a[:300] for a in cifar_test))
    summary = export("tiny_cnv", run_dir=run, out_dir=tmp_path / "q")
    qmd = load_qmd(tmp_path / "q")
    assert qmd.dataset == "cifar10" and qmd.name == "tiny_cnv" and qmd.description == "tiny cnv"
    assert summary["mismatches"] <= 1
    assert summary["test_images"] == 300
    assert qmd.provenance["recipe"]["augment_flip"] is True


def test_exported_cnv_runs_bit_exact_in_the_generated_rtl(tmp_path, cifar_test):
    """Float CNV -> export -> QMD -> generated Verilog (C++ Verilator harness): the hardware's
    classes and logits equal the integer reference, which equals the float model."""
    from sim.fast import simulate_all
    model = _randomize(CNV(**SMALL), seed=21)
    images, labels = cifar_test[0][:24], cifar_test[1][:24]
    qmd = save_qmd(tmp_path / "cnv", "cnv", (32, 32, 3), "uint8",
                   qmd_layers(model, {"net": "CNV", "input_shape": (32, 32, 3)}), dataset="cifar10")
    _check_equal(qmd, model, images[:8])
    folding = {"conv0": {"pe": 4, "simd": 3}, "conv1": {"pe": 8, "simd": 8}, "conv2": {"pe": 4, "simd": 8},
               "conv3": {"pe": 8, "simd": 4}, "conv4": {"pe": 8, "simd": 8}, "conv5": {"pe": 4, "simd": 8},
               "fc0": {"pe": 4, "simd": 4}, "fc1": {"pe": 2, "simd": 4}, "fc2": {"pe": 2, "simd": 2}}
    rep = simulate_all(qmd, folding, images, labels, tmp_path / "rtl")
    assert rep["images"] == 24 and rep["mismatches"] == 0
    assert rep["hardware_accuracy"] == rep["reference_accuracy"]
    assert abs(rep["cycles_per_frame_measured"] - rep["cycles_per_frame_analytic"]) <= \
        0.05 * rep["cycles_per_frame_analytic"]
