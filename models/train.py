"""Quantization-aware training of a zoo model, resumable.

``python -m models.train --model bnn_mnist`` trains with the recipe in
:data:`models.nets.MODELS` and writes ``runs/<model>/ckpt.pt`` after every epoch
(model, optimizer, epoch, RNG state, best test accuracy, history).
Running it again resumes where it stopped and follows the same schedule; a finished
run is left as it is. Adam with a cosine learning-rate schedule (stepped per
epoch); latent binary weights are clipped to [-1, 1] after each step and get no weight
decay.

A run's checkpoint lives in ``runs/`` (ignored by git, gone with the machine). So that a
long run outlives the machine it started on, :func:`train` also keeps a compact copy of it
in the repository, ``models/checkpoints/<model>.pt`` (:func:`write_snapshot`: the model in
float32, the optimizer's moments in bfloat16, about 12 MB for a CNV), which is committed; a
run whose ``runs/`` checkpoint is missing resumes from that snapshot, and export, fine-tuning
(``init_from``) and the float baseline read it too (:func:`checkpoint_path`). A resumed
snapshot is not bit-identical to an uninterrupted run (the moments were rounded to bfloat16).

Two recipe keys serve post-training quantization followed by fine-tuning (ShiftCNN):
``init_from`` names a model whose finished checkpoint (``runs/<init_from>/ckpt.pt``, or
``init_dir``) initialises a fresh run (every parameter and buffer of the same name and
shape: the float baseline's weights become the latent weights, its batch norms are kept);
``inq_schedule`` ``[[epoch, fraction], ...]`` freezes that fraction of every power-of-two
layer's weights, largest first, at the start of each listed epoch (INQ; fraction 1 at the
end makes the model integer-exact again).

The learning rate follows a cosine from ``lr`` to ``lr_min`` over ``epochs``; a recipe's
``restarts`` ``[[epochs, lr], ...]`` appends warm restarts (SGDR): after the main cycle, each
entry is another cosine cycle from its ``lr`` down to ``lr_min`` over its ``epochs``, continuing
from the current weights and Adam moments. Appending a restart to a recipe keeps its checkpoints
resumable (the schedule of the epochs already trained is unchanged), so a finished run that fell
short of its accuracy goal can be trained on without starting over.

Knowledge distillation: a recipe's ``distill`` ``{"teacher": name, "from_epoch": e,
"temperature": T, "weight": w}`` trains from (0-based) epoch ``e`` on against a finished
teacher's soft labels as well as the true ones: the loss is ``(1 - w) * CE(student, y) +
w * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, the teacher (its finished
checkpoint, in eval mode) seeing the same augmented batch. ``w = 1, T = 1`` is ReActNet's
distributional loss for binary networks. Like a restart, a ``distill`` whose ``from_epoch`` is
not before a checkpoint's epoch may be added to its recipe, which keeps the run resumable.
Its optional ``flip_from_epoch`` ``f`` makes the teacher's logits, from (0-based) epoch ``f`` on,
the mean of its logits on the batch and on the batch mirrored left-right (test-time flip
augmentation of the teacher: float_cifar's test accuracy is 85.79% alone, 86.97% flip-averaged);
it may likewise be added to a checkpoint's ``distill`` when ``f`` is not before its epoch.

Precise batch norm: a recipe's ``precise_bn`` ``{"images": n, "seed": s}`` replaces, once the
last epoch is trained, every batch norm's running statistics (the exponential averages of the
last ~10 training batches, momentum 0.1) by their equal-weight average over one pass of the
first ``n`` training images, augmented as in training with the RNG seeded ``s``, in the recipe's
batches, no weight changing (PreciseBN, Wu & Johnson 2021). The exported thresholds are folded
from these statistics, so the integer network no longer depends on which batches came last
(tnn_cifar's test accuracy moved 83.81% -> 83.40% -> 83.55% over its last three epochs at learning
rates of 7e-6 and less). It may be added to a finished run's recipe: the next ``make train``
applies it to the checkpoint, records ``precise_bn`` (the test accuracy before and after) in it,
and keeps the run resumable.

Top fine-tuning: a recipe's ``top_finetune`` retrains, once the last epoch (and ``precise_bn``) is
done, a CNV's last convolutions and dense layers on cached features of its frozen first ones
against the distillation teacher, with weight averaging (:mod:`models.top_finetune`). Like
``precise_bn`` it may be added to a finished run's recipe and keeps the run resumable.

Stochastic weight averaging: a recipe's ``swa`` ``{"from_epoch": e}`` keeps the equal-weight
average of the parameters (latent weights included) at the end of every (0-based) epoch from
``e`` on (Izmailov et al. 2018); once the last epoch is trained, the checkpoint's ``model`` is
that average, its batch norms' statistics computed by ``precise_bn`` (implied, with its
defaults, when the recipe has none), and the weights training continues from stay in
``train_model``. Like ``distill``, an ``swa`` starting at or after a checkpoint's epoch may be
added to its recipe together with a restart.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.data import load_dataset
from models.nets import build_model, model_config
from models.quant import clip_latent_weights, inq_fraction_at, inq_freeze
from models.top_finetune import apply_top_finetune, validate_top_finetune
from qnnfab.errors import QnnfabError
from qnnfab.paths import REPO_ROOT

CKPT = "ckpt.pt"
# One CPU thread by default, at most 2 (QNNFAB_THREADS=2): on a machine shared with other
# jobs, two OpenMP threads were measured 10-30x slower per epoch than one (their barriers
# wait for a descheduled thread), and on an idle machine two gain only ~10% on this MLP.
THREADS = max(1, min(2, int(os.environ.get("QNNFAB_THREADS", "1"))))


SNAPSHOT_DIR = REPO_ROOT / "models" / "checkpoints"


def default_run_dir(model_name):
    return REPO_ROOT / "runs" / model_name


def snapshot_path(model_name):
    """The committed snapshot of ``model_name``'s training run (see the module docstring)."""
    return SNAPSHOT_DIR / f"{model_name}.pt"


