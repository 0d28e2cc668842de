"""rnngrad.cells.LRU against an independent reference written here in complex arithmetic
(torch.complex128: lambda = exp(-exp(nu) + i exp(theta)), h_t = lambda h_{t-1} + gamma B u_t,
y_t = Re(C h_t) + D u_t, Zucchet et al.'s GLU and residual), in float64:

- the cell's outputs equal the reference's (1e-12), its initialisation is Orvieto et al.'s;
- its declared structure equals torch.func's derivation of its step (1e-12);
- every exact algorithm equals autograd through the complex reference (relative 1e-10), on
  one layer (rtrl() by per-unit traces) and on stacks, with h0, a reward and masks.
"""

from __future__ import annotations

import math

import pytest
import torch
from net_reference import max_rel_err, net_grads, spatial_grads

import rnngrad
from rnngrad.algorithms._traces_network import NetTraceState
from rnngrad.cells import LRU, LRUState, _derive

DT = torch.float64
T, B, K = 6, 3, 2

CONFIGS = {
    "plain": dict(input_size=3, hidden_size=4, state_size=5),
    "square": dict(input_size=4, hidden_size=4, state_size=3, r_min=0.5, max_phase=0.5),
    "block": dict(input_size=4, hidden_size=4, state_size=3, norm=True, glu=True,
                  residual=True),
    "glu": dict(input_size=3, hidden_size=4, state_size=2, glu=True),
}


def make_cell(name, seed=0) -> LRU:
    torch.manual_seed(seed)
    return LRU(**CONFIGS[name], dtype=DT)


# ---- the reference -------------------------------------------------------------------------


