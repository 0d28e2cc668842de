"""The per-unit trace engine's layout on rnngrad.RNN (one Elman layer under the flat names,
the Network path for e-prop, RFLO and SnAp-1): traces side by side in one tensor, e-prop's
trace never formed where the cell declares a zero eligibility_decay, the declaration
checked, the bound parameters following a replaced parameter, rnngrad.run keeping the
state's form. Gradients against the same rule without the structure (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnngrad
from rnngrad.algorithms._traces_network import NetTraceState
from rnngrad.cells import Elman

D, H, K = 3, 5, 2


def data(T=6, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=torch.float64)
    y = torch.randn(T, B, K, generator=g, dtype=torch.float64)
    return x, y


def run_steps(algo, model, x, y, h0=None):
    s = algo.init(model, x.shape[1], **({} if h0 is None else {"h0": h0}))
    out = []
    for t in range(x.shape[0]):
        s, _, g = algo.step(model, s, x[t], None if t == 2 else y[t])
        out.append(g)
    return s, out


@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("rule", ["eprop", "rflo", "snap1"])
def test_rnn_state_layout(rule, alpha):
    torch.manual_seed(0)
    m = rnngrad.RNN(D, H, K, alpha=alpha, dtype=torch.float64)
    x, y = data()
    s, _ = run_steps(getattr(rnngrad, rule)(), m, x, y)
    assert isinstance(s, NetTraceState)
    assert isinstance(s.h, torch.Tensor) and s.h.shape == (3, H)
    tr = s.traces[0]
    if rule != "snap1" and alpha == 1.0:  # the eligibility Jacobian is 0: never formed
        assert tr == {} and s.groups[0][0].X is None
        return
    (grp,) = s.groups[0]
    assert grp.X.shape == (3, 1, 1, H, D + H + 1)  # [W_in | W_rec | b_rec]
    assert list(tr) == ["W_in", "W_rec", "b_rec"]
    for n, P in zip(tr, (D, H, 1)):
        assert tr[n].shape == (3, 1, 1, H, P) and tr[n]._base is grp.X


class Undeclared(Elman):
    """The Elman cell with its constant eligibility Jacobian not declared: the engine takes
    it from linearize at every step (the generic path)."""

    eligibility_decay = None


class WrongDecay(Elman):
    @property
    def eligibility_decay(self):
        return 0.5 * (1.0 - self.alpha)


def copy_into(net, rnn):
    with torch.no_grad():
        for n in ("W_in", "W_rec", "b_rec"):
            getattr(net.cells[0], n).copy_(getattr(rnn, n))
        net.W_out.copy_(rnn.W_out)
        net.b_out.copy_(rnn.b_out)
    return net


@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("rule", ["eprop", "rflo"])
def test_declared_decay_equals_the_generic_path(rule, alpha):
    torch.manual_seed(0)
    m = rnngrad.RNN(D, H, K, alpha=alpha, dtype=torch.float64)
    net = copy_into(rnngrad.Network(Undeclared(D, H, alpha=alpha, dtype=torch.float64), K), m)
    x, y = data()
    h0 = torch.randn(3, H, dtype=torch.float64)
    s1, g1 = run_steps(getattr(rnngrad, rule)(), m, x, y, h0)
    s2, g2 = run_steps(getattr(rnngrad, rule)(), net, x, y, h0)
    assert s2.traces[0] != {}  # undeclared: the trace is formed
    for a, b in zip(g1, g2):
        if a is None:
            assert b is None
            continue
        for k in ("W_in", "W_rec", "b_rec"):
            torch.testing.assert_close(a[k], b["cells.0." + k], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(a["h0"], b["h0"][0].h, rtol=1e-12, atol=1e-13)


def test_a_wrong_decay_declaration_is_refused():
    net = rnngrad.Network(WrongDecay(D, H, alpha=0.6, dtype=torch.float64), K)
    with pytest.raises(ValueError, match="declares eligibility_decay"):
        rnngrad.eprop().init(net, 2)


@pytest.mark.parametrize("rule", ["eprop", "snap1"])
def test_a_replaced_parameter_is_seen_by_the_next_step(rule):
    torch.manual_seed(0)
    m = rnngrad.RNN(D, H, K, alpha=0.6, dtype=torch.float64)
    x, y = data(T=2)
    algo = getattr(rnngrad, rule)()
    s = algo.init(m, 3)
    s, _, _ = algo.step(m, s, x[0], y[0])
    new_rec = torch.randn(H, H, dtype=torch.float64) * 0.3
    new_in = torch.randn(H, D, dtype=torch.float64) * 0.3
    m.W_rec = nn.Parameter(new_rec.clone())  # a new Parameter
    m.W_in.data = new_in.clone()  # the same Parameter, other storage
    _, _, g = algo.step(m, s, x[1], y[1])
    # the reference: the same two steps on a model that has the new weights for step 2
    torch.manual_seed(0)
    ref = rnngrad.RNN(D, H, K, alpha=0.6, dtype=torch.float64)
    ra = getattr(rnngrad, rule)()
    rs = ra.init(ref, 3)
    rs, _, _ = ra.step(ref, rs, x[0], y[0])
    with torch.no_grad():
        ref.W_rec.copy_(new_rec)
        ref.W_in.copy_(new_in)
    _, _, rg = ra.step(ref, rs, x[1], y[1])
    for k in rg:
        torch.testing.assert_close(g[k], rg[k], rtol=1e-12, atol=1e-13, msg=k)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("rule", ["eprop", "snap1"])
def test_run_on_rnn_keeps_the_state_form(rule, alpha):
    torch.manual_seed(0)
    m = rnngrad.RNN(D, H, K, alpha=alpha, dtype=torch.float64)
    x, y = data(T=7, B=2)
    h0 = torch.randn(2, H, dtype=torch.float64)
    algo = getattr(rnngrad, rule)()
    s = algo.init(m, 2, h0=h0)
    total = None
    for t in range(5):
        s, _, g = algo.step(m, s, x[t], y[t])
        total = g if total is None else {k: total[k] + g[k] for k in g}
    _, _, g_next = algo.step(m, s, x[5], y[5])
    c = algo.init(m, 2, h0=h0)
    c, _, gc = rnngrad.run(algo, m, c, x[:5], y[:5])  # closed form over the chunk
    assert isinstance(c.h, torch.Tensor) and isinstance(gc["h0"], torch.Tensor)
    for k in total:
        torch.testing.assert_close(gc[k], total[k], rtol=1e-10, atol=1e-12, msg=k)
    _, _, gc_next = algo.step(m, c, x[5], y[5])  # the state steps on
    for k in g_next:
        torch.testing.assert_close(gc_next[k], g_next[k], rtol=1e-10, atol=1e-12, msg=k)
