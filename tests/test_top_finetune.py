"""Top fine-tuning (models/top_finetune.py) on a tiny binary CNV: it retrains only the layers
after the frozen ones, its cached-feature path scores what the whole model scores, it keeps the
run resumable and its cache extendable, it exports bit-exact, and malformed entries are refused."""

import pytest
import torch

from models import nets
from models.data import load_dataset
from models.export import export
from models.qmd import load_qmd
from models.reference import accuracy
from models.top_finetune import CACHE_FILE, bottom_fingerprint
from models.train import _load_data, evaluate, load_checkpoint, train
from qnnfab.errors import QnnfabError

SMALL = {"in_shape": [32, 32, 3], "channels": [8, 8, 16, 16, 32, 32], "pool_after": [1, 3], "hidden": [32, 32],
         "logit_scale": 0.125, "scale": False}
TOP = {"from_conv": 4, "passes": 2, "epochs": 2, "lr": 0.002, "swa_from": 1, "seed": 0, "cache_seed": 1}


@pytest.fixture
def tiny_pair(monkeypatch, tmp_path):
    """A finished tiny float teacher and a finished tiny binary student distilled from it."""
    common = {"net": "CNV", "dataset": "cifar10", "input_shape": (32, 32, 3), "epochs": 1, "batch_size": 64,
              "lr": 0.01, "lr_min": 0.0, "weight_decay": 0.0, "augment_shift": 2, "augment_flip": True,
              "train_limit": 256, "test_limit": 200}
    monkeypatch.setitem(nets.MODELS, "tiny_float", common | {"net_args": SMALL | {"weight": "float", "act": "relu"},
                                                             "description": "tiny float teacher"})
    monkeypatch.setitem(nets.MODELS, "tiny_bnn", common | {"net_args": SMALL, "description": "tiny bnn",
                                                           "distill": {"teacher": "tiny_float", "from_epoch": 0}})
    teacher_dir, run = tmp_path / "teacher", tmp_path / "run"
    train("tiny_float", run_dir=teacher_dir, seed=1, progress=False)
    train("tiny_bnn", run_dir=run, seed=3, progress=False, teacher_dir=teacher_dir)
    return run, teacher_dir


def test_top_finetune_retrains_the_top_only_and_scores_the_whole_model(tiny_pair, monkeypatch, tmp_path):
    run, teacher_dir = tiny_pair
    before = load_checkpoint(run / "ckpt.pt")
    monkeypatch.setitem(nets.MODELS["tiny_bnn"], "top_finetune", dict(TOP))
    cfg = nets.model_config("tiny_bnn")
    s = train("tiny_bnn", run_dir=run, seed=3, progress=False, teacher_dir=teacher_dir)
    ck = load_checkpoint(run / "ckpt.pt")
    rec = ck["top_finetune"]
    assert rec["settings"] == TOP and rec["swa_epochs"] == 1 and len(rec["history"]) == 2
    assert rec["test_accuracy_before"] == before["history"][-1]["test_accuracy"]
    assert s["test_accuracy"] == rec["test_accuracy"]
    # the cached-feature evaluation is the whole model's evaluation
    model = nets.build_model(cfg)
    model.load_state_dict(ck["model"])
    xte, yte = _load_data(cfg, "test")
    assert evaluate(model, xte, yte) == rec["test_accuracy"]
    # frozen first four convolutions; the rest changed; the main run's weights kept for resuming
    for key, value in before["model"].items():
        assert torch.equal(ck["train_model"][key], value), key
        frozen = key.startswith(tuple(f"{m}.{i}." for m in ("convs", "conv_bns") for i in range(4)))
        if frozen:
            assert torch.equal(ck["model"][key], value), key
        elif key.endswith(("weight", "running_mean")):
            assert not torch.equal(ck["model"][key], value), key
    assert ck["history"] == before["history"] and ck["epoch"] == before["epoch"]
    # a finished, fine-tuned run has nothing to do
    again = train("tiny_bnn", run_dir=run, seed=3, progress=False, teacher_dir=teacher_dir)
    assert again["test_accuracy"] == s["test_accuracy"]
    assert load_checkpoint(run / "ckpt.pt")["top_finetune"] == rec
    # the export is bit-exact and records how the top was trained
    import models.export as ex
    monkeypatch.setattr(ex, "load_dataset", lambda name, split: tuple(a[:200] for a in load_dataset(name, split)))
    summary = export("tiny_bnn", run_dir=run, out_dir=tmp_path / "q")
    qmd = load_qmd(tmp_path / "q")
    assert summary["mismatches"] == 0
    assert qmd.provenance["recipe"]["top_finetune"]["settings"] == TOP
    assert qmd.provenance["qat_accuracy"] == rec["test_accuracy"]
    x, y = load_dataset("cifar10", "test")
    assert accuracy(qmd, x[:200], y[:200]) == rec["test_accuracy"]


