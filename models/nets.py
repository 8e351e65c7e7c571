"""Network topologies for quantization-aware training, and the registry of zoo models.

``MODELS`` maps a zoo name to its recipe: topology (``net`` + ``net_args``), data set,
and training hyper-parameters. ``python -m models.train --model <name>`` followed by
``python -m models.export --model <name>`` reproduces ``models/zoo/<name>/``.
"""

import copy
from collections import OrderedDict

import torch
from torch import nn

from models.quant import BinaryActivation, BinaryLinear
from qnnfab.errors import QnnfabError


class SFC(nn.Module):
    """FINN's SFC multilayer perceptron, W1A1 (binary weights and activations).

    Input: uint8 pixels ``[B, H, W, C]`` (or floats of the same values), binarized by a
    fixed threshold (``+1 if pixel >= in_threshold else -1``) and flattened row-major,
    which is the QMD's flatten order. Each hidden layer is ``BinaryLinear`` (no bias) →
    ``BatchNorm1d`` → ``BinaryActivation``; the last layer is ``BinaryLinear`` (no bias,
    no BN) times a fixed positive ``logit_scale`` (a power of two, so float logits are
    exactly ``logit_scale`` times the integer dot products the hardware computes and
    their argmax, ties included, is the same). Dropout acts in training only.
    """

    def __init__(self, in_features=784, hidden=(256, 256, 256), classes=10, in_threshold=128,
                 in_dropout=0.0, dropout=0.0, logit_scale=0.0625, scale=False, bn_eps=1e-5,
                 bn_momentum=0.1):
        super().__init__()
        if not logit_scale > 0:
            raise ValueError("logit_scale must be positive")
        self.in_features = in_features
        self.in_threshold = in_threshold
        self.logit_scale = float(logit_scale)
        self.in_drop = nn.Dropout(in_dropout)
        self.fcs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.drops = nn.ModuleList()
        self.act = BinaryActivation()
        width = in_features
        for h in hidden:
            self.fcs.append(BinaryLinear(width, h, scale=scale))
            self.bns.append(nn.BatchNorm1d(h, eps=bn_eps, momentum=bn_momentum))
            self.drops.append(nn.Dropout(dropout))
            width = h
        self.out = BinaryLinear(width, classes, scale=False)

    def binarize_input(self, x):
        """``+1`` where ``pixel >= in_threshold`` else ``-1``, flattened to ``[B, features]``."""
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input values per image, got {x.shape[1]}")
        return torch.where(x >= self.in_threshold, 1.0, -1.0)

    def forward(self, x, trace=False):
        """Float logits ``[B, classes]``; with ``trace=True`` an ordered dict keyed by the
        exported QMD layer names (``binarize``, ``fc0``, ``fc0_act``, ..., ``fc<L>``,
        ``class``), every value the float model's view of that integer tensor, plus
        ``logits``."""
        t = OrderedDict()
        a = self.binarize_input(x)
        t["binarize"] = a.reshape(x.shape)
        a = self.in_drop(a)
        for i, (fc, bn, drop) in enumerate(zip(self.fcs, self.bns, self.drops)):
            if trace:
                t[f"fc{i}"] = fc.dot(a)
            a = self.act(bn(fc(a)))
            t[f"fc{i}_act"] = a
            a = drop(a)
        dot = self.out(a)
        logits = dot * self.logit_scale
        if not trace:
            return logits
        t[f"fc{len(self.fcs)}"] = dot
        t["class"] = torch.argmax(logits, dim=-1)
        t["logits"] = logits
        return t


NETS = {"SFC": SFC}

MODELS = {
    "bnn_mnist": {
        "net": "SFC",
        "dataset": "mnist",
        "input_shape": (28, 28, 1),
        "net_args": {"in_features": 784, "hidden": [256, 256, 256], "classes": 10,
                     "in_threshold": 128, "in_dropout": 0.2, "dropout": 0.2,
                     "logit_scale": 0.0625, "scale": False},
        "epochs": 100,          # the recipe of the shipped QMD: 97.66% on the 10,000 test images
        "batch_size": 256,
        "lr": 0.01,
        "lr_min": 0.0,
        "weight_decay": 0.0,
        "description": ("FINN SFC W1A1 multilayer perceptron for MNIST: input pixels binarized "
                        "at 128, 784-256-256-256-10 with binary weights and activations, "
                        "batch norm folded into integer thresholds; outputs the integer logits "
                        "(dot products) and their argmax."),
    },
}


def model_config(name):
    """A copy of the registry entry of ``name`` (with ``name`` filled in)."""
    if name not in MODELS:
        raise QnnfabError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    cfg = copy.deepcopy(MODELS[name])
    cfg["name"] = name
    return cfg


def build_model(cfg):
    """Instantiate the network of a registry entry (a name or a config dict)."""
    if isinstance(cfg, str):
        cfg = model_config(cfg)
    if cfg["net"] not in NETS:
        raise QnnfabError(f"unknown topology {cfg['net']!r} (known: {', '.join(NETS)})")
    return NETS[cfg["net"]](**cfg["net_args"])
