"""Input as a function of output (rnngrad/steady/inverse.py), steady state and trajectory."""

from __future__ import annotations

import pytest
import torch
from steady_refs import F64, INVERTIBLE, RTOL, _seed_and_one_thread, rel_err, system  # noqa: F401

import rnngrad
from rnngrad.cells import get_activation
from rnngrad.steady import (
    fixed_point,
    inverse_input,
    inverse_trajectory,
    inverse_trajectory_jacobian,
    trajectory_state_gradient,
)

ROUND_OFF = 1e-13  # float64: b(t) then f(W x(t-1) + b(t)) loses a few eps of max|x|
JAC_RTOL = 1e-12  # the same derivative by formula and by autograd, a few eps apart


@pytest.mark.parametrize("activation", INVERTIBLE)
def test_inverse_input_round_trip(activation):
    W, _, _ = system(11, 4, scale=0.4)
    lo, hi = get_activation(activation).range
    base = torch.rand(4, 11, dtype=F64)
    x = {"tanh": 1.8 * base - 0.9, "sigmoid": 0.05 + 0.9 * base}.get(activation, 0.1 + base)
    b = inverse_input(W, x, activation=activation)
    x_back, _ = fixed_point(W, b, activation=activation)
    assert rel_err(x_back, x) <= RTOL


def test_inverse_input_unique_where_steady_state_is_not():
    """W = 2I with tanh has three steady states for b = 0; inverse_input maps each back to 0."""
    W = 2.0 * torch.eye(3, dtype=F64)
    x_plus, _ = fixed_point(W, torch.zeros(3, dtype=F64), x0=torch.full((3,), 0.5, dtype=F64))
    x_minus = -x_plus
    for x in (x_plus, x_minus, torch.zeros(3, dtype=F64)):
        assert float(inverse_input(W, x).abs().max()) <= 1e-11
    assert float(x_plus.min()) > 0.9


def test_inverse_input_out_of_range_and_relu_raise():
    W = torch.zeros(3, 3, dtype=F64)
    x = torch.tensor([[0.5, 1.2, -3.0], [0.0, 0.1, 1.0]], dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"3 entries outside the range \(-1\.0, 1\.0\) of tanh.*x\[0, 1\] = 1\.2, x\[0, 2\] = -3, x\[1, 2\] = 1",
    ):
        inverse_input(W, x)
    with pytest.raises(ValueError, match="'relu' has no inverse"):
        inverse_input(W, x.abs(), activation="relu")


def test_inverse_input_overflow_raises():
    """b = f^-1(x) - W x with finite x and W that overflows float64 raises, never returns Inf."""
    W = -2.0 * torch.eye(2, dtype=F64)
    x = torch.tensor([1e308, 1.0], dtype=F64)
    with pytest.raises(
        ValueError, match=r"b overflowed: 1 entries are Inf or NaN \(first: b\[0\]: b = inf\)"
    ):
        inverse_input(W, x, activation="identity")


# ------------------------------------------------------------------------- trajectory


def in_range(activation: str, shape: tuple[int, ...], *, seed: int = 0) -> torch.Tensor:
    """Random states well inside f's range."""
    base = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return {
        "tanh": 1.8 * base - 0.9,
        "sigmoid": 0.05 + 0.9 * base,
        "softplus": 0.1 + 2.0 * base,
        "identity": 4.0 * base - 2.0,
    }[activation]


def run(W, b, x0, activation):
    """x(t) = f(W x(t-1) + b(t)), t = 1..T, a plain loop."""
    act = get_activation(activation)
    xs, x = [], x0
    for t in range(b.shape[0]):
        x = act.fn(x @ W.T + b[t])
        xs.append(x)
    return torch.stack(xs)


@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("activation", INVERTIBLE)
def test_inverse_trajectory_reproduces_the_trajectory(activation, batch):
    T, N = 7, 6
    W, _, _ = system(N, None, scale=0.9)
    shape = (T, N) if batch is None else (T, batch, N)
    x = in_range(activation, shape)
    x0 = in_range(activation, shape[1:], seed=1)
    b = inverse_trajectory(W, x, x0=x0, activation=activation)
    assert b.shape == x.shape
    assert rel_err(run(W, b, x0, activation), x) <= ROUND_OFF
    # x(0) defaults to zeros
    b0 = inverse_trajectory(W, x, activation=activation)
    assert rel_err(run(W, b0, torch.zeros_like(x0), activation), x) <= ROUND_OFF


