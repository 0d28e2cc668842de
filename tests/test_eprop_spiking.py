"""e-prop on spiking networks (LIF, ALIF) from the generic trace engine, in float64:

- term by term against Bellec et al. 2020's equations, written out here from their paper
  and their ``compute_eligibility_traces`` (eps^v, eps^a, psi, e, the readout's filter on
  e, the learning signal through W_out^T or a random matrix), traces and gradients;
- against the oracle: autograd through the forward with the recurrent spikes detached
  where they enter the membrane potentials (Bellec's ``stop_z_gradients``), symmetric
  and random feedback (the latter through Bellec's ``matmul_random_feedback``), 1e-10;
- BPTT (through the surrogate) and RTRL exact against autograd; ``rnngrad check`` on
  "lif" and "alif".
"""

from __future__ import annotations

import pytest
import torch

import rnngrad
import rnngrad.check
from rnngrad.algorithms.eprop import random_feedback
from rnngrad.cells import ALIF, LIF

TOL = 1e-10
D, U, K, T, B = 4, 6, 2, 20, 3
F64 = torch.float64


def make(kind: str, kappa: float, *, t_ref: float = 0.0) -> rnngrad.Network:
    torch.manual_seed(1)
    if kind == "lif":
        cell = LIF(D, U, t_ref=t_ref, dtype=F64)
    else:  # Bellec's mixed population: beta = 0 makes a unit a LIF neuron
        cell = ALIF(D, U, tau_a=50.0, beta=[0, 0, 0, 0.4, 0.8, 1.2], t_ref=t_ref, dtype=F64)
    return rnngrad.Network(cell, K, readout="softmax", readout_decay=kappa)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, B, D, generator=g, dtype=F64) < 0.4).to(F64) * 1.2  # input spikes
    y = torch.randint(0, K, (T, B), generator=g)
    mask = torch.zeros(T, B, dtype=F64)
    mask[T // 2:] = 1.0 / (T - T // 2)  # a recall window, as in the evidence task
    return x, y, mask


def trajectory(net, x):
    """v_t, a_t, z_t (t = 0..T) and psi_t, the pseudo-derivative with refractoriness."""
    cell = net.cells[0]
    with torch.no_grad():
        s = cell.init_state(B)
        vs, as_, zs, free = [s.v], [getattr(s, "a", torch.zeros_like(s.v))], [cell.output(s)], [
            torch.ones_like(s.v)]
        for t in range(T):
            s = cell.step(cell.params(), s, x[t])
            vs.append(s.v)
            as_.append(getattr(s, "a", torch.zeros_like(s.v)))
            zs.append(cell.output(s))
            free.append((s.q == 0).to(F64) if cell.refractory else torch.ones_like(s.v))
    v, a, z, free = map(torch.stack, (vs, as_, zs, free))
    beta = cell.beta if isinstance(cell, ALIF) else torch.zeros(U, dtype=F64)
    A = cell.v_th + beta * a
    psi = 0.3 / cell.v_th * torch.clamp(1 - (v - A).abs() / cell.v_th, min=0) * free
    return v, a, z, psi, beta


def learning_signal(net, x, y, mask, feedback):
    """L_t = B dl_t/dz_t (T, B, U): dl/dz by autograd on the readout alone."""
    _, h = net(x)
    with torch.enable_grad():
        zt = net.readout_z(h.detach()).detach().requires_grad_(True)
        logp = torch.log_softmax(zt, -1)
        L = -(mask * logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)).sum() / B
        (dz,) = torch.autograd.grad(L, zt)
    Bfb = net.W_out.detach() if feedback is None else feedback
    return dz @ Bfb


def bellec_eprop(net, x, y, mask, feedback=None):
    """Bellec et al.'s e-prop, hardcoded: per synapse (post i, pre j),

        eps^v_t = alpha eps^v_{t-1} + z_pre_t          (z_pre = x_t, or z_{t-1} for W_rec)
        eps^a_t = (rho - beta_i psi_{t-1}) eps^a_{t-1} + psi_{t-1} eps^v_{t-1}
        e_t     = psi_t (eps^v_t - beta_i eps^a_t)      (LIF: psi_t eps^v_t)
        ebar_t  = kappa ebar_{t-1} + e_t                the readout's filter
        grad    = sum_t sum_b L_t[i] ebar_t[i, j],      no self-connections.
    """
    cell = net.cells[0]
    kappa = net.readout_decay
    v, a, z, psi, beta = trajectory(net, x)
    rho = getattr(cell, "rho", 0.0)
    L = learning_signal(net, x, y, mask, feedback)
    out = {}
    traces = {}
    for name, pre in (("W_in", x), ("W_rec", z[:-1])):  # pre_t for t = 1..T
        P = pre.shape[2]
        eps_v = torch.zeros(B, P, dtype=F64)
        eps_a = torch.zeros(B, U, P, dtype=F64)
        ebar = torch.zeros(B, U, P, dtype=F64)
        g = torch.zeros(U, P, dtype=F64)
        for t in range(1, T + 1):
            # eps^a first: it uses eps^v_{t-1} and psi_{t-1}
            eps_a = (rho - beta[:, None] * psi[t - 1][:, :, None]) * eps_a \
                + psi[t - 1][:, :, None] * eps_v[:, None, :]
            eps_v = cell.alpha * eps_v + pre[t - 1]
            e = psi[t][:, :, None] * (eps_v[:, None, :] - beta[:, None] * eps_a)
            ebar = kappa * ebar + e
            g += torch.einsum("bi,bij->ij", L[t - 1], ebar)
        if name == "W_rec":
            g.fill_diagonal_(0.0)
        out["cells.0." + name] = g
        traces[name] = (eps_v, eps_a, ebar)
    return out, traces


