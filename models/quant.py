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
* :class:`SintActivation` — signed ``b``-bit activation, ``clamp(round(y/step))`` in
  ``-2^(b-1) .. 2^(b-1) - 1``; STE inside the range.
* :class:`UintActivation` — ``b``-bit activation ``sum_i [y >= i - 1/2]`` in
  ``0 .. 2^b - 1`` (round-half-up of ``clamp(y, 0, 2^b - 1)``); STE inside the range.

Power-of-two family (ShiftCNN; exact integers times one float scale per layer):

* :func:`shiftcnn_codes` / :func:`shiftcnn_quantize` — greedy residual quantization over
  ``N`` codebooks of ``B`` bits after normalising by ``max|W|`` (post-training).
* :class:`Pow2Linear` / :class:`Pow2Conv2d` — STE fine-tuning with those weights: the dot
  product uses the integer weights ``Wq`` of the QMD's ``pow2`` kind, times
  ``alpha = max|W| * 2^-E``; optional INQ schedule (:func:`inq_freeze`,
  :func:`inq_fraction_at`): the largest weights are quantized and frozen first.

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
    """``bits``-bit activation ``sum_{i=1..2^b-1} [y >= (i - 1/2) * step]`` in ``0 .. 2^b - 1``
    (round-half-up of ``clamp(y / step, 0, 2^b - 1)``: fixed point with ``step`` the value of
    one code, ``step = 1`` by default); STE where ``-step/2 <= y <= (2^b - 1/2) * step``. The
    output is the integer code itself (the next layer's BN absorbs ``step``), exactly what the
    QMD's ``threshold`` layer with ``2^b - 1`` thresholds produces."""

    def __init__(self, bits=2, step=1.0):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
        if not step > 0:
            raise ValueError(f"step must be positive, got {step!r}")
        self.bits, self.step = bits, float(step)
        self.levels = tuple((i - 0.5) * self.step for i in range(1, 2 ** bits))
        self.qmd_out = {"kind": "uint", "bits": bits}

    def forward(self, x):
        return LevelCount.apply(x, self.levels, 0, -0.5 * self.step, (2 ** self.bits - 0.5) * self.step)


class SintActivation(nn.Module):
    """Signed ``bits``-bit activation: ``clamp(round(y / step), -2^(b-1), 2^(b-1) - 1)`` (round
    half up) as ``-2^(b-1) + sum_i [y >= (i - 2^(b-1) + 1/2) * step]`` over ``2^b - 1`` levels;
    STE inside the range. The QMD's ``threshold`` with ``out`` ``{"kind": "sint", "bits": b}``."""

    def __init__(self, bits=4, step=1.0):
        super().__init__()
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
        if not step > 0:
            raise ValueError(f"step must be positive, got {step!r}")
        self.bits, self.step = bits, float(step)
        half = 2 ** (bits - 1)
        self.levels = tuple((i - half + 0.5) * self.step for i in range(2 ** bits - 1))
        self.qmd_out = {"kind": "sint", "bits": bits}

    def forward(self, x):
        half = 2 ** (self.bits - 1)
        return LevelCount.apply(x, self.levels, -half, (-half - 0.5) * self.step, (half - 0.5) * self.step)


# --------------------------------------------------------------------------- power of two (ShiftCNN)

def shiftcnn_codebook(term, code_bits):
    """The non-zero magnitudes of ShiftCNN's codebook ``C_(term+1)`` by index ``j`` =
    1 .. 2^(B-1) - 1: ``2^-(term + j - 1)`` (a list; index 0 is the zero term)."""
    return [2.0 ** -(term + j - 1) for j in range(1, 1 << (code_bits - 1))]


def _check_pow2(terms, code_bits):
    if not isinstance(terms, int) or isinstance(terms, bool) or not 1 <= terms <= 4:
        raise ValueError(f"terms must be an integer in 1..4, got {terms!r}")
    if not isinstance(code_bits, int) or isinstance(code_bits, bool) or not 2 <= code_bits <= 8:
        raise ValueError(f"code_bits must be an integer in 2..8, got {code_bits!r}")


