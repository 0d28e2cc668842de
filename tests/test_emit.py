"""The protocol's ``emit`` (an output that depends on parameters and on the step's input) and
the ``diagonal`` declaration, on user cells (emit_zoo) that declare nothing else.

Exact algorithms equal autograd through the network's own loop (``net_reference``, which
calls ``emit``) in float64 at relative error <= 1e-10; rtrl(layers="spatial") and the
trace rules equal autograd through the graphs they differentiate exactly; a cell
declared diagonal whose units couple, complex tensors, and bad ``layers`` modes raise
errors that name what was given and what was expected."""

from __future__ import annotations

import math

import pytest
import torch
from emit_zoo import (
    ComplexState,
    DiagEmit,
    DiagPlain,
    FakeDiagonal,
    Readout,
    SharedRow,
    SneakyEmit,
)
from net_reference import max_rel_err, net_grads, spatial_grads

import rnngrad
from rnngrad.algorithms import _traces_network
from rnngrad.cells import Elman

TOL = 1e-10
D, K = 3, 2
F64 = {"dtype": torch.float64}


def make(kind: str, *, readout="identity", seed=0) -> rnngrad.Network:
    torch.manual_seed(seed)
    cells = {
        "readout": lambda: [Readout(D, 4)],
        "diagemit": lambda: [DiagEmit(D, 4)],
        "diagplain": lambda: [DiagPlain(D, 5)],
        "readout+diagemit": lambda: [Readout(D, 4), DiagEmit(4, 3)],
        "three": lambda: [DiagEmit(D, 4), Readout(4, 3), DiagEmit(3, 4)],
        "elman2": lambda: [Elman(D, 4, **F64), Elman(4, 3, alpha=0.6, **F64)],
    }[kind]()
    return rnngrad.Network(cells, K, readout=readout)


def data(T=5, B=3, *, loss="mse", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, K, (T, B), generator=g)
    else:
        y = torch.randn(T, B, K, generator=g, dtype=torch.float64)
    mask = torch.randint(0, 3, (T, B), generator=g).double() * 0.5
    return x, y, mask


def random_state(net, B, seed=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(type(s)(*(0.5 * torch.randn(c.shape, generator=g, dtype=c.dtype) for c in s))
                 for s in net.init_state(B))


def reward(h):
    T = h.shape[0]
    w = torch.linspace(0.5, 1.5, T, dtype=h.dtype).view(T, 1, 1)
    return (w * torch.sin(h)).sum() - 0.25 * (h * h).mean()


EXACT = {
    "bptt": lambda T: rnngrad.bptt(),
    "bptt_ckpt2": lambda T: rnngrad.bptt(checkpoint=2),
    "tbptt_T": lambda T: rnngrad.tbptt(T),
    "rtrl": lambda T: rnngrad.rtrl(),
    "rtrl_generic": lambda T: rnngrad.rtrl(generic=True),
}
KINDS = ["readout", "diagemit", "readout+diagemit", "three"]


def both_paths(algo):
    return [algo] if algo.sequence is None else [algo, algo._replace(sequence=None)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", EXACT)
def test_exact_algorithms_through_emit_equal_autograd(kind, name):
    net = make(kind)
    x, y, mask = data()
    _, ref = net_grads(net, x, y, mask=mask)
    for algo in both_paths(EXACT[name](x.shape[0])):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, mask=mask)
        assert set(g) == {n for n, _ in net.named_parameters()}
        assert max_rel_err(g, ref) <= TOL, (algo.name, max_rel_err(g, ref))


@pytest.mark.parametrize("kind", ["readout+diagemit", "three"])
@pytest.mark.parametrize("name", ["bptt", "rtrl", "rtrl_generic"])
def test_exact_through_emit_with_h0_reward_and_cross_entropy(kind, name):
    net = make(kind, readout="softmax")
    x, y, mask = data(T=6, loss="cross_entropy")
    s0 = random_state(net, 3)
    _, ref = net_grads(net, x, y, loss="cross_entropy", mask=mask, state0=s0, reward=reward)
    for algo in both_paths(EXACT[name](6)):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, loss="cross_entropy", mask=mask,
                                h0=s0, reward=reward)
        assert max_rel_err(g, ref) <= TOL, (algo.name, max_rel_err(g, ref))


