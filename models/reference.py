"""Integer-exact torch reference model: executes a QMD, and only a QMD.

This is the golden model. It implements the semantics of ``docs/qmd-spec.md`` on
int64 tensors; nothing in it is float except one documented shortcut: dense and
convolution products run as float matrix products, which is exact because every partial
sum is an integer whose magnitude is bounded (interval arithmetic: max |input| times the
largest row sum of |weights|) below the float's integer range — float32 when the bound is
below 2^24 (a CNV's layers: 4.5x faster convolutions than float64 on this CPU), float64
when it is below 2^53, an error otherwise — checked here, not assumed.
"""

import numpy as np
import torch
import torch.nn.functional as F

from models.qmd import Qmd, load_qmd

_EXACT_F64 = 2**53
_EXACT_F32 = 2**24

# Images per reference batch when a whole test set is evaluated: a batch's int64 and float activations
# stay below glibc's 32 MB mmap ceiling, so their memory is reused instead of mapped and
# zeroed anew for every tensor (the CNV on 400 CIFAR-10 images: 10.1 CPU-s at batch 400,
# 6.9 CPU-s at batch 50, the same predictions).
EVAL_BATCH = 50


class ReferenceModel:
    """Runs a :class:`Qmd` on a batch of integer inputs ``[B, *input_shape]``.

    ``run(x)`` returns the class indices ``[B]``; ``trace(x)`` returns a dict of every
    layer's output (int64 tensors ``[B, *out_shape]``) keyed by layer name, in order.
    """

    def __init__(self, qmd):
        self.qmd = qmd if isinstance(qmd, Qmd) else load_qmd(qmd)
        self._weights = {}
        for layer in self.qmd.layers:
            if layer.kind in ("dense", "conv2d"):
                # signs, TTQ's pos_scale/-neg_scale/0, or pow2's Wq = sum of the terms' +-2^shift:
                # sum_k Wq*x is the spec's shift-add sum exactly (the same integers)
                w = layer.int_weights
                bound = max(abs(layer.in_act.lo), abs(layer.in_act.hi)) * int(np.abs(w).sum(axis=1).max())
                assert bound < _EXACT_F64, f"{layer.name}: accumulator range too large for exact float64"
                # the weights' float type is the one the layer's products run in, exact for its bound
                dtype = torch.float32 if bound < _EXACT_F32 else torch.float64
                self._weights[layer.name] = torch.from_numpy(w.astype(np.float64)).to(dtype)

    def trace(self, x):
        x = torch.as_tensor(np.asarray(x)).to(torch.int64)
        expect = (x.shape[0],) + tuple(self.qmd.input_shape)
        if tuple(x.shape) != expect:
            raise ValueError(f"input batch has shape {tuple(x.shape)}, expected {expect}")
        lo, hi = self.qmd.input_act.lo, self.qmd.input_act.hi
        if x.numel() and (x.min() < lo or x.max() > hi):
            raise ValueError(f"input values outside [{lo}, {hi}] of dtype {self.qmd.input_dtype}")
        outs = {}
        for layer in self.qmd.layers:
            x = getattr(self, f"_{layer.kind}")(layer, x)
            outs[layer.name] = x
        return outs

    def run(self, x):
        return list(self.trace(x).values())[-1]

    # -- layer kinds (docs/qmd-spec.md, section "Layer kinds") --------------------------

    def _threshold(self, layer, x):
        thr = torch.from_numpy(layer.arrays["thresholds"])      # [C, T]
        up = torch.from_numpy(layer.arrays["direction"]) > 0    # [C]
        xe = x.unsqueeze(-1)                                    # [..., C, 1]
        met = torch.where(up.unsqueeze(-1), xe >= thr, xe <= thr)
        count = met.sum(dim=-1, dtype=torch.int64)
        return layer.out_act.from_count(count)      # binary 2c-1, ternary c-1, uint c

    def _dense(self, layer, x):
        flat = x.reshape(x.shape[0], -1).to(self._weights[layer.name].dtype)
        y = flat @ self._weights[layer.name].T
        return y.round().to(torch.int64)

    def _conv2d(self, layer, x):
        a = layer.attrs
        k, cin = a["kernel"], a["in_channels"]
        # [Cout, K*K*Cin] in (ky, kx, c) order -> torch's [Cout, Cin, K, K]
        w = self._weights[layer.name].reshape(-1, k, k, cin).permute(0, 3, 1, 2)
        xc = x.permute(0, 3, 1, 2).to(self._weights[layer.name].dtype)          # NHWC -> NCHW
        if a["padding"]:
            p = a["padding"]
            xc = F.pad(xc, (p, p, p, p), value=float(a["pad_value"]))
        y = F.conv2d(xc, w, stride=a["stride"])
        return y.permute(0, 2, 3, 1).round().to(torch.int64)              # NCHW -> NHWC

    def _maxpool(self, layer, x):
        y = F.max_pool2d(x.permute(0, 3, 1, 2).to(torch.float64), layer.attrs["kernel"], layer.attrs["stride"])
        return y.permute(0, 2, 3, 1).to(torch.int64)

    def _argmax(self, layer, x):
        # torch.argmax returns the first maximal index, as the spec requires
        return torch.argmax(x, dim=-1)


def accuracy(qmd, images, labels, batch=EVAL_BATCH):
    """Fraction of ``images`` the integer reference classifies as ``labels``."""
    ref = qmd if isinstance(qmd, ReferenceModel) else ReferenceModel(qmd)
    correct = 0
    for i in range(0, len(images), batch):
        pred = ref.run(images[i:i + batch])
        correct += int((pred == torch.as_tensor(labels[i:i + batch]).to(torch.int64)).sum())
    return correct / len(images)