@torch.no_grad()
def shiftcnn_codes(r, terms=2, code_bits=4):
    """ShiftCNN's greedy residual quantization of normalized weights ``r`` (``w / max|W|``).

    Term ``t`` = 0 .. N-1 takes the value of codebook ``C_(t+1)`` (0 and
    ``±2^-(t + j - 1)``, :func:`shiftcnn_codebook`) nearest to the residual left by the
    terms before it (ties go to the smaller magnitude, 0 first), and the residual
    becomes ``r - sum of the terms so far``. Returns ``(negative, index, value)``:
    bool and int64 tensors ``[terms, *r.shape]`` (index 0 = zero term, never negative)
    and the float64 sum of the terms (the quantized ``r``)."""
    _check_pow2(terms, code_bits)
    r = r.detach().to(torch.float64)
    top = (1 << (code_bits - 1)) - 1
    res = r.clone()
    total = torch.zeros_like(r)
    negs, idxs = [], []
    for t in range(terms):
        # candidates in ascending magnitude: 0, 2^-(t+top-1), ..., 2^-t; candidate c >= 1 is index top + 1 - c
        cand = torch.tensor([0.0] + shiftcnn_codebook(t, code_bits)[::-1], dtype=torch.float64, device=r.device)
        c = torch.argmin((res.abs().unsqueeze(-1) - cand).abs(), dim=-1)
        idx = torch.where(c > 0, top + 1 - c, torch.zeros_like(c))
        neg = (res < 0) & (idx > 0)
        q = torch.where(neg, -cand[c], cand[c])
        res = res - q
        total = total + q
        negs.append(neg)
        idxs.append(idx)
    return torch.stack(negs), torch.stack(idxs), total


def pow2_exponent_offset(index):
    """The smallest ``E`` that makes every term integer: ``max(t + j - 1)`` over the non-zero
    terms of ``index`` (``[terms, ...]``), 0 when all are zero."""
    t = torch.arange(index.shape[0], device=index.device).view(-1, *[1] * (index.dim() - 1))
    used = torch.where(index > 0, t + index - 1, torch.zeros_like(index))
    return int(used.max()) if used.numel() else 0


def pow2_int_weights(negative, index, exponent_offset):
    """``Wq = sum over terms of (-1)^negative * 2^(E - t - (j - 1))`` (zero terms add 0), float64:
    the QMD's integer pow2 weights (docs/qmd-spec.md)."""
    t = torch.arange(index.shape[0], device=index.device).view(-1, *[1] * (index.dim() - 1))
    shift = (exponent_offset - t - (index - 1)).to(torch.float64)
    mag = torch.where(index > 0, torch.pow(2.0, shift), torch.zeros_like(shift))
    return torch.where(negative, -mag, mag).sum(dim=0)


def shiftcnn_quantize(w, terms=2, code_bits=4):
    """Post-training ShiftCNN quantization of a weight tensor (one layer): normalise by
    ``scale = max|W|``, quantize greedily (:func:`shiftcnn_codes`), scale back. Returns
    ``(w_hat, codes)`` with ``w_hat = scale * sum of the terms`` (float64) and ``codes`` a dict
    ``negative``, ``index`` (``[terms, *w.shape]``), ``scale``, ``exponent_offset``, ``int_weights``
    (``Wq``, float64 integers, with ``w_hat == scale * 2^-E * Wq`` exactly)."""
    w = w.detach().to(torch.float64)
    scale = float(w.abs().max()) if w.numel() else 0.0
    if scale == 0.0:
        scale = 1.0
    neg, idx, value = shiftcnn_codes(w / scale, terms, code_bits)
    e = pow2_exponent_offset(idx)
    wq = pow2_int_weights(neg, idx, e)
    return scale * value, {"negative": neg, "index": idx, "scale": scale, "exponent_offset": e, "int_weights": wq}