CASES = [("lif", 0.0, 0.0), ("lif", 0.9, 3.0), ("alif", 0.0, 0.0), ("alif", 0.8, 4.0)]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind,kappa,t_ref", CASES)
@pytest.mark.parametrize("feedback", ["symmetric", "random"])
def test_eprop_is_bellecs_equations_term_by_term(kind, kappa, t_ref, feedback):
    net = make(kind, kappa, t_ref=t_ref)
    x, y, mask = data()
    algo = rnngrad.eprop(feedback, seed=5)
    Bfb = random_feedback(net, 5) if feedback == "random" else None
    ref, traces = bellec_eprop(net, x, y, mask, Bfb)
    _, g = rnngrad.gradient(net, x, y, algorithm=algo, loss="cross_entropy", mask=mask)
    for n, r in ref.items():
        assert r.abs().max() > 0
        assert rel(g[n], r) <= TOL, (n, rel(g[n], r))
    # the engine's traces are Bellec's, term by term, at the last step
    state = algo.init(net, B)
    for t in range(T):
        state, _, _ = algo.step(net, state, x[t], y[t], mask_t=mask[t], loss="cross_entropy")
    for name, (eps_v, eps_a, ebar) in traces.items():
        M = state.traces[0][name]  # (B, C, 1, U, P): C = (v, a[, q]) per unit
        own = torch.ones(U, eps_v.shape[1], dtype=F64)
        if name == "W_rec":
            own.fill_diagonal_(0.0)  # no self-connections: never a trace
        assert rel(M[:, 0, 0], eps_v[:, None, :] * own) <= 1e-12
        if kind == "alif":
            assert rel(M[:, 1, 0], eps_a * own) <= 1e-12
        if kappa:
            assert rel(state.leak.E[name][:, 0], ebar * own) <= 1e-12


def stop_z_step(cell, p, s, x):
    """Bellec's stop_z_gradients: z_{t-1} detached where it enters v_t (W_rec and reset);
    the adaptation keeps its own spike."""
    z = cell.output(s)
    zd = z.detach()
    W = p["W_rec"] * (1 - torch.eye(U, dtype=F64))
    new = [cell.alpha * s.v + x @ p["W_in"].T + zd @ W.T - cell.v_th * zd]
    if isinstance(cell, ALIF):
        new.append(cell.rho * s.a + z)
    if cell.refractory:
        new.append(((s.q - 1).clamp(min=0) + (cell.n_ref - 1) * z).detach())
    return type(s)(*new)


def oracle(net, x, y, mask, feedback=None, *, stop_z=True):
    """Autograd through the forward, spikes detached as Bellec's stop_z_gradients; with a
    random feedback matrix, the readout's backward goes through it (Bellec's
    matmul_random_feedback: value h W_out^T, gradient to h through B)."""
    P = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    cell = net.cells[0]
    (lp,) = net.layer_params(P)
    s = cell.init_state(B)
    zs = []
    for t in range(T):
        s = stop_z_step(cell, lp, s, x[t]) if stop_z else cell.step(lp, s, x[t])
        h = cell.output(s)
        if feedback is None:
            u = h @ P["W_out"].T + P["b_out"]
        else:
            hb = h @ feedback.T
            u = h.detach() @ P["W_out"].T + P["b_out"] + (hb - hb.detach())
        zs.append(u if not zs else net.readout_decay * zs[-1] + u)
    logp = torch.log_softmax(torch.stack(zs), -1)
    L = -(mask * logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)).sum() / B
    return dict(zip(P, torch.autograd.grad(L, list(P.values()))))


@pytest.mark.parametrize("kind,kappa,t_ref", CASES[1:])
@pytest.mark.parametrize("feedback", ["symmetric", "random"])
def test_eprop_equals_autograd_with_stop_z_gradients(kind, kappa, t_ref, feedback):
    net = make(kind, kappa, t_ref=t_ref)
    x, y, mask = data(seed=2)
    Bfb = random_feedback(net, 7) if feedback == "random" else None
    ref = oracle(net, x, y, mask, Bfb)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.eprop(feedback, seed=7),
                            loss="cross_entropy", mask=mask, set_grad=True)  # shapes checked
    for n, r in ref.items():
        assert rel(g[n], r) <= TOL, (n, rel(g[n], r))
    # and it is an approximation: the exact gradient differs
    _, exact = rnngrad.gradient(net, x, y, loss="cross_entropy", mask=mask)
    assert rel(g["cells.0.W_rec"], exact["cells.0.W_rec"]) > 1e-3


@pytest.mark.parametrize("kind,kappa,t_ref", CASES[1::2])
def test_bptt_and_rtrl_through_the_surrogate_are_exact(kind, kappa, t_ref):
    net = make(kind, kappa, t_ref=t_ref)
    x, y, mask = data(seed=3)
    ref = oracle(net, x, y, mask, stop_z=False)
    for algo in (rnngrad.bptt(), rnngrad.bptt(checkpoint=6), rnngrad.rtrl(), rnngrad.tbptt(T)):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, loss="cross_entropy", mask=mask)
        for n, r in ref.items():
            assert rel(g[n], r) <= TOL, (algo.name, n, rel(g[n], r))


@pytest.mark.slow  # test_check runs every registered cell, these two included
@pytest.mark.parametrize("cell", ["lif", "alif"])
def test_rnngrad_check_covers_the_spiking_cells(cell):
    rows = rnngrad.check.run_checks(cell=cell)
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert {r.algorithm for r in rows} >= {"bptt()", "rtrl()", "rtrl(generic=True)"}