def ref_outputs(cell: LRU, P: dict, x: torch.Tensor, h0: torch.Tensor | None = None):
    """The LRU in complex arithmetic: (T, B, H) outputs and the last complex state."""
    lam = torch.exp(torch.complex(-torch.exp(P["nu"]), torch.exp(P["theta"])))
    gamma = torch.exp(P["gamma_log"])
    Bc = torch.complex(P["B_re"], P["B_im"])
    Cc = torch.complex(P["C_re"], P["C_im"])
    h = torch.zeros(x.shape[1], cell.state_size, dtype=torch.complex128) if h0 is None else h0
    ys = []
    for t in range(x.shape[0]):
        u = x[t]
        if cell.norm:
            mu = u.mean(-1, keepdim=True)
            u = (u - mu) / torch.sqrt(((u - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
        h = lam * h + gamma * (u.to(torch.complex128) @ Bc.T)
        y = (h @ Cc.T).real + (u * P["D"] if P["D"].dim() == 1 else u @ P["D"].T)
        if cell.glu:
            g = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
            y = (g @ P["W_1"].T + P["b_1"]) * torch.sigmoid(g @ P["W_2"].T + P["b_2"])
        if cell.residual:
            y = y + x[t]
        ys.append(y)
    return torch.stack(ys), h


def ref_grads(net, x, y, mask, h0=None):
    """Autograd through the complex reference of every layer, the pinned loss written here."""
    P = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    leaves = list(P.values())
    hin = x
    h0c = []
    if h0 is not None:
        for s in h0:
            re, im = (c.detach().clone().requires_grad_(True) for c in s)
            leaves += [re, im]
            h0c.append((re, im))
    for l, (prefix, cell) in enumerate(net.layers()):
        own = {n[len(prefix):]: v for n, v in P.items() if n.startswith(prefix)}
        start = None if h0 is None else torch.complex(*h0c[l])
        hin, _ = ref_outputs(cell, own, hin, start)
    z = hin @ P["W_out"].T + P["b_out"]
    L = (mask * 0.5 * ((z - y) ** 2).sum(-1)).sum() / x.shape[1]
    gs = torch.autograd.grad(L, leaves)
    out = dict(zip(P, gs[:len(P)]))
    if h0 is not None:
        it = iter(gs[len(P):])
        out["h0"] = tuple(LRUState(next(it), next(it)) for _ in h0)
    return out


def data(D, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=DT)
    y = torch.randn(T, B, K, generator=g, dtype=DT)
    mask = torch.randint(0, 3, (T, B), generator=g).to(DT) * 0.5
    return x, y, mask


def random_state(net, seed=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(LRUState(*(0.5 * torch.randn(c.shape, generator=g, dtype=DT) for c in s))
                 for s in net.init_state(B))


# ---- the cell ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_outputs_equal_the_complex_reference(name):
    cell = make_cell(name)
    x, _, _ = data(cell.input_size)
    ys, h = ref_outputs(cell, cell.params(), x)
    s = cell.init_state(B)
    for t in range(T):
        s = cell.step(cell.params(), s, x[t])
        torch.testing.assert_close(cell.emit(cell.params(), s, x[t]), ys[t], rtol=1e-12,
                                   atol=1e-12)
    torch.testing.assert_close(torch.complex(s.re, s.im), h, rtol=1e-12, atol=1e-12)


def test_initialisation_is_orvietos():
    torch.manual_seed(0)
    cell = LRU(3, 8, state_size=4000, r_min=0.4, r_max=0.9, max_phase=1.5, dtype=DT)
    P = {k: v.detach() for k, v in cell.params().items()}
    lr, li, _, _ = LRU.eigenvalues(P)
    mod, phase = torch.sqrt(lr ** 2 + li ** 2), torch.atan2(li, lr) % (2 * math.pi)
    assert 0.4 - 1e-12 <= float(mod.min()) and float(mod.max()) <= 0.9 + 1e-12
    assert 0.0 <= float(phase.min()) and float(phase.max()) <= 1.5 + 1e-12
    # |lambda|^2 uniform on [r_min^2, r_max^2]: its mean is the midpoint
    assert abs(float((mod ** 2).mean()) - (0.16 + 0.81) / 2) < 0.02
    torch.testing.assert_close(torch.exp(P["gamma_log"]), torch.sqrt(1 - mod ** 2))
    assert abs(float(P["B_re"].std()) - 1 / math.sqrt(6)) < 0.02
    assert abs(float(P["C_re"].std()) - 1 / math.sqrt(4000)) < 0.002
    assert cell.D.shape == (8, 3) and LRU(4, 4, dtype=DT).D.shape == (4,)


@pytest.mark.parametrize("name", CONFIGS)
def test_declared_structure_matches_torch_func(name):
    cell = make_cell(name)
    P = {k: v.detach() for k, v in cell.params().items()}
    g = torch.Generator().manual_seed(3)
    s = LRUState(*(torch.randn(B, cell.state_size, generator=g, dtype=DT) for _ in range(2)))
    x = torch.randn(B, cell.input_size, generator=g, dtype=DT)
    fields = ("local", "eligibility", "immediate", "jacobian", "input_jacobian")
    mine = cell.linearize(P, s, x, need=fields)
    ref = _derive.linearize(cell, P, s, x, fields)
    for field in ("local", "eligibility", "jacobian", "input_jacobian"):
        torch.testing.assert_close(getattr(mine, field), getattr(ref, field), rtol=1e-12,
                                   atol=1e-12, msg=field)
    assert set(mine.immediate) == {"nu", "theta", "gamma_log", "B_re", "B_im"}
    for n, imm in mine.immediate.items():
        torch.testing.assert_close(imm.dense(), ref.immediate[n].dense(), rtol=1e-12,
                                   atol=1e-12, msg=n)
    # the emit-only parameters really are: owned by no unit and absent from step
    _derive.verify_diagonal(cell, "test")
    assert {n for n, G in cell.param_blocks().items() if G is None} == \
        {n for n, _ in cell.named_parameters()} - set(mine.immediate)


# ---- gradients against autograd through the complex reference -----------------------------

EXACT = {
    "bptt": lambda: rnngrad.bptt(),
    "bptt_ckpt2": lambda: rnngrad.bptt(checkpoint=2),
    "tbptt_T": lambda: rnngrad.tbptt(T),
    "rtrl": lambda: rnngrad.rtrl(),
    "rtrl_generic": lambda: rnngrad.rtrl(generic=True),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("algo", EXACT)
def test_one_layer_gradients_equal_autograd_through_complex_arithmetic(name, algo):
    net = rnngrad.Network(make_cell(name), K)
    x, y, mask = data(net.input_size)
    h0 = random_state(net)
    ref = ref_grads(net, x, y, mask, h0)
    _, g = rnngrad.gradient(net, x, y, algorithm=EXACT[algo](), mask=mask, h0=h0)
    assert max_rel_err(g, ref) <= 1e-10, max_rel_err(g, ref)


def test_rtrl_on_one_lru_is_per_unit_traces_constant_in_T():
    """O(B C |params|) numbers: no (B, S, S) nor (B, S, N) influence, the same at any T."""
    net = rnngrad.Network(make_cell("block"), K)
    cell = net.cells[0]
    algo = rnngrad.rtrl()
    x = torch.randn(12, B, 4, dtype=DT)
    state = algo.init(net, B)
    assert isinstance(state, NetTraceState)

    def numel(st):
        return sum(M.numel() for M in st.traces[0].values())

    n0 = numel(state)
    owned = sum(p.numel() for n, p in cell.named_parameters()
                if cell.param_blocks()[n] is not None)
    assert n0 == B * 2 * owned  # C = 2 (re, im) numbers per owned parameter entry
    for t in range(12):
        state, _, _ = algo.step(net, state, x[t], None)
        assert numel(state) == n0


@pytest.mark.parametrize("stack", ["plain+block",
                                   pytest.param("glu+block+block", marks=pytest.mark.slow)])
def test_stacks_exact_and_spatial(stack):
    torch.manual_seed(0)
    names = stack.split("+")
    cells = [LRU(**CONFIGS[names[0]], dtype=DT)]
    for n in names[1:]:
        cfg = dict(CONFIGS[n], input_size=cells[-1].hidden_size, hidden_size=4)
        cells.append(LRU(**cfg, dtype=DT))
    net = rnngrad.Network(cells, K)
    x, y, mask = data(net.input_size)
    h0 = random_state(net)
    ref = ref_grads(net, x, y, mask, h0)
    for make in (EXACT["bptt"], EXACT["rtrl"], EXACT["rtrl_generic"]):
        _, g = rnngrad.gradient(net, x, y, algorithm=make(), mask=mask, h0=h0)
        assert max_rel_err(g, ref) <= 1e-10, (make().name, max_rel_err(g, ref))
    sp = spatial_grads(net, x, y, mask=mask, state0=h0,
                       layer_step=lambda cell, p, s, xx: cell.step(p, s, xx))
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl(layers="spatial"), mask=mask,
                            h0=h0)
    assert max_rel_err(g, sp) <= 1e-10
    # the top layer is exact in spatial RTRL; a lower layer is not
    top = [n for n in ref if n.startswith(f"cells.{len(cells) - 1}.")]
    assert max_rel_err({n: g[n] for n in top}, {n: ref[n] for n in top}) <= 1e-10
    assert max_rel_err({"B": g["cells.0.B_re"]}, {"B": ref["cells.0.B_re"]}) > 1e-4


def test_float32_runs_and_agrees_with_float64():
    torch.manual_seed(0)
    net = rnngrad.Network(LRU(3, 4, state_size=5, glu=True), K)
    net64 = rnngrad.Network(LRU(3, 4, state_size=5, glu=True, dtype=DT), K).to(DT)
    net64.load_state_dict({k: v.to(DT) for k, v in net.state_dict().items()})
    x, y, mask = data(3)
    _, g32 = rnngrad.gradient(net, x.float(), y.float(), algorithm=rnngrad.rtrl(),
                              mask=mask.float())
    _, g64 = rnngrad.gradient(net64, x, y, algorithm=rnngrad.rtrl(), mask=mask)
    assert max_rel_err({k: v.double() for k, v in g32.items()}, g64) < 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"residual=True .* needs input_size == hidden_size, "
                                         r"got 3 and 4"):
        LRU(3, 4, residual=True)
    with pytest.raises(ValueError, match=r"need 0 <= r_min < r_max <= 1, got r_min=0.9, "
                                         r"r_max=0.5"):
        LRU(3, 4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="state_size must be a positive int, got 0"):
        LRU(3, 4, state_size=0)
    with pytest.raises(ValueError, match="max_phase must be a finite number > 0"):
        LRU(3, 4, max_phase=0.0)


def test_gradient_of_lambda_through_its_parametrisation():
    """nu and theta by central finite differences of the network's own loss (1e-6)."""
    torch.manual_seed(0)
    net = rnngrad.Network(LRU(2, 3, state_size=2, dtype=DT), 1)
    x, y = torch.randn(5, 2, 2, dtype=DT), torch.randn(5, 2, 1, dtype=DT)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl())
    _, ref = net_grads(net, x, y)
    for n in ("cells.0.nu", "cells.0.theta"):
        p = dict(net.named_parameters())[n]
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += 1e-6
                lp = rnngrad.gradient(net, x, y)[0]
                p.view(-1)[i] -= 2e-6
                lm = rnngrad.gradient(net, x, y)[0]
                p.view(-1)[i] += 1e-6
            fd.view(-1)[i] = (lp - lm) / 2e-6
        torch.testing.assert_close(g[n], fd, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g[n], ref[n], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", CONFIGS)
def test_hand_derived_output_derivatives_match_torch_func(name):
    cell = make_cell(name)
    P = {k: v.detach() for k, v in cell.params().items()}
    g = torch.Generator().manual_seed(4)
    s = LRUState(*(torch.randn(B, cell.state_size, generator=g, dtype=DT) for _ in range(2)))
    x = torch.randn(B, cell.input_size, generator=g, dtype=DT)
    q = torch.randn(B, cell.hidden_size, generator=g, dtype=DT)
    mine, ref = cell.emit_vjp(P, s, x, q), _derive.emit_vjp(cell, P, s, x, q)
    for n in ref[0]:  # the step's parameters are absent from emit's (zero in torch.func's)
        got = mine[0].get(n, torch.zeros_like(ref[0][n]))
        torch.testing.assert_close(got, ref[0][n], rtol=1e-12, atol=1e-12, msg=n)
    for a, b in zip(mine[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(cell.emit_jacobians(P, s, x), _derive.emit_jacobians(cell, P, s, x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and the whole-sequence BPTT against the generic one (a torch.func vjp per step)
    xs = torch.randn(T, B, cell.input_size, generator=g, dtype=DT)
    dout = torch.randn(T, B, cell.hidden_size, generator=g, dtype=DT)
    dS = LRUState(*(torch.randn(B, cell.state_size, generator=g, dtype=DT) for _ in range(2)))
    outs = []
    for impl in (cell, super(LRU, cell)):
        y, sT, c = impl.forward_sequence(P, xs, s, cache=True)
        outs.append((y, sT, impl.backward_sequence(P, xs, s, c, dout, dS)))
    (y1, s1, (g1, dx1, d01)), (y2, s2, (g2, dx2, d02)) = outs
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    for n in g2:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-10, atol=1e-12, msg=n)
    for a, b in zip((dx1, *d01, *s1), (dx2, *d02, *s2)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