def checkpoint_path(model_name, run_dir=None):
    """Where ``model_name``'s trained checkpoint is read: ``<run_dir>/ckpt.pt`` when
    ``run_dir`` is given; else ``runs/<model>/ckpt.pt`` if it exists, else the committed
    snapshot if that exists, else the ``runs/`` path (whose absence the caller reports)."""
    if run_dir is not None:
        return Path(run_dir) / CKPT
    own = default_run_dir(model_name) / CKPT
    if not own.is_file() and snapshot_path(model_name).is_file():
        return snapshot_path(model_name)
    return own


def _map_floats(obj, fn):
    """``obj`` (nested dicts/lists/tuples of tensors) with ``fn`` applied to every floating tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _map_floats(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_floats(v, fn) for v in obj)
    return obj


def write_snapshot(ck, path):
    """Write the compact, committable copy of checkpoint ``ck``: everything as it is, but
    the optimizer state's floating tensors in bfloat16 (the model stays float32, exact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    small = dict(ck, optimizer=_map_floats(ck["optimizer"], lambda t: t.to(torch.bfloat16)), snapshot=True)
    _save_atomic(small, path)


def _widen_snapshot(ck):
    """A checkpoint read from a snapshot, its optimizer state back in float32."""
    if ck.get("snapshot"):
        ck = dict(ck, optimizer=_map_floats(ck["optimizer"], lambda t: t.to(torch.float32)))
    return ck


def _recipe(cfg):
    """The parts of a config that define the training run (compared on resume)."""
    return {k: cfg[k] for k in ("net", "net_args", "dataset", "epochs", "batch_size", "lr",
                                 "lr_min", "weight_decay") if k in cfg} | \
        {k: cfg[k] for k in ("augment_shift", "augment_flip", "train_limit", "test_limit", "init_from",
                             "inq_schedule", "restarts", "distill", "precise_bn", "swa", "top_finetune")
                          if cfg.get(k)}


def _cycles(cfg):
    """The learning-rate cycles of a recipe: ``[(first_epoch, epochs, peak_lr), ...]``, the main
    cosine cycle first, then its ``restarts``."""
    cycles, first = [(0, cfg["epochs"], cfg["lr"])], cfg["epochs"]
    for n, lr in cfg.get("restarts", []):
        cycles.append((first, n, lr))
        first += n
    return cycles


def total_epochs(cfg):
    """Epochs of the whole run: the main cycle plus every restart."""
    first, n, _ = _cycles(cfg)[-1]
    return first + n


def lr_at(cfg, epoch):
    """The learning rate of (0-based) ``epoch``: cosine annealing from the cycle's peak to
    ``lr_min`` within the cycle that contains it (:func:`_cycles`)."""
    for first, n, peak in _cycles(cfg):
        if epoch < first + n:
            return cfg["lr_min"] + (peak - cfg["lr_min"]) * (1 + math.cos(math.pi * (epoch - first) / n)) / 2
    raise ValueError(f"epoch {epoch} is past the run's {total_epochs(cfg)} epochs")


def _validate_restarts(model_name, cfg):
    restarts = cfg.get("restarts", [])
    ok = isinstance(restarts, list) and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], int) and r[0] >= 1
        and isinstance(r[1], (int, float)) and r[1] > 0 for r in restarts)
    if not ok:
        raise QnnfabError(f"{model_name}: restarts must be a list of [epochs >= 1, lr > 0] pairs, got {restarts!r}")


