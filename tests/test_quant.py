"""Straight-through-estimator quantizers: forward values, STE gradients, latent clipping."""

import pytest
import torch
from torch import nn

from models.quant import BinaryActivation, BinaryLinear, BinarySign, binary_sign, clip_latent_weights


def test_sign_forward_values_and_zero_is_plus_one():
    x = torch.tensor([-3.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 7.0])
    y = BinarySign.apply(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert y.dtype == x.dtype
    assert binary_sign(x.double()).dtype == torch.float64
    assert torch.equal(BinaryActivation()(x), y)


def test_sign_backward_passes_gradient_only_where_abs_le_1():
    x = torch.tensor([-2.0, -1.0001, -1.0, -0.3, 0.0, 0.3, 1.0, 1.0001, 5.0], requires_grad=True)
    upstream = torch.arange(1.0, 10.0)
    BinarySign.apply(x).backward(upstream)
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(x.grad, upstream * mask)


def test_binary_activation_module_gradient_matches_function():
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    BinaryActivation()(x).sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() <= 1).float())


def test_binary_linear_forward_uses_sign_of_latent_weights():
    torch.manual_seed(0)
    fc = BinaryLinear(20, 7)
    with torch.no_grad():
        fc.weight[0, 0] = 0.0                       # sign(0) = +1
    x = torch.randn(5, 20)
    w = torch.where(fc.weight >= 0, 1.0, -1.0)
    assert w[0, 0] == 1.0
    assert torch.allclose(fc(x), x @ w.T, atol=1e-5)
    xb = torch.where(torch.randn(5, 20) >= 0, 1.0, -1.0)
    dot = fc(xb)
    assert torch.equal(dot, torch.round(dot))       # binary inputs -> integer dot products
    assert torch.equal(dot, xb @ w.T)
    assert fc.bias is None


def test_binary_linear_scale_is_per_row_mean_abs():
    torch.manual_seed(1)
    fc = BinaryLinear(16, 4, scale=True)
    x = torch.where(torch.randn(3, 16) >= 0, 1.0, -1.0)
    alpha = fc.weight.detach().abs().mean(dim=1)
    assert torch.allclose(fc.alpha(), alpha)
    assert torch.allclose(fc(x), fc.dot(x) * alpha)
    assert torch.equal(BinaryLinear(16, 4).alpha(), torch.ones(4))


def test_binary_linear_weight_gradient_is_straight_through():
    torch.manual_seed(2)
    fc = BinaryLinear(6, 3)
    with torch.no_grad():
        fc.weight.uniform_(-0.9, 0.9)
        fc.weight[1, 2] = 1.5                       # outside [-1, 1]: STE blocks its gradient
    x = torch.randn(4, 6)
    g = torch.randn(4, 3)
    fc(x).backward(g)
    expect = g.T @ x
    expect[1, 2] = 0.0
    assert torch.allclose(fc.weight.grad, expect, atol=1e-6)


def test_clip_latent_weights_clamps_only_binary_weights():
    torch.manual_seed(3)
    model = nn.Sequential(BinaryLinear(8, 8), nn.BatchNorm1d(8), BinaryLinear(8, 2))
    with torch.no_grad():
        model[0].weight.mul_(10)
        model[2].weight.fill_(-3.0)
        model[2].weight[0, 0] = 0.25
        model[1].weight.fill_(5.0)
    before = model[0].weight.detach().clone()
    assert clip_latent_weights(model) == 2
    assert torch.equal(model[0].weight, before.clamp(-1, 1))
    assert model[0].weight.abs().max() <= 1.0 and (model[0].weight.abs() == 1.0).any()
    assert model[2].weight[0, 0] == 0.25 and model[2].weight[1, 1] == -1.0
    assert torch.equal(model[1].weight, torch.full((8,), 5.0))  # batch-norm gamma untouched


def test_clipping_after_optimizer_steps_keeps_weights_in_range_and_training_works():
    torch.manual_seed(4)
    model = nn.Sequential(BinaryLinear(10, 16), nn.BatchNorm1d(16), BinaryActivation(), BinaryLinear(16, 2))
    x = torch.where(torch.randn(256, 10) >= 0, 1.0, -1.0)
    y = (x[:, 0] + x[:, 1] + x[:, 2] > 0).long()   # majority of three inputs
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(300):
        loss = nn.functional.cross_entropy(model(x) * 0.25, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        clip_latent_weights(model)
        losses.append(loss.item())
        for m in (model[0], model[3]):
            assert m.weight.abs().max() <= 1.0
    assert losses[-1] < 0.6 * losses[0]
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean()
    assert acc > 0.85


def test_train_device_is_validated():
    from models.train import train
    from qnnfab.errors import QnnfabError
    with pytest.raises(QnnfabError, match="--device must be 'cpu' or 'cuda"):
        train("bnn_mnist", epochs=1, device="tpu", run_dir="/nonexistent-never-created")
    if not torch.cuda.is_available():
        with pytest.raises(QnnfabError, match="no CUDA device"):
            train("bnn_mnist", epochs=1, device="cuda", run_dir="/nonexistent-never-created")


def test_flush_subnormals_zeroes_only_subnormal_parameters_and_buffers_and_keeps_outputs():
    """A distillation teacher's subnormal weights (weight decay leaves ~1M in float_cifar) are
    set to zero: normal values, zeros and integers stay, and the outputs are unchanged."""
    from models.train import flush_subnormals
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).eval()
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        w = net[0].weight
        w[0, :5] = torch.tensor([tiny / 2, -tiny / 4, tiny, 0.0, 1e-40])   # 3 subnormal, 1 normal, 1 zero
        net[1].running_mean[2] = -tiny / 8                                  # a subnormal buffer
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(32, 16)
    with torch.no_grad():
        ref = net(x)
    assert flush_subnormals(net) == 4
    after = net.state_dict()
    assert after["0.weight"][0, :5].tolist() == [0.0, 0.0, tiny, 0.0, 0.0]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"0.weight", "1.running_mean"}
    mask = torch.ones_like(before["0.weight"], dtype=torch.bool)
    mask[0, [0, 1, 4]] = False
    assert torch.equal(before["0.weight"][mask], after["0.weight"][mask])
    assert after["1.num_batches_tracked"] == before["1.num_batches_tracked"]
    with torch.no_grad():
        assert torch.equal(net(x), ref)
    assert flush_subnormals(net) == 0
