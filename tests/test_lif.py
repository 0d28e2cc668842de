"""The spiking cells (rnngrad.cells.LIF, ALIF) and their surrogates, in float64.

- the surrogate spike: value exactly H(u); slope gamma f(u) (f written out here) under
  autograd and every torch.func transform (vmap, jvp, vjp, jacrev);
- the dynamics against a transcription of Bellec et al.'s ``EligALIF`` step (their code:
  adaptation, reset by subtraction, no self-connections, refractory counter);
- the declared structure (local, immediate, jacobian, input_jacobian) field by field
  against ``_derive.linearize``'s torch.func derivation of ``step`` (1e-12), and e-prop's
  eligibility against jacrev of a step with the recurrent spikes detached where they enter
  the membrane potential (Bellec's ``stop_z_gradients``);
- the hand-derived BPTT against autograd through a loop of ``step`` and the generic path
  (relative error 1e-10);
- bad input: time constants, dt, thresholds, surrogates, beta, states.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev, vjp, vmap

import rnngrad
from rnngrad.cells import ALIF, LIF, Cell, Surrogate, _derive
from rnngrad.cells._derive import jvp  # torch.func.jvp, its first-call warning silenced
from rnngrad.cells.base import flatten_state, unflatten_state

DT = torch.float64
D, U, B = 3, 5, 4

CELLS = {
    "lif": lambda: LIF(D, U, dtype=DT),
    "alif": lambda: ALIF(D, U, dtype=DT),
    "lif-ref-superspike": lambda: LIF(D, U, t_ref=3.0, surrogate="superspike", dtype=DT),
    "alif-ref-arctan": lambda: ALIF(D, U, t_ref=4.0, beta=[0.0, 0.0, 0.5, 0.4, 0.3],
                                    surrogate="arctan", gamma=0.5, dtype=DT),
    "alif-dt2": lambda: ALIF(D, U, tau_m=10.0, tau_a=50.0, dt=2.0, v_th=0.4, beta=0.2,
                             dtype=DT),
}


def f_written_out(name: str, u: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    if name == "triangle":
        return torch.clamp(1 - u.abs(), min=0)
    if name == "superspike":
        return 1 / (1 + k * u.abs()) ** 2
    return 1 / (1 + (math.pi * k * u / 2) ** 2)


def random_state(cell, batch: int, seed: int = 0):
    """Membranes around the threshold (so the pseudo-derivative is nonzero), adaptation
    positive, refractory counters whole numbers in [0, n_ref - 1]."""
    g = torch.Generator().manual_seed(seed)
    ref = cell.init_state(batch)
    comps = []
    for f, c in zip(ref._fields, ref):
        if f == "q":
            comps.append(torch.randint(0, cell.n_ref, c.shape, generator=g).to(DT))
        elif f == "a":
            comps.append(torch.rand(c.shape, generator=g, dtype=DT) * 3)
        else:
            comps.append(cell.v_th * (1 + 0.8 * torch.randn(c.shape, generator=g, dtype=DT)))
    return type(ref)(*comps)


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(params=list(CELLS))
def cell(request):
    return CELLS[request.param]()


# ---- the surrogate spike ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["triangle", "superspike", "arctan"])
def test_spike_is_heaviside_with_the_documented_slope(name):
    s = Surrogate(name, gamma=0.3)
    u = torch.cat([torch.linspace(-2.5, 2.5, 401, dtype=DT),
                   torch.tensor([0.0, -0.0, 1e-300, -1e-300, 1.0, -1.0], dtype=DT)])
    z = s.spike(u)
    assert torch.equal(z, (u > 0).to(DT))  # exactly H(u), H(0) = 0
    slope = 0.3 * f_written_out(name, u)
    uu = u.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(s.spike(uu).sum(), uu)
    assert torch.allclose(g, slope, rtol=1e-12, atol=1e-15)
    assert torch.allclose(s.derivative(u), slope, rtol=1e-12, atol=1e-15)
    # torch.func: jacrev (diagonal), jvp, vjp, vmap all see the same function
    J = jacrev(s.spike)(u)
    assert torch.allclose(J, torch.diag(slope), rtol=1e-12, atol=1e-15)
    t = torch.randn_like(u)
    val, tan = jvp(s.spike, (u,), (t,))
    assert torch.equal(val, z) and torch.allclose(tan, slope * t, rtol=1e-12, atol=1e-15)
    val, fn = vjp(s.spike, u)
    assert torch.allclose(fn(t)[0], slope * t, rtol=1e-12, atol=1e-15)
    per = vmap(jacrev(lambda x: s.spike(x.unsqueeze(0)).squeeze(0)))(u)
    assert torch.allclose(per, slope, rtol=1e-12, atol=1e-15)
    # the in-place form the sequence forms use: the same numbers, over its argument
    w = u.clone()
    assert s.derivative_(w) is w and torch.equal(w, s.derivative(u))


@pytest.mark.parametrize("name", ["triangle", "superspike", "arctan"])
def test_surrogates_share_peak_and_area(name):
    s = Surrogate(name)
    assert float(s.f(torch.zeros(1, dtype=DT))) == 1.0
    assert float(s.f(torch.linspace(-5, 5, 10001, dtype=DT)).max()) <= 1.0
    # area int f = F(inf) - F(-inf), F the antiderivative (F' = f is checked above)
    big = torch.tensor([-1e15, 1e15], dtype=DT)
    F = s.antiderivative(big)
    assert abs(float(F[1] - F[0]) - 1.0) < 1e-12


def test_bad_surrogates_are_refused():
    with pytest.raises(ValueError, match=r"unknown surrogate 'sigmoid'; known surrogates: "
                                         r"triangle, superspike, arctan"):
        LIF(D, U, surrogate="sigmoid")
    with pytest.raises(ValueError, match="triangle surrogate has no steepness"):
        Surrogate("triangle", steepness=3.0)
    with pytest.raises(ValueError, match=r"gamma must be a positive finite number, got 0"):
        LIF(D, U, gamma=0)
    with pytest.raises(ValueError, match=r"steepness must be a positive finite number, got -1"):
        Surrogate("arctan", steepness=-1)
    with pytest.raises(ValueError, match="gamma is set by the surrogate"):
        ALIF(D, U, surrogate=Surrogate("arctan"), gamma=0.5)
    with pytest.raises(TypeError, match="surrogate must be a name"):
        LIF(D, U, surrogate=3)


# ---- the dynamics: Bellec et al.'s EligALIF, transcribed -----------------------------------


def bellec_step(W_in, W_rec, x, v, b, z, r, *, alpha, rho, thr, beta, n_ref):
    """One step of their ``EligALIF.__call__`` (time-major, float64, dt = 1 spike units)."""
    W = W_rec * (1 - torch.eye(W_rec.shape[0], dtype=W_rec.dtype))  # disconnect autapses
    new_b = rho * b + z
    thr_t = thr + new_b * beta
    new_v = alpha * v + x @ W_in.T + z @ W.T - z * thr
    new_z = torch.where(r > 0, torch.zeros_like(z), ((new_v - thr_t) / thr > 0).to(z.dtype))
    new_r = torch.clamp(r + n_ref * new_z - 1, 0.0, float(n_ref))
    return new_v, new_b, new_z, new_r


@pytest.mark.parametrize("kind", ["lif", "alif", "alif-refractory"])
def test_dynamics_match_bellecs_code(kind):
    torch.manual_seed(3)
    if kind == "lif":
        cell = LIF(D, U, tau_m=20.0, v_th=0.6, dtype=DT)
        beta, rho = torch.zeros(U, dtype=DT), 0.0
    else:
        cell = ALIF(D, U, tau_m=20.0, tau_a=200.0, v_th=0.6, beta=[0, 0, 0.5, 1.0, 1.6],
                    t_ref=5.0 if kind == "alif-refractory" else 0.0, dtype=DT)
        beta, rho = cell.beta, math.exp(-1 / 200)
    assert cell.alpha == math.exp(-1 / 20)
    T = 60
    x = (torch.rand(T, B, D, dtype=DT) < 0.3).to(DT) * 1.5  # input spikes
    params = cell.params()
    s = cell.init_state(B)
    v = b = z = r = torch.zeros(B, U, dtype=DT)
    n_ref = cell.n_ref if cell.refractory else 1
    zs = []
    with torch.no_grad():
        for t in range(T):
            s = cell.step(params, s, x[t])
            v, b, z, r = bellec_step(params["W_in"], params["W_rec"], x[t], v, b, z, r,
                                     alpha=cell.alpha, rho=rho, thr=0.6, beta=beta, n_ref=n_ref)
            torch.testing.assert_close(s.v, v, rtol=1e-13, atol=1e-13)
            if kind != "lif":
                torch.testing.assert_close(s.a, b, rtol=1e-13, atol=1e-13)
            assert torch.equal(cell.output(s), z)
            zs.append(z)
    zs = torch.stack(zs)
    assert 0.02 < float(zs.mean()) < 0.9  # the comparison saw spikes and silences
    if kind == "alif-refractory":  # spikes at least n_ref = 5 steps apart
        for bb in range(B):
            for i in range(U):
                times = zs[:, bb, i].nonzero().flatten()
                if times.numel() > 1:
                    assert int(times.diff().min()) >= 5


def test_no_self_connections():
    torch.manual_seed(0)
    cell = ALIF(D, U, dtype=DT)
    assert torch.equal(cell.W_rec.diagonal(), torch.zeros(U, dtype=DT))
    net = rnngrad.Network(cell, 2)
    x, y = torch.randn(8, B, D, dtype=DT) * 2, torch.randn(8, B, 2, dtype=DT)
    out, h = net(x)
    with torch.no_grad():
        cell.W_rec.diagonal().fill_(5.0)  # never used
    out2, h2 = net(x)
    assert torch.equal(out, out2) and torch.equal(h, h2)
    out2.sum().backward()
    assert torch.equal(cell.W_rec.grad.diagonal(), torch.zeros(U, dtype=DT))
    assert cell.W_rec.grad.abs().sum() > 0
    _, g = rnngrad.gradient(net, x, y)
    assert torch.equal(g["cells.0.W_rec"].diagonal(), torch.zeros(U, dtype=DT))


def test_time_constants_and_defaults():
    cell = ALIF(D, U, tau_m=10.0, tau_a=100.0, dt=0.5)
    assert cell.alpha == math.exp(-0.05) and cell.rho == math.exp(-0.005)
    beta = rnngrad.cells.lif.bellec_beta(20.0, 2000.0)
    assert abs(beta - 1.7 * (1 - math.exp(-1 / 2000)) / (1 - math.exp(-1 / 20))) < 1e-15
    assert torch.allclose(ALIF(D, U).beta, torch.full((U,), beta))
    assert LIF(D, U, t_ref=5.0).n_ref == 5 and LIF(D, U, t_ref=5.0, dt=2.5).n_ref == 2
    assert type(LIF(D, U).init_state(2)).__name__ == "LIFState"
    assert ALIF(D, U, t_ref=2.0).init_state(2)._fields == ("v", "a", "q")


# ---- declared structure against torch.func ----------------------------------------------

FIELDS = ("local", "immediate", "jacobian", "input_jacobian")


def test_declared_structure_matches_torch_func(cell):
    params = {k: v.detach() for k, v in cell.params().items()}
    state, x = random_state(cell, B), torch.randn(B, D, dtype=DT)
    mine = cell.linearize(params, state, x, need=FIELDS + ("eligibility",))
    ref = _derive.linearize(cell, params, state, x, FIELDS)  # derives all: only linearize is ours
    for a, b in zip(mine.state, ref.state):
        assert torch.equal(a, b)
    for f in ("local", "jacobian", "input_jacobian"):
        a, b = getattr(mine, f), getattr(ref, f)
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-12, f
    assert set(mine.immediate) == set(ref.immediate) == {"W_in", "W_rec"}
    for n in mine.immediate:
        a, b = mine.immediate[n].dense(), ref.immediate[n].dense()
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-12, n
    # the state really is near threshold: the pseudo-derivative enters the Jacobian
    assert float(mine.jacobian.abs().max()) > 0 and not torch.allclose(mine.local, mine.eligibility)
    # each field alone is the same as all together
    for f in FIELDS + ("eligibility",):
        alone = getattr(cell.linearize(params, state, x, need=(f,)), f)
        both = getattr(mine, f)
        if f == "immediate":
            assert all(torch.equal(alone[n].dense(), both[n].dense()) for n in both)
        else:
            assert torch.equal(alone, both)


def stop_z_step(cell, params, state, x):
    """Bellec's e-prop graph, written from the equations: the previous spikes detached where
    they enter the membrane potential (W_rec z and the reset v_th z), kept in a."""
    z = cell.output(state)
    zd = z.detach()
    W = params["W_rec"] * (1 - torch.eye(U, dtype=DT))
    v = cell.alpha * state.v + x @ params["W_in"].T + zd @ W.T - cell.v_th * zd
    new = [v]
    if isinstance(cell, ALIF):
        new.append(cell.rho * state.a + z)
    if cell.refractory:
        new.append(((state.q - 1).clamp(min=0) + (cell.n_ref - 1) * z).detach())
    return type(state)(*new)


def test_eligibility_is_bellecs_detached_jacobian(cell):
    params = {k: v.detach() for k, v in cell.params().items()}
    state, x = random_state(cell, B), torch.randn(B, D, dtype=DT)

    def single(s, xx):
        st = unflatten_state(s.unsqueeze(0), state)
        return flatten_state(stop_z_step(cell, params, st, xx.unsqueeze(0))).squeeze(0)

    J = vmap(jacrev(single))(flatten_state(state), x)
    C = len(state)
    ref = _derive.unit_blocks(J, C, U)
    elig = cell.linearize(params, state, x, need=("eligibility",)).eligibility
    assert float((elig - ref).abs().max()) <= 1e-12
    # across units the detached graph has no path at all: e-prop's block-diagonal is exact there
    off = J.reshape(B, C, U, C, U).clone()
    off.diagonal(dim1=2, dim2=4).zero_()
    assert float(off.abs().max()) == 0.0
    # Bellec's form for ALIF: [[alpha, 0], [psi, rho - beta psi]]
    if isinstance(cell, ALIF):
        u = (state.v - cell.v_th - cell.beta * state.a) / cell.v_th
        psi = cell.surrogate.gamma / cell.v_th * f_written_out(cell.surrogate.name, u)
        if cell.refractory:
            psi = psi * (state.q == 0)
        assert torch.allclose(elig[..., 1, 0], psi, rtol=1e-13, atol=0)
        assert torch.allclose(elig[..., 1, 1], cell.rho - cell.beta * psi, rtol=1e-13, atol=0)
        assert torch.equal(elig[..., 0, 0], torch.full_like(psi, cell.alpha))
        assert torch.equal(elig[..., 0, 1], torch.zeros_like(psi))


def test_step_is_pure_and_vmappable(cell):
    params = cell.params()
    state, x = random_state(cell, B), torch.randn(B, D, dtype=DT)
    before = [s.clone() for s in state]
    batched = cell.step(params, state, x)
    assert all(torch.equal(a, b) for a, b in zip(state, before))

    def one(*args):
        *comps, xb = args
        st = type(state)(*(c.unsqueeze(0) for c in comps))
        return tuple(c.squeeze(0) for c in cell.step(params, st, xb.unsqueeze(0)))

    for a, b in zip(vmap(one)(*state, x), batched):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


# ---- hand-derived BPTT through the surrogate ----------------------------------------------


def autograd_reference(cell, params, inputs, state0, d_outputs, d_state):
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    xs = inputs.detach().clone().requires_grad_(True)
    s0 = type(state0)(*(s.detach().clone().requires_grad_(True) for s in state0))
    s, L = s0, 0.0
    for t in range(inputs.shape[0]):
        s = cell.step(p, s, xs[t])
        L = L + (cell.output(s) * d_outputs[t]).sum()
    if d_state is not None:
        L = L + sum((a * b).sum() for a, b in zip(s, d_state))
    g = torch.autograd.grad(L, [p["W_in"], p["W_rec"], xs, *s0], allow_unused=True)
    g = [torch.zeros_like(v) if gi is None else gi
         for v, gi in zip([p["W_in"], p["W_rec"], xs, *s0], g)]
    return {"W_in": g[0], "W_rec": g[1]}, g[2], g[3:]


@pytest.mark.parametrize("T,batch", [(1, 1), (9, 4)])
@pytest.mark.parametrize("with_d_state", [False, True])
def test_hand_bptt_matches_autograd(cell, T, batch, with_d_state):
    assert cell.hand_derived_bptt
    params = {k: v.detach() for k, v in cell.params().items()}
    inputs = torch.randn(T, batch, D, dtype=DT) * 2
    state0 = random_state(cell, batch)
    d_out = torch.randn(T, batch, U, dtype=DT)
    d_state = None
    if with_d_state:
        d_state = type(state0)(*(torch.randn_like(c) for c in state0))
    outs, sT, cache = cell.forward_sequence(params, inputs, state0, cache=True)
    s = state0
    for t in range(T):
        s = cell.step(params, s, inputs[t])
        assert torch.equal(outs[t], cell.output(s).detach())
    grads, d_in, d_s0 = cell.backward_sequence(params, inputs, state0, cache, d_out, d_state)
    ref_g, ref_x, ref_s0 = autograd_reference(cell, params, inputs, state0, d_out, d_state)
    for k in ref_g:
        assert rel_err(grads[k], ref_g[k]) <= 1e-10, k
    assert rel_err(d_in, ref_x) <= 1e-10
    assert type(d_s0) is type(state0)
    for f, a, b in zip(state0._fields, d_s0, ref_s0):
        if f == "q":
            assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))
        else:
            assert rel_err(a, b) <= 1e-10, f
    # the graph-building path (grad enabled) gives the same outputs
    p_req = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    outs2, _, _ = cell.forward_sequence(p_req, inputs, state0)
    assert outs2.requires_grad and torch.equal(outs2.detach(), outs)


def test_hand_bptt_matches_generic_path(cell):
    params = {k: v.detach() for k, v in cell.params().items()}
    T, batch = 6, 3
    inputs = torch.randn(T, batch, D, dtype=DT) * 2
    state0 = random_state(cell, batch)
    d_state = type(state0)(*(torch.randn_like(c) for c in state0))
    d_out = torch.randn(T, batch, U, dtype=DT)
    _, _, cache = cell.forward_sequence(params, inputs, state0, cache=True)
    _, _, g_cache = Cell.forward_sequence(cell, params, inputs, state0, cache=True)
    mine = cell.backward_sequence(params, inputs, state0, cache, d_out, d_state)
    ref = Cell.backward_sequence(cell, params, inputs, state0, g_cache, d_out, d_state)
    for k in ref[0]:
        assert rel_err(mine[0][k], ref[0][k]) <= 1e-10, k
    assert rel_err(mine[1], ref[1]) <= 1e-10


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"tau_m": 0.0}, r"tau_m \(ms\) must be a positive finite number, got 0.0"),
    ({"tau_m": -5}, r"tau_m \(ms\) must be a positive finite number, got -5"),
    ({"tau_m": float("nan")}, r"tau_m \(ms\) must be a positive finite number, got nan"),
    ({"tau_a": 0}, r"tau_a \(ms\) must be a positive finite number, got 0"),
    ({"dt": 0.0}, r"dt \(ms\) must be a positive finite number, got 0.0"),
    ({"dt": 25.0}, r"dt = 25 ms is larger than tau_m = 20 ms"),
    ({"dt": 3.0, "tau_m": 5.0, "tau_a": 2.0}, r"dt = 3 ms is larger than tau_a = 2 ms"),
    ({"v_th": 0}, r"v_th must be a positive finite number, got 0"),
    ({"t_ref": -1.0}, r"t_ref \(ms\) must be a non-negative finite number, got -1.0"),
    ({"beta": -0.1}, r"beta must be finite and >= 0, got -0.1"),
    ({"beta": [0.1, 0.2]}, r"beta has 2 values but the cell has 5 units"),
    ({"beta": "big"}, r"beta must be a number, 5 numbers or None, got str"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ALIF(D, U, **kwargs)


def test_bad_states_are_refused():
    cell = ALIF(D, U, t_ref=3.0, dtype=DT)
    x = torch.randn(B, D, dtype=DT)
    s = random_state(cell, B)
    cell(x, s)  # a good state passes
    bad = s._replace(v=s.v.clone().index_fill_(1, torch.tensor([2]), float("nan")))
    with pytest.raises(ValueError, match=r"state.v of ALIF contains NaN or Inf"):
        cell(x, bad)
    bad = s._replace(q=torch.zeros_like(s.q).index_fill_(1, torch.tensor([1]), 0.5))
    with pytest.raises(ValueError, match=r"state.q of ALIF counts refractory steps left and must "
                                         r"hold whole numbers in \[0, 2\] \(n_ref = 3\), got 0.5"):
        cell(x, bad)
    bad = s._replace(q=torch.full_like(s.q, 7.0))
    with pytest.raises(ValueError, match=r"whole numbers in \[0, 2\].*got 7.0"):
        cell(x, bad)
    with pytest.raises(ValueError, match=r"state.a has shape \(4, 3\) but ALIF expects \(4, 5\)"):
        cell(x, s._replace(a=s.a[:, :3]))
    # the same checks on an initial state given to an algorithm
    net = rnngrad.Network(cell, 2)
    xs, ys = torch.randn(4, B, D, dtype=DT), torch.randn(4, B, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"h0.q of ALIF counts refractory steps"):
        rnngrad.gradient(net, xs, ys, h0=s._replace(q=s.q - 1.0))
    with pytest.raises(ValueError, match=r"h0.v contains NaN or Inf"):
        rnngrad.gradient(net, xs, ys, h0=s._replace(v=s.v * float("nan")))
