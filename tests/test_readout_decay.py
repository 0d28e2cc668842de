"""The leaky readout ``Network(readout_decay=kappa)``: z_t = kappa z_{t-1} + W_out h_t + b_out.

- ``Network.forward`` against the filter written out here;
- every exact algorithm (BPTT, checkpointed, truncated with k >= T, RTRL structured and
  generic), through the whole-sequence and the step paths, equal to autograd through
  ``net(...)`` in float64 (relative error 1e-10), with masks, h0, a reward and every loss;
- TBPTT(k) equal to autograd with the cells' state and the readout's state cut every k steps;
- the per-unit trace rules equal to the gradient of the graph they differentiate, with
  the filter applied to the trace; UORO unbiased;
- bad values of readout_decay, and rnngrad.RNN refusing it.
"""

from __future__ import annotations

import math

import pytest
import torch
from cell_zoo import MGU, Adaptive, TanhGate
from net_reference import max_rel_err, unit_cut_step

import rnngrad
from rnngrad.cells import ALIF, GRU, LIF, Elman

TOL = 1e-10
D, K, KAPPA = 3, 2, 0.8
F64 = {"dtype": torch.float64}


def make_net(kind: str, *, readout="identity", kappa=KAPPA, seed=0) -> rnngrad.Network:
    torch.manual_seed(seed)
    cells = {
        "elman": lambda: [Elman(D, 4, alpha=0.6, **F64)],
        "gru": lambda: [GRU(D, 4, **F64)],
        "mgu": lambda: [MGU(D, 4)],
        "adaptive": lambda: [Adaptive(D, 4)],  # an output that is not a state component
        "lif": lambda: [LIF(D, 5, **F64)],
        "alif": lambda: [ALIF(D, 5, beta=[0, 0, 0.3, 0.6, 1.0], t_ref=2.0, **F64)],
        "stack": lambda: [GRU(D, 4, **F64), Adaptive(4, 3)],
    }[kind]()
    return rnngrad.Network(cells, K, readout=readout, readout_decay=kappa)


KINDS = ["gru", "adaptive", "alif", "stack"]  # hand-derived and generic BPTT, outputs, stacks


