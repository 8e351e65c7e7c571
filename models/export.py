"""Export a trained binary network to a QMD: batch norm + sign folded into integer thresholds.

``python -m models.export --model bnn_mnist`` reads ``runs/bnn_mnist/ckpt.pt``, measures
the float QAT model's accuracy on the 10,000 test images, writes
``models/zoo/bnn_mnist/`` (``qmd.json`` + ``qmd.npz``), runs the integer
:class:`~models.reference.ReferenceModel` on the description just written, and records
both accuracies in its provenance.

Folding (FINN's trick). A hidden layer computes, in float, ``y = k*(alpha*dot - mean) +
beta`` with ``k = gamma/sqrt(var+eps)`` and outputs ``+1`` iff ``y >= 0``. For ``k > 0``
that is ``dot >= ceil(t)`` with ``t = (mean - beta/k)/alpha`` (direction +1); for
``k < 0`` it is ``dot <= floor(t)`` (direction -1); for ``k == 0`` the output is the
constant ``beta >= 0``, written as a threshold outside the reachable range. Everything is
computed in float64, checked against ``y >= 0`` for every reachable dot value, and
clamped to ``[-N-1, N+1]`` (``N`` = fan-in).

``--model bnn_cifar`` exports the CNV convolutional network the same way
(:func:`cnv_layers`): conv2d layers with weights in (ky, kx, c) order, the first
layer's input normalisation ``(q - Z)/S`` folded exactly into its thresholds on the raw
pixel dot products, max-pools of binary values, and the dense layer after the last conv
reading the features in the QMD's channels-last order.
"""

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import torch

from models.data import DATASETS, load_dataset
from models.nets import CNV, MODELS, SFC, build_model
from models.qmd import dot_range as qmd_dot_range
from models.qmd import save_qmd
from models.reference import EVAL_BATCH, ReferenceModel
from models.train import EVAL_BATCH as FLOAT_EVAL_BATCH
from models.train import THREADS, checkpoint_path, load_checkpoint, total_epochs
from qnnfab.errors import QnnfabError
from qnnfab.paths import DATA_DIR, REPO_ROOT, ZOO_DIR


# --------------------------------------------------------------------------- folding

def fold_bn_sign(k, mean, beta, alpha, n):
    """Integer thresholds equivalent to ``sign(k*(alpha*dot - mean) + beta)`` (sign(0)=+1)
    for every integer ``dot`` in ``[-n, n]``.

    ``k``, ``mean``, ``beta``, ``alpha`` are per-channel ``[C]`` (``alpha >= 0``).
    Returns ``(thresholds int64 [C], direction int64 [C])``: channel ``c`` outputs ``+1``
    iff ``dot >= thresholds[c]`` (direction +1) or ``dot <= thresholds[c]`` (-1).
    Thresholds lie in ``[-n-1, n+1]``.
    """
    k, mean, beta, alpha = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (k, mean, beta, alpha))
    if (alpha < 0).any() or not np.isfinite(np.concatenate([k, mean, beta, alpha])).all():
        raise ValueError("alpha must be >= 0 and all parameters finite")
    lo, hi = -n - 1, n + 1
    slope = np.sign(k) * (alpha > 0)        # sign of dy/d(dot)
    up = slope >= 0                         # constant channels are written as direction +1
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (mean - beta / k) / alpha
    thr = np.where(slope > 0, np.ceil(t), np.where(slope < 0, np.floor(t), 0.0))
    const_met = beta + k * (-mean) * (alpha == 0) >= 0   # value of y when slope == 0
    thr = np.where(slope == 0, np.where(const_met, lo, hi), thr)
    thr = np.clip(np.nan_to_num(thr, nan=0.0, posinf=hi, neginf=lo), lo, hi).astype(np.int64)
    direction = np.where(up, 1, -1).astype(np.int64)

    # exact check against the float64 formula for every reachable dot value; a channel
    # whose t is within rounding of an integer may need its threshold moved by one
    dots = np.arange(-n, n + 1, dtype=np.float64)
    met = k[:, None] * (alpha[:, None] * dots[None, :] - mean[:, None]) + beta[:, None] >= 0
    got = np.where(up[:, None], dots[None, :] >= thr[:, None], dots[None, :] <= thr[:, None])
    for c in np.flatnonzero((met != got).any(axis=1)):
        row = met[c]
        if up[c]:
            new = int(dots[np.argmax(row)]) if row.any() else hi
            ok = np.array_equal(row, dots >= new)
        else:
            new = int(dots[len(row) - 1 - np.argmax(row[::-1])]) if row.any() else lo
            ok = np.array_equal(row, dots <= new)
        if not ok:  # cannot happen: y is monotone in dot (IEEE operations are monotone)
            raise AssertionError(f"channel {c}: sign(BN) is not monotone in the dot product")
        thr[c] = new
    return thr, direction


