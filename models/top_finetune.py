"""Top fine-tuning: retrain the last layers of a finished CNV on cached features of its frozen
first layers, against the distillation teacher, with stochastic weight averaging.

A recipe's ``top_finetune`` ``{"from_conv": s, "passes": K, "epochs": E, "lr": r, "swa_from": f,
"seed": a, "cache_seed": b}`` runs once the last epoch is trained (``make train`` applies it to a
finished checkpoint; adding it keeps the run resumable, like ``precise_bn``; it does not combine
with ``swa``):

1. Cache. The convolutions ``0 .. s-1`` (with their batch norms in eval mode, i.e. exactly the
   integer network's first layers) are frozen. Their binary output (after the pooling that
   follows conv ``s-1``) is computed once for the 10,000 test images and for ``K`` augmented
   passes over the training set (the recipe's shift and flip, torch RNG seeded ``b``, batches of
   500), together with the recipe's ``distill`` teacher's flip-averaged logits on the same
   augmented images. For CNV and ``s = 4`` that is 128x5x5 bits per image, so one fine-tuning
   epoch costs the last two convolutions and the dense layers only (23-29 s on one CPU thread
   for bnn_cifar, against 140-377 s measured for a distilled epoch of the whole network with two).
2. Fine-tune. Convolutions ``s ..`` and the dense layers train for ``E`` epochs (Adam, cosine
   learning rate from ``r`` to 0, latent weights clipped, the recipe's weight decay on the other
   parameters as in training; torch RNG seeded ``a``) on the KL divergence to the cached teacher
   logits (ReActNet's distributional loss, the recipe's ``distill`` temperature and weight); each epoch every training image appears
   once, its features drawn from a random one of the ``K`` passes.
3. Average. The parameters at the end of every (0-based) epoch from ``f`` on are averaged
   (stochastic weight averaging); the average's batch norms then get precise statistics
   (the equal-weight mean over the first cached pass, in training batches).

The checkpoint's ``model`` becomes the result, its ``train_model`` keeps the weights the
main run ended with (so warm restarts appended later continue from those), and
``top_finetune`` records the settings and the test accuracy before and after. The cache lives in
``runs/<model>/top_finetune_cache.pt`` (about 2 GB for CNV, K = 12) and is reused when its
settings, teacher and frozen weights (:func:`bottom_fingerprint`) match.
"""

import hashlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qnnfab.errors import QnnfabError

TOP_FINETUNE_FIELDS = ("from_conv", "passes", "epochs", "lr", "swa_from", "seed", "cache_seed")
CACHE_BATCH = 500
CACHE_FILE = "top_finetune_cache.pt"


