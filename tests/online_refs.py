"""Plain references for the approximate online algorithms' tests (float64, autograd).

Layout of the recurrent parameters, as in ``rnngrad.algorithms._online``:
theta = [W_rec | W_in | b_rec] (H, P), pre_t = [h_{t-1}; x_t; 1].
"""

from __future__ import annotations

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
