"""rtrl() and the diagonal declaration on the built-in diagonal cells (LRU, eLSTM): per-unit
traces for one layer, unit-by-unit J M inside the exact influence of a stack, spatial RTRL
per layer, and a coupling hidden in a subclass caught, all in float64 against autograd
through the network's own loop (relative 1e-10)."""

from __future__ import annotations

import pytest
import torch
from net_reference import max_rel_err, net_grads, spatial_grads

import rnngrad
from rnngrad.algorithms._rtrl_network import NetRTRLState
from rnngrad.algorithms._traces_network import NetTraceState
from rnngrad.cells import ELSTM, GRU, LRU, LRUState

DT = torch.float64
T, B, D, K = 5, 3, 3, 2


class MixedLRU(LRU):
    """An LRU whose step leaks 10% of each unit's real part into the next unit: still
    declared diagonal by inheritance, which is now false."""

    def step(self, params, state, x):
        new = super().step(params, state, x)
        return LRUState(new.re + 0.1 * torch.roll(state.re, 1, dims=1), new.im)


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, B, D, generator=g, dtype=DT),
            torch.randn(T, B, K, generator=g, dtype=DT),
            torch.randint(0, 3, (T, B), generator=g).to(DT) * 0.5)


def random_state(net, seed=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(type(s)(*(0.5 * torch.randn(c.shape, generator=g, dtype=DT) for c in s))
                 for s in net.init_state(B))


def test_a_coupling_subclass_of_a_diagonal_cell_is_caught():
    torch.manual_seed(0)
    # verify=False: past the first-use check of the inherited linearize (which catches this
    # subclass too, tests/test_verify_cells.py), to rtrl()'s own diagonal probe
    net = rnngrad.Network(MixedLRU(D, 4, state_size=4, dtype=DT), K, verify=False)
    x, y, mask = data()
    with pytest.raises(ValueError, match=r"MixedLRU declares diagonal = True but its units "
                                         r"couple: d state_t\.re\[(\d)\] / d state_\(t-1\)\.re"):
        rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl(), mask=mask)
    # the dense path assumes nothing of the cell (bptt() would use the LRU's hand-derived
    # backward, which the subclass did not update: rnngrad check --cell catches that)
    _, ref = net_grads(net, x, y, mask=mask)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl(generic=True), mask=mask)
    assert max_rel_err(g, ref) <= 1e-10


@pytest.mark.parametrize("make", [lambda: LRU(D, 4, state_size=3, glu=True, dtype=DT),
                                  lambda: ELSTM(D, 4, dtype=DT)], ids=["lru", "elstm"])
def test_one_diagonal_layer_keeps_no_influence_matrix(make):
    torch.manual_seed(0)
    net = rnngrad.Network(make(), K)
    state = rnngrad.rtrl().init(net, B)
    assert isinstance(state, NetTraceState)
    cell = net.cells[0]
    S = sum(c.shape[1] for c in state.h[0])
    n_params = sum(p.numel() for p in cell.parameters())
    biggest = max(M.numel() for M in state.traces[0].values())
    assert biggest < B * S * n_params // 2  # far below the (B, S, N) influence
    x, y, mask = data()
    s0 = random_state(net)
    _, ref = net_grads(net, x, y, mask=mask, state0=s0)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl(), mask=mask, h0=s0)
    assert max_rel_err(g, ref) <= 1e-10


def test_exact_rtrl_on_a_stack_with_diagonal_and_coupled_layers():
    """LRU (C = 2, unit by unit), GRU (dense J), eLSTM (C = 1, unit by unit)."""
    torch.manual_seed(0)
    net = rnngrad.Network([LRU(D, 4, state_size=3, dtype=DT), GRU(4, 3, dtype=DT),
                           ELSTM(3, 4, dtype=DT)], K)
    assert isinstance(rnngrad.rtrl().init(net, B), NetRTRLState)
    x, y, mask = data()
    s0 = random_state(net)
    _, ref = net_grads(net, x, y, mask=mask, state0=s0)
    for algo in (rnngrad.rtrl(), rnngrad.rtrl(generic=True), rnngrad.bptt()):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, mask=mask, h0=s0)
        assert max_rel_err(g, ref) <= 1e-10, (algo.name, max_rel_err(g, ref))
    # spatial: per-unit traces on the diagonal layers, the GRU's own dense influence
    state = rnngrad.rtrl(layers="spatial").init(net, B)
    assert state.modes == ("local", "dense", "local")
    sp = spatial_grads(net, x, y, mask=mask, state0=s0,
                       layer_step=lambda c, p, s, xx: c.step(p, s, xx))
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl(layers="spatial"), mask=mask,
                            h0=s0)
    assert max_rel_err(g, sp) <= 1e-10
