"""Quantizers for quantization-aware training of binary and ternary networks (straight-through estimators).

Forward passes compute exactly what the exported integer model computes; only the
backward passes are approximations (the straight-through estimator, STE):

* :class:`BinarySign` — ``+1 if x >= 0 else -1`` (note ``sign(0) = +1``, as the
  hardware's ``x >= T`` comparison does); gradient ``grad * (|x| <= 1)``.
* :class:`BinaryLinear` — a linear layer without bias whose forward uses ``sign(W)`` of
  float latent weights ``W``; :func:`clip_latent_weights` keeps ``W`` in ``[-1, 1]``
  after every optimizer step. With ``scale=True`` each output is multiplied by the
  XNOR-Net factor ``alpha = mean |W|`` of its row (folded into thresholds at export).
* :class:`BinaryConv2d` — the convolutional counterpart of :class:`BinaryLinear`
  (``sign(W)`` of float latent weights ``[out, in, K, K]``, no bias, optional per-output
  ``alpha``), clipped by :func:`clip_latent_weights` as well.
* :class:`BinaryActivation` — :class:`BinarySign` applied to the module's input.

Ternary family (every forward value an exact small integer or an exact product of one
with a per-channel float scale, so the exported integer model computes the same):

* :func:`ternarize` — TWN's ``+1 if w > delta, -1 if w < -delta, else 0``; STE gradient
  (identity where ``|w| <= 1``).
* :class:`TernaryLinear` / :class:`TernaryConv2d` — ternary weights from float latent
  weights with the per-output-channel threshold ``delta = delta_factor * mean|W|``
  (TWN: ``delta_factor = 0.7``; larger values give sparser weights). ``mode="twn"``:
  the scale ``alpha`` = mean of ``|W|`` above ``delta`` (per output channel).
  ``mode="ttq"``: trained positive and negative scales ``Wp``, ``Wn`` (per layer),
  constrained to an integer ratio ``pos : neg`` (``round(levels * Wp / max(Wp, Wn))``
  in ``1..levels``, STE, reduced by their gcd ``g``), so the dot product uses the integer
  weights ``pos / -neg / 0`` — exactly the QMD's ``pos_scale``/``neg_scale`` — times the
  common ``alpha = g * max(Wp, Wn) / levels``, which export folds into the thresholds.
* :class:`TernaryActivation` — TNN's ternary activation: ``[y >= -t] + [y >= t] - 1``
  in {-1, 0, +1} (two thresholds per channel after BN folding); STE where ``|y| <= 1``.
* :class:`UintActivation` — ``b``-bit activation ``sum_i [y >= i - 1/2]`` in
  ``0 .. 2^b - 1`` (round-half-up of ``clamp(y, 0, 2^b - 1)``); STE inside the range.

Every activation module has ``levels`` (the float thresholds on its input ``y``, sorted)
and ``qmd_out`` (the QMD ``threshold`` output kind); every weight module has
``qmd_weight()`` (the QMD weight kind and integer arrays) and ``alpha()``.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class BinarySign(torch.autograd.Function):
    """Forward: ``+1`` where ``x >= 0``, else ``-1`` (same dtype as ``x``).
    Backward (STE, hard-tanh): the incoming gradient where ``|x| <= 1``, zero elsewhere."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def binary_sign(x):
    """Apply :class:`BinarySign` (``+1 if x >= 0 else -1``, STE gradient)."""
    return BinarySign.apply(x)


class BinaryActivation(nn.Module):
    """Binary activation: ``BinarySign`` of the input, values -1/+1."""

    levels = (0.0,)
    qmd_out = {"kind": "binary"}

    def forward(self, x):
        return binary_sign(x)