def test_network_forward_calls_emit():
    net = make("readout+diagemit")
    x, _, _ = data()
    params = net.layer_params()
    state = net.init_state(3)
    for t in range(x.shape[0]):
        s0 = net.cells[0].step(params[0], state[0], x[t])
        h0 = net.cells[0].emit(params[0], s0, x[t])
        s1 = net.cells[1].step(params[1], state[1], h0)
        h = net.cells[1].emit(params[1], s1, h0)
        state = (s0, s1)
    _, hs = net(x)
    torch.testing.assert_close(hs[-1], h, rtol=0, atol=0)


# --- one diagonal layer: rtrl() keeps per-unit traces --------------------------------------


@pytest.mark.parametrize("kind", ["diagemit", "diagplain"])
def test_rtrl_on_one_diagonal_layer_keeps_per_unit_traces(kind):
    net = make(kind)
    x, y, mask = data(T=7)
    s0 = random_state(net, 3)
    algo = rnngrad.rtrl()
    state = algo.init(net, 3)
    assert isinstance(state, _traces_network.NetTraceState)
    S = sum(c.shape[1] for c in state.h[0])
    n_params = sum(p.numel() for p in net.cells[0].parameters())
    kept = sum(M.numel() for M in state.traces[0].values())
    assert kept <= 3 * S * n_params // net.cells[0].n_units  # O(B C |params|), no S x N
    _, ref = net_grads(net, x, y, mask=mask, state0=s0, reward=reward)
    for a in (rnngrad.rtrl(), rnngrad.snap1()):
        _, g = rnngrad.gradient(net, x, y, algorithm=a, mask=mask, h0=s0, reward=reward)
        assert max_rel_err(g, ref) <= TOL, (a.name, max_rel_err(g, ref))


# --- rtrl(layers="spatial") ----------------------------------------------------------------


def _plain_step(cell, p, s, x):
    return cell.step(p, s, x)


@pytest.mark.parametrize("kind", ["readout+diagemit", "three", "elman2"])
def test_spatial_rtrl_is_the_gradient_of_the_layer_graphs(kind):
    """Layer l's parameters: autograd through layer l's whole recurrence, with every layer
    above it seeing its own previous state detached (only the same step's path down)."""
    net = make(kind)
    x, y, mask = data(T=6)
    s0 = random_state(net, 3)
    ref = spatial_grads(net, x, y, mask=mask, state0=s0, layer_step=_plain_step)
    for algo in (rnngrad.rtrl(layers="spatial"), rnngrad.rtrl(layers="spatial", generic=True)):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, mask=mask, h0=s0)
        assert max_rel_err(g, ref) <= TOL, (algo.name, max_rel_err(g, ref))
    assert not rnngrad.rtrl(layers="spatial").exact and rnngrad.rtrl().exact
    # and it is an approximation: the exact gradient differs on the lower layer
    _, exact = net_grads(net, x, y, mask=mask, state0=s0)
    low = [n for n in exact if n.startswith("cells.0.")]
    assert max_rel_err({n: g[n] for n in low}, {n: exact[n] for n in low}) > 1e-4


def test_spatial_rtrl_state_is_per_unit_on_diagonal_layers_dense_elsewhere():
    net = make("three")
    state = rnngrad.rtrl(layers="spatial").init(net, 2)
    assert state.modes == ("local", "dense", "local")
    assert isinstance(state.traces[0], dict) and torch.is_tensor(state.traces[1])


@pytest.mark.parametrize("kind", ["readout", "readout+diagemit"])
def test_trace_rules_through_emit(kind):
    """SnAp-1 on emitting cells: the gradient of the unit-cut graph; the parameters that
    only emit uses take their exact same-step gradient."""
    net = make(kind)
    x, y, mask = data(T=6)
    s0 = random_state(net, 3)
    ref = spatial_grads(net, x, y, mask=mask, state0=s0)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.snap1(), mask=mask, h0=s0)
    assert max_rel_err(g, ref) <= TOL, max_rel_err(g, ref)
    _, ge = rnngrad.gradient(net, x, y, algorithm=rnngrad.eprop(), mask=mask, h0=s0)
    assert torch.isfinite(torch.cat([v.reshape(-1) for k, v in ge.items() if k != "h0"])).all()


