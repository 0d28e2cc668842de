"""Every built-in cell against independent oracles, in float64.

- the structure each cell declares in ``linearize`` (local, immediate, jacobian,
  input_jacobian) against the ``torch.func`` derivation of ``_derive.linearize``, which
  differentiates ``step`` and ignores the override (tolerance 1e-12);
- the e-prop eligibility Jacobian against autograd through a reference step written
  here, whose recurrent input is detached where it enters the pre-activations (1e-12);
- the hand-derived whole-sequence BPTT against autograd through a plain loop of
  ``step`` and against the base class's generic ``Cell.backward_sequence`` (relative
  error 1e-10).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnngrad.cells import GRU, LSTM, Cell, Elman, _derive
from rnngrad.cells.base import flatten_state, unflatten_state

DT = torch.float64
D, H, B = 3, 5, 4

CELLS = {
    "elman-tanh": lambda: Elman(D, H, dtype=DT),
    "elman-relu": lambda: Elman(D, H, activation="relu", dtype=DT),
    "elman-sigmoid": lambda: Elman(D, H, activation="sigmoid", dtype=DT),
    "elman-softplus": lambda: Elman(D, H, activation="softplus", dtype=DT),
    "leaky-tanh": lambda: Elman(D, H, alpha=0.3, dtype=DT),
    "leaky-relu": lambda: Elman(D, H, activation="relu", alpha=0.6, dtype=DT),
    "leaky-softplus": lambda: Elman(D, H, activation="softplus", alpha=0.5, dtype=DT),
    "gru": lambda: GRU(D, H, dtype=DT),
    "lstm": lambda: LSTM(D, H, dtype=DT),
}
FIELDS = ("local", "immediate", "jacobian", "input_jacobian")


def random_state(cell, batch: int):
    """A state away from zero (so that relu units are on both sides of their kink)."""
    return type(cell.init_state(batch))(*(torch.randn_like(s) for s in cell.init_state(batch)))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    a, b = a.detach(), b.detach()
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(params=list(CELLS))
def cell(request):
    return CELLS[request.param]()


# ---- declared structure against torch.func ----------------------------------------------


def test_linearize_matches_torch_func(cell):
    params = {k: v.detach() for k, v in cell.params().items()}
    state, x = random_state(cell, B), torch.randn(B, D, dtype=DT)
    mine = cell.linearize(params, state, x, need=FIELDS)
    ref = _derive.linearize(cell, params, state, x, FIELDS)
    for a, b in zip(mine.state, cell.step(params, state, x)):
        assert close(a, b)
    for field in ("local", "jacobian", "input_jacobian"):
        assert close(getattr(mine, field), getattr(ref, field)), field
    assert set(mine.immediate) == {k for k, G in cell.param_blocks().items() if G is not None}
    for name, imm in mine.immediate.items():
        assert imm.inp is not None, f"{name}: expected a factored Immediate"
        assert close(imm.dense(), ref.immediate[name].dense()), name


def test_linearize_fields_alone(cell):
    """Each field asked alone equals the same field asked with the others; the rest are None."""
    params = cell.params()
    state, x = random_state(cell, B), torch.randn(B, D, dtype=DT)
    everything = cell.linearize(params, state, x, need=(*FIELDS, "eligibility"))
    for field in (*FIELDS, "eligibility"):
        one = cell.linearize(params, state, x, need=(field,))
        for other in (*FIELDS, "eligibility"):
            assert (getattr(one, other) is None) == (other != field)
        if field == "immediate":
            for k, v in one.immediate.items():
                assert close(v.dense(), everything.immediate[k].dense())
        else:
            assert close(getattr(one, field), getattr(everything, field))
    bare = cell.linearize(params, state, x)
    assert all(getattr(bare, f) is None for f in (*FIELDS, "eligibility"))


def test_param_blocks_match_the_default(cell):
    """Declared ownership equals what the generic rule infers from the shapes."""
    assert cell.param_blocks() == Cell.param_blocks(cell)


def test_local_is_the_unit_blocks_of_the_jacobian(cell):
    params = cell.params()
    state, x = random_state(cell, B), torch.randn(B, D, dtype=DT)
    lin = cell.linearize(params, state, x, need=("local", "jacobian"))
    C = len(state)
    J = lin.jacobian.view(B, C, H, C, H)
    for i in range(H):  # a loop over units in a test only: the oracle is plain indexing
        assert close(lin.local[:, i], J[:, :, i, :, i])


# ---- eligibility: e-prop's Jacobian against autograd with a detached recurrent input ----

ACT = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "softplus": F.softplus}


def reference_step_detached(cell, p, state, x):
    """One step written from the equations, with h_{t-1} detached where it enters the
    pre-activations through the recurrent weights: e-prop's convention."""
    if isinstance(cell, Elman):
        h = state[0]
        a = x @ p["W_in"].T + h.detach() @ p["W_rec"].T + p["b_rec"]
        return ((1 - cell.alpha) * h + cell.alpha * ACT[cell.activation](a),)
    if isinstance(cell, GRU):
        h = state[0]
        gi = x @ p["W_ih"].T + p["b_ih"]
        gh = h.detach() @ p["W_hh"].T + p["b_hh"]
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        return ((1 - z) * n + z * h,)
    h, c = state
    a = x @ p["W_ih"].T + p["b_ih"] + h.detach() @ p["W_hh"].T + p["b_hh"]
    i, f = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H:2 * H])
    g, o = torch.tanh(a[:, 2 * H:3 * H]), torch.sigmoid(a[:, 3 * H:])
    c = f * c + i * g
    return (o * torch.tanh(c), c)