def data(T=7, B=3, *, loss="mse", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(T, B, D, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, K, (T, B), generator=g)
    else:
        y = torch.randn(T, B, K, generator=g, dtype=torch.float64)
    mask = torch.randint(0, 3, (T, B), generator=g).double() * 0.5
    return x, y, mask


def counter(state, field: str) -> bool:
    """A spiking cell's refractory counter: whole steps, no gradient."""
    return field == "q" and type(state).__name__.endswith("RefractoryState")


def random_state(net, B, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in net.init_state(B):
        comps = []
        for f, c in zip(s._fields, s):
            if counter(s, f):
                comps.append(torch.randint(0, 2, c.shape, generator=g).to(c.dtype))
            else:
                comps.append(0.5 * torch.randn(c.shape, generator=g, dtype=c.dtype))
        out.append(type(s)(*comps))
    return tuple(out)


def reward(h):
    T = h.shape[0]
    w = torch.linspace(0.5, 1.5, T, dtype=h.dtype).view(T, 1, 1)
    return (w * torch.sin(h)).sum() - 0.25 * (h * h).mean()


def loss_of_y(y, targets, loss):
    """Per-step, per-example loss (T, B) from the network's outputs y = g(z)."""
    if loss == "mse":
        return 0.5 * ((y - targets) ** 2).sum(-1)
    if loss == "cross_entropy":  # softmax readout
        return -torch.log(y.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    raise ValueError(loss)


def forward_grads(net, x, y, *, loss="mse", mask=None, state0=None, reward=None):
    """The oracle: autograd through ``net(x, h0)`` (Network.forward)."""
    params = dict(net.named_parameters())
    leaves = list(params.values())
    h0 = None
    if state0 is not None:
        h0 = tuple(type(s)(*(c.detach().clone().requires_grad_(not counter(s, f))
                             for f, c in zip(s._fields, s))) for s in state0)
        leaves += [c for s in h0 for c in s if c.requires_grad]
    out, h = net(x, h0)
    T, B = x.shape[:2]
    m = torch.ones(T, B, dtype=x.dtype) if mask is None else mask
    L = (m * loss_of_y(out, y, loss)).sum() / B
    if reward is not None:
        L = L - reward(h)
    gs = torch.autograd.grad(L, leaves, allow_unused=True)
    gs = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, gs)]
    grads = dict(zip(params, gs[:len(params)]))
    if state0 is not None:  # a refractory counter q has no gradient
        it = iter(gs[len(params):])
        grads["h0"] = tuple(type(s)(*(torch.zeros_like(c) if counter(s, f) else next(it)
                                      for f, c in zip(s._fields, s))) for s in state0)
    return L.detach(), grads


def both_paths(algo):
    return [algo] if algo.sequence is None else [algo, algo._replace(sequence=None)]


# ---- the forward pass ------------------------------------------------------------------------


def test_forward_is_the_written_out_filter():
    net = make_net("gru")
    x, _, _ = data()
    y, h = net(x)
    W, b = net.W_out.detach(), net.b_out.detach()
    z, ref = torch.zeros(3, K, dtype=torch.float64), []
    for t in range(x.shape[0]):
        z = KAPPA * z + h[t].detach() @ W.T + b
        ref.append(z)
    torch.testing.assert_close(y.detach(), torch.stack(ref), rtol=1e-14, atol=1e-14)
    plain = make_net("gru", kappa=0.0)
    y0, h0 = plain(x)
    torch.testing.assert_close(y0, h0 @ plain.W_out.T + plain.b_out, rtol=0, atol=0)
    assert "readout_decay=0.8" in repr(net) and "readout_decay" not in repr(plain)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_readout_decay_is_refused(bad):
    with pytest.raises(ValueError, match=r"readout_decay must be a number kappa in \[0, 1\)"):
        rnngrad.Network(Elman(D, 3), K, readout_decay=bad)


def test_rnn_does_not_take_readout_decay():
    with pytest.raises(TypeError, match="readout_decay"):
        rnngrad.RNN(D, 3, K, readout_decay=0.5)
    assert rnngrad.RNN(D, 3, K).readout_decay == 0.0


# ---- exact algorithms --------------------------------------------------------------------------

EXACT = {
    "bptt": lambda T: rnngrad.bptt(),
    "bptt_ckpt1": lambda T: rnngrad.bptt(checkpoint=1),
    "bptt_ckpt3": lambda T: rnngrad.bptt(checkpoint=3),
    "tbptt_T": lambda T: rnngrad.tbptt(T),
    "tbptt_T+3": lambda T: rnngrad.tbptt(T + 3),
    "rtrl": lambda T: rnngrad.rtrl(),
    "rtrl_generic": lambda T: rnngrad.rtrl(generic=True),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", EXACT)
def test_exact_algorithms_equal_autograd_through_forward(kind, name):
    net = make_net(kind)
    x, y, mask = data()
    _, ref = forward_grads(net, x, y, mask=mask)
    for algo in both_paths(EXACT[name](x.shape[0])):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, mask=mask)
        assert {k: v.shape for k, v in g.items()} == {k: v.shape for k, v in ref.items()}
        assert max_rel_err(g, ref) <= TOL, (algo.name, max_rel_err(g, ref))


@pytest.mark.parametrize("kind", ["alif", "stack"])
@pytest.mark.parametrize("name", ["bptt", "bptt_ckpt3", "tbptt_T", "rtrl", "rtrl_generic"])
def test_exact_with_h0_reward_and_cross_entropy(kind, name):
    net = make_net(kind, readout="softmax")
    x, y, mask = data(T=6, loss="cross_entropy")
    s0 = random_state(net, 3)
    value, ref = forward_grads(net, x, y, loss="cross_entropy", mask=mask, state0=s0,
                               reward=reward)
    for algo in both_paths(EXACT[name](6)):
        v, g = rnngrad.gradient(net, x, y, algorithm=algo, loss="cross_entropy", mask=mask,
                                h0=s0, reward=reward)
        assert abs(float(v - value)) <= 1e-12 * abs(float(value))
        assert max_rel_err(g, ref) <= TOL, (algo.name, max_rel_err(g, ref))


def test_the_filter_changes_the_gradient():
    """kappa really enters: the gradients at kappa = 0.8 and at 0 differ."""
    x, y, mask = data()
    _, a = rnngrad.gradient(make_net("lif"), x, y, mask=mask)
    _, b = rnngrad.gradient(make_net("lif", kappa=0.0), x, y, mask=mask)
    assert max_rel_err(a, b) > 0.1


def cut_reference(net, x, y, k, *, mask, state0):
    """Autograd with the whole state, the cells' and the readout's z, detached every k steps."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    lp = net.layer_params(params)
    state, z = state0, None
    T, B = x.shape[:2]
    L = x.new_zeros(())
    for t in range(T):
        if t > 0 and t % k == 0:
            state = tuple(type(s)(*(c.detach() for c in s)) for s in state)
            z = z.detach()
        state, h = net.step(lp, state, x[t])
        u = h @ params["W_out"].T + params["b_out"]
        z = u if z is None else KAPPA * z + u
        L = L + (mask[t] * 0.5 * ((z - y[t]) ** 2).sum(-1)).sum() / B
    g = torch.autograd.grad(L, list(params.values()))
    return dict(zip(params, g))


@pytest.mark.parametrize("kind", ["alif", "stack"])
@pytest.mark.parametrize("k", [1, 3])
def test_tbptt_cuts_the_readout_state_too(kind, k):
    net = make_net(kind)
    x, y, mask = data(T=8)
    s0 = random_state(net, 3)
    ref = cut_reference(net, x, y, k, mask=mask, state0=s0)
    for algo in both_paths(rnngrad.tbptt(k)):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, mask=mask, h0=s0)
        g.pop("h0")
        assert max_rel_err(g, ref) <= TOL, (algo.name, max_rel_err(g, ref))


@pytest.mark.parametrize("kind", ["alif"])
def test_online_steps_sum_to_gradient(kind):
    net = make_net(kind)
    x, y, mask = data()
    for algo in (rnngrad.rtrl(), rnngrad.tbptt(2), rnngrad.bptt(), rnngrad.bptt(checkpoint=2),
                 rnngrad.snap1(), rnngrad.eprop(), rnngrad.uoro(seed=3)):
        _, ref = rnngrad.gradient(net, x, y, algorithm=algo._replace(sequence=None)
                                  if algo.sequence else algo, mask=mask)
        if algo.rng is not None:
            algo = rnngrad.uoro(seed=3)
        state = algo.init(net, 3)
        total, loss = None, 0.0
        for t in range(x.shape[0]):
            state, out, g = algo.step(net, state, x[t], y[t], mask_t=mask[t])
            loss = loss + out.loss
            total = rnngrad.algorithms.base.add_grads(total, g)
        state, g = algo.flush(net, state)
        total = rnngrad.algorithms.base.add_grads(total, g)
        assert max_rel_err(total, ref) <= TOL, algo.name
        value, _ = forward_grads(net, x, y, mask=mask)
        assert abs(float(loss - value)) <= 1e-12 * float(value), algo.name


# ---- the approximations -----------------------------------------------------------------------


def filtered_cut_grads(net, x, y, *, mask, layer_step, state0=None):
    """Autograd of the graph the per-unit trace rules differentiate (one layer): the step
    ``layer_step`` (cross-unit paths cut), the readout's filter as it is; with ``state0``
    also its gradient (a refractory counter q has none)."""
    P = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    (lp,) = net.layer_params(P)
    (_, cell), = net.layers()
    if state0 is None:
        (s,) = net.init_state(x.shape[1])
    else:
        s = type(state0[0])(*(c.detach().clone().requires_grad_(not counter(state0[0], f))
                              for f, c in zip(state0[0]._fields, state0[0])))
    s0 = s
    T, B = x.shape[:2]
    hs = []
    for t in range(T):
        s = layer_step(cell, lp, s, x[t])
        hs.append(cell.output(s))
    h = torch.stack(hs)
    u = h @ P["W_out"].T + P["b_out"]
    zs, z = [], None
    for t in range(T):
        z = u[t] if z is None else KAPPA * z + u[t]
        zs.append(z)
    L = (mask * 0.5 * ((torch.stack(zs) - y) ** 2).sum(-1)).sum() / B
    leaves = list(P.values()) + [c for c in s0 if c.requires_grad]
    g = list(torch.autograd.grad(L, leaves))
    out = dict(zip(P, g[:len(P)]))
    if state0 is not None:
        it = iter(g[len(P):])
        out["h0"] = (type(s0)(*(next(it) if c.requires_grad else torch.zeros_like(c)
                                for c in s0)),)
    return out


def stop_z_step(cell, p, s, x):
    """Bellec's e-prop graph for LIF/ALIF: z_{t-1} detached where it enters v_t."""
    z = cell.output(s)
    zd = z.detach()
    W = p["W_rec"] * cell.offdiag
    new = [cell.alpha * s.v + x @ p["W_in"].T + zd @ W.T - cell.v_th * zd]
    if cell.adaptive:
        new.append(cell.rho * s.a + z)
    if cell.refractory:
        new.append(((s.q - 1).clamp(min=0) + (cell.n_ref - 1) * z).detach())
    return type(s)(*new)


@pytest.mark.parametrize("kind", ["mgu", "adaptive", "lif", "alif"])
def test_trace_rules_filter_the_trace(kind):
    net = make_net(kind)
    x, y, mask = data()
    ref = filtered_cut_grads(net, x, y, mask=mask, layer_step=unit_cut_step)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.snap1(), mask=mask)
    assert {k: v.shape for k, v in g.items()} == {k: v.shape for k, v in ref.items()}
    assert max_rel_err(g, ref) <= TOL, max_rel_err(g, ref)
    if kind in ("lif", "alif"):
        ref = filtered_cut_grads(net, x, y, mask=mask, layer_step=stop_z_step)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.eprop(), mask=mask)
    assert max_rel_err(g, ref) <= TOL, max_rel_err(g, ref)