def validate_top_finetune(model_name, cfg):
    """Check ``cfg["top_finetune"]``; a malformed entry is a one-line error."""
    d = cfg.get("top_finetune")
    if d is None:
        return
    where = f"{model_name}: top_finetune"
    if not isinstance(d, dict) or set(d) != set(TOP_FINETUNE_FIELDS):
        raise QnnfabError(f"{where} must be a dict with the fields {', '.join(TOP_FINETUNE_FIELDS)}, got {d!r}")
    if cfg.get("net") != "CNV":
        raise QnnfabError(f"{where}: only a CNV has convolutions to freeze, not a {cfg.get('net')}")
    if not cfg.get("distill"):
        raise QnnfabError(f"{where}: it learns from the recipe's distill teacher, and the recipe has no distill")
    if cfg.get("swa"):
        raise QnnfabError(f"{where}: it fine-tunes the run's last weights and cannot follow swa (drop one of them)")
    n_convs = len(cfg["net_args"].get("channels", ()))
    ints = {k: d[k] for k in ("from_conv", "passes", "epochs", "swa_from", "seed", "cache_seed")}
    bad = [k for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise QnnfabError(f"{where}: {', '.join(bad)} must be integers")
    if not 1 <= d["from_conv"] < n_convs:
        raise QnnfabError(f"{where}: from_conv must be a convolution after the first (1 to {n_convs - 1}), "
                          f"got {d['from_conv']}")
    if d["passes"] < 1 or d["epochs"] < 1:
        raise QnnfabError(f"{where}: passes and epochs must be >= 1, got {d['passes']} and {d['epochs']}")
    if not 0 <= d["swa_from"] < d["epochs"]:
        raise QnnfabError(f"{where}: swa_from must be an epoch of the fine-tuning (0 to {d['epochs'] - 1}), "
                          f"got {d['swa_from']}")
    if not (isinstance(d["lr"], (int, float)) and d["lr"] > 0):
        raise QnnfabError(f"{where}: lr must be > 0, got {d['lr']!r}")


def _run_convs(model, a, start, stop):
    """Convolutions ``start .. stop-1`` of CNV ``model`` (conv, batch norm, activation, and the
    pooling that follows those in ``pool_after``) on NCHW activations ``a``, as CNV.forward runs them."""
    for i in range(start, stop):
        a = model.act(model.conv_bns[i](model.convs[i](a)))
        if i in model.pool_after:
            a = F.max_pool2d(a, 2, 2)
    return a


def bottom_features(model, x, split):
    """The frozen first ``split`` convolutions of CNV ``model`` on uint8 images ``x``: -1/+1
    activations after the pooling that follows conv ``split - 1``, NCHW (as the next conv takes them)."""
    q = x.to(torch.float32).permute(0, 3, 1, 2)
    return _run_convs(model, (q - model.in_zero) / model.in_scale, 0, split)


def top_forward(model, a, split):
    """CNV ``model``'s float logits from the activations ``a`` that :func:`bottom_features` gives."""
    from models.nets import _dense_head
    return _dense_head(model, _run_convs(model, a, split, len(model.convs)).flatten(1), None, False)


def bottom_fingerprint(model, split):
    """SHA-256 of the frozen layers' parameters and batch-norm statistics: the cached features
    are those of these exact weights (a run trained on after a fine-tuning caches anew)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.startswith(tuple(f"{m}.{i}." for m in ("convs", "conv_bns") for i in range(split))):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cache_key(model, settings, teacher):
    return {"from_conv": settings["from_conv"], "cache_seed": settings["cache_seed"], "teacher": teacher,
            "bottom": bottom_fingerprint(model, settings["from_conv"])}


@torch.no_grad()
def build_cache(model, teacher, teacher_name, xtr, xte, cfg, settings, path, log=print):
    """Cache the frozen layers' features and the teacher's flip-averaged logits (see the module
    docstring, step 1) in ``path``, one training pass at a time (a run cut short resumes at its
    next pass); returns the cache dict."""
    from models.train import _save_atomic, augment, teacher_output
    split, passes = settings["from_conv"], settings["passes"]
    key = _cache_key(model, settings, teacher_name)
    cache = None
    if path.is_file():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache.get("key") != key:
            log(f"top_finetune: {path} was cached with other settings ({cache.get('key')}); caching anew")
            cache = None
    model.eval()
    if cache is None:
        t0 = time.time()
        test = torch.cat([bottom_features(model, xte[i:i + CACHE_BATCH], split) > 0
                          for i in range(0, len(xte), CACHE_BATCH)])
        cache = {"key": key, "test": test, "train": [], "teacher": [], "rng_state": None}
        log(f"top_finetune: test features {tuple(test.shape)} cached in {time.time() - t0:.1f} s")
    with torch.random.fork_rng(devices=[]):
        if cache["rng_state"] is None:
            torch.manual_seed(settings["cache_seed"])
        else:
            torch.set_rng_state(cache["rng_state"])
        while len(cache["train"]) < passes:
            t0 = time.time()
            feats, logits = [], []
            for i in range(0, len(xtr), CACHE_BATCH):
                x = augment(xtr[i:i + CACHE_BATCH], cfg)
                feats.append(bottom_features(model, x, split) > 0)
                logits.append(teacher_output(teacher, x, True))
            cache["train"].append(torch.cat(feats))
            cache["teacher"].append(torch.cat(logits).half())
            cache["rng_state"] = torch.get_rng_state()
            _save_atomic(cache, path)
            log(f"top_finetune: training pass {len(cache['train'])}/{passes} cached in {time.time() - t0:.1f} s")
    return cache


def finetune(model, cache, ytr, yte, cfg, settings, log=print):
    """Steps 2 and 3 of the module docstring on ``model`` (changed in place: the averaged,
    precise-batch-norm result); returns the per-epoch history and the final test accuracy."""
    from models.quant import clip_latent_weights
    from models.train import _make_optimizer, distill_loss, recompute_bn_statistics, swa_update
    split, n_pass = settings["from_conv"], settings["passes"]
    train = torch.stack(cache["train"][:n_pass])
    teach = torch.stack(cache["teacher"][:n_pass])
    test = cache["test"]
    bs = cfg["batch_size"]
    n = len(ytr)
    d = cfg["distill"]
    for i in range(split):
        model.convs[i].requires_grad_(False)
        model.conv_bns[i].requires_grad_(False)
    top_bns = [model.conv_bns[i] for i in range(split, len(model.convs))] + list(model.bns)

    def evaluate():
        model.eval()
        with torch.no_grad():
            correct = sum(int((top_forward(model, test[i:i + CACHE_BATCH].float() * 2 - 1, split).argmax(1)
                               == yte[i:i + CACHE_BATCH]).sum()) for i in range(0, len(yte), CACHE_BATCH))
        model.train()
        return correct / len(yte)

    opt = _make_optimizer(model, cfg)     # the frozen layers get no gradient, so Adam leaves them
    history, average, count = [], None, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        for ep in range(settings["epochs"]):
            t0 = time.time()
            lr = settings["lr"] * (1 + math.cos(math.pi * ep / settings["epochs"])) / 2
            for g in opt.param_groups:
                g["lr"] = lr
            perm, pick = torch.randperm(n), torch.randint(0, n_pass, (n,))
            model.train()
            tot = 0.0
            for b in range(n // bs):
                idx = perm[b * bs:(b + 1) * bs]
                k = pick[idx]
                logits = top_forward(model, train[k, idx].float() * 2 - 1, split)
                loss = distill_loss(logits, ytr[idx], teach[k, idx].float(), d["temperature"], d["weight"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                clip_latent_weights(model)
                tot += loss.item()
            if ep >= settings["swa_from"]:
                average, count = swa_update(average, count, model), count + 1
            acc = evaluate()
            history.append({"epoch": ep + 1, "lr": lr, "loss": tot / (n // bs), "test_accuracy": acc,
                            "seconds": round(time.time() - t0, 2)})
            log(f"top_finetune epoch {ep + 1}/{settings['epochs']}: lr {lr:.6f} loss {tot / (n // bs):.4f} "
                f"test acc (float QAT) {acc:.4f} [{time.time() - t0:.1f} s]")
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in average:
                v.copy_(average[k])
        # precise statistics of the average, over the first cached pass
        recompute_bn_statistics(model, top_bns, lambda: [top_forward(model, train[0, i:i + bs].float() * 2 - 1, split)
                                                         for i in range(0, n, bs)])
    model.requires_grad_(True)
    return history, evaluate(), count


def apply_top_finetune(model_name, model, ck, cfg, xtr, ytr, xte, yte, run_dir, teacher_dir=None, log=print):
    """Apply the recipe's ``top_finetune`` to the finished checkpoint ``ck`` (whose weights ``model``
    holds) unless it already was with these settings; returns the updated checkpoint (not saved)."""
    from models.train import load_teacher
    settings = cfg["top_finetune"]
    done = ck.get("top_finetune")
    if done and done["epoch"] == ck["epoch"] and done["settings"] == settings:
        log(f"{model_name}: already trained for {ck['epoch']} epochs, top fine-tuning applied (test accuracy "
            f"{done['test_accuracy']:.4f}); nothing to do")
        return ck
    t0 = time.time()
    base = {k: v.clone() for k, v in ck.get("train_model", ck["model"]).items()}
    model.load_state_dict(ck["model"] if not done else base)
    before = (ck.get("precise_bn") or ck["history"][-1])["test_accuracy"]   # of the model it starts from
    teacher, _ = load_teacher(cfg["distill"]["teacher"], teacher_dir)
    log(f"{model_name}: top fine-tuning from conv{settings['from_conv']} on, teacher {cfg['distill']['teacher']} "
        f"(flip-averaged), {settings['passes']} cached training passes, {settings['epochs']} epochs")
    cache = build_cache(model, teacher, cfg["distill"]["teacher"], xtr, xte, cfg, settings,
                        Path(run_dir) / CACHE_FILE, log)
    history, after, count = finetune(model, cache, ytr, yte, cfg, settings, log)
    log(f"{model_name}: top fine-tuning, the average of its last {count} epochs with precise batch norm: "
        f"test acc (float QAT) {before:.4f} -> {after:.4f}")
    return dict(ck, model=model.state_dict(), train_model=base,
                top_finetune={"epoch": ck["epoch"], "settings": dict(settings), "swa_epochs": count,
                              "test_accuracy_before": before, "test_accuracy": after, "history": history,
                              "seconds": round(time.time() - t0, 1)})
