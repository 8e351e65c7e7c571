"""Ternary quantizers (TWN, TTQ, ternary and 2-bit activations) with straight-through
estimators, the multi-level threshold fold, and the ternary CNV (tnn_cifar's topology):
float QAT model == integer reference, layer by layer; a smoke training with export."""

import json

import numpy as np
import pytest
import torch

from models import nets
from models.data import load_dataset
from models.export import export, float_model_trace, fold_bn_levels, qmd_layers, reference_predictions
from models.nets import CNV, build_model, model_config
from models.qmd import load_qmd, save_qmd
from models.quant import (LevelCount, TernaryActivation, TernaryConv2d, TernaryLinear, UintActivation,
                          clip_latent_weights, ternarize)
from models.reference import ReferenceModel
from models.train import load_checkpoint, train

torch.set_num_threads(1)

SMALL = {"channels": (8, 8, 16, 16, 32, 32), "pool_after": (1, 3), "hidden": (32, 32)}


# --------------------------------------------------------------------------- quantizers

def test_ternarize_forward_is_exact_and_backward_is_straight_through():
    w = torch.tensor([-2.0, -0.6, -0.5, -0.2, 0.0, 0.5, 0.50001, 0.9, 1.5], requires_grad=True)
    t = ternarize(w, torch.tensor(0.5))
    assert t.tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]      # |w| == delta -> 0
    g = torch.arange(1.0, 10.0)
    t.backward(g)
    assert torch.equal(w.grad, g * (w.detach().abs() <= 1).float())


def test_twn_delta_alpha_and_density_per_output_channel():
    torch.manual_seed(0)
    fc = TernaryLinear(40, 6, mode="twn", delta_factor=0.7)
    w = fc.weight.detach()
    delta = 0.7 * w.abs().mean(dim=1)
    assert torch.allclose(fc.delta(), delta)
    t = torch.where(w > delta[:, None], 1.0, torch.where(w < -delta[:, None], -1.0, 0.0))
    assert torch.equal(fc.ternary_weight(), t) and torch.equal(fc.int_weight(), t)
    above = w.abs() > delta[:, None]
    alpha = (w.abs() * above).sum(1) / above.sum(1)
    assert torch.allclose(fc.alpha(), alpha)
    x = torch.randint(-1, 2, (5, 40)).float()
    assert torch.equal(fc.dot(x), x @ t.T)                   # integer inputs -> integer dot products
    assert torch.allclose(fc(x), (x @ t.T) * alpha)
    assert fc.density() == pytest.approx(float((t != 0).float().mean()))
    assert TernaryLinear(40, 6, delta_factor=1.4).density() < TernaryLinear(40, 6, delta_factor=0.7).density()
    spec = fc.qmd_weight()
    assert spec["weight"] == "ternary" and np.array_equal(spec["weights"], t.numpy().astype(np.int8))
    assert "pos_scale" not in spec


def test_ttq_integer_ratio_exact_weights_and_gradients():
    torch.manual_seed(1)
    conv = TernaryConv2d(3, 4, 3, mode="ttq", levels=8)
    with torch.no_grad():
        conv.wp.fill_(0.3)
        conv.wn.fill_(0.4)
    pos, neg, g = (v.detach() if torch.is_tensor(v) else v for v in conv.ttq_scales())
    assert (float(pos), float(neg)) == (3.0, 4.0) and g == 2      # round(8*0.3/0.4) = 6 : 8, gcd 2
    t = conv.ternary_weight().detach()
    wq = conv.int_weight()
    assert torch.equal(wq.detach(), torch.where(t > 0, 3.0, torch.where(t < 0, -4.0, 0.0)))
    assert torch.allclose(conv.alpha(), torch.full((4,), 0.4 * 2 / 8))
    # alpha * Wq approximates TTQ's Wp / -Wn weights
    assert torch.allclose((conv.alpha()[0] * wq)[t > 0], torch.tensor(0.3)) and \
        torch.allclose((conv.alpha()[0] * wq)[t < 0], torch.tensor(-0.4))
    x = torch.randint(-1, 2, (2, 3, 5, 5)).float()
    y = conv(x)
    assert torch.equal(conv.dot(x), torch.round(conv.dot(x)))
    y.sum().backward()
    assert conv.wp.grad is not None and conv.wn.grad is not None and conv.weight.grad is not None
    spec = conv.qmd_weight()
    assert spec["pos_scale"].tolist() == [3] * 4 and spec["neg_scale"].tolist() == [4] * 4
    with torch.no_grad():
        conv.wp.fill_(0.5)
        conv.wn.fill_(0.5)
    assert [float(v.detach()) for v in conv.ttq_scales()[:2]] == [1.0, 1.0]


