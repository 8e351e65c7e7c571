"""Export of binary networks: BN+sign folding, float model == integer reference, the
train -> export pipeline (resumable), and the shipped ``bnn_mnist`` description."""

import json

import numpy as np
import pytest
import torch

from models import nets
from models.data import load_dataset
from models.export import export, float_model_trace, fold_bn_sign, qmd_layers, reference_predictions
from models.nets import SFC
from models.qmd import load_qmd, save_qmd
from models.reference import ReferenceModel, accuracy
from models.train import load_checkpoint, shift_images, train
from qnnfab.errors import QnnfabError
from qnnfab.paths import ZOO_DIR

torch.set_num_threads(1)   # tiny tensors; threads only add contention on a shared machine


@pytest.fixture(scope="module")
def mnist_test():
    return load_dataset("mnist", "test")


# --------------------------------------------------------------------------- folding

def _met_float64(k, mean, beta, alpha, n):
    dots = np.arange(-n, n + 1, dtype=np.float64)
    return dots, k[:, None] * (alpha[:, None] * dots[None, :] - mean[:, None]) + beta[:, None] >= 0


def _met_thresholds(thr, direction, dots):
    return np.where(direction[:, None] > 0, dots[None, :] >= thr[:, None], dots[None, :] <= thr[:, None])


def test_fold_matches_float_formula_for_every_dot_value_including_edge_cases():
    n = 64
    rng = np.random.default_rng(0)
    c = 400
    k = rng.normal(0, 1, c) * rng.choice([1e-3, 1, 30], c)
    mean = rng.normal(0, 20, c)
    beta = rng.normal(0, 2, c)
    alpha = rng.uniform(0.2, 1.0, c)
    # edge cases: exact integer t (sign(0) = +1 at the threshold), both directions
    k[:4], alpha[:4], beta[:4], mean[:4] = [0.5, -0.5, 2.0, -4.0], 1.0, 0.0, [3.0, 3.0, -7.0, 10.0]
    # k == 0: constant output beta >= 0 (beta = 0 counts as +1)
    k[4:7], beta[4:7] = 0.0, [1.0, -1.0, 0.0]
    # alpha == 0 (an all-zero latent row with scale=True): constant k*(-mean) + beta
    alpha[7:9], k[7:9], mean[7:9], beta[7:9] = 0.0, [1.0, 1.0], [1.0, -1.0], [0.0, 0.0]
    # thresholds far outside the reachable range -> clamped
    mean[9:13], k[9:13], beta[9:13], alpha[9:13] = [1e4, -1e4, 1e4, -1e4], [1, 1, -1, -1], 0.0, 1.0
    thr, direction = fold_bn_sign(k, mean, beta, alpha, n)
    assert thr.dtype == np.int64 and thr.shape == (c,) and direction.shape == (c,)
    assert thr.min() >= -n - 1 and thr.max() <= n + 1
    assert set(np.unique(direction)) <= {-1, 1}
    dots, met = _met_float64(k, mean, beta, alpha, n)
    assert np.array_equal(_met_thresholds(thr, direction, dots), met)
    assert thr[:4].tolist() == [3, 3, -7, 10] and direction[:4].tolist() == [1, -1, 1, -1]
    assert met[4].all() and not met[5].any() and met[6].all()
    assert not met[7].any() and met[8].all()
    assert thr[9:13].tolist() == [n + 1, -n - 1, n + 1, -n - 1]
    assert not met[9].any() and met[10].all() and met[11].all() and not met[12].any()
    # the generic channels follow the closed form ceil/floor((mean - beta/k)/alpha)
    t = (mean - beta / np.where(k == 0, 1, k)) / np.where(alpha == 0, 1, alpha)
    expect = np.clip(np.where(k > 0, np.ceil(t), np.floor(t)), -n - 1, n + 1)
    assert np.array_equal(thr[13:], expect[13:].astype(np.int64))
    assert np.array_equal(direction[13:], np.where(k[13:] > 0, 1, -1))


# --------------------------------------------------------------------------- float == integer