class _Pow2Weights:
    """ShiftCNN power-of-two weights shared by :class:`Pow2Linear` and :class:`Pow2Conv2d`.

    Forward: ``dot(x) * alpha`` with ``dot`` the integer-weight product (``Wq``, exact
    integers) and ``alpha = max|W| * 2^-E`` per layer (``E``: :func:`pow2_exponent_offset` of
    the codes), i.e. the layer computes with ``w_hat = alpha * Wq``, ShiftCNN's quantized
    weights. Backward: straight through to the latent float weights (``dWq/dW = 1/alpha``).

    INQ (incremental network quantization, optional): :meth:`inq_freeze` quantizes and
    freezes the largest-magnitude weights up to a fraction of the layer (their codes are
    kept in buffers, the scale fixed at the first call); the others stay float and keep
    training. At fraction 1 the layer is the same integer-exact layer as above, with the
    frozen codes."""

    latent_clipped = False     # free latent weights: the normalisation by max|W| sets the scale

    def _init_pow2(self, terms, code_bits, scale):
        _check_pow2(terms, code_bits)
        self.terms, self.code_bits, self.scale = terms, code_bits, scale
        shape = (terms,) + tuple(self.weight.shape)
        self.register_buffer("inq_mask", torch.zeros(self.weight.shape, dtype=torch.bool))
        self.register_buffer("inq_negative", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("inq_index", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("inq_scale", torch.zeros((), dtype=torch.float64))

    # -- quantization ---------------------------------------------------------------------

    @property
    def inq_fraction(self):
        """Fraction of the weights INQ has frozen (0 without INQ)."""
        return float(self.inq_mask.float().mean())

    def _scale(self):
        if self.inq_mask.any():
            return float(self.inq_scale)
        s = float(self.weight.detach().abs().max())
        return s if s > 0 else 1.0

    def codes(self):
        """``(negative, index, scale)`` of the current weights: greedy ShiftCNN codes
        ``[terms, *weight.shape]`` (INQ-frozen weights: their frozen codes)."""
        s = self._scale()
        neg, idx, _ = shiftcnn_codes(self.weight.detach() / s, self.terms, self.code_bits)
        if self.inq_mask.any():
            neg = torch.where(self.inq_mask, self.inq_negative, neg)
            idx = torch.where(self.inq_mask, self.inq_index, idx)
        return neg, idx, s

    def exponent_offset(self):
        return pow2_exponent_offset(self.codes()[1])

    def int_weight(self):
        """The integer weights ``Wq`` (float tensor of integers) with the STE gradient
        ``dWq/dW = 1/alpha`` (zero for INQ-frozen weights)."""
        neg, idx, s = self.codes()
        e = pow2_exponent_offset(idx)
        wq = pow2_int_weights(neg, idx, e).to(self.weight.dtype)
        k = 2.0 ** e / s
        ste = self.weight * k
        if self.inq_mask.any():
            ste = torch.where(self.inq_mask, torch.zeros_like(ste), ste)
        return wq + (ste - ste.detach())

    def alpha(self):
        """Per-output-channel scale ``max|W| * 2^-E`` of the dot product ``[out]`` (ones when
        ``scale`` is off)."""
        ones = torch.ones(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)
        if not self.scale:
            return ones
        neg, idx, s = self.codes()
        return ones * (s * 2.0 ** -pow2_exponent_offset(idx))

    def _effective_weight(self):
        """INQ before fraction 1: frozen weights at their quantized values, the rest float
        (divided by ``alpha`` when ``scale`` is off, so both parts are on the dot product's scale)."""
        neg, idx, s = self.codes()
        e = pow2_exponent_offset(idx)
        a = s * 2.0 ** -e
        wq = pow2_int_weights(neg, idx, e).to(self.weight.dtype)
        w = torch.where(self.inq_mask, wq * a, self.weight)
        return w if self.scale else w / a

    def _partial_inq(self):
        return bool(self.inq_mask.any()) and not bool(self.inq_mask.all())

    @torch.no_grad()
    def inq_freeze(self, fraction):
        """Freeze the largest-magnitude weights not yet frozen until ``fraction`` of the layer
        is (INQ); the codes are the greedy ShiftCNN codes with the scale ``max|W|`` fixed at the
        first call. Returns the number of weights newly frozen."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"INQ fraction must be in [0, 1], got {fraction!r}")
        total = self.inq_mask.numel()
        want = total if fraction >= 1.0 else int(round(fraction * total))
        have = int(self.inq_mask.sum())
        if want <= have:
            return 0
        if have == 0:
            s = float(self.weight.abs().max())
            self.inq_scale.fill_(s if s > 0 else 1.0)
        mag = torch.where(self.inq_mask, torch.full_like(self.weight, -1.0), self.weight.abs()).flatten()
        pick = torch.topk(mag, want - have).indices
        new = torch.zeros(total, dtype=torch.bool, device=self.weight.device)
        new[pick] = True
        new = new.view(self.weight.shape)
        neg, idx, _ = shiftcnn_codes(self.weight / float(self.inq_scale), self.terms, self.code_bits)
        self.inq_negative.copy_(torch.where(new, neg, self.inq_negative))
        self.inq_index.copy_(torch.where(new, idx, self.inq_index))
        self.inq_mask |= new
        return want - have

    def qmd_weight(self):
        """``{"weight": "pow2", "weights": uint8 codes [out, terms, *weight.shape[1:]], "terms",
        "code_bits", "exponent_offset", "int_weights": int64 Wq [out, ...]}`` (the QMD's
        fields; ``int_weights`` for the exporter's own use)."""
        if self._partial_inq():
            raise ValueError(f"INQ has frozen only {100 * self.inq_fraction:.1f}% of the weights; the layer is "
                             "integer only at fraction 1")
        with torch.no_grad():
            neg, idx, _ = self.codes()
            e = pow2_exponent_offset(idx)
            code = (neg.to(torch.int64) << (self.code_bits - 1)) | idx
            return {"weight": "pow2", "weights": code.movedim(0, 1).cpu().numpy().astype(np.uint8),
                    "terms": self.terms, "code_bits": self.code_bits, "exponent_offset": e,
                    "int_weights": pow2_int_weights(neg, idx, e).cpu().numpy().astype(np.int64)}

    def density(self):
        """Fraction of non-zero integer weights."""
        with torch.no_grad():
            neg, idx, _ = self.codes()
            return float((pow2_int_weights(neg, idx, 0) != 0).float().mean())

    def _extra(self):
        return f", terms={self.terms}, code_bits={self.code_bits}, scale={self.scale}"


class Pow2Linear(_Pow2Weights, nn.Linear):
    """``y = x @ Wq.T * alpha`` with ShiftCNN power-of-two weights (see :class:`_Pow2Weights`). No bias."""

    def __init__(self, in_features, out_features, terms=2, code_bits=4, scale=True):
        nn.Linear.__init__(self, in_features, out_features, bias=False)
        self._init_pow2(terms, code_bits, scale)

    def dot(self, x):
        """The integer-valued dot products ``x @ Wq.T`` (before ``alpha``)."""
        return F.linear(x, self.int_weight())

    def forward(self, x):
        if self._partial_inq():
            return F.linear(x, self._effective_weight())
        y = self.dot(x)
        return y * self.alpha() if self.scale else y

    def extra_repr(self):
        return nn.Linear.extra_repr(self) + self._extra()


class Pow2Conv2d(_Pow2Weights, nn.Conv2d):
    """``y = conv2d(x, Wq) * alpha`` with ShiftCNN power-of-two weights (see :class:`_Pow2Weights`). No bias."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, terms=2, code_bits=4,
                 scale=True):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self._init_pow2(terms, code_bits, scale)

    def dot(self, x):
        """The integer-valued convolution of ``x`` with ``Wq`` (before ``alpha``), NCHW."""
        return F.conv2d(x, self.int_weight(), None, self.stride, self.padding)

    def forward(self, x):
        if self._partial_inq():
            return F.conv2d(x, self._effective_weight(), None, self.stride, self.padding)
        y = self.dot(x)
        return y * self.alpha().view(1, -1, 1, 1) if self.scale else y

    def extra_repr(self):
        return nn.Conv2d.extra_repr(self) + self._extra()


def inq_fraction_at(schedule, epoch):
    """The INQ fraction a schedule ``[[epoch, fraction], ...]`` sets at ``epoch`` (0 before its
    first entry): the fraction of the last entry whose epoch is ``<= epoch``."""
    frac = 0.0
    for e, f in sorted(schedule):
        if e <= epoch:
            frac = float(f)
    return frac


def inq_freeze(model, fraction):
    """:meth:`_Pow2Weights.inq_freeze` on every power-of-two layer of ``model``; returns the
    number of weights newly frozen."""
    return sum(m.inq_freeze(fraction) for m in model.modules() if isinstance(m, _Pow2Weights))


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