# --- UORO through emit ---------------------------------------------------------------------


def test_uoro_gives_emit_only_parameters_their_exact_gradient():
    """In one layer, V and E enter only emit: UORO's estimate has no part in them."""
    net = make("readout")
    x, y, mask = data()
    _, ref = net_grads(net, x, y, mask=mask)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.uoro(seed=1), mask=mask)
    for n in ("cells.0.V", "cells.0.E", "W_out", "b_out"):
        torch.testing.assert_close(g[n], ref[n], rtol=1e-10, atol=1e-13)
    assert max_rel_err({"u": g["cells.0.U"]}, {"u": ref["cells.0.U"]}) > 1e-3  # an estimate


def _exact_influence(net, x1):
    """d s_T / d theta (S, N) for one sequence x1 (T, D) from the zero state, by autograd."""
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
        state = net.init_state(1)
        lp = net.layer_params(P)
        for t in range(x1.shape[0]):
            state, _ = net.step(lp, state, x1[t:t + 1])
        return torch.cat([torch.cat(list(s), 1) for s in state], 1)[0]

    return torch.autograd.functional.jacobian(f, flat0)


def test_uoro_is_unbiased_through_a_lower_layers_emit():
    net = make("readout+diagemit")
    x, _, _ = data(T=3, B=1)
    M = _exact_influence(net, x[:, 0])
    groups, n = 4, 250
    X = x.expand(-1, groups * n, -1).contiguous()
    algo = rnngrad.uoro(seed=0)
    state = algo.init(net, groups * n)
    for t in range(3):
        state, _, _ = algo.step(net, state, X[t], None)
    s = (state.h_tilde[:, :, None] * state.theta_tilde[:, None, :]).view(groups, n, *M.shape)
    for k in range(groups):
        mean = s[k].mean(0)
        se = math.sqrt((s[k] - mean).square().sum().item() / (n - 1) / n)
        assert (mean - M).norm().item() <= 4 * se


# --- bad input -----------------------------------------------------------------------------


def test_a_cell_declared_diagonal_whose_units_couple_is_refused():
    torch.manual_seed(0)
    net = rnngrad.Network(FakeDiagonal(D, 4), K)
    x, y, _ = data()
    msg = (r"rtrl\(\): FakeDiagonal declares diagonal = True but its units couple: "
           r"d state_t\.h\[(\d)\] / d state_\(t-1\)\.h\[(\d)\] = .*unit \2 moves unit \1")
    with pytest.raises(ValueError, match=msg) as e:
        rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl())
    import re

    i, j = (int(v) for v in re.search(msg, e.value.args[0]).groups())
    assert i == (j + 1) % 4  # the shift: unit j feeds unit j + 1
    with pytest.raises(ValueError, match="declares diagonal = True but its units couple"):
        rnngrad.gradient(rnngrad.Network([DiagPlain(D, 4), FakeDiagonal(4, 4)], K), x, y,
                         algorithm=rnngrad.rtrl(layers="spatial"))
    net = rnngrad.Network(SharedRow(D, 4), K)
    with pytest.raises(ValueError, match=r"parameter 'W' \(shape \(4, 3\), G=1\) is not owned "
                                         r"row by row: the rows of unit 0 move unit 1"):
        rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl())
    # the exact dense path, which assumes nothing, still takes them
    _, ref = net_grads(net, x, y)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl(generic=True))
    assert max_rel_err(g, ref) <= TOL


def test_a_parameter_said_to_enter_only_emit_but_entering_step_is_refused():
    torch.manual_seed(0)
    net = rnngrad.Network(SneakyEmit(D, 4), K)
    x, y, _ = data()
    for algo in (rnngrad.snap1(), rnngrad.eprop()):
        with pytest.raises(ValueError, match=r"parameter 'V' of SneakyEmit \(shape \(4, 4\)\) "
                                             r"is owned by no unit .* but enters step"):
            rnngrad.gradient(net, x, y, algorithm=algo)
    _, ref = net_grads(net, x, y)
    for algo in (rnngrad.bptt(), rnngrad.rtrl()):
        assert max_rel_err(rnngrad.gradient(net, x, y, algorithm=algo)[1], ref) <= TOL


