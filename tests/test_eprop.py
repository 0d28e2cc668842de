"""e-prop and RFLO against the theory: TBPTT(1) for alpha = 1, Bellec's stop-gradient
construction for any alpha, and the plain trace equation for random feedback."""

import pytest
import torch
from online_refs import autograd_grads, make_data, make_model

import rnngrad
from rnngrad.algorithms.eprop import random_feedback
from rnngrad.cells import get_activation

NAMES = ("W_in", "W_rec", "b_rec", "W_out", "b_out")


def assert_close(g, ref, names=NAMES):
    for n in names:
        torch.testing.assert_close(g[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("loss,readout", [("mse", "identity"), ("cross_entropy", "softmax")])
def test_alpha1_equals_tbptt1(loss, readout):
    model = make_model(readout=readout)
    x, y, mask = make_data(loss=loss)
    _, g = rnngrad.gradient(model, x, y, algorithm=rnngrad.eprop(), loss=loss, mask=mask)
    ref = autograd_grads(model, x, y, mask, loss, detach_every_step=True)
    assert_close(g, ref)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_equals_stop_gradient_construction(alpha, activation):
    model = make_model(alpha=alpha, activation=activation, H=6)
    x, y, mask = make_data(T=7)
    h0 = torch.randn(4, 6, dtype=torch.float64)
    _, g = rnngrad.gradient(model, x, y, algorithm=rnngrad.eprop(), mask=mask, h0=h0)
    ref = autograd_grads(model, x, y, mask, "mse", h0=h0, cut_rec=True)
    assert_close(g, ref, NAMES + ("h0",))
    if alpha != 1.0:  # the cut matters: e-prop is not the exact gradient
        _, exact = rnngrad.gradient(model, x, y, mask=mask, h0=h0)
        assert not torch.allclose(g["W_rec"], exact["W_rec"])


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_random_feedback_is_the_trace_equation(alpha):
    model = make_model(alpha=alpha)
    x, y, mask = make_data()
    T, B, D = x.shape
    H = model.hidden_size
    algo = rnngrad.eprop("random", seed=3)
    _, g = rnngrad.gradient(model, x, y, algorithm=algo, mask=mask)
    # the equation, term by term: trace_t = (1-a) trace_{t-1} + a phi'(a_t) pre_t^T, L_t = B dl/dz
    Bt = random_feedback(model, 3)
    act = get_activation(model.activation)
    W = torch.cat([model.W_rec, model.W_in, model.b_rec[:, None]], 1).detach()
    h = torch.zeros(B, H, dtype=torch.float64)
    trace = torch.zeros(B, H, H + D + 1, dtype=torch.float64)
    G = torch.zeros(H, H + D + 1, dtype=torch.float64)
    for t in range(T):
        pre = torch.cat([h, x[t], torch.ones(B, 1, dtype=torch.float64)], 1)
        a = pre @ W.T
        h = (1 - alpha) * h + alpha * act.fn(a)
        dphi = 1 - act.fn(a) ** 2
        trace = (1 - alpha) * trace + alpha * dphi[:, :, None] * pre[:, None, :]
        z = h @ model.W_out.detach().T + model.b_out.detach()
        L = (mask[t, :, None] / B * (z - y[t])) @ Bt
        G += (L[:, :, None] * trace).sum(0)
    torch.testing.assert_close(g["W_rec"], G[:, :H], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g["W_in"], G[:, H:H + D], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g["b_rec"], G[:, -1], rtol=1e-10, atol=1e-12)
    _, exact = rnngrad.gradient(model, x, y, mask=mask)
    torch.testing.assert_close(g["W_out"], exact["W_out"], rtol=1e-10, atol=1e-12)


def test_random_feedback_is_fixed_and_seeded():
    model = make_model(H=8, K=3)
    b1, b2, b3 = random_feedback(model, 0), random_feedback(model, 0), random_feedback(model, 1)
    assert torch.equal(b1, b2) and not torch.equal(b1, b3)
    assert b1.shape == model.W_out.shape and b1.abs().max() <= 8 ** -0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="feedback must be one of"):
        rnngrad.eprop("transpose")
    with pytest.raises(TypeError, match="seed must be an int"):
        rnngrad.rflo(seed=1.5)
    algo = rnngrad.eprop()
    assert not algo.exact and algo.online and "O(" in algo.cost