def bn_coefficients(bn):
    """``(k, mean, beta)`` in float64 of an eval-mode ``BatchNorm1d``/``BatchNorm2d``: ``y = k*(x-mean)+beta``."""
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(var)
    k = gamma / torch.sqrt(var + bn.eps)
    return k.numpy(), bn.running_mean.detach().double().numpy(), beta.numpy()


def binary_weights(fc):
    """The -1/+1 int8 weights a :class:`BinaryLinear` (``[out, in]``) or
    :class:`BinaryConv2d` (``[out, in, K, K]``) uses (``W >= 0`` -> +1)."""
    return np.where(fc.weight.detach().numpy() >= 0, 1, -1).astype(np.int8)


def dot_range(w, lo, hi):
    """``(lo, hi)`` of ``sum_k w[o,k]*x[k]`` over inputs ``x`` in ``[lo, hi]``, hulled over
    the outputs ``o`` (the range :func:`models.qmd.load_qmd` derives for the layer; zero
    weights contribute nothing)."""
    rlo, rhi = qmd_dot_range(w, lo, hi)
    return int(rlo.min()), int(rhi.max())


# --------------------------------------------------------------------------- QMD layers

def sfc_layers(model, input_shape):
    """QMD layer dicts (for :func:`models.qmd.save_qmd`) of an :class:`SFC` model."""
    if not isinstance(model, SFC):
        raise TypeError(f"expected an SFC model, got {type(model).__name__}")
    channels = input_shape[-1]
    if int(np.prod(input_shape)) != model.in_features:
        raise ValueError(f"input shape {input_shape} does not match the model's {model.in_features} inputs")
    layers = [{"name": "binarize", "kind": "threshold", "out": {"kind": "binary"},
               "arrays": {"thresholds": np.full((channels, 1), model.in_threshold, dtype=np.int64),
                          "direction": np.ones(channels, dtype=np.int64)}}]
    for i, (fc, bn) in enumerate(zip(model.fcs, model.bns)):
        layers.append(_dense(f"fc{i}", fc))
        k, mean, beta = bn_coefficients(bn)
        alpha = fc.alpha().detach().double().numpy()
        thr, direction = fold_bn_sign(k, mean, beta, alpha, fc.in_features)
        layers.append({"name": f"fc{i}_act", "kind": "threshold", "out": {"kind": "binary"},
                       "arrays": {"thresholds": thr[:, None], "direction": direction}})
    layers.append(_dense(f"fc{len(model.fcs)}", model.out))
    layers.append({"name": "class", "kind": "argmax"})
    return layers


def _dense(name, fc):
    return {"name": name, "kind": "dense", "in_features": fc.in_features, "out_features": fc.out_features,
            "weight": "binary", "arrays": {"weights": binary_weights(fc)}}