@pytest.mark.parametrize("kind", ["adaptive", "alif"])
def test_trace_rules_with_h0(kind):
    net = make_net(kind)
    x, y, mask = data()
    s0 = random_state(net, 3)
    step = stop_z_step if kind == "alif" else unit_cut_step
    ref = filtered_cut_grads(net, x, y, mask=mask, layer_step=step, state0=s0)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.eprop(), mask=mask, h0=s0)
    assert float(torch.cat([c.flatten() for c in ref["h0"][0]]).abs().max()) > 0
    assert max_rel_err(g, ref) <= TOL, max_rel_err(g, ref)


def test_trace_rules_refuse_a_leaky_readout_on_a_stack():
    net = make_net("stack")
    x, y, _ = data()
    for algo in (rnngrad.eprop(), rnngrad.snap1()):
        with pytest.raises(ValueError, match=r"readout_decay.*one layer"):
            rnngrad.gradient(net, x, y, algorithm=algo)


class _Rolled(TanhGate):
    """A user's cell whose output mixes units (h rolled by one): not unit by unit."""

    def output(self, state):
        return state.h.roll(1, dims=1)


def test_trace_rules_name_the_cells_a_leaky_readout_needs():
    from emit_zoo import Readout

    x, y, _ = data()
    torch.manual_seed(0)
    emits = rnngrad.Network(Readout(D, 4), K, readout_decay=KAPPA)
    with pytest.raises(ValueError, match=r"eprop\(\) with a leaky readout needs a cell whose "
                                         r"output is output\(state\); Readout writes emit"):
        rnngrad.gradient(emits, x, y, algorithm=rnngrad.eprop())
    rolled = rnngrad.Network(_Rolled(D, 4), K, readout_decay=KAPPA)
    with pytest.raises(ValueError, match=r"snap1\(\) with a leaky readout .* output of _Rolled "
                                         r"is not unit by unit"):
        rnngrad.gradient(rolled, x, y, algorithm=rnngrad.snap1())
    # the exact algorithms take both
    for net in (emits, rolled):
        _, ref = forward_grads(net, x, y)
        for algo in (rnngrad.bptt(), rnngrad.rtrl()):
            assert max_rel_err(rnngrad.gradient(net, x, y, algorithm=algo)[1], ref) <= TOL