def test_inverse_trajectory_drives_an_rnn():
    """In rnngrad's RNN notation b(t) = W_in x_t + b_rec: with W_in = I, b_rec = 0 the inputs
    are b(t) themselves, and the RNN's hidden states are the trajectory."""
    T, B, N = 5, 2, 4
    model = rnngrad.RNN(N, N, 1, dtype=F64)
    with torch.no_grad():
        model.W_in.copy_(torch.eye(N, dtype=F64))
        model.b_rec.zero_()
    x = in_range("tanh", (T, B, N))
    x0 = in_range("tanh", (B, N), seed=1)
    b = inverse_trajectory(model.W_rec.detach(), x, x0=x0)
    _, h = model(b, h0=x0)
    assert rel_err(h, x) <= ROUND_OFF


def test_inverse_trajectory_out_of_range_names_step_and_unit():
    W = torch.zeros(3, 3, dtype=F64)
    x = torch.zeros(4, 3, dtype=F64)
    x[1, 2], x[3, 0] = 1.5, -1.0
    with pytest.raises(
        ValueError,
        match=r"x has 2 entries outside the range \(-1\.0, 1\.0\) of tanh, where f\^-1 is "
        r"defined: step t=2, unit 2: x\[1, 2\] = 1\.5, step t=4, unit 0: x\[3, 0\] = -1",
    ):
        inverse_trajectory(W, x)
    xb = torch.full((2, 3, 3), 0.5, dtype=F64)
    xb[1, 2, 0] = 0.0
    with pytest.raises(ValueError, match=r"step t=2, batch row 2, unit 0: x\[1, 2, 0\] = 0$"):
        inverse_trajectory(W, xb, activation="sigmoid")
    with pytest.raises(ValueError, match="'relu' has no inverse"):
        inverse_trajectory(W, xb, activation="relu")


def test_inverse_trajectory_overflow_raises():
    W = -2.0 * torch.eye(2, dtype=F64)
    x = torch.tensor([[1.0, 1.0], [1e308, 1.0], [1.0, 1.0]], dtype=F64)
    # b(2) = x(2) + 2 x(1) is finite; b(3) = x(3) + 2 x(2) = 1 + 2e308 is not
    with pytest.raises(
        ValueError,
        match=r"b\(t\) overflowed: 1 entries are Inf or NaN \(first: step t=3, unit 0: "
        r"b\(t\) = inf\); b\(t\) = f\^-1\(x\(t\)\) - W x\(t-1\) is not representable in "
        r"torch.float64",
    ):
        inverse_trajectory(W, x, activation="identity")


def test_inverse_trajectory_bad_shapes_raise():
    W = torch.zeros(3, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"x has shape \(4,\) but \(T, 3\) or \(T, B, 3\)"):
        inverse_trajectory(W, torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match=r"x0 has shape \(2, 3\) but \(5, 3\) or \(3,\)"):
        inverse_trajectory(W, torch.zeros(4, 5, 3, dtype=F64), x0=torch.zeros(2, 3, dtype=F64))
    with pytest.raises(TypeError, match="x has dtype torch.float32 but W has dtype torch.float64"):
        inverse_trajectory(W, torch.zeros(4, 3))


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("activation", INVERTIBLE)
def test_inverse_trajectory_jacobian_equals_autograd(activation, batch):
    """db(t)/dx(t') is block lower-bidiagonal: D^-1(t) on the diagonal, -W below."""
    T, N = 4, 3
    W, _, _ = system(N, None, scale=0.9)
    shape = (T, N) if batch is None else (T, batch, N)
    x = in_range(activation, shape)
    x0 = in_range(activation, shape[1:], seed=1)
    J = inverse_trajectory_jacobian(W, x, activation=activation)
    ref = torch.autograd.functional.jacobian(
        lambda x: inverse_trajectory(W, x, x0=x0, activation=activation), x
    )
    if batch is not None:  # (T, B, N, T, B, N): rows do not couple; keep each row's block
        assert float(ref.abs().sum()) == pytest.approx(
            float(ref.diagonal(dim1=1, dim2=4).abs().sum())
        )
        ref = ref.diagonal(dim1=1, dim2=4).permute(4, 0, 1, 2, 3)  # (B, T, N, T, N)
    assert J.shape == ref.shape
    assert rel_err(J, ref) <= JAC_RTOL
    # the structure, read off directly
    act = get_activation(activation)
    Jb = J if batch is None else J[1]
    xb = x if batch is None else x[:, 1]
    D = act.deriv(act.inverse(xb), xb)
    assert rel_err(Jb[2, :, 2, :], torch.diag(1.0 / D[2])) <= JAC_RTOL
    assert torch.equal(Jb[2, :, 1, :], -W)
    assert float(Jb[2, :, 3, :].abs().max()) == 0.0 and float(Jb[3, :, 1, :].abs().max()) == 0.0


