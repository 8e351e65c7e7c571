"""ShiftCNN quantizers: greedy residual power-of-two quantization (post-training), the
STE fine-tuning modules, the INQ schedule, and their agreement with the QMD's pow2 codes."""

import numpy as np
import pytest
import torch

from models.qmd import pow2_decode
from models.quant import (Pow2Conv2d, Pow2Linear, inq_fraction_at, inq_freeze, pow2_exponent_offset,
                          pow2_int_weights, shiftcnn_codebook, shiftcnn_codes, shiftcnn_quantize)

torch.set_num_threads(1)


def _greedy_scalar(r, terms, code_bits):
    """ShiftCNN's greedy residual assignment, one weight at a time, written plainly."""
    out = []
    for t in range(terms):
        best_j, best = 0, abs(r)                        # the zero term first: ties go to it
        for j, mag in sorted(enumerate(shiftcnn_codebook(t, code_bits), start=1), key=lambda e: e[1]):
            if abs(abs(r) - mag) < best:
                best_j, best = j, abs(abs(r) - mag)
        neg = r < 0 and best_j > 0
        q = 0.0 if best_j == 0 else (-1 if neg else 1) * 2.0 ** -(t + best_j - 1)
        out.append((neg, best_j))
        r -= q
    return out


def test_codebooks_are_shiftcnns():
    assert shiftcnn_codebook(0, 4) == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]
    assert shiftcnn_codebook(1, 4) == [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125]
    assert shiftcnn_codebook(2, 2) == [0.25]


@pytest.mark.parametrize("terms, code_bits", [(1, 4), (2, 4), (3, 3), (2, 2)])
def test_greedy_residual_matches_the_plain_algorithm(terms, code_bits):
    g = torch.Generator().manual_seed(terms * 10 + code_bits)
    r = torch.cat([torch.rand(300, generator=g) * 2 - 1,
                   torch.tensor([0.0, 1.0, -1.0, 0.5, -0.75, 0.375, 2.0 ** -7, -(2.0 ** -9), 0.96875, 1e-6])])
    neg, idx, value = shiftcnn_codes(r, terms, code_bits)
    assert neg.shape == idx.shape == (terms, len(r))
    for i, v in enumerate(r.tolist()):
        want = _greedy_scalar(v, terms, code_bits)
        assert [(bool(neg[t, i]), int(idx[t, i])) for t in range(terms)] == want, (v, want)
    # every term is a member of its codebook, and the value is the sum of the terms
    top = (1 << (code_bits - 1)) - 1
    assert ((idx >= 0) & (idx <= top)).all() and not (neg & (idx == 0)).any()
    t = torch.arange(terms).view(-1, 1)
    terms_value = torch.where(idx > 0, torch.where(neg, -1.0, 1.0) * 2.0 ** -(t + idx - 1).double(),
                              torch.zeros((), dtype=torch.float64))
    assert torch.equal(terms_value.sum(0), value)


def test_ptq_scale_exponent_and_exact_integer_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 40, generator=g) * 0.1
    w_hat, c = shiftcnn_quantize(w, terms=2, code_bits=4)
    s, e, wq = c["scale"], c["exponent_offset"], c["int_weights"]
    assert s == float(w.abs().max())
    assert torch.equal(wq, torch.round(wq)) and e == pow2_exponent_offset(c["index"]) <= 7
    assert torch.equal(w_hat, s * 2.0 ** -e * wq)                 # exact: powers of two times one scale
    # the largest weight is represented exactly by term 0, index 1 (2^0 of the normalised range)
    k = int(w.abs().argmax())
    assert float(w_hat.flatten()[k]) == float(w.flatten()[k].double())
    # the QMD's decoding of the same codes gives the same integers
    codes = ((c["negative"].long() << 3) | c["index"]).movedim(0, 1).numpy().astype(np.uint8)
    assert np.array_equal(pow2_decode(codes, 4, e), wq.numpy().astype(np.int64))


def test_more_terms_and_bits_quantize_better():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 576, generator=g)

    def err(terms, bits):
        return float(((shiftcnn_quantize(w, terms, bits)[0] - w.double()) ** 2).mean())
    e11, e14, e24, e23, e34 = err(1, 4), err(1, 4), err(2, 4), err(2, 3), err(3, 4)
    assert e24 < 0.25 * e14                  # the second codebook removes most of the error
    assert e24 < e23 and e34 < e24
    assert e11 == e14