def test_eligibility_matches_detached_autograd(cell):
    params = {k: v.detach() for k, v in cell.params().items()}
    state, x = random_state(cell, B), torch.randn(B, D, dtype=DT)
    C = len(state)
    s = flatten_state(state)

    def f(s):
        return torch.cat(reference_step_detached(cell, params, tuple(unflatten_state(s, state)), x),
                         -1)

    J = torch.autograd.functional.jacobian(f, s)                       # (B, S, B, S)
    J = torch.stack([J[b, :, b, :] for b in range(B)]).view(B, C, H, C, H)
    ref = torch.stack([J[:, :, i, :, i] for i in range(H)], 1)         # (B, U, C, C)
    elig = cell.linearize(params, state, x, need=("eligibility",)).eligibility
    assert elig.shape == (B, H, C, C)
    assert close(elig, ref)
    assert close(cell.eligibility_jacobian(params, state, x), ref)
    # the reference really cuts something: e-prop's Jacobian is not SnAp-1's local one
    assert not close(elig, cell.linearize(params, state, x, need=("local",)).local, 1e-6)


# ---- step: pure and vmap-compatible ------------------------------------------------------


def test_step_is_pure_and_vmappable(cell):
    params = cell.params()
    state, x = random_state(cell, B), torch.randn(B, D, dtype=DT)
    before = [s.clone() for s in state], x.clone(), {k: v.detach().clone() for k, v in params.items()}
    batched = cell.step(params, state, x)
    assert all(torch.equal(a, b) for a, b in zip(state, before[0]))
    assert torch.equal(x, before[1])
    assert all(torch.equal(params[k], v) for k, v in before[2].items())

    def one(*args):
        *comps, xb = args
        st = type(state)(*(c.unsqueeze(0) for c in comps))
        return tuple(c.squeeze(0) for c in cell.step(params, st, xb.unsqueeze(0)))

    per_example = torch.func.vmap(one)(*state, x)
    for a, b in zip(per_example, batched):
        assert close(a, b)


# ---- hand-derived BPTT against autograd through a loop of step ---------------------------


