"""rnngrad.cells.ELSTM against Irie et al. (2023)'s equations written here (a loop of
tanh / sigmoid gates on c_{t-1}, the output gate on [x_t, c_t]), in float64: outputs equal
(1e-12), declared structure equals torch.func's (1e-12), every exact algorithm equals
autograd through the reference loop (relative 1e-10), and RTRL is per-unit traces."""

from __future__ import annotations

import pytest
import torch
from net_reference import max_rel_err

import rnngrad
from rnngrad.algorithms._traces_network import NetTraceState
from rnngrad.cells import ELSTM, ELSTMState, _derive

DT = torch.float64
T, B, D, H, K = 6, 3, 3, 4, 2


def ref_outputs(P, x, c0=None):
    """Irie et al.'s eLSTM ("QuasiLSTM"): separate z, f blocks, output gate on [x_t, c_t]."""
    Wz, Wf = P["W"][:H], P["W"][H:]
    wz, wf = P["w"][:H], P["w"][H:]
    bz, bf = P["b"][:H], P["b"][H:]
    O = torch.cat((P["W_o"], P["R_o"]), 1)  # their nn.Linear(D + H, H)
    c = torch.zeros(x.shape[1], H, dtype=DT) if c0 is None else c0
    hs = []
    for t in range(x.shape[0]):
        z = torch.tanh(x[t] @ Wz.T + wz * c + bz)
        f = torch.sigmoid(x[t] @ Wf.T + wf * c + bf)
        c = c * f + (1.0 - f) * z
        o = torch.sigmoid(torch.cat((x[t], c), 1) @ O.T + P["b_o"])
        hs.append(c * o)
    return torch.stack(hs)


def ref_grads(net, x, y, mask, c0):
    P = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    c0 = c0.detach().clone().requires_grad_(True)
    own = {n.removeprefix("cells.0."): v for n, v in P.items() if n.startswith("cells.0.")}
    z = ref_outputs(own, x, c0) @ P["W_out"].T + P["b_out"]
    L = (mask * 0.5 * ((z - y) ** 2).sum(-1)).sum() / x.shape[1]
    gs = torch.autograd.grad(L, list(P.values()) + [c0])
    out = dict(zip(P, gs[:-1]))
    out["h0"] = ELSTMState(gs[-1])
    return out


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, B, D, generator=g, dtype=DT),
            torch.randn(T, B, K, generator=g, dtype=DT),
            torch.randint(0, 3, (T, B), generator=g).to(DT) * 0.5,
            0.5 * torch.randn(B, H, generator=g, dtype=DT))


def make(seed=0, forget_bias=0.0):
    torch.manual_seed(seed)
    return ELSTM(D, H, forget_bias=forget_bias, dtype=DT)


def test_outputs_equal_irie_et_al_equations():
    cell = make(forget_bias=1.0)
    x, _, _, c0 = data()
    ref = ref_outputs(cell.params(), x, c0)
    s = ELSTMState(c0)
    for t in range(T):
        s = cell.step(cell.params(), s, x[t])
        torch.testing.assert_close(cell.emit(cell.params(), s, x[t]), ref[t], rtol=1e-12,
                                   atol=1e-12)
    assert float(cell.b.detach()[H:].mean()) > 0.5  # the forget bias


def test_declared_structure_matches_torch_func():
    cell = make()
    P = {k: v.detach() for k, v in cell.params().items()}
    x, _, _, c0 = data()
    fields = ("local", "eligibility", "immediate", "jacobian", "input_jacobian")
    mine = cell.linearize(P, ELSTMState(c0), x[0], need=fields)
    ref = _derive.linearize(cell, P, ELSTMState(c0), x[0], fields)
    for f in ("local", "eligibility", "jacobian", "input_jacobian"):
        torch.testing.assert_close(getattr(mine, f), getattr(ref, f), rtol=1e-12, atol=1e-12)
    assert set(mine.immediate) == {"W", "w", "b"}
    for n, imm in mine.immediate.items():
        torch.testing.assert_close(imm.dense(), ref.immediate[n].dense(), rtol=1e-12, atol=1e-12)
    _derive.verify_diagonal(cell, "test")


@pytest.mark.parametrize("algo", ["bptt", "bptt_ckpt2", "tbptt_T", "rtrl", "rtrl_generic",
                                  "eprop", "snap1"])
def test_gradients_equal_autograd_through_the_reference(algo):
    """One eLSTM layer: its units do not couple, so SnAp-1 and e-prop (whose eligibility is
    every path within the unit) are exact too, as Irie et al. note of RTRL."""
    make_algo = {"bptt": rnngrad.bptt, "bptt_ckpt2": lambda: rnngrad.bptt(checkpoint=2),
                 "tbptt_T": lambda: rnngrad.tbptt(T), "rtrl": rnngrad.rtrl,
                 "rtrl_generic": lambda: rnngrad.rtrl(generic=True), "eprop": rnngrad.eprop,
                 "snap1": rnngrad.snap1}[algo]
    net = rnngrad.Network(make(), K)
    x, y, mask, c0 = data()
    ref = ref_grads(net, x, y, mask, c0)
    _, g = rnngrad.gradient(net, x, y, algorithm=make_algo(), mask=mask, h0=ELSTMState(c0))
    assert max_rel_err(g, ref) <= 1e-10, max_rel_err(g, ref)


def test_rtrl_keeps_per_unit_traces():
    net = rnngrad.Network(make(), K)
    state = rnngrad.rtrl().init(net, B)
    assert isinstance(state, NetTraceState)
    assert {n: tuple(M.shape) for n, M in state.traces[0].items()} == {
        "W": (B, 1, 2, H, D), "w": (B, 1, 2, H, 1), "b": (B, 1, 2, H, 1)}


def test_stack_with_lru_exact_and_spatial():
    torch.manual_seed(0)
    net = rnngrad.Network([ELSTM(D, H, dtype=DT), rnngrad.cells.LRU(H, 3, state_size=2,
                                                                     dtype=DT)], K)
    from net_reference import net_grads, spatial_grads

    x, y, mask, _ = data()
    _, ref = net_grads(net, x, y, mask=mask)
    for algo in (rnngrad.rtrl(), rnngrad.bptt()):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, mask=mask)
        assert max_rel_err(g, ref) <= 1e-10
    sp = spatial_grads(net, x, y, mask=mask, layer_step=lambda c, p, s, xx: c.step(p, s, xx))
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl(layers="spatial"), mask=mask)
    assert max_rel_err(g, sp) <= 1e-10