def _random_sfc(seed, scale=False, hidden=(48, 32)):
    """A small SFC-like model with random weights and random BN statistics, including
    negative gammas, zero gammas and thresholds outside the reachable range."""
    torch.manual_seed(seed)
    model = SFC(in_features=784, hidden=hidden, classes=10, in_threshold=128, in_dropout=0.2,
                dropout=0.2, logit_scale=0.0625, scale=scale)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fc, bn in zip(model.fcs, model.bns):
            fc.weight.uniform_(-1, 1, generator=g)
            n, c = fc.in_features, fc.out_features
            alpha = fc.alpha()
            bn.running_mean.copy_(alpha * torch.randn(c, generator=g) * n ** 0.5)
            bn.running_var.copy_(torch.rand(c, generator=g) * n + 0.5)
            gamma = torch.randn(c, generator=g)
            gamma[0] = 0.0                         # constant +1 (beta > 0)
            gamma[1] = 0.0                         # constant -1 (beta < 0)
            bn.weight.copy_(gamma)
            beta = torch.randn(c, generator=g)
            beta[0], beta[1] = 0.7, -0.7
            bn.bias.copy_(beta)
            bn.running_mean[2] = 10.0 * n          # never met / always met
            bn.running_mean[3] = -10.0 * n
        model.out.weight.uniform_(-1, 1, generator=g)
    model.eval()
    return model


@pytest.mark.parametrize("scale", [False, True])
def test_integer_reference_equals_float_model_layer_by_layer(tmp_path, mnist_test, scale):
    images, labels = mnist_test[0][:400], mnist_test[1][:400]
    model = _random_sfc(seed=1 + scale, scale=scale)
    cfg = {"net": "SFC", "input_shape": (28, 28, 1)}
    qmd = save_qmd(tmp_path / "tiny", "tiny", (28, 28, 1), "uint8", qmd_layers(model, cfg))
    names = [l.name for l in qmd.layers]
    assert names == ["binarize", "fc0", "fc0_act", "fc1", "fc1_act", "fc2", "class"]
    acts = [qmd.layer("fc0_act"), qmd.layer("fc1_act")]
    directions = np.concatenate([l.arrays["direction"] for l in acts])
    assert (directions == 1).any() and (directions == -1).any()

    ref = ReferenceModel(qmd).trace(images)
    flt = float_model_trace(model, images)
    for name in names:
        r, f = ref[name].numpy(), flt[name]
        assert r.shape == f.shape, name
        assert np.array_equal(r, f), f"{name}: {(r != f).sum()} of {r.size} elements differ"
    # binarized activations are genuinely mixed, and the special channels behave
    for name in ("binarize", "fc0_act", "fc1_act"):
        assert set(np.unique(ref[name].numpy())) == {-1, 1}, name
    for name in ("fc0_act", "fc1_act"):
        a = ref[name].numpy()
        assert (a[:, 0] == 1).all() and (a[:, 1] == -1).all()       # zero gamma
        assert set(np.unique(a[:, 2])) <= {-1, 1} and len(np.unique(a[:, 2])) == 1
    # logits: float logits / scale, rounded, are the integer dot products
    logits = flt["logits"].astype(np.float64) / model.logit_scale
    assert np.array_equal(np.round(logits).astype(np.int64), ref["fc2"].numpy())
    assert np.array_equal(np.round(logits), logits)
    assert np.array_equal(ref["class"].numpy(), np.argmax(flt["logits"], axis=1))
    assert np.array_equal(reference_predictions(qmd, images, batch=128), flt["class"])
    assert accuracy(qmd, images, labels) == pytest.approx(float((flt["class"] == labels).mean()))


def test_first_layer_binarizes_pixels_at_128(tmp_path):
    model = _random_sfc(seed=5)
    cfg = {"net": "SFC", "input_shape": (28, 28, 1)}
    qmd = save_qmd(tmp_path / "t", "t", (28, 28, 1), "uint8", qmd_layers(model, cfg))
    layer = qmd.layer("binarize")
    assert layer.arrays["thresholds"].tolist() == [[128]] and layer.arrays["direction"].tolist() == [1]
    x = np.arange(256, dtype=np.uint8).repeat(4)[:784].reshape(1, 28, 28, 1)
    out = ReferenceModel(qmd).trace(x)["binarize"].numpy().reshape(-1)
    assert np.array_equal(out, np.where(x.reshape(-1) >= 128, 1, -1))
    assert np.array_equal(float_model_trace(model, x)["binarize"].reshape(-1), out)