def autograd_reference(cell, params, inputs, state0, d_outputs, d_state):
    """Gradients of L = sum_t <d_outputs[t], h_t> + <d_state, state_T> by autograd through
    a plain loop of ``step``."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    xs = inputs.detach().clone().requires_grad_(True)
    s0 = type(state0)(*(s.detach().clone().requires_grad_(True) for s in state0))
    s, L = s0, 0.0
    for t in range(inputs.shape[0]):
        s = cell.step(p, s, xs[t])
        L = L + (cell.output(s) * d_outputs[t]).sum()
    if d_state is not None:
        L = L + sum((a * b).sum() for a, b in zip(s, d_state))
    names = list(p)
    g = torch.autograd.grad(L, [*(p[k] for k in names), xs, *s0])
    return dict(zip(names, g[:len(names)])), g[len(names)], g[len(names) + 1:]


@pytest.mark.parametrize("T,batch", [(1, 1), (1, 3), (6, 1), (7, 4)])
@pytest.mark.parametrize("with_d_state", [False, True])
def test_hand_bptt_matches_autograd(cell, T, batch, with_d_state):
    assert cell.hand_derived_bptt
    params = {k: v.detach() for k, v in cell.params().items()}
    inputs = torch.randn(T, batch, D, dtype=DT)
    state0 = random_state(cell, batch)
    d_out = torch.randn(T, batch, H, dtype=DT)
    d_state = random_state(cell, batch) if with_d_state else None
    outs, sT, cache = cell.forward_sequence(params, inputs, state0, cache=True)
    # forward: the same trajectory as a loop of step
    s = state0
    for t in range(T):
        s = cell.step(params, s, inputs[t])
        assert close(outs[t], cell.output(s))
    assert all(close(a, b) for a, b in zip(sT, s))
    grads, d_in, d_s0 = cell.backward_sequence(params, inputs, state0, cache, d_out, d_state)
    ref_g, ref_x, ref_s0 = autograd_reference(cell, params, inputs, state0, d_out, d_state)
    assert set(grads) == set(ref_g)
    for k in ref_g:
        assert grads[k].shape == ref_g[k].shape
        assert rel_err(grads[k], ref_g[k]) <= 1e-10, k
    assert rel_err(d_in, ref_x) <= 1e-10
    assert type(d_s0) is type(state0)
    for a, b in zip(d_s0, ref_s0):
        assert rel_err(a, b) <= 1e-10
    # input_grad=False skips d_inputs and changes nothing else
    _, _, cache = cell.forward_sequence(params, inputs, state0, cache=True)
    g2, none, d_s0b = cell.backward_sequence(params, inputs, state0, cache, d_out, d_state,
                                             input_grad=False)
    assert none is None
    assert all(torch.equal(g2[k], grads[k]) for k in grads)
    assert all(torch.equal(a, b) for a, b in zip(d_s0b, d_s0))


def test_hand_bptt_matches_generic_path(cell):
    """The hand derivation against the base class's torch.func vjp per step."""
    params = {k: v.detach() for k, v in cell.params().items()}
    T, batch = 5, 3
    inputs = torch.randn(T, batch, D, dtype=DT)
    state0, d_state = random_state(cell, batch), random_state(cell, batch)
    d_out = torch.randn(T, batch, H, dtype=DT)
    outs, _, cache = cell.forward_sequence(params, inputs, state0, cache=True)
    g_outs, _, g_cache = Cell.forward_sequence(cell, params, inputs, state0, cache=True)
    assert close(outs, g_outs)
    mine = cell.backward_sequence(params, inputs, state0, cache, d_out, d_state)
    ref = Cell.backward_sequence(cell, params, inputs, state0, g_cache, d_out, d_state)
    for k in ref[0]:
        assert rel_err(mine[0][k], ref[0][k]) <= 1e-10, k
    assert rel_err(mine[1], ref[1]) <= 1e-10
    for a, b in zip(mine[2], ref[2]):
        assert rel_err(a, b) <= 1e-10