def test_spatial_needs_a_stack_and_layers_must_be_known():
    x, y, _ = data()
    with pytest.raises(ValueError, match=r"rtrl\(layers='spatial'\) .* needs at least two; got "
                                         r"a network of 1 layer \(DiagEmit\).*use rtrl\(\)"):
        rnngrad.gradient(make("diagemit"), x, y, algorithm=rnngrad.rtrl(layers="spatial"))
    rnn = rnngrad.RNN(D, 4, K, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"needs at least two; got a network of 1 layer"):
        rnngrad.gradient(rnn, x, y, algorithm=rnngrad.rtrl(layers="spatial"))
    with pytest.raises(ValueError, match=r"unknown layers mode 'bogus'; known modes: 'exact' "
                                         r".* and 'spatial'"):
        rnngrad.rtrl(layers="bogus")
    with pytest.raises(ValueError, match="unknown layers mode 3"):
        rnngrad.rtrl(layers=3)


def test_complex_parameters_and_states_are_refused():
    torch.manual_seed(0)
    cell = DiagPlain(D, 4)
    cell.W = torch.nn.Parameter(cell.W.detach().to(torch.complex128))
    with pytest.raises(TypeError, match=r"cells\[0\] \(DiagPlain\) has parameter 'W' of dtype "
                                        r"torch.complex128; rnngrad needs real parameters"):
        rnngrad.Network(cell, K)
    net = make("diagplain")
    with torch.no_grad():  # made complex after construction
        for p in net.parameters():
            p.data = p.data.to(torch.complex128)
    with pytest.raises(TypeError, match=r"complex128.*real"):
        rnngrad.rtrl().init(net, 2)
    with pytest.raises(TypeError, match=r"cells\[0\] \(ComplexState\): init_state\(2\)\.h is "
                                        r"torch.complex128 on cpu but the cell's parameters are "
                                        r"torch.float64"):
        rnngrad.Network(ComplexState(D, 4), K)
    # a state that turns complex after the network was built
    net = make("diagplain")
    net.cells[0].init_state = ComplexState.init_state.__get__(net.cells[0])
    for algo in (rnngrad.rtrl(), rnngrad.bptt(), rnngrad.uoro(), rnngrad.snap1()):
        with pytest.raises(TypeError, match=r"cells\[0\] \(DiagPlain\) has a state component "
                                            r"'h' of dtype torch.complex128, but rnngrad's "
                                            r"algorithms take real states only"):
            algo.init(net, 2)


def test_declared_structure_with_an_unowned_parameter_in_step_is_refused():
    """A cell that declares its immediate term (no torch.func fallback) and gives a
    parameter to no unit: the structured paths drop that parameter's immediate term, so
    they check first that it does not enter step."""
    from rnngrad.cells import GRU

    class SneakyGRU(GRU):
        def __init__(self, D, H):
            super().__init__(D, H, dtype=torch.float64)
            self.V = torch.nn.Parameter(0.1 * torch.randn(H, H, dtype=torch.float64))

        def param_blocks(self):
            return {**super().param_blocks(), "V": None}

        def step(self, params, state, x):
            new = super().step(params, state, x)
            return type(new)(new.h + state.h @ params["V"].T)

    torch.manual_seed(0)
    x, y, _ = data()
    # verify=False: past the first-use check of the inherited linearize (which catches it
    # too, tests/test_verify_cells.py), to the algorithms' own check
    for net, algo in ((rnngrad.Network(SneakyGRU(D, 3), K, verify=False), rnngrad.rtrl()),
                      (rnngrad.Network([SneakyGRU(D, 3), Elman(3, 4, **F64)], K, verify=False),
                       rnngrad.rtrl(layers="spatial"))):
        with pytest.raises(ValueError, match=r"parameter 'V' of SneakyGRU \(shape \(3, 3\)\) "
                                             r"is owned by no unit .* but enters step"):
            rnngrad.gradient(net, x, y, algorithm=algo)