def _resumable(ck_recipe, recipe, ck_epoch):
    """Whether a checkpoint trained for ``ck_epoch`` epochs under ``ck_recipe`` continues under
    ``recipe``: the same recipe, except that ``recipe`` may append warm restarts to the
    checkpoint's, add a ``distill`` or an ``swa`` that starts at or after ``ck_epoch`` (or a
    ``distill`` ``flip_from_epoch`` at or after it to the checkpoint's ``distill``), and add,
    change or drop ``precise_bn`` or ``top_finetune`` (applied after the last epoch, they change
    no trained epoch)."""
    a, b = dict(ck_recipe), dict(recipe)
    for key in ("precise_bn", "top_finetune"):  # applied after the last epoch
        a.pop(key, None), b.pop(key, None)
    ra, rb = a.pop("restarts", []), b.pop("restarts", [])
    later_ok = True
    da, db = a.get("distill"), b.get("distill")
    if da is not None and db is not None and "flip_from_epoch" not in da and "flip_from_epoch" in db:
        later_ok &= db["flip_from_epoch"] >= ck_epoch        # the flip-averaged teacher comes later
        b["distill"] = {k: v for k, v in db.items() if k != "flip_from_epoch"}
    for key in ("distill", "swa"):              # may start at or after the checkpoint's epoch
        da, db = a.pop(key, None), b.pop(key, None)
        later_ok &= da == db or (da is None and db["from_epoch"] >= ck_epoch)
    return a == b and rb[:len(ra)] == ra and later_ok


DISTILL_DEFAULTS = {"from_epoch": 0, "temperature": 1.0, "weight": 1.0}


def _validate_distill(model_name, cfg):
    """Fill in ``cfg["distill"]``'s defaults; a malformed entry is a one-line error."""
    d = cfg.get("distill")
    if d is None:
        return
    where = f"{model_name}: distill"
    if not isinstance(d, dict) or not isinstance(d.get("teacher"), str):
        raise QnnfabError(f"{where} must be a dict with a 'teacher' model name, got {d!r}")
    unknown = set(d) - {"teacher", "flip_from_epoch", *DISTILL_DEFAULTS}
    if unknown:
        raise QnnfabError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
                          f"(known: teacher, {', '.join(DISTILL_DEFAULTS)}, flip_from_epoch)")
    d = DISTILL_DEFAULTS | d
    if d["teacher"] == model_name:
        raise QnnfabError(f"{where}: a model cannot be its own teacher")
    if not (isinstance(d["from_epoch"], int) and 0 <= d["from_epoch"] < total_epochs(cfg)):
        raise QnnfabError(f"{where}: from_epoch must be an epoch of the run (0 to {total_epochs(cfg) - 1}), "
                          f"got {d['from_epoch']!r}")
    if "flip_from_epoch" in d and not (isinstance(d["flip_from_epoch"], int)
                                       and d["from_epoch"] <= d["flip_from_epoch"] < total_epochs(cfg)):
        raise QnnfabError(f"{where}: flip_from_epoch must be an epoch of the run from from_epoch on "
                          f"({d['from_epoch']} to {total_epochs(cfg) - 1}), got {d['flip_from_epoch']!r}")
    if not (isinstance(d["temperature"], (int, float)) and d["temperature"] > 0):
        raise QnnfabError(f"{where}: temperature must be > 0, got {d['temperature']!r}")
    if not (isinstance(d["weight"], (int, float)) and 0 < d["weight"] <= 1):
        raise QnnfabError(f"{where}: weight must be in (0, 1], got {d['weight']!r}")
    cfg["distill"] = d


PRECISE_BN_DEFAULTS = {"images": 50000, "seed": 0}


def _validate_precise_bn(model_name, cfg):
    """Fill in ``cfg["precise_bn"]``'s defaults; a malformed entry is a one-line error."""
    d = cfg.get("precise_bn")
    if d is None:
        return
    where = f"{model_name}: precise_bn"
    if not isinstance(d, dict) or set(d) - set(PRECISE_BN_DEFAULTS):
        raise QnnfabError(f"{where} must be a dict with the fields {', '.join(PRECISE_BN_DEFAULTS)}, got {d!r}")
    d = PRECISE_BN_DEFAULTS | d
    if not (isinstance(d["images"], int) and d["images"] >= 1):
        raise QnnfabError(f"{where}: images must be an int >= 1, got {d['images']!r}")
    if not isinstance(d["seed"], int):
        raise QnnfabError(f"{where}: seed must be an int, got {d['seed']!r}")
    cfg["precise_bn"] = d


def _validate_swa(model_name, cfg):
    """Check ``cfg["swa"]``; it implies ``precise_bn`` (with its defaults when absent)."""
    d = cfg.get("swa")
    if d is None:
        return
    where = f"{model_name}: swa"
    if not isinstance(d, dict) or set(d) != {"from_epoch"}:
        raise QnnfabError(f"{where} must be a dict with the one field from_epoch, got {d!r}")
    if not (isinstance(d["from_epoch"], int) and 0 <= d["from_epoch"] < total_epochs(cfg)):
        raise QnnfabError(f"{where}: from_epoch must be an epoch of the run (0 to {total_epochs(cfg) - 1}), "
                          f"got {d['from_epoch']!r}")
    cfg.setdefault("precise_bn", dict(PRECISE_BN_DEFAULTS))


