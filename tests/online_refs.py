"""Plain references for the approximate online algorithms' tests (float64, autograd).

Layout of the recurrent parameters, as in ``rnngrad.algorithms._online``:
theta = [W_rec | W_in | b_rec] (H, P), pre_t = [h_{t-1}; x_t; 1].
"""

from __future__ import annotations

import math

import pytest
import torch

import rnngrad
from rnngrad.cells import get_activation
from rnngrad.readouts import loss_and_grad


def make_model(D=3, H=5, K=2, *, alpha=1.0, seed=0, readout="identity", activation="tanh"):
    torch.manual_seed(seed)
    return rnngrad.RNN(D, H, K, alpha=alpha, readout=readout, activation=activation,
                       dtype=torch.float64)


def make_data(T=6, B=4, D=3, K=2, *, seed=1, loss="mse"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, K, (T, B), generator=g)
    else:
        y = torch.randn(T, B, K, generator=g, dtype=torch.float64)
    mask = (torch.rand(T, B, generator=g) < 0.7).double()
    return x, y, mask


def pinned_loss(model, z_all, targets, mask, loss):
    B = z_all.shape[1]
    value, _ = loss_and_grad(z_all, targets, mask / B, loss=loss, readout_name=model.readout)
    return value


def params_dict(model):
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def run_graph(model, P, inputs, h0, *, cut_rec=False, detach_every_step=False):
    """The forward pass as an autograd graph over the parameter copies P.

    cut_rec: h_{t-1} detached where it enters a_t through W_rec (the leak keeps its path).
    detach_every_step: the whole state detached before each step (TBPTT(1)).
    """
    act = get_activation(model.activation)
    alpha = model.alpha
    h = h0
    zs = []
    for t in range(inputs.shape[0]):
        if detach_every_step:
            h = h.detach()
        h_rec = h.detach() if cut_rec else h
        a = inputs[t] @ P["W_in"].T + h_rec @ P["W_rec"].T + P["b_rec"]
        h = (1 - alpha) * h + alpha * act.fn(a)
        zs.append(h @ P["W_out"].T + P["b_out"])
    return torch.stack(zs)


def autograd_grads(model, inputs, targets, mask, loss, *, h0=None, **kw):
    P = params_dict(model)
    B, H = inputs.shape[1], model.hidden_size
    h0 = torch.zeros(B, H, dtype=torch.float64) if h0 is None else h0.clone().requires_grad_(True)
    z = run_graph(model, P, inputs, h0, **kw)
    L = pinned_loss(model, z, targets, mask, loss)
    names = list(P)
    wrt = [P[n] for n in names] + ([h0] if h0.requires_grad else [])
    gs = torch.autograd.grad(L, wrt, allow_unused=True)
    out = {n: (g if g is not None else torch.zeros_like(P[n])) for n, g in zip(names, gs, strict=False)}
    if h0.requires_grad:
        out["h0"] = gs[-1] if gs[-1] is not None else torch.zeros_like(h0)
    return out


def exact_influence(model, inputs_1):
    """Exact M_T[k, i, j] = dh_T^k / theta_ij for one sequence inputs_1 (T, D), h0 = 0."""
    act = get_activation(model.activation)
    alpha = model.alpha
    H = model.hidden_size
    theta0 = torch.cat([model.W_rec.detach(), model.W_in.detach(),
                        model.b_rec.detach().unsqueeze(1)], 1)

    def f(theta):
        h = torch.zeros(H, dtype=torch.float64)
        for t in range(inputs_1.shape[0]):
            pre = torch.cat([h, inputs_1[t], torch.ones(1, dtype=torch.float64)])
            h = (1 - alpha) * h + alpha * act.fn(theta @ pre)
        return h

    return torch.autograd.functional.jacobian(f, theta0)  # (H, H, P)


def run_steps(algo, model, inputs, targets=None, loss="mse"):
    """Drive init / step over a sequence; return the final state."""
    state = algo.init(model, inputs.shape[1])
    for t in range(inputs.shape[0]):
        state, _, _ = algo.step(model, state, inputs[t],
                                None if targets is None else targets[t], loss=loss)
    return state