def test_pow2_linear_forward_is_integer_dot_times_alpha_with_ste():
    torch.manual_seed(3)
    fc = Pow2Linear(24, 5, terms=2, code_bits=4)
    x = torch.randint(0, 16, (4, 24)).float()
    q = fc.qmd_weight()
    wq = torch.from_numpy(q["int_weights"]).float()
    assert torch.equal(fc.int_weight().detach(), wq)
    assert torch.equal(fc.dot(x), x @ wq.T) and torch.equal(fc.dot(x), torch.round(fc.dot(x)))
    w_hat, c = shiftcnn_quantize(fc.weight)
    assert q["exponent_offset"] == c["exponent_offset"] and np.array_equal(q["int_weights"], c["int_weights"].numpy())
    alpha = fc.alpha()
    assert torch.allclose(alpha, torch.full((5,), c["scale"] * 2.0 ** -c["exponent_offset"]).float())
    assert torch.allclose(fc(x), (x @ wq.T) * alpha)
    assert torch.allclose((alpha[0] * wq).double(), w_hat, rtol=1e-6)
    assert np.array_equal(pow2_decode(q["weights"], 4, q["exponent_offset"]), q["int_weights"])
    assert q["weights"].shape == (5, 2, 24) and q["weights"].dtype == np.uint8
    # STE: the gradient reaches the latent weights as if Wq were W / alpha
    fc.dot(x).sum().backward()
    assert torch.allclose(fc.weight.grad, x.sum(0).expand(5, 24) / alpha[0])
    assert 0 < fc.density() <= 1


def test_pow2_conv2d_codes_follow_the_weight_layout():
    torch.manual_seed(4)
    conv = Pow2Conv2d(3, 4, 3, terms=2, code_bits=4)
    q = conv.qmd_weight()
    assert q["weights"].shape == (4, 2, 3, 3, 3) and q["int_weights"].shape == (4, 3, 3, 3)
    x = torch.randint(0, 256, (2, 3, 6, 6)).float()
    wq = torch.from_numpy(q["int_weights"]).float()
    assert torch.equal(conv.dot(x), torch.nn.functional.conv2d(x, wq))
    assert torch.allclose(conv(x), conv.dot(x) * conv.alpha().view(1, -1, 1, 1))
    with pytest.raises(ValueError, match="terms must be an integer in 1..4"):
        Pow2Conv2d(3, 4, 3, terms=0)
    with pytest.raises(ValueError, match="code_bits must be an integer in 2..8"):
        Pow2Linear(3, 4, code_bits=9)


def test_inq_freezes_largest_weights_first_and_ends_integer_exact():
    torch.manual_seed(5)
    model = torch.nn.Sequential(Pow2Linear(32, 8), torch.nn.ReLU(), Pow2Linear(8, 4))
    fc = model[0]
    w0 = fc.weight.detach().clone()
    assert inq_freeze(model, 0.5) == 128 + 16
    assert fc.inq_fraction == 0.5
    frozen = fc.inq_mask.clone()
    assert w0.abs()[frozen].min() >= w0.abs()[~frozen].max()          # largest magnitudes first
    scale = float(fc.inq_scale)
    assert scale == float(w0.abs().max())
    with pytest.raises(ValueError, match="INQ has frozen only 50.0% of the weights"):
        fc.qmd_weight()
    # a training step moves the float weights only; the frozen ones stay at their codes
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.rand(16, 32)
    before = fc._effective_weight().detach().clone()
    model(x).pow(2).sum().backward()
    assert (fc.weight.grad[frozen] == 0).all() and (fc.weight.grad[~frozen] != 0).any()
    opt.step()
    after = fc._effective_weight().detach()
    assert torch.equal(after[frozen], before[frozen]) and not torch.equal(after[~frozen], before[~frozen])
    assert inq_freeze(model, 0.5) == 0                                 # idempotent
    inq_freeze(model, 1.0)
    assert fc.inq_fraction == 1.0 and float(fc.inq_scale) == scale
    # fully frozen: the integer-exact path, with the codes frozen at each step
    q = fc.qmd_weight()
    wq = torch.from_numpy(q["int_weights"]).float()
    xi = torch.randint(0, 8, (3, 32)).float()
    assert torch.equal(fc.dot(xi), xi @ wq.T)
    assert torch.equal(fc.int_weight().detach(), wq)
    neg, idx, _ = shiftcnn_codes(w0 / scale)           # the first half was frozen from the initial weights
    assert torch.equal(fc.inq_index[:, frozen], idx[:, frozen])
    assert torch.equal(fc.inq_negative[:, frozen], neg[:, frozen])
    assert torch.allclose(fc(xi), (xi @ wq.T) * fc.alpha())


def test_inq_schedule_lookup():
    sched = [[0, 0.5], [3, 0.75], [5, 1.0]]
    assert [inq_fraction_at(sched, e) for e in range(7)] == [0.5, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]
    assert inq_fraction_at([[2, 0.5]], 1) == 0.0
    with pytest.raises(ValueError, match="INQ fraction must be in"):
        Pow2Linear(4, 4).inq_freeze(1.5)


def test_int_weights_helper_matches_qmd_decoding():
    rng = np.random.default_rng(6)
    idx = torch.from_numpy(rng.integers(0, 8, (2, 5, 7)))
    neg = torch.from_numpy(rng.random((2, 5, 7)) < 0.5) & (idx > 0)
    e = pow2_exponent_offset(idx)
    codes = ((neg.long() << 3) | idx).movedim(0, 1).numpy().astype(np.uint8)
    assert np.array_equal(pow2_int_weights(neg, idx, e).numpy().astype(np.int64), pow2_decode(codes, 4, e))