@torch.no_grad()
def swa_update(average, count, model):
    """Fold ``model``'s floating parameters into the running equal-weight ``average`` (a dict
    name -> tensor, on the CPU) of ``count`` earlier ones; returns the new average."""
    params = {k: v.detach().cpu() for k, v in model.named_parameters() if v.is_floating_point()}
    if count == 0:
        return {k: v.clone() for k, v in params.items()}
    return {k: average[k] + (v - average[k]) / (count + 1) for k, v in params.items()}


@torch.no_grad()
def recompute_bn_statistics(model, bns, run_batches):
    """Replace the running mean and variance of the batch norms ``bns`` (modules of ``model``) by
    their equal-weight average over the training-mode forward passes that ``run_batches()`` makes;
    ``model``'s mode and the batch norms' momenta are restored afterwards."""
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None                  # cumulative: every batch weighs the same
    model.train()
    run_batches()
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)


@torch.no_grad()
def precise_batch_norm(model, x, cfg, images, seed):
    """Set the running mean and variance of every batch norm of ``model`` to their equal-weight
    average over the training-mode forward passes of the first ``images`` uint8 images of ``x``
    in batches of ``cfg["batch_size"]``, augmented by :func:`augment` under a torch RNG seeded
    ``seed`` (the global RNG is restored); returns the number of batch norms updated."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    device, bs = next(model.parameters()).device, cfg["batch_size"]

    def run_batches():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in range(0, min(images, len(x)), bs):
                model(augment(x[i:min(i + bs, images)], cfg).to(device))

    recompute_bn_statistics(model, bns, run_batches)
    return len(bns)


def _apply_precise_bn(model_name, model, ck, cfg, xtr, xte, yte, ckpt_path, snap):
    """Apply the recipe's ``precise_bn`` to the finished checkpoint ``ck`` (whose weights
    ``model`` holds) unless it already was with these settings; save it and return ``ck``."""
    pb = cfg["precise_bn"]
    done = ck.get("precise_bn")
    swa = ck.get("swa") if cfg.get("swa") else None
    if done and done["epoch"] == ck["epoch"] and done["images"] == pb["images"] and done["seed"] == pb["seed"] \
            and done.get("swa_epochs", 0) == (swa["count"] if swa else 0):
        print(f"{model_name}: already trained for {ck['epoch']} epochs, precise batch norm applied (test accuracy "
              f"{done['test_accuracy']:.4f}); nothing to do", flush=True)
        return ck
    before = ck["history"][-1]["test_accuracy"]
    t0 = time.time()
    extra = {}
    if swa:                                 # the weight average, then its own batch norm statistics
        # a copy: ck["model"] may be the live model's own tensors (state_dict() does not copy)
        train_model = {k: v.clone() for k, v in ck.get("train_model", ck["model"]).items()}
        model.load_state_dict(train_model)
        with torch.no_grad():
            for k, v in model.named_parameters():
                if k in swa["average"]:
                    v.copy_(swa["average"][k])
        extra = {"train_model": train_model}
    n_bn = precise_batch_norm(model, xtr, cfg, pb["images"], pb["seed"])
    after = evaluate(model, xte, yte)
    ck = dict(ck, model=model.state_dict(), **extra,
              precise_bn={"epoch": ck["epoch"], "images": pb["images"], "seed": pb["seed"],
                          "swa_epochs": swa["count"] if swa else 0,
                          "batch_norms": n_bn, "test_accuracy_before": before, "test_accuracy": after,
                          "seconds": round(time.time() - t0, 2)})
    _save_atomic(ck, ckpt_path)
    if snap is not None:
        write_snapshot(ck, snap)
    if swa:
        print(f"{model_name}: the average of the weights of the last {swa['count']} epochs (swa)", flush=True)
    print(f"{model_name}: precise batch norm over {min(pb['images'], len(xtr)):,} augmented training images "
          f"({n_bn} batch norms): test acc (float QAT) {before:.4f} -> {after:.4f}", flush=True)
    return ck


def _apply_top_finetune(model_name, model, ck, cfg, xtr, ytr, xte, yte, run_dir, teacher_dir, ckpt_path, snap):
    """Apply the recipe's ``top_finetune`` (:mod:`models.top_finetune`) to the finished checkpoint
    ``ck``; save it (and its snapshot) when it changed, and return it."""
    new = apply_top_finetune(model_name, model, ck, cfg, xtr, ytr, xte, yte, run_dir, teacher_dir,
                             log=lambda msg: print(msg, flush=True))
    if new is not ck:
        _save_atomic(new, ckpt_path)
        if snap is not None:
            write_snapshot(new, snap)
    return new


def load_teacher(name, run_dir=None):
    """The finished model ``name`` as a frozen teacher (eval mode, no gradients): its
    ``runs/`` checkpoint or committed snapshot (``run_dir`` overrides); an unfinished or missing
    one is an error naming it."""
    path = checkpoint_path(name, run_dir)
    if not path.is_file():
        raise QnnfabError(f"the distillation teacher {name} is not trained: make train MODEL={name} first",
                          where=str(path))
    ck = load_checkpoint(path)
    done, total = ck["epoch"], total_epochs(ck["config"])
    if done < total:
        raise QnnfabError(f"the distillation teacher {name} is trained for {done} of its {total} epochs: "
                          f"finish it first (make train MODEL={name})", where=str(path))
    with torch.random.fork_rng(devices=[]):     # building it must not move the student's RNG stream
        teacher = build_model(ck["config"])
    teacher.load_state_dict(ck["model"])
    teacher.eval().requires_grad_(False)
    flush_subnormals(teacher)
    return teacher, ck


def flush_subnormals(module):
    """Set every float parameter and buffer of ``module`` whose magnitude is below float32's
    smallest normal number (but not zero) to zero, in place; return how many there were.

    Weight decay drives a trained float model's unused weights towards zero: float_cifar holds
    961,849 subnormal parameters and buffers, and an x86 CPU computes on subnormal operands
    many times slower, so its forward pass as a distillation teacher took 0.73 s per batch of
    128 instead of 0.09 s (2 threads) and dominated a distilled epoch. Values below 1.2e-38
    contribute nothing at float32 precision: float_cifar's logits on a training batch are the
    same to the bit after the flush."""
    tiny = torch.finfo(torch.float32).tiny
    n = 0
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                small = (t.abs() < tiny) & (t != 0)
                n += int(small.sum())
                t[small] = 0
    return n


def teacher_output(teacher, x, flip_average):
    """The teacher's logits for the uint8 batch ``x`` ``[B, H, W, C]``; with ``flip_average``
    the mean of its logits on ``x`` and on ``x`` mirrored left-right (no RNG is used)."""
    logits = teacher(x)
    if flip_average:
        logits = (logits + teacher(x.flip(2))) / 2
    return logits


def distill_loss(logits, targets, teacher_logits, temperature, weight):
    """``(1 - weight) * CE(logits, targets) + weight * T^2 * KL(softmax(teacher / T) || softmax(logits / T))``."""
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    loss = weight * t * t * kl
    if weight < 1:
        loss = loss + (1 - weight) * F.cross_entropy(logits, targets)
    return loss


def init_from_checkpoint(model, path):
    """Copy every parameter and buffer of the checkpoint at ``path`` whose name and shape
    match into ``model`` (then, when the checkpoint is a float model's, ``model.init_from_float()``
    if it has one: a CNV rescales for its activation step; a quantized source, as tnn_cifar is for
    its sparsity sweep, is taken as it is); returns the number of tensors copied (an error if none)."""
    ck = load_checkpoint(path)
    own = model.state_dict()
    take = {k: v for k, v in ck["model"].items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not take:
        raise QnnfabError("no parameter of the checkpoint matches the model", where=str(path))
    model.load_state_dict(take, strict=False)
    source_weight = ck.get("recipe", {}).get("net_args", {}).get("weight")   # float recipes name it
    if source_weight == "float" and hasattr(model, "init_from_float"):
        model.init_from_float()
    return len(take)


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def load_checkpoint(path):
    """Read a checkpoint written by :func:`train`."""
    path = Path(path)
    if not path.is_file():
        raise QnnfabError("checkpoint not found; train first (python -m models.train --model <name>)",
                          where=str(path))
    return _widen_snapshot(torch.load(path, map_location="cpu", weights_only=True))


def _save_atomic(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_data(cfg, split):
    x, y = load_dataset(cfg["dataset"], split)
    limit = cfg.get(f"{split}_limit")
    if limit:
        x, y = x[:limit], y[:limit]
    return torch.from_numpy(x), torch.from_numpy(y)


# float-model evaluation batch: a CNV's largest activation at 100 images (23 MB) stays below glibc's
# 32 MB mmap ceiling, so its memory is reused instead of mapped and zeroed anew for each tensor
# (shift_cifar's QAT model on 1,000 test images: 18.6 CPU-s at batch 1000, 13.6 of them in the
# kernel, 7.3 CPU-s at batch 100)
EVAL_BATCH = 100


@torch.no_grad()
def evaluate(model, x, y, batch=EVAL_BATCH):
    """Top-1 accuracy (fraction) of ``model`` in eval mode on uint8 images ``x``."""
    was_training = model.training
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    for i in range(0, len(x), batch):
        pred = model(x[i:i + batch].to(device)).argmax(dim=1).cpu()
        correct += int((pred == y[i:i + batch]).sum())
    model.train(was_training)
    return correct / len(x)


def shift_images(x, s):
    """Translate each uint8 image of ``x`` ``[B, H, W, C]`` by a random offset in
    ``[-s, s]`` pixels along both axes, filling with zeros (uses the global torch RNG)."""
    if s <= 0:
        return x
    b, h, w = x.shape[:3]
    xp = F.pad(x, (0, 0, s, s, s, s))
    dy = torch.randint(-s, s + 1, (b,))
    dx = torch.randint(-s, s + 1, (b,))
    out = torch.empty_like(x)
    for oy in range(-s, s + 1):
        for ox in range(-s, s + 1):
            m = (dy == oy) & (dx == ox)
            if m.any():
                out[m] = xp[m, s + oy:s + oy + h, s + ox:s + ox + w]
    return out


def flip_images(x):
    """Mirror each uint8 image of ``x`` ``[B, H, W, C]`` left-right with probability 1/2
    (uses the global torch RNG)."""
    m = torch.rand(x.shape[0]) < 0.5
    out = x.clone()
    out[m] = x[m].flip(2)
    return out


def augment(x, cfg):
    """The recipe's training augmentation of a uint8 batch ``[B, H, W, C]``: a random
    shift by up to ``augment_shift`` pixels with zero fill (= a random crop of the image
    zero-padded by that many pixels), then a random horizontal flip if ``augment_flip``."""
    x = shift_images(x, cfg.get("augment_shift", 0))
    if cfg.get("augment_flip"):
        x = flip_images(x)
    return x


def _make_optimizer(model, cfg):
    """Adam; weight decay (if any) only on parameters that are not latent binary/ternary weights."""
    latent = [m.weight for m in model.modules() if getattr(m, "latent_clipped", False)]
    ids = {id(p) for p in latent}
    other = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": latent, "weight_decay": 0.0},
              {"params": other, "weight_decay": cfg.get("weight_decay", 0.0)}]
    return torch.optim.Adam(groups, lr=cfg["lr"])


def _device(name):
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QnnfabError(f"--device {name}: this torch build or machine has no CUDA device (use --device cpu)")
        return torch.device(name)
    raise QnnfabError(f"--device must be 'cpu' or 'cuda[:N]', got {name!r}")


def train(model_name, epochs=None, seed=0, resume=True, run_dir=None, stop_after=None, progress=True,
          device="cpu", init_dir=None, compile_model=False, teacher_dir=None):
    """Train ``model_name`` (a key of :data:`models.nets.MODELS`) and return a summary dict.

    ``epochs`` overrides the recipe's epoch count (it sets the cosine schedule's length).
    ``resume`` continues from ``<run_dir>/ckpt.pt`` if it exists (the same recipe and
    seed are required). ``stop_after`` ends this invocation after that many epochs
    (the run can be resumed later, with the same result as an uninterrupted one).
    ``device`` ("cpu" or "cuda[:N]") is where the model and batches live; data loading,
    augmentation and checkpoints stay on the CPU, so a run may resume on another device
    (bit-identical resumption is promised on the same device only).
    ``init_dir`` overrides where the recipe's ``init_from`` checkpoint is read, ``teacher_dir``
    where its ``distill`` teacher's is.
    Without ``run_dir`` the run also keeps its committed snapshot
    (``models/checkpoints/<model>.pt``) up to date and resumes from it when ``runs/`` has none.
    ``compile_model`` runs the training steps through ``torch.compile`` (inductor fuses the
    straight-through estimators and batch norms: 1.13x faster per CNV step with one CPU thread,
    but only ~1% per bnn_cifar epoch with two (284 s against 288 s), after ~60-75 s of compilation
    per process, so only worth it for long single-thread runs); the weights,
    checkpoints and evaluation are those of the plain module, so a run may switch between
    compiled and eager at any resume (with float rounding differences, not bit-identical).
    """
    dev = _device(device)
    torch.set_num_threads(THREADS)
    cfg = model_config(model_name)
    if epochs is not None:
        if epochs < 1:
            raise QnnfabError(f"--epochs must be at least 1, got {epochs}")
        cfg["epochs"] = int(epochs)
    _validate_restarts(model_name, cfg)
    _validate_distill(model_name, cfg)
    _validate_precise_bn(model_name, cfg)
    _validate_swa(model_name, cfg)
    validate_top_finetune(model_name, cfg)
    n_epochs = total_epochs(cfg)
    snap = None if run_dir else snapshot_path(model_name)
    run_dir = Path(run_dir) if run_dir else default_run_dir(model_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CKPT
    resume_path = ckpt_path if ckpt_path.is_file() or snap is None or not snap.is_file() else snap
    recipe = _jsonable(_recipe(cfg))

    torch.manual_seed(seed)
    model = build_model(cfg)
    fresh = not (resume and resume_path.is_file())
    if cfg.get("init_from") and fresh:
        src = checkpoint_path(cfg["init_from"], init_dir)
        if not src.is_file():
            raise QnnfabError(f"{model_name} starts from {cfg['init_from']}'s trained checkpoint (init_from), "
                              f"which is not there: make train MODEL={cfg['init_from']} first", where=str(src))
        n = init_from_checkpoint(model, src)
        print(f"{model_name}: initialised {n} tensors from {src}", flush=True)
    model = model.to(dev)
    clip_latent_weights(model)
    step_model = torch.compile(model) if compile_model else model
    opt = _make_optimizer(model, cfg)
    start, best, history, elapsed = 0, 0.0, [], 0.0
    swa_state = None

    if not fresh:
        ck = load_checkpoint(resume_path)
        if not _resumable(ck["recipe"], recipe, ck["epoch"]) or ck["seed"] != seed:
            raise QnnfabError("checkpoint was trained with a different recipe or seed "
                              f"(checkpoint: seed {ck['seed']}, epochs {ck['recipe'].get('epochs')}); "
                              "use --no-resume to start over, or another --run-dir", where=str(resume_path))
        model.load_state_dict(ck.get("train_model", ck["model"]))   # not the swa average
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng_state"])
        start, best, history = ck["epoch"], ck["best_test_accuracy"], ck["history"]
        elapsed = ck.get("train_seconds", 0.0)
        swa_state = ck.get("swa")
        print(f"resuming {model_name} from epoch {start}/{n_epochs} ({resume_path})", flush=True)
    if start >= n_epochs:
        if cfg.get("precise_bn") or cfg.get("top_finetune"):
            xtr, ytr = _load_data(cfg, "train")
            xte, yte = _load_data(cfg, "test")
            if cfg.get("precise_bn"):
                ck = _apply_precise_bn(model_name, model, ck, cfg, xtr, xte, yte, ckpt_path, snap)
            if cfg.get("top_finetune"):
                ck = _apply_top_finetune(model_name, model, ck, cfg, xtr, ytr, xte, yte, run_dir, teacher_dir,
                                         ckpt_path, snap)
        else:
            print(f"{model_name}: already trained for {start} epochs (test accuracy "
                  f"{history[-1]['test_accuracy']:.4f}); nothing to do", flush=True)
        return _summary(model_name, cfg, ckpt_path if ckpt_path.is_file() else resume_path, history, best,
                        elapsed, ck.get("precise_bn"), ck.get("top_finetune"))

    distill = cfg.get("distill")
    teacher = None
    if distill and end_epoch(n_epochs, start, stop_after) > distill["from_epoch"]:
        teacher, tck = load_teacher(distill["teacher"], teacher_dir)
        teacher = teacher.to(dev)
        flip = (f", flip-averaged from epoch {distill['flip_from_epoch'] + 1}"
                if "flip_from_epoch" in distill else "")
        print(f"{model_name}: distilling from {distill['teacher']} (epoch {tck['epoch']}, test accuracy "
              f"{tck['history'][-1]['test_accuracy']:.4f}) from epoch {distill['from_epoch'] + 1}{flip}, "
              f"T={distill['temperature']:g}, weight {distill['weight']:g}", flush=True)
    xtr, ytr = _load_data(cfg, "train")
    xte, yte = _load_data(cfg, "test")
    bs = cfg["batch_size"]
    n_batches = (len(xtr) + bs - 1) // bs

    end = end_epoch(n_epochs, start, stop_after)
    for epoch in range(start, end):
        taught = teacher is not None and epoch >= distill["from_epoch"]
        t0 = time.time()
        if cfg.get("inq_schedule"):
            frozen = inq_freeze(model, inq_fraction_at(cfg["inq_schedule"], epoch))
            if frozen:
                print(f"{model_name} epoch {epoch + 1}: INQ froze {frozen} more weights", flush=True)
        model.train()
        # the shuffle depends only on (seed, epoch), so a resumed run sees the same batches
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        tot_loss, tot_correct = 0.0, 0
        bar = tqdm(range(n_batches), desc=f"{model_name} epoch {epoch + 1}/{n_epochs}",
                   leave=False, disable=not progress, mininterval=2.0, file=sys.stderr)
        for b in bar:
            idx = perm[b * bs:(b + 1) * bs]
            x, y = augment(xtr[idx], cfg).to(dev), ytr[idx].to(dev)
            logits = step_model(x)
            if taught:
                with torch.no_grad():
                    teacher_logits = teacher_output(teacher, x, epoch >= distill.get("flip_from_epoch", n_epochs))
                loss = distill_loss(logits, y, teacher_logits, distill["temperature"], distill["weight"])
            else:
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clip_latent_weights(model)
            tot_loss += loss.item() * len(idx)
            tot_correct += int((logits.argmax(dim=1) == y).sum())
            if b % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        test_acc = evaluate(model, xte, yte)
        best = max(best, test_acc)
        if cfg.get("swa") and epoch >= cfg["swa"]["from_epoch"]:
            n = swa_state["count"] if swa_state else 0
            swa_state = {"count": n + 1, "average": swa_update(swa_state["average"] if swa_state else None, n, model)}
        secs = time.time() - t0
        elapsed += secs
        history.append({"epoch": epoch + 1, "lr": lr, "loss": tot_loss / len(xtr),
                        "train_accuracy": tot_correct / len(xtr), "test_accuracy": test_acc,
                        "seconds": round(secs, 2)})
        ck = {"model_name": model_name, "config": cfg, "recipe": recipe, "seed": seed,
              "model": model.state_dict(), "optimizer": opt.state_dict(),
              "epoch": epoch + 1,
              "rng_state": torch.get_rng_state(), "best_test_accuracy": best,
              "history": history, "train_seconds": elapsed,
              "torch_version": str(torch.__version__)}
        if swa_state:
            ck["swa"] = swa_state
        _save_atomic(ck, ckpt_path)
        if snap is not None:
            write_snapshot(ck, snap)
        print(f"{model_name} epoch {epoch + 1}/{n_epochs}: lr {lr:.5f} loss {tot_loss / len(xtr):.4f} "
              f"train acc {tot_correct / len(xtr):.4f} test acc (float QAT) {test_acc:.4f} "
              f"best {best:.4f} [{secs:.1f} s]", flush=True)
    if end >= n_epochs and (cfg.get("precise_bn") or cfg.get("top_finetune")):
        if cfg.get("precise_bn"):
            ck = _apply_precise_bn(model_name, model, ck, cfg, xtr, xte, yte, ckpt_path, snap)
        if cfg.get("top_finetune"):
            ck = _apply_top_finetune(model_name, model, ck, cfg, xtr, ytr, xte, yte, run_dir, teacher_dir,
                                     ckpt_path, snap)
        return _summary(model_name, cfg, ckpt_path, history, best, elapsed, ck.get("precise_bn"),
                        ck.get("top_finetune"))
    return _summary(model_name, cfg, ckpt_path, history, best, elapsed)


def end_epoch(n_epochs, start, stop_after):
    """The epoch an invocation stops at: the run's end, or ``stop_after`` epochs after ``start``."""
    return n_epochs if stop_after is None else min(n_epochs, start + stop_after)