class BinaryLinear(nn.Linear):
    """``y = x @ sign(W).T`` (times ``alpha = mean|W|`` per output row if ``scale``).

    ``W`` (``self.weight``, ``[out, in]``) holds float latent weights; only their signs
    reach the forward pass and the exported model. There is no bias: the hardware's
    accumulator is the plain dot product, and any offset is folded into the next
    threshold. Keep ``W`` in ``[-1, 1]`` with :func:`clip_latent_weights`.
    """

    latent_clipped = True      # latent weights kept in [-1, 1], no weight decay

    def __init__(self, in_features, out_features, scale=False):
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def binary_weight(self):
        """The -1/+1 weights the forward pass uses (float tensor, with STE gradient)."""
        return binary_sign(self.weight)

    def alpha(self):
        """Per-output-row scale ``mean |W|`` ``[out]`` (ones when ``scale`` is off)."""
        if not self.scale:
            return torch.ones(self.out_features, dtype=self.weight.dtype, device=self.weight.device)
        return self.weight.abs().mean(dim=1)

    def dot(self, x):
        """The integer-valued dot products ``x @ sign(W).T`` (before ``alpha``)."""
        return F.linear(x, self.binary_weight())

    def qmd_weight(self):
        """``{"weight": "binary", "weights": int8 -1/+1 [out, in]}`` (``W >= 0`` -> +1)."""
        return _binary_qmd(self.weight)

    def forward(self, x):
        y = self.dot(x)
        if self.scale:
            y = y * self.alpha()
        return y

    def extra_repr(self):
        return f"{super().extra_repr()}, scale={self.scale}"


class BinaryConv2d(nn.Conv2d):
    """``y = conv2d(x, sign(W))`` (times ``alpha = mean|W|`` per output channel if ``scale``).

    ``W`` (``self.weight``, ``[out, in, K, K]``) holds float latent weights; only their
    signs reach the forward pass and the exported model. No bias (any offset is folded
    into the next threshold). Keep ``W`` in ``[-1, 1]`` with :func:`clip_latent_weights`.
    """

    latent_clipped = True      # latent weights kept in [-1, 1], no weight decay

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, scale=False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.scale = scale

    def binary_weight(self):
        """The -1/+1 weights the forward pass uses (float tensor, with STE gradient)."""
        return binary_sign(self.weight)

    def alpha(self):
        """Per-output-channel scale ``mean |W|`` ``[out]`` (ones when ``scale`` is off)."""
        if not self.scale:
            return torch.ones(self.out_channels, dtype=self.weight.dtype, device=self.weight.device)
        return self.weight.abs().mean(dim=(1, 2, 3))

    def dot(self, x):
        """The integer-valued convolution of ``x`` with ``sign(W)`` (before ``alpha``), NCHW."""
        return F.conv2d(x, self.binary_weight(), None, self.stride, self.padding)

    def qmd_weight(self):
        """``{"weight": "binary", "weights": int8 -1/+1 [out, in, K, K]}`` (``W >= 0`` -> +1)."""
        return _binary_qmd(self.weight)

    def forward(self, x):
        y = self.dot(x)
        if self.scale:
            y = y * self.alpha().view(1, -1, 1, 1)
        return y

    def extra_repr(self):
        return f"{super().extra_repr()}, scale={self.scale}"


def _binary_qmd(weight):
    return {"weight": "binary", "weights": np.where(weight.detach().cpu().numpy() >= 0, 1, -1).astype(np.int8)}


# --------------------------------------------------------------------------- ternary

class Ternarize(torch.autograd.Function):
    """Forward: ``+1`` where ``w > delta``, ``-1`` where ``w < -delta``, else ``0`` (exact).
    Backward (STE): the incoming gradient where ``|w| <= 1``."""

    @staticmethod
    def forward(ctx, w, delta):
        ctx.save_for_backward(w)
        return ((w > delta).to(w.dtype) - (w < -delta).to(w.dtype))

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype), None


def ternarize(w, delta):
    """Apply :class:`Ternarize` (``delta`` broadcasts against ``w``)."""
    return Ternarize.apply(w, delta)