def test_top_finetune_cache_extends_with_the_same_random_stream(tiny_pair, monkeypatch, tmp_path):
    run, teacher_dir = tiny_pair
    entry = nets.MODELS["tiny_bnn"]
    monkeypatch.setitem(entry, "top_finetune", dict(TOP, epochs=1, swa_from=0))
    train("tiny_bnn", run_dir=run, seed=3, progress=False, teacher_dir=teacher_dir)
    two = torch.load(run / CACHE_FILE, weights_only=True)
    assert len(two["train"]) == 2
    assert two["key"] | {"bottom": None} == {"from_conv": 4, "cache_seed": 1, "teacher": "tiny_float", "bottom": None}
    # the key names the frozen weights: a change below from_conv changes it, one above does not
    model = nets.build_model(nets.model_config("tiny_bnn"))
    model.load_state_dict(load_checkpoint(run / "ckpt.pt")["train_model"])
    assert bottom_fingerprint(model, 4) == two["key"]["bottom"]
    with torch.no_grad():
        model.convs[4].weight.neg_()
        assert bottom_fingerprint(model, 4) == two["key"]["bottom"]
        model.conv_bns[3].running_mean.add_(1)
        assert bottom_fingerprint(model, 4) != two["key"]["bottom"]
    monkeypatch.setitem(entry, "top_finetune", dict(TOP, epochs=1, swa_from=0, passes=3))
    train("tiny_bnn", run_dir=run, seed=3, progress=False, teacher_dir=teacher_dir)
    three = torch.load(run / CACHE_FILE, weights_only=True)
    assert len(three["train"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(two["train"], three["train"]))
    # a cache built in one go holds the same three passes
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "ckpt.pt").write_bytes((run / "ckpt.pt").read_bytes())
    ck = load_checkpoint(fresh / "ckpt.pt")
    assert ck["top_finetune"]["settings"]["passes"] == 3
    monkeypatch.setitem(entry, "top_finetune", dict(TOP, epochs=1, swa_from=0, passes=3, lr=0.001))
    train("tiny_bnn", run_dir=fresh, seed=3, progress=False, teacher_dir=teacher_dir)
    one_go = torch.load(fresh / CACHE_FILE, weights_only=True)
    for a, b in zip(one_go["train"] + one_go["teacher"], three["train"] + three["teacher"]):
        assert torch.equal(a, b)
    # the fine-tuning starts from the main run's weights, not from the earlier fine-tuned ones
    redone = load_checkpoint(fresh / "ckpt.pt")
    assert redone["top_finetune"]["test_accuracy_before"] == ck["top_finetune"]["test_accuracy_before"]
    for key, value in ck["train_model"].items():
        assert torch.equal(redone["train_model"][key], value), key


@pytest.mark.parametrize("change, message", [
    ({"epochs": None}, "must be a dict with the fields"),
    ({"from_conv": 0}, "from_conv must be a convolution after the first"),
    ({"from_conv": 6}, "from_conv must be a convolution after the first"),
    ({"swa_from": 2}, "swa_from must be an epoch of the fine-tuning"),
    ({"passes": 0}, "passes and epochs must be >= 1"),
    ({"lr": 0}, "lr must be > 0"),
    ({"seed": "0"}, "seed must be integers"),
])
def test_malformed_top_finetune_is_one_clear_error(monkeypatch, tmp_path, change, message):
    entry = {"net": "CNV", "dataset": "cifar10", "input_shape": (32, 32, 3), "net_args": SMALL, "epochs": 1,
             "batch_size": 64, "lr": 0.01, "lr_min": 0.0, "weight_decay": 0.0, "train_limit": 64,
             "test_limit": 64, "description": "tiny", "distill": {"teacher": "float_cifar"},
             "top_finetune": {k: v for k, v in (TOP | change).items() if v is not None}}
    monkeypatch.setitem(nets.MODELS, "tiny_bad", entry)
    with pytest.raises(QnnfabError, match=message):
        train("tiny_bad", run_dir=tmp_path / "r", progress=False)


def test_top_finetune_needs_a_teacher_and_a_cnv(monkeypatch, tmp_path):
    base = {"dataset": "cifar10", "input_shape": (32, 32, 3), "epochs": 1, "batch_size": 64, "lr": 0.01,
            "lr_min": 0.0, "weight_decay": 0.0, "description": "tiny", "top_finetune": dict(TOP)}
    monkeypatch.setitem(nets.MODELS, "tiny_nodistill", base | {"net": "CNV", "net_args": SMALL})
    with pytest.raises(QnnfabError, match="the recipe has no distill"):
        train("tiny_nodistill", run_dir=tmp_path / "a", progress=False)
    monkeypatch.setitem(nets.MODELS, "tiny_sfc", base | {"net": "SFC", "dataset": "mnist",
                                                         "net_args": {"in_features": 784, "hidden": [8]},
                                                         "distill": {"teacher": "float_cifar"}})
    with pytest.raises(QnnfabError, match="only a CNV has convolutions to freeze"):
        train("tiny_sfc", run_dir=tmp_path / "b", progress=False)
    monkeypatch.setitem(nets.MODELS, "tiny_swa", base | {"net": "CNV", "net_args": SMALL, "swa": {"from_epoch": 0},
                                                         "distill": {"teacher": "float_cifar"}})
    with pytest.raises(QnnfabError, match="cannot follow swa"):
        train("tiny_swa", run_dir=tmp_path / "c", progress=False)
