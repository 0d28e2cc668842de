"""Time-varying weights (rnngrad/steady/trajectory.py): dR/dW(t) = u(t) x(t-1)^T.

Against rnngrad.bptt(sensitivities=True) (the sum over t is BPTT's shared-weight
gradient) and against autograd with respect to per-step copies of the weights,
in float64 to relative error <= 1e-10 (RTOL).
"""

from __future__ import annotations

import pytest
import torch
from steady_refs import F64, RTOL, _seed_and_one_thread, rel_err  # noqa: F401

import rnngrad
from rnngrad.cells import get_activation
from rnngrad.steady import per_step_gradients

SUM_RTOL = 1e-12  # the same products summed in another order


def problem(*, alpha: float = 1.0, activation: str = "tanh", T=6, B=3, D=2, N=5, K=3):
    torch.manual_seed(4)
    model = rnngrad.RNN(D, N, K, activation=activation, alpha=alpha, dtype=F64)
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(T, B, D, generator=gen, dtype=F64)
    targets = torch.randn(T, B, K, generator=gen, dtype=F64)
    h0 = 0.5 * torch.randn(B, N, generator=gen, dtype=F64)
    loss, g = rnngrad.gradient(
        model, inputs, targets, loss="mse", h0=h0, algorithm=rnngrad.bptt(sensitivities=True)
    )
    with torch.no_grad():
        _, h = model(inputs, h0=h0)
    return model, inputs, targets, h0, h, loss, g


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_per_step_gradients_sum_to_bptt(alpha):
    model, inputs, _, h0, h, _, g = problem(alpha=alpha)
    per_step = per_step_gradients(g["u"], h, x0=h0, inputs=inputs)
    assert list(per_step) == ["W_in", "W_rec", "b_rec"]
    T, _, N = h.shape
    assert per_step["W_rec"].shape == (T, N, N) and per_step["W_in"].shape == (T, N, 2)
    for name in per_step:
        assert rel_err(per_step[name].sum(0), g[name]) <= SUM_RTOL, name


@pytest.mark.parametrize("alpha", [1.0, 0.7])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_per_step_gradients_equal_autograd_on_per_step_copies(activation, alpha):
    """W_rec(t) = W_rec + dW(t) etc. at dW = 0: autograd's dL/dW(t) is the lemma's u(t) x(t-1)^T."""
    model, inputs, targets, h0, h, loss, g = problem(alpha=alpha, activation=activation)
    T, B, _ = inputs.shape
    act = get_activation(activation)
    p = {name: t.detach() for name, t in model.named_parameters()}
    copies = {
        name: torch.zeros(T, *p[name].shape, dtype=F64, requires_grad=True)
        for name in ("W_in", "W_rec", "b_rec")
    }
    x, total = h0, 0.0
    for t in range(T):
        W_in, W_rec, b_rec = (p[n] + copies[n][t] for n in ("W_in", "W_rec", "b_rec"))
        a = inputs[t] @ W_in.T + x @ W_rec.T + b_rec
        x = (1 - alpha) * x + alpha * act.fn(a)
        z = x @ p["W_out"].T + p["b_out"]
        total = total + 0.5 * ((z - targets[t]) ** 2).sum() / B
    assert float(total.detach()) == pytest.approx(float(loss), rel=1e-13)  # the same loss
    ref = dict(zip(copies, torch.autograd.grad(total, list(copies.values())), strict=True))
    per_step = per_step_gradients(g["u"], h, x0=h0, inputs=inputs)
    for name in copies:
        assert per_step[name].shape == ref[name].shape
        assert rel_err(per_step[name], ref[name]) <= RTOL, name
        for t in range(T):  # each step on its own scale too
            assert rel_err(per_step[name][t], ref[name][t]) <= RTOL, (name, t)


def test_per_step_gradients_unbatched_and_default_x0():
    _, inputs, _, h0, h, _, g = problem()
    batched = per_step_gradients(g["u"][:, :1], h[:, :1], x0=h0[:1], inputs=inputs[:, :1])
    single = per_step_gradients(g["u"][:, 0], h[:, 0], x0=h0[0], inputs=inputs[:, 0])
    for name in batched:
        assert torch.allclose(batched[name], single[name], rtol=1e-14, atol=0), name
    # x0 = None is x(0) = 0: the first step's dW_rec vanishes
    zero = per_step_gradients(g["u"], h)
    assert list(zero) == ["W_rec", "b_rec"]
    assert float(zero["W_rec"][0].abs().max()) == 0.0
    assert torch.equal(zero["W_rec"][1:], per_step_gradients(g["u"], h, x0=h0)["W_rec"][1:])


def test_per_step_gradients_bad_inputs_raise():
    u = torch.zeros(4, 2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"u has shape \(3,\) but \(T, B, N\) or \(T, N\)"):
        per_step_gradients(torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"x has shape \(4, 3\) but u's \(4, 2, 3\) is expected"):
        per_step_gradients(u, torch.zeros(4, 3, dtype=F64))
    with pytest.raises(TypeError, match="x has dtype torch.float32 but u has dtype torch.float64"):
        per_step_gradients(u, torch.zeros(4, 2, 3))
    with pytest.raises(ValueError, match=r"x0 has shape \(3, 3\) but \(2, 3\) or \(3,\)"):
        per_step_gradients(u, u, x0=torch.zeros(3, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"inputs has shape \(4, 5\) but \(4, 2, D\) is expected"):
        per_step_gradients(u, u, inputs=torch.zeros(4, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"u contains 1 NaN or Inf entries"):
        bad = u.clone()
        bad[0, 0, 0] = float("inf")
        per_step_gradients(bad, u)