class RoundClamp(torch.autograd.Function):
    """Forward: ``clamp(round(x), lo, hi)``, an exact integer. Backward: straight through."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        return torch.clamp(torch.round(x), lo, hi)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _TernaryWeights:
    """The ternary quantizer shared by :class:`TernaryLinear` and :class:`TernaryConv2d`."""

    latent_clipped = True      # latent weights kept in [-1, 1], no weight decay

    def _init_ternary(self, mode, scale, delta_factor, levels):
        if mode not in ("twn", "ttq"):
            raise ValueError(f"mode must be 'twn' or 'ttq', got {mode!r}")
        if not delta_factor >= 0:
            raise ValueError(f"delta_factor must be >= 0, got {delta_factor!r}")
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive integer, got {levels!r}")
        self.mode, self.scale, self.delta_factor, self.levels = mode, scale, float(delta_factor), levels
        if mode == "ttq":
            with torch.no_grad():
                w = self.weight.abs()
                above = w > self.delta().view(-1, *[1] * (w.dim() - 1))
                init = float(w[above].mean()) if above.any() else 1.0
            self.wp = nn.Parameter(torch.tensor(init))
            self.wn = nn.Parameter(torch.tensor(init))

    def _rows(self):
        return self.weight.reshape(self.weight.shape[0], -1)

    def _view(self, v):
        return v.view(-1, *[1] * (self.weight.dim() - 1))

    def delta(self):
        """Per-output-channel threshold ``delta_factor * mean|W|`` ``[out]`` (no gradient)."""
        return self.delta_factor * self._rows().detach().abs().mean(dim=1)

    def ternary_weight(self):
        """The -1/0/+1 weights (float tensor with STE gradient)."""
        return ternarize(self.weight, self._view(self.delta()))

    def ttq_scales(self):
        """TTQ: ``(pos, neg, g)``: ``pos``/``neg`` integer-valued tensors, the ratio ``Wp : Wn``
        rounded to integers in ``1..levels`` (STE gradient to Wp, Wn) and divided by their
        greatest common divisor ``g`` (so equal scales give ``1 : 1``, the narrowest dot product)."""
        wp, wn = self.wp.abs() + 1e-12, self.wn.abs() + 1e-12
        top = torch.maximum(wp, wn)
        pos = RoundClamp.apply(self.levels * wp / top, 1.0, float(self.levels))
        neg = RoundClamp.apply(self.levels * wn / top, 1.0, float(self.levels))
        g = math.gcd(int(pos.detach()), int(neg.detach()))
        return pos / g, neg / g, g

    def int_weight(self):
        """The integer weights of the dot product: the ternary signs (TWN), or ``pos``/``-neg``/0
        (TTQ; the STE gradient of a weight is scaled by its ``pos`` or ``neg``, as in TTQ)."""
        t = self.ternary_weight()
        if self.mode == "twn":
            return t
        pos, neg, _ = self.ttq_scales()
        return torch.where(t > 0, pos * t, neg * t)

    def alpha(self):
        """Per-output-channel float scale of the dot product ``[out]`` (ones when ``scale`` is off):
        TWN mean ``|W|`` above ``delta``; TTQ ``max(Wp, Wn) / levels``."""
        ones = torch.ones(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)
        if not self.scale:
            return ones
        if self.mode == "ttq":
            return ones * torch.maximum(self.wp.abs(), self.wn.abs()) * self.ttq_scales()[2] / self.levels
        w = self._rows().detach().abs()
        above = w > self.delta()[:, None]
        count = above.sum(dim=1)
        return torch.where(count > 0, (w * above).sum(dim=1) / count.clamp(min=1), ones)

    def qmd_weight(self):
        """``{"weight": "ternary", "weights": int8 -1/0/+1 [out, ...]}`` plus, for TTQ,
        ``pos_scale``/``neg_scale`` (int64 ``[out]``, the same integers in every row)."""
        with torch.no_grad():
            spec = {"weight": "ternary", "weights": self.ternary_weight().cpu().numpy().astype(np.int8)}
            if self.mode == "ttq":
                pos, neg = (int(v) for v in self.ttq_scales()[:2])
                rows = self.weight.shape[0]
                spec["pos_scale"] = np.full(rows, pos, dtype=np.int64)
                spec["neg_scale"] = np.full(rows, neg, dtype=np.int64)
        return spec

    def density(self):
        """Fraction of non-zero ternary weights."""
        with torch.no_grad():
            return float((self.ternary_weight() != 0).float().mean())

    def _extra(self):
        return f", mode={self.mode}, scale={self.scale}, delta_factor={self.delta_factor}" + (
            f", levels={self.levels}" if self.mode == "ttq" else "")


class TernaryLinear(_TernaryWeights, nn.Linear):
    """``y = x @ Wq.T`` times ``alpha`` per output if ``scale``; ``Wq`` ternary (TWN) or
    ``pos``/``-neg``/0 (TTQ), see the module docstring. No bias."""

    def __init__(self, in_features, out_features, mode="twn", scale=True, delta_factor=0.7, levels=8):
        nn.Linear.__init__(self, in_features, out_features, bias=False)
        self._init_ternary(mode, scale, delta_factor, levels)

    def dot(self, x):
        """The integer-valued dot products ``x @ Wq.T`` (before ``alpha``)."""
        return F.linear(x, self.int_weight())

    def forward(self, x):
        y = self.dot(x)
        return y * self.alpha() if self.scale else y

    def extra_repr(self):
        return nn.Linear.extra_repr(self) + self._extra()


class TernaryConv2d(_TernaryWeights, nn.Conv2d):
    """``y = conv2d(x, Wq)`` times ``alpha`` per output channel if ``scale``; see :class:`TernaryLinear`."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, mode="twn", scale=True,
                 delta_factor=0.7, levels=8):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self._init_ternary(mode, scale, delta_factor, levels)

    def dot(self, x):
        """The integer-valued convolution of ``x`` with ``Wq`` (before ``alpha``), NCHW."""
        return F.conv2d(x, self.int_weight(), None, self.stride, self.padding)

    def forward(self, x):
        y = self.dot(x)
        return y * self.alpha().view(1, -1, 1, 1) if self.scale else y

    def extra_repr(self):
        return nn.Conv2d.extra_repr(self) + self._extra()