def test_ternary_and_2bit_activations_and_their_ste():
    y = torch.tensor([-3.0, -0.51, -0.5, -0.49, 0.0, 0.49, 0.5, 0.7, 1.49, 1.5, 2.5, 3.6], requires_grad=True)
    t = TernaryActivation(0.5)(y)
    assert t.tolist() == [-1, -1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    t.sum().backward()
    assert torch.equal(y.grad, (y.detach().abs() <= 1).float())
    y.grad = None
    u = UintActivation(2)(y)
    assert u.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 3]
    u.sum().backward()
    assert torch.equal(y.grad, ((y.detach() >= -0.5) & (y.detach() <= 3.5)).float())
    assert UintActivation(2).levels == (0.5, 1.5, 2.5) and UintActivation(2).qmd_out == {"kind": "uint", "bits": 2}
    assert LevelCount.apply(torch.tensor([0.0]), (0.0,), 5, -1.0, 1.0).item() == 6.0
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        UintActivation(9)
    with pytest.raises(ValueError, match="mode must be 'twn' or 'ttq'"):
        TernaryLinear(4, 4, mode="xnor")


def test_clip_latent_weights_includes_ternary_modules():
    model = torch.nn.Sequential(TernaryLinear(8, 8), TernaryConv2d(2, 2, 3, mode="ttq"))
    with torch.no_grad():
        model[0].weight.mul_(10)
    assert clip_latent_weights(model) == 2 and model[0].weight.abs().max() <= 1.0


@pytest.mark.parametrize("levels", [(0.0,), (-0.5, 0.5), (0.5, 1.5, 2.5)])
def test_fold_bn_levels_is_exact_on_every_dot(levels):
    rng = np.random.default_rng(len(levels))
    c, lo, hi = 40, -30, 50
    k = rng.normal(0, 1, c)
    k[:3] = 0.0                                          # constant channels
    mean, beta, alpha = rng.normal(10, 20, c), rng.normal(0, 2, c), rng.uniform(0.01, 2, c)
    thr, direction = fold_bn_levels(k, mean, beta, alpha, levels, lo, hi, chunk=500)
    dots = np.arange(lo, hi + 1)
    y = k[:, None] * (alpha[:, None] * dots[None] - mean[:, None]) + beta[:, None]
    want = sum((y >= lv).astype(int) for lv in levels)
    met = np.where(direction[:, None, None] > 0, dots[None, None] >= thr[:, :, None], dots[None, None] <= thr[:, :, None])
    assert np.array_equal(met.sum(axis=1), want)
    assert thr.min() >= lo - 1 and thr.max() <= hi + 1
    d = np.diff(thr, axis=1)
    assert (np.where(direction[:, None] > 0, d >= 0, d <= 0)).all()


# --------------------------------------------------------------------------- ternary CNV

@pytest.fixture(scope="module")
def cifar_test():
    return load_dataset("cifar10", "test")


