import pytest
import torch

import rnngrad
from rnngrad.cells import ACTIVATIONS


def test_parameter_names_and_shapes():
    m = rnngrad.RNN(3, 5, 2)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"W_in": (5, 3), "W_rec": (5, 5), "b_rec": (5,), "W_out": (2, 5),
                      "b_out": (2,)}
    assert m.W_rec.dtype == torch.float32


@pytest.mark.parametrize("readout", ["identity", "softmax", "sigmoid"])
def test_forward_matches_the_equations(readout):
    m = rnngrad.RNN(3, 4, 2, alpha=0.5, readout=readout, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    y, h = m(x)
    assert y.shape == (6, 2, 2) and h.shape == (6, 2, 4)
    hp = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(6):
        hp = 0.5 * hp + 0.5 * torch.tanh(x[t] @ m.W_in.T + hp @ m.W_rec.T + m.b_rec)
        assert torch.allclose(h[t], hp, atol=1e-14)
    z = h[-1] @ m.W_out.T + m.b_out
    expect = {"identity": z, "softmax": torch.softmax(z, -1), "sigmoid": torch.sigmoid(z)}
    assert torch.allclose(y[-1], expect[readout], atol=1e-14)


def test_activation_derivatives_and_inverses():
    a = torch.linspace(-3, 3, 101, dtype=torch.float64, requires_grad=True)
    for act in ACTIVATIONS.values():
        fa = act.fn(a)
        (d,) = torch.autograd.grad(fa.sum(), a)
        mask = a.detach().abs() > 1e-3  # relu is not differentiable at 0
        assert torch.allclose(act.deriv(a.detach(), fa.detach())[mask], d[mask]), act.name
        if act.inverse is not None:
            inside = (fa > act.range[0] + 1e-9) & (fa < act.range[1] - 1e-9)
            assert torch.allclose(act.inverse(fa.detach())[inside], a.detach()[inside]), act.name


def test_orthogonal_and_identity_init():
    m = rnngrad.RNN(2, 6, 1, init="orthogonal", dtype=torch.float64)
    assert torch.allclose(m.W_rec @ m.W_rec.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    m = rnngrad.RNN(2, 6, 1, init="identity")
    assert torch.equal(m.W_rec.detach(), torch.eye(6))


def test_state_dict_round_trip_and_to():
    m = rnngrad.RNN(2, 3, 1, activation="relu", alpha=0.3)
    m2 = rnngrad.RNN(2, 3, 1, activation="relu", alpha=0.3)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(4, 2, 2)
    assert torch.equal(m(x)[0], m2(x)[0])
    assert m.to(torch.float64).W_in.dtype == torch.float64


def test_forward_differentiable_in_its_inputs_with_frozen_weights():
    m = rnngrad.RNN(2, 3, 1, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.shape == x.shape and torch.isfinite(gx).all()


def test_setting_alpha_changes_what_every_algorithm_computes():
    # rnngrad.RNN's alpha is its cell's: setting it after construction (or after online
    # steps) is what the next call uses, never a stale copy
    torch.manual_seed(0)
    net = rnngrad.RNN(3, 4, 2, alpha=0.5, dtype=torch.float64)
    ref = rnngrad.RNN(3, 4, 2, alpha=0.8, dtype=torch.float64)
    ref.load_state_dict(net.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y = torch.randn(5, 2, 2, dtype=torch.float64)
    algo = rnngrad.eprop()
    state = algo.init(net, 2)
    algo.step(net, state, x[0], y[0])  # the step path has seen alpha 0.5
    net.alpha = 0.8
    assert net.alpha == 0.8 and net.cells[0].alpha == 0.8
    for a in (rnngrad.bptt(), rnngrad.eprop(), rnngrad.snap1()):
        _, g = rnngrad.gradient(net, x, y, algorithm=a)
        _, r = rnngrad.gradient(ref, x, y, algorithm=a)
        assert all(torch.allclose(g[n], r[n], rtol=1e-12, atol=1e-14) for n in r), a.name
    with pytest.raises(ValueError, match=r"alpha must be a float in \(0, 1\], got 0"):
        net.alpha = 0