class LevelCount(torch.autograd.Function):
    """Forward: ``offset + number of levels <= x`` (exact). Backward: the gradient where
    ``lo <= x <= hi`` (straight through inside the quantizer's range)."""

    @staticmethod
    def forward(ctx, x, levels, offset, lo, hi):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        y = torch.full_like(x, float(offset))
        for level in levels:
            y = y + (x >= level).to(x.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x >= ctx.lo) & (x <= ctx.hi)).to(grad.dtype), None, None, None, None


class TernaryActivation(nn.Module):
    """TNN ternary activation ``[y >= -t] + [y >= t] - 1`` in {-1, 0, +1}; STE where ``|y| <= 1``."""

    qmd_out = {"kind": "ternary"}

    def __init__(self, threshold=0.5):
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold!r}")
        self.levels = (-float(threshold), float(threshold))

    def forward(self, x):
        return LevelCount.apply(x, self.levels, -1, -1.0, 1.0)


class UintActivation(nn.Module):
    """``bits``-bit activation ``sum_{i=1..2^b-1} [y >= i - 1/2]`` in ``0 .. 2^b - 1``; STE
    where ``-1/2 <= y <= 2^b - 1/2``."""

    def __init__(self, bits=2):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
        self.bits = bits
        self.levels = tuple(i - 0.5 for i in range(1, 2 ** bits))
        self.qmd_out = {"kind": "uint", "bits": bits}

    def forward(self, x):
        return LevelCount.apply(x, self.levels, 0, -0.5, 2 ** self.bits - 0.5)


@torch.no_grad()
def clip_latent_weights(model):
    """Clamp the latent weights of every binary- or ternary-weight module in ``model``
    (:class:`BinaryLinear`, :class:`BinaryConv2d`, :class:`TernaryLinear`,
    :class:`TernaryConv2d`) to ``[-1, 1]`` (call after each optimizer step). Returns the
    number of modules clipped."""
    n = 0
    for m in model.modules():
        if getattr(m, "latent_clipped", False):
            m.weight.clamp_(-1.0, 1.0)
            n += 1
    return n