# --------------------------------------------------------------------------- train -> export

def test_shift_augmentation_translates_each_image_with_zero_fill():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 28, 28, 1), dtype=torch.uint8)
    y = shift_images(x, 2)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert torch.equal(shift_images(x, 0), x)
    pad = torch.nn.functional.pad(x, (0, 0, 2, 2, 2, 2))
    seen = set()
    for i in range(len(x)):
        hits = [(oy, ox) for oy in range(-2, 3) for ox in range(-2, 3)
                if torch.equal(pad[i, 2 + oy:30 + oy, 2 + ox:30 + ox], y[i])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 10                         # offsets vary from image to image


@pytest.fixture
def tiny_registry(monkeypatch):
    entry = {"net": "SFC", "dataset": "mnist", "input_shape": (28, 28, 1),
             "net_args": {"in_features": 784, "hidden": [32, 32], "classes": 10, "in_threshold": 128,
                          "in_dropout": 0.1, "dropout": 0.1, "logit_scale": 0.125, "scale": False},
             "epochs": 3, "batch_size": 128, "lr": 0.01, "lr_min": 0.0, "weight_decay": 0.0,
             "train_limit": 3000, "test_limit": 500, "description": "tiny test model"}
    monkeypatch.setitem(nets.MODELS, "tiny_test", entry)
    return "tiny_test"


def test_compiled_training_checkpoints_the_plain_module_and_resumes_eagerly(tmp_path, tiny_registry):
    """``--compile`` trains through torch.compile, but the checkpoint holds the plain module's
    state (no ``_orig_mod.`` prefix), so eager runs resume it; it learns as well as eager."""
    run = tmp_path / "compiled"
    train(tiny_registry, run_dir=run, seed=3, progress=False, stop_after=2, compile_model=True)
    ck = load_checkpoint(run / "ckpt.pt")
    assert ck["epoch"] == 2
    assert set(ck["model"]) == set(nets.build_model(tiny_registry).state_dict())
    s = train(tiny_registry, run_dir=run, seed=3, progress=False)          # eager resume
    assert s["epochs_done"] == 3 and s["test_accuracy"] > 0.5


def test_train_resume_is_identical_and_export_records_provenance(tmp_path, tiny_registry, mnist_test):
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    s = train(tiny_registry, run_dir=straight, seed=3, progress=False)
    assert s["epochs_done"] == 3
    train(tiny_registry, run_dir=pieces, seed=3, progress=False, stop_after=1)
    assert load_checkpoint(pieces / "ckpt.pt")["epoch"] == 1
    train(tiny_registry, run_dir=pieces, seed=3, progress=False, stop_after=1)
    train(tiny_registry, run_dir=pieces, seed=3, progress=False)
    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(pieces / "ckpt.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [h["test_accuracy"] for h in a["history"]] == [h["test_accuracy"] for h in b["history"]]
    assert [h["lr"] for h in a["history"]] == pytest.approx([0.01, 0.0075, 0.0025])
    for p in a["model"]:
        if p.startswith(("fcs.", "out.")) and p.endswith("weight"):
            assert a["model"][p].abs().max() <= 1.0
    # a finished run is left alone; a different seed is refused
    assert train(tiny_registry, run_dir=straight, seed=3, progress=False)["epochs_done"] == 3
    with pytest.raises(QnnfabError, match="different recipe or seed"):
        train(tiny_registry, run_dir=straight, seed=4, progress=False)

    out = tmp_path / "qmd"
    summary = export(tiny_registry, run_dir=straight, out_dir=out)
    qmd = load_qmd(out)
    prov = qmd.provenance
    assert [l.name for l in qmd.layers] == ["binarize", "fc0", "fc0_act", "fc1", "fc1_act", "fc2", "class"]
    images, labels = mnist_test
    assert prov["integer_accuracy_at_export"] == accuracy(qmd, images, labels)
    assert prov["qat_accuracy"] == summary["qat_accuracy"] > 0.5
    assert abs(prov["qat_accuracy"] - prov["integer_accuracy_at_export"]) <= 0.002
    assert prov["float_vs_integer_class_mismatches"] <= 20
    assert prov["dataset"] == "mnist, ../shared/data/mnist.npz, 10,000 test images"
    assert prov["epochs"] == 3 and prov["seed"] == 3 and prov["torch_version"] == torch.__version__
    assert len(prov["exported"]) == 10 and prov["exported"][4] == "-"
    assert qmd.description == "tiny test model"
    json.loads((out / "qmd.json").read_text())      # plain JSON on disk


def test_a_run_without_its_runs_checkpoint_resumes_from_the_committed_snapshot(tmp_path, tiny_registry,
                                                                               monkeypatch):
    """The default run keeps models/checkpoints/<m>.pt (model float32, Adam moments bfloat16)
    current; when runs/ is gone (a fresh clone) training resumes from it, and export reads it."""
    import models.train as tr
    monkeypatch.setattr("models.train.default_run_dir", lambda name: tmp_path / "runs" / name)
    train(tiny_registry, seed=3, progress=False, stop_after=1)
    snap = tr.snapshot_path(tiny_registry)
    full, small = load_checkpoint(tmp_path / "runs" / tiny_registry / "ckpt.pt"), load_checkpoint(snap)
    assert small["epoch"] == full["epoch"] == 1 and small["snapshot"]
    for key in full["model"]:
        assert torch.equal(full["model"][key], small["model"][key]), key
    raw = torch.load(snap, weights_only=True)["optimizer"]["state"]
    assert {t.dtype for st in raw.values() for t in st.values() if t.is_floating_point()} == {torch.bfloat16}
    moments = full["optimizer"]["state"]
    for k, st in small["optimizer"]["state"].items():      # widened back to float32 on load
        assert st["exp_avg"].dtype == torch.float32
        assert torch.equal(st["exp_avg"], moments[k]["exp_avg"].to(torch.bfloat16).float())
    assert tr.checkpoint_path(tiny_registry) == tmp_path / "runs" / tiny_registry / "ckpt.pt"
    import shutil
    shutil.rmtree(tmp_path / "runs")                         # the machine is gone; the snapshot is committed
    assert tr.checkpoint_path(tiny_registry) == snap
    s = train(tiny_registry, seed=3, progress=False)
    assert s["epochs_done"] == 3 and load_checkpoint(snap)["epoch"] == 3
    assert [h["epoch"] for h in load_checkpoint(snap)["history"]] == [1, 2, 3]
    shutil.rmtree(tmp_path / "runs")
    summary = export(tiny_registry, out_dir=tmp_path / "q")            # reads the snapshot
    assert summary["qat_accuracy"] > 0.5 and load_qmd(tmp_path / "q").provenance["epochs"] == 3
    # --snapshot rewrites the snapshot from a runs/ checkpoint
    snap.unlink()
    train(tiny_registry, run_dir=tmp_path / "other", seed=3, progress=False, stop_after=1)
    assert tr.main(["--model", tiny_registry, "--snapshot", "--run-dir", str(tmp_path / "other")]) == 0
    assert load_checkpoint(snap)["epoch"] == 1


def test_export_without_checkpoint_is_a_clear_error(tmp_path, tiny_registry):
    with pytest.raises(QnnfabError, match="checkpoint not found"):
        export(tiny_registry, run_dir=tmp_path / "nothing", out_dir=tmp_path / "q")


# --------------------------------------------------------------------------- shipped model

def test_shipped_bnn_mnist_reaches_its_recorded_integer_accuracy(mnist_test):
    qmd = load_qmd(ZOO_DIR / "bnn_mnist")
    assert [l.name for l in qmd.layers] == ["binarize", "fc0", "fc0_act", "fc1", "fc1_act", "fc2",
                                          "fc2_act", "fc3", "class"]
    assert [l.attrs.get("out_features") for l in qmd.layers if l.kind == "dense"] == [256, 256, 256, 10]
    assert qmd.layer("binarize").arrays["thresholds"].tolist() == [[128]]
    prov = qmd.provenance
    images, labels = mnist_test
    acc = accuracy(qmd, images, labels)
    assert acc == prov["integer_accuracy_at_export"]
    assert acc >= 0.97
    assert abs(prov["qat_accuracy"] - acc) <= 0.002
    assert prov["dataset"] == "mnist, ../shared/data/mnist.npz, 10,000 test images"
    for key in ("epochs", "seed", "torch_version", "exported"):
        assert key in prov


def test_warm_restarts_extend_a_finished_run_and_keep_its_checkpoint_resumable(tmp_path, tiny_registry,
                                                                               monkeypatch):
    """Appending ``restarts`` to a finished run's recipe trains on from its checkpoint: each
    restart is a new cosine cycle from its own peak learning rate, the first cycle's epochs
    are kept as they were, and a recipe that changes the trained part is still refused."""
    from models.train import lr_at, total_epochs
    run = tmp_path / "run"
    first = train(tiny_registry, run_dir=run, seed=3, progress=False)
    assert first["epochs_done"] == 3
    before = load_checkpoint(run / "ckpt.pt")
    monkeypatch.setitem(nets.MODELS[tiny_registry], "restarts", [[2, 0.004]])
    cfg = nets.model_config(tiny_registry)
    assert total_epochs(cfg) == 5
    assert [lr_at(cfg, e) for e in range(5)] == pytest.approx([0.01, 0.0075, 0.0025, 0.004, 0.002])
    s = train(tiny_registry, run_dir=run, seed=3, progress=False)
    assert s["epochs_done"] == 5 and s["epochs"] == 5
    after = load_checkpoint(run / "ckpt.pt")
    assert after["history"][:3] == before["history"]
    assert [h["lr"] for h in after["history"][3:]] == pytest.approx([0.004, 0.002])
    assert after["recipe"]["restarts"] == [[2, 0.004]]
    assert s["test_accuracy"] > 0.5
    # the same, in one uninterrupted run, gives the same weights
    straight = train(tiny_registry, run_dir=tmp_path / "straight", seed=3, progress=False)
    assert straight["epochs_done"] == 5
    b = load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    for key in after["model"]:
        assert torch.equal(after["model"][key], b["model"][key]), key
    # a changed restart that was already trained, or a malformed one, is refused
    monkeypatch.setitem(nets.MODELS[tiny_registry], "restarts", [[2, 0.003]])
    with pytest.raises(QnnfabError, match="different recipe or seed"):
        train(tiny_registry, run_dir=run, seed=3, progress=False)
    monkeypatch.setitem(nets.MODELS[tiny_registry], "restarts", [[0, 0.003]])
    with pytest.raises(QnnfabError, match=r"restarts must be a list of \[epochs >= 1, lr > 0\] pairs"):
        train(tiny_registry, run_dir=run, seed=3, progress=False)
    summary = export(tiny_registry, run_dir=run, out_dir=tmp_path / "q")
    assert load_qmd(tmp_path / "q").provenance["recipe"]["restarts"] == [[2, 0.004]]
    assert load_qmd(tmp_path / "q").provenance["epochs"] == 5 and summary["qat_accuracy"] > 0.5


def test_distillation_from_a_finished_teacher_resumes_and_is_refused_when_malformed(tmp_path, tiny_registry,
                                                                                    monkeypatch):
    """A recipe's ``distill`` trains against a finished teacher's soft labels from its
    ``from_epoch`` on: the epochs before it are those of the plain run, adding it to a
    checkpoint at or before ``from_epoch`` keeps the run resumable (with the same weights as an
    uninterrupted distilled run), and a missing or unfinished teacher or a malformed entry is a
    one-line error."""
    from models.train import distill_loss
    teacher_dir = tmp_path / "teacher"
    train(tiny_registry, run_dir=teacher_dir, seed=1, progress=False)
    student = dict(nets.MODELS[tiny_registry], description="tiny distilled student")
    monkeypatch.setitem(nets.MODELS, "tiny_student", student)
    # plain for one epoch, then the recipe gains distillation from epoch 1 and the run trains on
    run = tmp_path / "resumed"
    train("tiny_student", run_dir=run, seed=3, progress=False, stop_after=1)
    plain_epoch1 = load_checkpoint(run / "ckpt.pt")
    student["distill"] = {"teacher": tiny_registry, "from_epoch": 1, "temperature": 2.0, "weight": 0.5}
    s = train("tiny_student", run_dir=run, seed=3, progress=False, teacher_dir=teacher_dir)
    assert s["epochs_done"] == 3 and s["test_accuracy"] > 0.5
    resumed = load_checkpoint(run / "ckpt.pt")
    assert resumed["history"][0] == plain_epoch1["history"][0]
    assert resumed["recipe"]["distill"] == {"teacher": tiny_registry, "from_epoch": 1, "temperature": 2.0,
                                            "weight": 0.5}
    straight = tmp_path / "straight"
    train("tiny_student", run_dir=straight, seed=3, progress=False, teacher_dir=teacher_dir)
    b = load_checkpoint(straight / "ckpt.pt")
    for key in resumed["model"]:
        assert torch.equal(resumed["model"][key], b["model"][key]), key
    # the distilled epochs optimised another loss than the plain run's
    plain = tmp_path / "plain"
    student.pop("distill")
    train("tiny_student", run_dir=plain, seed=3, progress=False)
    p = load_checkpoint(plain / "ckpt.pt")
    same = ("loss", "train_accuracy", "test_accuracy")
    assert [p["history"][0][k] for k in same] == [resumed["history"][0][k] for k in same]
    assert p["history"][1]["loss"] != resumed["history"][1]["loss"]
    assert any(not torch.equal(p["model"][k], resumed["model"][k]) for k in p["model"])
    # the loss: weight 1 and equal logits is zero; weight w mixes the cross entropy in
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert float(distill_loss(logits, target, logits.clone(), 3.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(8, 10)
    kl = (torch.softmax(other / 2, 1) * (torch.log_softmax(other / 2, 1) - torch.log_softmax(logits / 2, 1))).sum(1)
    expect = 0.25 * torch.nn.functional.cross_entropy(logits, target) + 0.75 * 4 * kl.mean()
    assert float(distill_loss(logits, target, other, 2.0, 0.75)) == pytest.approx(float(expect), rel=1e-5)
    # distillation added before the checkpoint's epoch changes the trained part: refused
    student["distill"] = {"teacher": tiny_registry, "from_epoch": 0}
    with pytest.raises(QnnfabError, match="different recipe or seed"):
        train("tiny_student", run_dir=run, seed=3, progress=False, teacher_dir=teacher_dir)
    # a teacher that is missing or not finished
    with pytest.raises(QnnfabError, match=f"teacher {tiny_registry} is not trained"):
        train("tiny_student", run_dir=tmp_path / "x", seed=3, progress=False, teacher_dir=tmp_path / "none")
    half = tmp_path / "half"
    train(tiny_registry, run_dir=half, seed=1, progress=False, stop_after=1)
    with pytest.raises(QnnfabError, match=f"teacher {tiny_registry} is trained for 1 of its 3 epochs"):
        train("tiny_student", run_dir=tmp_path / "y", seed=3, progress=False, teacher_dir=half)
    # malformed entries
    for bad, message in (({"from_epoch": 0}, "must be a dict with a 'teacher'"),
                         ({"teacher": tiny_registry, "tau": 2}, r"unknown field\(s\) tau"),
                         ({"teacher": tiny_registry, "weight": 0}, r"weight must be in \(0, 1\]"),
                         ({"teacher": tiny_registry, "from_epoch": 3}, r"from_epoch must be an epoch of the run"),
                         ({"teacher": "tiny_student"}, "cannot be its own teacher")):
        student["distill"] = bad
        with pytest.raises(QnnfabError, match=message):
            train("tiny_student", run_dir=tmp_path / "z", seed=3, progress=False, teacher_dir=teacher_dir)
    # the export records it
    student["distill"] = {"teacher": tiny_registry, "from_epoch": 1, "temperature": 2.0, "weight": 0.5}
    export("tiny_student", run_dir=run, out_dir=tmp_path / "q")
    assert load_qmd(tmp_path / "q").provenance["recipe"]["distill"]["teacher"] == tiny_registry


def test_flip_averaged_teacher_is_added_to_a_distilled_run_and_resumes(tmp_path, tiny_registry, monkeypatch):
    """A ``distill`` ``flip_from_epoch`` makes the teacher's logits, from that epoch on, the mean
    of its logits on the batch and on its mirror image; it may be added to a distilled checkpoint
    at or before that epoch (the run equals an uninterrupted one), not to one past it, and a
    malformed value is a one-line error."""
    from models.train import load_teacher, teacher_output
    teacher_dir = tmp_path / "teacher"
    train(tiny_registry, run_dir=teacher_dir, seed=1, progress=False)
    teacher, _ = load_teacher(tiny_registry, teacher_dir)
    x = torch.randint(0, 256, (6, 28, 28, 1), dtype=torch.uint8)
    mirrored = x[:, :, torch.arange(27, -1, -1)]
    with torch.no_grad():
        expect = (teacher(x) + teacher(mirrored)) / 2
        assert torch.equal(teacher_output(teacher, x, False), teacher(x))
        assert torch.allclose(teacher_output(teacher, x, True), expect, rtol=0, atol=1e-6)
        assert not torch.allclose(teacher_output(teacher, x, True), teacher(x))

    plain_distill = {"teacher": tiny_registry, "from_epoch": 0, "temperature": 2.0, "weight": 0.5}
    student = dict(nets.MODELS[tiny_registry], description="tiny student", distill=dict(plain_distill))
    monkeypatch.setitem(nets.MODELS, "tiny_student", student)
    run = tmp_path / "resumed"
    train("tiny_student", run_dir=run, seed=3, progress=False, stop_after=2, teacher_dir=teacher_dir)
    epoch2 = load_checkpoint(run / "ckpt.pt")
    student["distill"] = dict(plain_distill, flip_from_epoch=2)
    s = train("tiny_student", run_dir=run, seed=3, progress=False, teacher_dir=teacher_dir)
    assert s["epochs_done"] == 3 and s["test_accuracy"] > 0.5
    resumed = load_checkpoint(run / "ckpt.pt")
    assert resumed["history"][:2] == epoch2["history"]
    assert resumed["recipe"]["distill"]["flip_from_epoch"] == 2
    straight = tmp_path / "straight"
    train("tiny_student", run_dir=straight, seed=3, progress=False, teacher_dir=teacher_dir)
    b = load_checkpoint(straight / "ckpt.pt")
    for key in resumed["model"]:
        assert torch.equal(resumed["model"][key], b["model"][key]), key
    # the flip-averaged epoch optimised another loss than the plain teacher's
    student["distill"] = dict(plain_distill)
    plain = tmp_path / "plain"
    train("tiny_student", run_dir=plain, seed=3, progress=False, teacher_dir=teacher_dir)
    p = load_checkpoint(plain / "ckpt.pt")
    same = ("loss", "train_accuracy", "test_accuracy")
    assert [[h[k] for k in same] for h in p["history"][:2]] == [[h[k] for k in same] for h in epoch2["history"]]
    assert p["history"][2]["loss"] != resumed["history"][2]["loss"]
    # added to a checkpoint past flip_from_epoch it would change a trained epoch: refused
    student["distill"] = dict(plain_distill, flip_from_epoch=1)
    with pytest.raises(QnnfabError, match="different recipe or seed"):
        train("tiny_student", run_dir=plain, seed=3, progress=False, teacher_dir=teacher_dir)
    # malformed: before the distillation starts, past the run, not an int
    for bad in (dict(plain_distill, from_epoch=1, flip_from_epoch=0), dict(plain_distill, flip_from_epoch=3),
                dict(plain_distill, flip_from_epoch="2")):
        student["distill"] = bad
        with pytest.raises(QnnfabError, match=r"distill: flip_from_epoch must be an epoch of the run"):
            train("tiny_student", run_dir=tmp_path / "z", seed=3, progress=False, teacher_dir=teacher_dir)


def test_precise_batch_norm_and_weight_averaging_finish_a_run_and_keep_it_resumable(tmp_path, tiny_registry,
                                                                                     monkeypatch):
    """``precise_bn`` added to a finished recipe replaces its batch norms' running statistics by
    the equal-weight average over an augmented pass of the training images (the weights stay);
    ``swa`` keeps the running average of the parameters from its epoch on, and the finished
    checkpoint's ``model`` is that average (with precise statistics) while training resumes from
    ``train_model``; both may join a finished run's recipe, and malformed entries are refused."""
    from models.train import precise_batch_norm, swa_update
    run = tmp_path / "run"
    train(tiny_registry, run_dir=run, seed=3, progress=False)
    before = load_checkpoint(run / "ckpt.pt")
    monkeypatch.setitem(nets.MODELS[tiny_registry], "precise_bn", {"images": 1000})
    s = train(tiny_registry, run_dir=run, seed=3, progress=False)
    after = load_checkpoint(run / "ckpt.pt")
    assert after["precise_bn"]["images"] == 1000 and after["precise_bn"]["seed"] == 0
    assert s["test_accuracy"] == after["precise_bn"]["test_accuracy"] > 0.5
    assert after["history"] == before["history"]
    for key, value in before["model"].items():
        if "running_" in key:
            assert not torch.equal(value, after["model"][key]), key
        elif "num_batches" not in key:
            assert torch.equal(value, after["model"][key]), key
    # the statistics are those of the augmented batches, every batch weighing the same
    cfg = nets.model_config(tiny_registry)
    model = nets.build_model(cfg)
    model.load_state_dict(after["model"])
    x, _ = load_dataset("mnist", "train")
    x = torch.from_numpy(x[:1000])
    assert precise_batch_norm(model, x, cfg, 1000, 0) == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, after["model"][key]), key
    # swa from epoch 3 of a restart of 2 epochs: the average of the epoch-4 and epoch-5 weights
    monkeypatch.setitem(nets.MODELS[tiny_registry], "restarts", [[2, 0.004]])
    monkeypatch.setitem(nets.MODELS[tiny_registry], "swa", {"from_epoch": 3})
    train(tiny_registry, run_dir=run, seed=3, progress=False, stop_after=1)
    epoch4 = load_checkpoint(run / "ckpt.pt")
    assert epoch4["swa"]["count"] == 1 and "train_model" not in epoch4
    s = train(tiny_registry, run_dir=run, seed=3, progress=False)
    done = load_checkpoint(run / "ckpt.pt")
    assert done["epoch"] == 5 and done["swa"]["count"] == 2 and done["precise_bn"]["swa_epochs"] == 2
    for key in done["swa"]["average"]:
        expect = (epoch4["model"][key] + done["train_model"][key]) / 2
        assert torch.allclose(done["model"][key], expect, rtol=0, atol=1e-6), key
        assert torch.equal(done["model"][key], done["swa"]["average"][key]), key
    assert s["test_accuracy"] == done["precise_bn"]["test_accuracy"] > 0.5
    assert swa_update(None, 0, model).keys() == dict(model.named_parameters()).keys()
    # a finished run with both applied has nothing to do
    again = train(tiny_registry, run_dir=run, seed=3, progress=False)
    assert again["test_accuracy"] == s["test_accuracy"]
    # malformed entries
    for key, bad, message in (("precise_bn", {"images": 0}, "images must be an int >= 1"),
                              ("precise_bn", {"batches": 3}, "must be a dict with the fields images, seed"),
                              ("swa", {"from_epoch": 9}, "from_epoch must be an epoch of the run"),
                              ("swa", {"start": 1}, "must be a dict with the one field from_epoch")):
        monkeypatch.setitem(nets.MODELS[tiny_registry], key, bad)
        with pytest.raises(QnnfabError, match=message):
            train(tiny_registry, run_dir=tmp_path / "bad", seed=3, progress=False)
        monkeypatch.delitem(nets.MODELS[tiny_registry], key)