def test_rtrl_on_a_diagonal_cell_with_a_leaky_readout():
    """rtrl() keeps the dense influence there (per-unit traces cannot filter emit's own
    parameters): still exact."""
    from emit_zoo import DiagEmit

    torch.manual_seed(0)
    net = rnngrad.Network(DiagEmit(D, 4), K, readout_decay=KAPPA)
    x, y, mask = data()
    s0 = random_state(net, 3)
    _, ref = forward_grads(net, x, y, mask=mask, state0=s0, reward=reward)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl(), mask=mask, h0=s0, reward=reward)
    assert max_rel_err(g, ref) <= TOL, max_rel_err(g, ref)


def _filtered_influence(net, x1):
    """d (r_T) / d theta (H, N) for one sequence x1 (T, D) from the zero state, where
    r_t = kappa r_{t-1} + h_t is the readout's filtered input, by autograd."""
    names = net.recurrent_names()
    P0 = dict(net.named_parameters())
    shapes = [P0[n].shape for n in names]
    flat0 = torch.cat([P0[n].detach().reshape(-1) for n in names])

    def f(flat):
        P, off = dict(P0), 0
        for n, sh in zip(names, shapes):
            k = math.prod(sh)
            P[n] = flat[off:off + k].view(sh)
            off += k
        state, r = net.init_state(1), None
        lp = net.layer_params(P)
        for t in range(x1.shape[0]):
            state, h = net.step(lp, state, x1[t:t + 1])
            r = h if r is None else KAPPA * r + h
        return r[0]

    return torch.autograd.functional.jacobian(f, flat0)


@pytest.mark.parametrize("kind", ["adaptive", "alif"])
def test_uoro_is_unbiased_for_the_filtered_influence(kind):
    net = make_net(kind)
    x, _, _ = data(T=4, B=1)
    M = _filtered_influence(net, x[:, 0])
    assert M.abs().max() > 0
    groups, n = 4, 400
    X = x.expand(-1, groups * n, -1).contiguous()
    algo = rnngrad.uoro(seed=0)
    state = algo.init(net, groups * n)
    for t in range(4):
        state, _, _ = algo.step(net, state, X[t], None)
    H = net.hidden_size
    r_tilde = state.h_tilde[:, -H:]  # the filter's block of the augmented state
    s = (r_tilde[:, :, None] * state.theta_tilde[:, None, :]).view(groups, n, *M.shape)
    for k in range(groups):
        mean = s[k].mean(0)
        se = math.sqrt((s[k] - mean).square().sum().item() / (n - 1) / n)
        assert (mean - M).norm().item() <= 4 * se