def _summary(model_name, cfg, ckpt_path, history, best, elapsed, precise_bn=None, top_finetune=None):
    """What :func:`train` returns; ``test_accuracy`` is the final model's (after precise batch
    norm and top fine-tuning, when they were applied)."""
    acc = history[-1]["test_accuracy"] if history else None
    if precise_bn:
        acc = precise_bn["test_accuracy"]
    if top_finetune:
        acc = top_finetune["test_accuracy"]
    return {"model": model_name, "checkpoint": str(ckpt_path), "epochs_done": len(history),
            "epochs": total_epochs(cfg), "test_accuracy": acc,
            "best_test_accuracy": best, "train_seconds": elapsed, "precise_bn": precise_bn}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bnn_mnist", help="zoo model name (default: bnn_mnist)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-resume", action="store_true", help="start over, ignoring a checkpoint")
    p.add_argument("--run-dir", default=None, help="checkpoint directory (default: runs/<model>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--compile", action="store_true", help="torch.compile the training steps "
                                                          "(faster for long runs; ~75 s to compile)")
    p.add_argument("--init-dir", default=None, help="run directory of the recipe's init_from model "
                                                     "(default: runs/<init_from>)")
    p.add_argument("--teacher-dir", default=None, help="run directory of the recipe's distill teacher "
                                                        "(default: runs/<teacher>, else its snapshot)")
    p.add_argument("--snapshot", action="store_true", help="only write the committed snapshot "
                                                           "(models/checkpoints/<model>.pt) of runs/<model>/ckpt.pt")
    args = p.parse_args(argv)
    if args.snapshot:
        try:
            src = Path(args.run_dir or default_run_dir(args.model)) / CKPT
            ck = load_checkpoint(src)
            write_snapshot(ck, snapshot_path(args.model))
        except QnnfabError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.model}: snapshot of epoch {ck['epoch']} written to {snapshot_path(args.model)} "
              f"({snapshot_path(args.model).stat().st_size / 1e6:.1f} MB)")
        return 0
    try:
        s = train(args.model, epochs=args.epochs, seed=args.seed, resume=not args.no_resume,
                  run_dir=args.run_dir, progress=not args.no_progress, device=args.device, init_dir=args.init_dir,
                  compile_model=args.compile, teacher_dir=args.teacher_dir)
    except QnnfabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{s['model']}: {s['epochs_done']}/{s['epochs']} epochs, float QAT test accuracy "
          f"{s['test_accuracy']:.4f} (best {s['best_test_accuracy']:.4f}), "
          f"{s['train_seconds'] / 60:.1f} min of training; checkpoint {s['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
