"""Quantizers for quantization-aware training of binary networks (straight-through estimators).

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
"""

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

    def forward(self, x):
        return binary_sign(x)


class BinaryLinear(nn.Linear):
    """``y = x @ sign(W).T`` (times ``alpha = mean|W|`` per output row if ``scale``).

    ``W`` (``self.weight``, ``[out, in]``) holds float latent weights; only their signs
    reach the forward pass and the exported model. There is no bias: the hardware's
    accumulator is the plain dot product, and any offset is folded into the next
    threshold. Keep ``W`` in ``[-1, 1]`` with :func:`clip_latent_weights`.
    """

    latent_binary = True

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

    latent_binary = True

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

    def forward(self, x):
        y = self.dot(x)
        if self.scale:
            y = y * self.alpha().view(1, -1, 1, 1)
        return y

    def extra_repr(self):
        return f"{super().extra_repr()}, scale={self.scale}"


@torch.no_grad()
def clip_latent_weights(model):
    """Clamp the latent weights of every binary-weight module in ``model``
    (:class:`BinaryLinear`, :class:`BinaryConv2d`) to ``[-1, 1]`` (call after each optimizer step). Returns the number of modules clipped."""
    n = 0
    for m in model.modules():
        if getattr(m, "latent_binary", False):
            m.weight.clamp_(-1.0, 1.0)
            n += 1
    return n