def adding_batch(T, B, *, generator):
    """The adding problem of length T: inputs (T, B, 2), targets (T, B, 1), mask last step."""
    values = torch.rand(T, B, generator=generator)
    first = torch.randint(0, T // 2, (B,), generator=generator)
    second = torch.randint(T // 2, T, (B,), generator=generator)
    markers = torch.zeros(T, B)
    cols = torch.arange(B)
    markers[first, cols] = 1.0
    markers[second, cols] = 1.0
    inputs = torch.stack([values, markers], -1)
    targets = torch.zeros(T, B, 1)
    targets[-1, :, 0] = values[first, cols] + values[second, cols]
    mask = torch.zeros(T, B)
    mask[-1] = 1.0
    return inputs, targets, mask


# --- shared checks for the unbiased estimators (UORO, KF-RTRL) -------------------------


def _mean_error(samples, M):
    """||mean - M|| and the standard error sqrt(tr Cov / n) it should be close to."""
    n = samples.shape[0]
    mean = samples.mean(0)
    var = (samples - mean).square().sum() / (n - 1)
    return (mean - M).norm().item(), math.sqrt(var.item() / n)


def check_unbiased_influence(samples_fn, alpha):
    """samples_fn(model, x1 (T, D), n, seed) -> n independent estimates (n, H, H, P) of
    RTRL's influence M_T. Each of 16 group means is within 4 standard errors of the exact
    influence, and quadrupling n shrinks the error like 1/sqrt(n)."""
    model = make_model(alpha=alpha, H=4, D=2)
    x, _, _ = make_data(T=5, B=1, D=2)
    M = exact_influence(model, x[:, 0])
    groups, n = 16, 500
    rms = []
    for n_i, seed in ((n, 0), (4 * n, 1)):
        s = samples_fn(model, x[:, 0], groups * n_i, seed).view(groups, n_i, *M.shape)
        errs = []
        for k in range(groups):
            err, se = _mean_error(s[k], M)
            assert err <= 4 * se, (n_i, err, se)
            errs.append(err)
        rms.append(math.sqrt(sum(e * e for e in errs) / groups))
    # quadrupling n halves the (root-mean-square over groups) error: the 1/sqrt(n) rate
    assert 0.35 < rms[1] / rms[0] < 0.7, rms


def check_unbiased_gradient(factory):
    """With n copies of one sequence the emitted gradient is the mean of n independent
    estimates of the exact gradient of that sequence; the readout gradient is exact."""
    model = make_model(H=4, D=2)
    x, y, _ = make_data(T=5, B=1, D=2)
    n = 20000
    X = x.expand(-1, n, -1).contiguous()
    Y = y.expand(-1, n, -1).contiguous()
    _, g = rnngrad.gradient(model, X, Y, algorithm=factory(seed=5))
    _, exact = rnngrad.gradient(model, x, y)
    rel = ((g["W_rec"] - exact["W_rec"]).norm() / exact["W_rec"].norm()).item()
    assert rel < 0.1, rel
    torch.testing.assert_close(g["W_out"], exact["W_out"], rtol=1e-10, atol=1e-12)


def check_h0_and_eps_raise(factory):
    model = make_model()
    with pytest.raises(ValueError, match="h0"):
        factory().init(model, 2, h0=torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps must be a positive float"):
        factory(eps=0.0)


def check_fresh_noise_but_reproducible(factory):
    model = make_model()
    x, y, _ = make_data()
    a = factory(seed=1)
    g1 = rnngrad.gradient(model, x, y, algorithm=a)[1]["W_rec"]
    g2 = rnngrad.gradient(model, x, y, algorithm=a)[1]["W_rec"]
    g3 = rnngrad.gradient(model, x, y, algorithm=factory(seed=1))[1]["W_rec"]
    assert not torch.equal(g1, g2) and torch.equal(g1, g3)