def test_inverse_trajectory_jacobian_overflow_raises():
    W = torch.zeros(2, 2, dtype=F64)
    x = torch.full((2, 2), 0.5, dtype=F64)
    x[1, 1] = 1e-320  # sigmoid'(logit(x)) = x (1 - x) is subnormal: 1 / it overflows
    with pytest.raises(
        ValueError,
        match=r"D\^-1\(t\) overflowed: 1 entries are Inf or NaN \(first: step t=2, unit 1: "
        r"D\^-1\(t\) = inf\)",
    ):
        inverse_trajectory_jacobian(W, x, activation="sigmoid")


@pytest.mark.parametrize("activation", INVERTIBLE)
def test_chain_rule_from_sensitivities_to_state_gradient(activation):
    """dR/dx(t) = D^-1(t) u(t) - W^T u(t+1) for a random reward R(x(1..T)), against autograd.

    u(t) = dR/db(t): autograd through the network run forward with b(t) as leaves.
    dR/dx(t): autograd of R with the states themselves as leaves (the composition x -> b -> R).
    """
    T, B, N = 6, 3, 5
    W, _, _ = system(N, None, scale=0.9)
    gen = torch.Generator().manual_seed(2)
    b = (0.5 * torch.randn(T, B, N, generator=gen, dtype=F64)).requires_grad_()
    x0 = 0.3 * torch.randn(B, N, generator=gen, dtype=F64)
    c = torch.randn(T, B, N, generator=gen, dtype=F64)
    M = torch.randn(N, N, generator=gen, dtype=F64)

    def R(x):  # couples steps and units, nonlinear
        return (c * x).sum() + torch.sin((x[1:] @ M) * x[:-1]).sum() + (x**3).sum() / 3

    x = run(W, b, x0, activation)
    (u,) = torch.autograd.grad(R(x), b)
    xs = x.detach().requires_grad_()
    (dR_dx,) = torch.autograd.grad(R(xs), xs)
    got = trajectory_state_gradient(W, x.detach(), u, activation=activation)
    assert rel_err(got, dR_dx) <= RTOL
    # it is the transpose of the trajectory Jacobian applied to u
    J = inverse_trajectory_jacobian(W, x.detach(), activation=activation)  # (B, T, N, T, N)
    JTu = torch.einsum("btisj,tbi->sbj", J, u)  # sum_{t,i} db_i(t)/dx_j(s) u_i(t)
    assert rel_err(got, JTu) <= 1e-12


def test_chain_rule_with_rnngrad_bptt_sensitivities():
    """rnngrad.bptt(sensitivities=True)'s u and the loss's explicit dL/dh(t) obey the relation."""
    T, B, D, N, K = 5, 3, 2, 4, 3
    model = rnngrad.RNN(D, N, K, dtype=F64)
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(T, B, D, generator=gen, dtype=F64)
    targets = torch.randn(T, B, K, generator=gen, dtype=F64)
    _, g = rnngrad.gradient(
        model, inputs, targets, loss="mse", algorithm=rnngrad.bptt(sensitivities=True)
    )
    with torch.no_grad():
        y, h = model(inputs)
        dL_dh = (y - targets) @ model.W_out / B  # L = (1/B) sum_t,b 0.5 ||W_out h + b_out - y||^2
    got = trajectory_state_gradient(model.W_rec.detach(), h, g["u"])
    assert rel_err(got, dL_dh) <= RTOL


def test_trajectory_state_gradient_bad_u_raises():
    W = torch.zeros(3, 3, dtype=F64)
    x = torch.zeros(4, 2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"u has shape \(4, 3\) but x's \(4, 2, 3\)"):
        trajectory_state_gradient(W, x, torch.zeros(4, 3, dtype=F64))