def fold_bn_levels(k, mean, beta, alpha, levels, lo, hi, chunk=1 << 22):
    """Integer thresholds of a multi-level activation: output ``count of levels c with
    k*(alpha*dot - mean) + beta >= c`` for every integer ``dot`` in ``[lo, hi]``.

    Each level is folded by :func:`fold_bn_sign` (with ``beta - c``), so exactly as a
    binary activation; returns ``(thresholds int64 [C, len(levels)], direction [C])``,
    clamped to ``[lo - 1, hi + 1]`` and sorted in each channel's direction (the levels
    are ascending). Channels are folded in chunks to bound the memory of the exact check.
    """
    k, mean, beta, alpha = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (k, mean, beta, alpha))
    n = max(abs(int(lo)), abs(int(hi)))
    step = max(1, chunk // (2 * n + 1))
    thr = np.zeros((len(k), len(levels)), dtype=np.int64)
    direction = np.zeros(len(k), dtype=np.int64)
    for c0 in range(0, len(k), step):
        sl = slice(c0, c0 + step)
        for i, level in enumerate(levels):
            t, d = fold_bn_sign(k[sl], mean[sl], beta[sl] - level, alpha[sl], n)
            thr[sl, i] = t
            direction[sl] = d
    return np.clip(thr, lo - 1, hi + 1), direction


def _weight_layer(name, kind, mod, reorder=None, **fields):
    """A ``dense``/``conv2d`` layer dict of a binary, ternary or pow2 weight module, and its integer
    weight matrix ``[out, fan-in]`` in the QMD's order (conv: (ky, kx, c))."""
    q = mod.qmd_weight()

    def to_qmd(w):                                        # [out, ...] -> [out, fan-in] in the QMD's order
        if w.ndim == 4:                                   # [Cout, Cin, K, K] -> (ky, kx, c)
            w = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        return reorder(w) if reorder is not None else w

    if q["weight"] == "pow2":
        codes = q["weights"]                              # [out, terms, *weight.shape[1:]]
        codes = np.stack([to_qmd(codes[:, t]) for t in range(codes.shape[1])], axis=1)
        wq = to_qmd(q["int_weights"]).astype(np.int64)
        spec = {"name": name, "kind": kind, **fields, "weight": "pow2", "terms": q["terms"],
                "code_bits": q["code_bits"], "exponent_offset": q["exponent_offset"], "arrays": {"weights": codes}}
        return spec, wq
    w = to_qmd(q["weights"])
    arrays = {"weights": w}
    wq = w.astype(np.int64)
    if "pos_scale" in q:
        arrays.update(pos_scale=q["pos_scale"], neg_scale=q["neg_scale"])
        wq = np.where(w > 0, q["pos_scale"][:, None], np.where(w < 0, -q["neg_scale"][:, None], 0))
    return {"name": name, "kind": kind, **fields, "weight": q["weight"], "arrays": arrays}, wq


def _act_layer(name, act, k, mean, beta, alpha, lo, hi):
    thr, direction = fold_bn_levels(k, mean, beta, alpha, act.levels, lo, hi)
    return {"name": name, "kind": "threshold", "out": dict(act.qmd_out),
            "arrays": {"thresholds": thr, "direction": direction}}


def cnv_layers(model, input_shape):
    """QMD layer dicts (for :func:`models.qmd.save_qmd`) of a :class:`CNV` model.

    ``conv<i>`` (conv2d, binary, ternary or pow2 weights in (ky, kx, c) order, TTQ's integer
    ``pos_scale``/``neg_scale``, pow2's term codes and exponent offset), ``conv<i>_act`` (threshold: one level per output step of
    the activation, binary/ternary/uint), ``pool<i>`` (maxpool 2/2, after the activations
    of ``model.pool_after``), then ``fc<i>``/``fc<i>_act`` and the logits ``fc<L>`` and
    ``class`` as for :class:`SFC`. The first conv's float input is ``(q - Z)/S`` of the
    pixels ``q``; per channel ``sum_k w_k (q_k - Z)/S = (dot_q - Z*sum_k w_k)/S`` (``w``
    the integer weights), so its thresholds are folded on ``dot_q`` with ``alpha/S`` and
    mean ``mean + alpha*Z*sum_k w_k/S``, exactly. Thresholds are clamped to ``[lo-1, hi+1]``
    of the layer's derived dot-product range.
    """
    if not isinstance(model, CNV):
        raise TypeError(f"expected a CNV model, got {type(model).__name__}")
    if getattr(model, "weight_kind", None) == "float":
        raise QnnfabError("a float CNV (a float baseline) has no integer description to export")
    if tuple(input_shape) != model.in_shape:
        raise ValueError(f"input shape {tuple(input_shape)} does not match the model's {model.in_shape}")
    if not model.fcs:
        raise ValueError("a CNV needs at least one hidden dense layer")
    layers = []
    lo, hi = 0, 255                                     # uint8 input
    act = model.act
    alo, ahi = _act_range(act)
    for i, (conv, bn) in enumerate(zip(model.convs, model.conv_bns)):
        cout, cin, k, _ = conv.weight.shape
        spec, wq = _weight_layer(f"conv{i}", "conv2d", conv, in_channels=cin, out_channels=cout, kernel=k,
                                 stride=1, padding=0)
        layers.append(spec)
        kk, mean, beta = bn_coefficients(bn)
        alpha = conv.alpha().detach().double().numpy()
        if i == 0:
            zero, scale = model.in_zero, model.in_scale
            mean = mean + alpha * zero * wq.sum(axis=1).astype(np.float64) / scale
            alpha = alpha / scale
        dlo, dhi = dot_range(wq, lo, hi)
        layers.append(_act_layer(f"conv{i}_act", act, kk, mean, beta, alpha, dlo, dhi))
        lo, hi = alo, ahi
        if i in model.pool_after:
            layers.append({"name": f"pool{i}", "kind": "maxpool", "kernel": 2, "stride": 2})
    h, w_, c = model.feature_shape
    for i, (fc, bn) in enumerate(zip(model.fcs, model.bns)):
        # torch flattens (C, H, W); the QMD flattens channels last (H, W, C)
        reorder = (lambda m: m.reshape(-1, c, h, w_).transpose(0, 2, 3, 1).reshape(m.shape[0], -1)) if i == 0 else None
        spec, wq = _weight_layer(f"fc{i}", "dense", fc, reorder, in_features=fc.in_features,
                                 out_features=fc.out_features)
        layers.append(spec)
        kk, mean, beta = bn_coefficients(bn)
        alpha = fc.alpha().detach().double().numpy()
        dlo, dhi = dot_range(wq, lo, hi)
        layers.append(_act_layer(f"fc{i}_act", act, kk, mean, beta, alpha, dlo, dhi))
    last = len(model.fcs)
    spec, _ = _weight_layer(f"fc{last}", "dense", model.out, in_features=model.out.in_features,
                            out_features=model.out.out_features)
    layers.append(spec)
    layers.append({"name": "class", "kind": "argmax"})
    return layers


def _act_range(act):
    """``(lo, hi)`` of an activation module's integer outputs."""
    kind = act.qmd_out["kind"]
    if kind == "binary":
        return -1, 1
    if kind == "ternary":
        return -1, 1
    if kind == "sint":
        return -(2 ** (act.qmd_out["bits"] - 1)), 2 ** (act.qmd_out["bits"] - 1) - 1
    return 0, 2 ** act.qmd_out["bits"] - 1


EXPORTERS = {"SFC": sfc_layers, "CNV": cnv_layers}


def qmd_layers(model, cfg):
    """QMD layer dicts of ``model`` built from registry entry ``cfg``."""
    return EXPORTERS[cfg["net"]](model, tuple(cfg["input_shape"]))


# --------------------------------------------------------------------------- float model

def load_trained(model_name, run_dir=None):
    """``(model in eval mode, checkpoint dict)`` from ``<run_dir>/ckpt.pt`` (default: the
    run's checkpoint or its committed snapshot, :func:`models.train.checkpoint_path`)."""
    path = checkpoint_path(model_name, run_dir)
    ck = load_checkpoint(path)
    if ck["model_name"] != model_name:
        raise QnnfabError(f"checkpoint is of model {ck['model_name']!r}, not {model_name!r}", where=str(path))
    model = build_model(ck["config"])
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck


@torch.no_grad()
def float_model_trace(model, images, batch=FLOAT_EVAL_BATCH):
    """Run the float QAT model (eval mode) on uint8 ``images`` and return its view of
    every exported layer, keyed by QMD layer name, as int64 numpy arrays (checked to be
    integers), plus ``logits`` (float32)."""
    model.eval()
    parts = {}
    for i in range(0, len(images), batch):
        t = model(torch.as_tensor(np.asarray(images[i:i + batch])), trace=True)
        for name, v in t.items():
            parts.setdefault(name, []).append(v)
    out = {}
    for name, vs in parts.items():
        v = torch.cat(vs)
        if name == "logits":
            out[name] = v.numpy()
            continue
        r = torch.round(v.double()) if v.is_floating_point() else v
        if not torch.equal(r, v.double() if v.is_floating_point() else v):
            raise AssertionError(f"float model's layer {name} is not integer-valued")
        out[name] = r.to(torch.int64).numpy()
    return out


def float_model_predictions(model, images, run_dir=None, batch=FLOAT_EVAL_BATCH):
    """Classes predicted by the float QAT model (a module, or a zoo name whose checkpoint
    is loaded from ``run_dir``) for uint8 ``images``."""
    if isinstance(model, str):
        model = load_trained(model, run_dir)[0]
    model.eval()
    with torch.no_grad():   # argmax of the logits, as the trace's "class" (without keeping every layer)
        return np.concatenate([torch.argmax(model(torch.as_tensor(np.asarray(images[i:i + batch]))), dim=-1)
                               .to(torch.int64).numpy() for i in range(0, len(images), batch)])


def reference_predictions(qmd, images, batch=EVAL_BATCH):
    """Classes the integer reference model predicts for ``images``."""
    ref = qmd if isinstance(qmd, ReferenceModel) else ReferenceModel(qmd)
    return np.concatenate([ref.run(images[i:i + batch]).numpy() for i in range(0, len(images), batch)])


# --------------------------------------------------------------------------- export

def measure_float_baseline(name, images, labels, run_dir=None):
    """The float baseline ``name``'s test accuracy, measured now from its checkpoint
    (``runs/<name>/ckpt.pt`` or its committed snapshot); ``{"model", "accuracy", "epochs",
    "checkpoint"}``, accuracy None (with a warning) when it has not been trained."""
    path = checkpoint_path(name, run_dir)
    if not path.is_file():
        print(f"warning: float baseline '{name}' not trained ({path} missing); "
              f"float_baseline_accuracy is not recorded", file=sys.stderr)
        return {"model": name, "accuracy": None, "epochs": None, "checkpoint": str(path)}
    model, ck = load_trained(name, run_dir)
    acc = float((float_model_predictions(model, images) == np.asarray(labels)).mean())
    return {"model": name, "accuracy": acc, "epochs": int(ck["epoch"]), "checkpoint": str(path)}


def _dataset_note(name, n):
    path = Path(DATA_DIR) / DATASETS[name]
    return f"{name}, {os.path.relpath(path, REPO_ROOT)}, {n:,} test images"


def export(model_name, run_dir=None, out_dir=None):
    """Export the checkpoint of ``model_name`` to ``out_dir`` (default ``models/zoo/<name>``)
    and return a summary (accuracies, paths)."""
    torch.set_num_threads(THREADS)
    model, ck = load_trained(model_name, run_dir)
    cfg = ck["config"]
    if cfg["net_args"].get("weight") == "float":
        raise QnnfabError(f"'{model_name}' is a float baseline: it trains (make train) and is evaluated as "
                          "another model's float_baseline_accuracy, but has no integer description to export")
    if ck["epoch"] < total_epochs(cfg):
        print(f"warning: exporting a partially trained model ({ck['epoch']}/{total_epochs(cfg)} epochs)",
              file=sys.stderr)
    images, labels = load_dataset(cfg["dataset"], "test")
    float_cls = float_model_predictions(model, images)
    qat_acc = float((float_cls == labels).mean())

    layers = qmd_layers(model, cfg)
    channel_order = None
    # an export-time choice (it changes no weight), so read from the registry, not the checkpoint
    balance_for = (MODELS.get(model_name) or cfg).get("balance_for_folding")
    if balance_for:                         # hidden channels reordered for the zero-skip lanes
        from models.channel_order import balance_channels
        layers, channel_order = balance_channels(layers, ZOO_DIR / balance_for / "folding.json")
        channel_order["folding"] = f"models/zoo/{balance_for}/folding.json"
    out_dir = Path(out_dir) if out_dir else ZOO_DIR / model_name
    recipe = {k: cfg[k] for k in ("epochs", "batch_size", "lr", "lr_min", "weight_decay")}
    recipe["augment_shift"] = cfg.get("augment_shift", 0)
    if cfg.get("augment_flip"):
        recipe["augment_flip"] = True
    if cfg.get("init_from"):
        recipe["init_from"] = cfg["init_from"]      # the checkpoint it was fine-tuned from
    if cfg.get("restarts"):
        recipe["restarts"] = cfg["restarts"]        # warm restarts after the main cosine cycle
    if cfg.get("distill"):
        recipe["distill"] = cfg["distill"]          # the teacher and loss it was distilled with
    if ck.get("precise_bn"):                        # applied to this checkpoint: how its BN statistics
        recipe["precise_bn"] = ck["precise_bn"]     # were taken (and over how many epochs' weight average)
        if ck["precise_bn"].get("swa_epochs"):
            recipe["swa"] = cfg["swa"]
    if ck.get("top_finetune"):                      # the last layers retrained on cached features
        recipe["top_finetune"] = {k: v for k, v in ck["top_finetune"].items() if k != "history"}
    provenance = {
        "qat_accuracy": qat_acc,
        "integer_accuracy_at_export": None,
        "dataset": _dataset_note(cfg["dataset"], len(labels)),
        "epochs": int(ck["epoch"]),
        "seed": int(ck["seed"]),
        "recipe": recipe | {"optimizer": "Adam, cosine LR per epoch, latent weights clipped to [-1,1]",
                            "net": cfg["net"], "net_args": cfg["net_args"]},
        "train_seconds": round(float(ck.get("train_seconds", 0.0)), 1),
        "torch_version": str(ck.get("torch_version", torch.__version__)),
        "exported": datetime.date.today().isoformat(),
        "exporter": "models/export.py",
    }
    if channel_order:
        provenance["channel_order"] = channel_order
    if cfg.get("float_baseline"):
        provenance["float_baseline"] = measure_float_baseline(cfg["float_baseline"], images, labels)
        provenance["float_baseline_accuracy"] = provenance["float_baseline"]["accuracy"]
    description = cfg.get("description", "")
    qmd = save_qmd(out_dir, model_name, tuple(cfg["input_shape"]), "uint8", layers, provenance, description,
                   dataset=cfg["dataset"])
    int_cls = reference_predictions(qmd, images)
    int_acc = float((int_cls == labels).mean())
    provenance["integer_accuracy_at_export"] = int_acc
    provenance["float_vs_integer_class_mismatches"] = int((int_cls != float_cls).sum())
    save_qmd(out_dir, model_name, tuple(cfg["input_shape"]), "uint8", layers, provenance, description,
                   dataset=cfg["dataset"])
    return {"model": model_name, "out_dir": str(out_dir), "qat_accuracy": qat_acc,
            "integer_accuracy": int_acc, "mismatches": provenance["float_vs_integer_class_mismatches"],
            "test_images": len(labels)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bnn_mnist", help="zoo model name (default: bnn_mnist)")
    p.add_argument("--run-dir", default=None, help="checkpoint directory (default: runs/<model>)")
    p.add_argument("--out-dir", default=None, help="QMD directory to write (default: models/zoo/<model>)")
    args = p.parse_args(argv)
    try:
        s = export(args.model, run_dir=args.run_dir, out_dir=args.out_dir)
    except QnnfabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{s['model']} -> {s['out_dir']}")
    print(f"float QAT accuracy:         {s['qat_accuracy']:.4f} ({s['test_images']:,} test images)")
    print(f"integer reference accuracy: {s['integer_accuracy']:.4f} "
          f"({s['mismatches']} images classified differently)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