def _randomize(model, seed):
    """Random latent weights, TTQ scales and BN statistics (zero and negative gammas,
    channels whose thresholds lie outside the reachable range)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        first = True
        for lin, bn in list(zip(model.convs, model.conv_bns)) + list(zip(model.fcs, model.bns)):
            lin.weight.uniform_(-1, 1, generator=g)
            if getattr(lin, "mode", None) == "ttq":
                lin.wp.fill_(float(torch.rand(1, generator=g)) + 0.2)
                lin.wn.fill_(float(torch.rand(1, generator=g)) + 0.2)
            c = lin.weight.shape[0]
            n = lin.weight[0].numel()
            spread = n ** 0.5 * (0.3 if first else 0.5) * float(lin.alpha()[0])
            bn.running_mean.copy_(torch.randn(c, generator=g) * spread)
            bn.running_var.copy_(torch.rand(c, generator=g) * spread ** 2 + spread ** 2 / 4)
            gamma = torch.randn(c, generator=g)
            gamma[0], gamma[1] = 0.0, 0.0
            bn.weight.copy_(gamma)
            beta = torch.randn(c, generator=g)
            beta[0], beta[1] = 0.7, -0.7
            bn.bias.copy_(beta)
            bn.running_mean[2] = 1e4 * n
            bn.running_mean[3] = -1e4 * n
            first = False
        model.out.weight.uniform_(-1, 1, generator=g)
    model.eval()
    return model


def _check_equal(qmd, model, images):
    ref = ReferenceModel(qmd).trace(images)
    flt = float_model_trace(model, images, batch=8)
    for layer in qmd.layers:
        r, f = ref[layer.name].numpy(), flt[layer.name]
        assert r.shape == f.shape, layer.name
        assert np.array_equal(r, f), f"{layer.name}: {(r != f).sum()} of {r.size} elements differ"
    assert np.array_equal(ref["class"].numpy(), np.argmax(flt["logits"], axis=1))
    return ref


@pytest.mark.parametrize("weight, act", [("twn", "ternary"), ("ttq", "uint2"), ("ttq", "ternary")])
def test_small_ternary_cnv_integer_reference_equals_float_model(tmp_path, cifar_test, weight, act):
    torch.manual_seed(0)
    model = _randomize(CNV(**SMALL, weight=weight, act=act, scale=True), seed=7)
    images = cifar_test[0][:12]
    qmd = save_qmd(tmp_path / "tnn", "tnn", (32, 32, 3), "uint8",
                   qmd_layers(model, {"net": "CNV", "input_shape": (32, 32, 3)}), dataset="cifar10")
    ref = _check_equal(qmd, model, images)
    convs = [l for l in qmd.layers if l.kind in ("conv2d", "dense")]
    assert all(l.attrs["weight"] == "ternary" for l in convs)
    assert all(("pos_scale" in l.arrays) == (weight == "ttq") for l in convs)
    if weight == "ttq":
        scales = {(int(l.arrays["pos_scale"][0]), int(l.arrays["neg_scale"][0])) for l in convs}
        assert any(p != n for p, n in scales)                  # asymmetric Wp != Wn, exact in integers
    densities = [float((l.weights != 0).mean()) for l in convs]
    assert all(0.3 < d < 0.9 for d in densities)
    assert model.weight_densities()["conv1"] == pytest.approx(densities[1], abs=1e-6)
    values = {-1, 0, 1} if act == "ternary" else {0, 1, 2, 3}
    for l in qmd.layers:
        if l.kind == "threshold":
            assert l.out_act.kind == ("ternary" if act == "ternary" else "uint")
            assert set(np.unique(ref[l.name].numpy())) <= values
    seen = set(np.unique(np.concatenate([ref[l.name].numpy().ravel() for l in qmd.layers
                                          if l.kind == "threshold"])))
    assert seen == values                                      # every level occurs


def test_tnn_cifar_registry_entry():
    cfg = model_config("tnn_cifar")
    assert cfg["dataset"] == "cifar10" and cfg["net"] == "CNV"
    model = build_model(cfg)
    assert isinstance(model.convs[0], TernaryConv2d) and isinstance(model.out, TernaryLinear)
    assert isinstance(model.act, UintActivation) and model.act.qmd_out == {"kind": "uint", "bits": 2}
    assert [c.out_channels for c in model.convs] == [64, 64, 128, 128, 256, 256]
    assert model(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 10)
    assert cfg["init_from"] == "float_cifar"
    # the float baseline's every tensor has a place in the ternary CNV (init_from copies them all)
    fm = build_model(model_config("float_cifar"))
    own = model.state_dict()
    assert all(k in own and own[k].shape == v.shape for k, v in fm.state_dict().items())
    for name in ("tnn_cifar_d10", "tnn_cifar_d14"):
        sweep = model_config(name)
        assert sweep["net_args"]["delta_factor"] > cfg["net_args"]["delta_factor"]
        # the sweep fine-tunes tnn_cifar: it differs only in the TWN threshold, start, length and
        # in distilling from its first epoch (tnn_cifar distills its last third)
        assert sweep["init_from"] == "tnn_cifar" and sweep["epochs"] == nets.SWEEP_EPOCHS < cfg["epochs"]
        assert "restarts" not in sweep and cfg["restarts"]
        assert "swa" not in sweep and "precise_bn" not in sweep and cfg["precise_bn"]
        # (with float_cifar's plain logits: tnn_cifar's flip-averaged teacher starts past their 5 epochs)
        plain_teacher = {k: v for k, v in cfg["distill"].items() if k != "flip_from_epoch"}
        assert sweep["distill"] == dict(plain_teacher, from_epoch=0) and cfg["distill"]["from_epoch"] > 0
        assert cfg["distill"]["flip_from_epoch"] >= cfg["distill"]["from_epoch"]
        assert {k: v for k, v in sweep["net_args"].items() if k != "delta_factor"} == \
            {k: v for k, v in cfg["net_args"].items() if k != "delta_factor"}
        skip = ("net_args", "description", "name", "init_from", "epochs", "distill", "restarts", "swa", "precise_bn")
        assert {k: v for k, v in sweep.items() if k not in skip} == {k: v for k, v in cfg.items() if k not in skip}
    # the committed snapshot (the 30-epoch cycle or past it) resumes under the recipe as it is now
    # (the warm restart appended to it)
    from models.train import _recipe, _resumable
    from qnnfab.paths import REPO_ROOT
    ck = load_checkpoint(REPO_ROOT / "models" / "checkpoints" / "tnn_cifar.pt")
    assert ck["epoch"] >= cfg["epochs"] and _resumable(ck["recipe"], json.loads(json.dumps(_recipe(cfg))), ck["epoch"])


def test_small_tnn_train_and_export(tmp_path, monkeypatch, cifar_test):
    entry = {"net": "CNV", "dataset": "cifar10", "input_shape": (32, 32, 3),
             "net_args": {"in_shape": [32, 32, 3], "channels": [8, 8, 16, 16, 32, 32], "pool_after": [1, 3],
                          "hidden": [32, 32], "logit_scale": 0.125, "weight": "ttq", "act": "ternary",
                          "scale": True},
             "epochs": 1, "batch_size": 64, "lr": 0.01, "lr_min": 0.0, "weight_decay": 0.0,
             "augment_shift": 2, "augment_flip": True, "train_limit": 384, "test_limit": 200,
             "description": "tiny tnn"}
    monkeypatch.setitem(nets.MODELS, "tiny_tnn", entry)
    run = tmp_path / "run"
    s = train("tiny_tnn", run_dir=run, seed=0, progress=False)
    assert s["epochs_done"] == 1
    ck = load_checkpoint(run / "ckpt.pt")
    for k, v in ck["model"].items():
        if k.startswith(("convs.", "fcs.", "out.")) and k.endswith("weight"):
            assert v.abs().max() <= 1.0, k
    import models.export as ex
    monkeypatch.setattr(ex, "load_dataset", lambda name, split: tuple(a[:200] for a in cifar_test))
    # the export orders the hidden channels for this folding's zero-skip lanes (models/channel_order.py)
    fold = {f"conv{k}": {"pe": 4, "simd": 1 if k == 0 else 4} for k in range(6)} | \
        {f"fc{k}": {"pe": 2, "simd": 4} for k in range(3)}
    (tmp_path / "zoo" / "tiny_tnn").mkdir(parents=True)
    (tmp_path / "zoo" / "tiny_tnn" / "folding.json").write_text(json.dumps({"layers": fold}))
    monkeypatch.setattr(ex, "ZOO_DIR", tmp_path / "zoo")
    monkeypatch.setitem(nets.MODELS["tiny_tnn"], "balance_for_folding", "tiny_tnn")
    summary = export("tiny_tnn", run_dir=run, out_dir=tmp_path / "q")
    qmd = load_qmd(tmp_path / "q")
    order = qmd.provenance["channel_order"]["layers"]
    assert any("channel_order" in v for v in order.values())
    assert all(v["cycles_per_vector_after"] > 0 for v in order.values())
    assert qmd.layer("conv1").attrs["weight"] == "ternary" and qmd.layer("conv1_act").out_act.kind == "ternary"
    assert summary["mismatches"] <= 1 and summary["test_images"] == 200
    model, _ = ex.load_trained("tiny_tnn", run)
    float_cls = float_model_trace(model, cifar_test[0][:16], batch=16)["class"]
    assert np.array_equal(reference_predictions(qmd, cifar_test[0][:16]), float_cls)
