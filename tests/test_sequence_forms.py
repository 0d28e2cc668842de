"""Every truncated rule in sequence form (``_sequence``) equals the sum of what its online
``init`` / ``step`` / ``flush`` emit, float64, relative error <= 1e-10: e-prop (symmetric,
random), RFLO, SnAp-1, RTRL on a diagonal cell and spatial RTRL, on every built-in cell,
stacks, user cells, ``rnngrad.RNN``; with masks, an initial state, a reward and a leaky
readout. Where a theorem applies (SnAp-1 on a diagonal cell is exact RTRL) the sequence
form equals autograd. Chunks (``rnngrad.run``) carry the traces and equal single steps."""

from __future__ import annotations

import pytest
import torch
from cell_zoo import MGU, Adaptive, Diagonal
from net_reference import max_rel_err, net_grads

import rnngrad
from rnngrad.cells import ALIF, ELSTM, GRU, LIF, LRU, LSTM, Elman

TOL = 1e-10
D, K, T, B = 3, 2, 7, 3
f64 = {"dtype": torch.float64}

NETS = {
    "elman": lambda: [Elman(D, 5, **f64)],
    "elman_leaky": lambda: [Elman(D, 4, alpha=0.4, activation="softplus", **f64)],
    "gru": lambda: [GRU(D, 4, **f64)],
    "lstm": lambda: [LSTM(D, 4, **f64)],
    "lif": lambda: [LIF(D, 4, v_th=0.3, **f64)],
    "alif": lambda: [ALIF(D, 4, v_th=0.3, beta=0.2, t_ref=2.0, **f64)],
    "lif_refractory": lambda: [LIF(D, 4, v_th=0.3, t_ref=3.0, surrogate="arctan", **f64)],
    "alif_beta_per_unit": lambda: [ALIF(D, 4, v_th=0.3, beta=[0.0, 0.1, 0.3, 0.5], **f64)],
    "lru": lambda: [LRU(D, 4, **f64)],
    "lru_glu": lambda: [LRU(D, D, state_size=5, norm=True, glu=True, residual=True, **f64)],
    "elstm": lambda: [ELSTM(D, 4, **f64)],
    "user_mgu": lambda: [MGU(D, 5)],
    "user_adaptive": lambda: [Adaptive(D, 4)],
    "user_diagonal": lambda: [Diagonal(D, 4)],
    "stack_lstm_gru": lambda: [LSTM(D, 4, **f64), GRU(4, 3, **f64)],
    "stack_elman": lambda: [Elman(D, 4, **f64), Elman(4, 3, alpha=0.6, **f64)],
    "stack_lru_alif": lambda: [LRU(D, 4, **f64), ALIF(4, 3, v_th=0.3, **f64)],
    "stack_user": lambda: [Elman(D, 4, **f64), MGU(4, 5)],
}
DIAGONAL = {"lru", "lru_glu", "elstm", "user_diagonal"}
ELMAN = {"elman", "elman_leaky", "stack_elman", "rnn"}


def make(kind: str, *, readout_decay: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "rnn":
        return rnngrad.RNN(D, 5, K, alpha=0.5, dtype=torch.float64)
    return rnngrad.Network(NETS[kind](), K, readout_decay=readout_decay)


def rules(kind: str) -> dict:
    out = {"eprop": rnngrad.eprop(), "eprop_random": rnngrad.eprop("random", seed=3),
           "snap1": rnngrad.snap1()}
    if kind in ELMAN:
        out["rflo"] = rnngrad.rflo(seed=1)
    if kind in DIAGONAL:
        out["rtrl_diagonal"] = rnngrad.rtrl()
    if kind.startswith("stack"):
        out["rtrl_spatial"] = rnngrad.rtrl(layers="spatial")
    return out


def data(seed=1, loss="mse"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=torch.float64)
    y = (torch.randint(0, K, (T, B), generator=g) if loss == "cross_entropy"
         else torch.randn(T, B, K, generator=g, dtype=torch.float64))
    mask = torch.randint(0, 3, (T, B), generator=g).double() * 0.5
    return x, y, mask


def random_state(net, seed=2):
    g = torch.Generator().manual_seed(seed)
    if isinstance(net, rnngrad.RNN):
        return 0.5 * torch.randn(B, net.hidden_size, generator=g, dtype=torch.float64)
    def draw(f, c):  # a refractory counter holds whole steps left
        r = torch.randn(c.shape, generator=g, dtype=c.dtype)
        return (r > 0.5).to(c.dtype) if f == "q" else 0.5 * r

    return tuple(type(s)(*(draw(f, c) for f, c in zip(s._fields, s)))
                 for s in net.init_state(B))


def reward(h):
    w = torch.linspace(0.5, 1.5, h.shape[0], dtype=h.dtype).view(-1, 1, 1)
    return (w * torch.sin(h)).sum() - 0.25 * (h * h).mean()


def rel(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))
    return max(rel(x, y) for x, y in zip(a, b))


def both(net, algo, x, y, **kw):
    """(sequence form, the online steps' sum), both through rnngrad.gradient."""
    assert algo.sequence is not None
    return (rnngrad.gradient(net, x, y, algorithm=algo, **kw),
            rnngrad.gradient(net, x, y, algorithm=algo._replace(sequence=None), **kw))


CASES = [(kind, name) for kind in [*NETS, "rnn"] for name in rules(kind)]


@pytest.mark.parametrize("kind,name", CASES)
@pytest.mark.parametrize("variant", ["plain", "mask_h0", "reward_ce"])
def test_sequence_form_equals_online_steps(kind, name, variant):
    net = make(kind)
    algo = rules(kind)[name]
    loss = "cross_entropy" if variant == "reward_ce" else "mse"
    if loss == "cross_entropy":
        net.readout = "softmax"
    x, y, mask = data(loss=loss)
    kw = {"loss": loss}
    if variant == "mask_h0":
        kw.update(mask=mask, h0=random_state(net))
    if variant == "reward_ce":
        kw.update(reward=reward, mask=mask)
    (v1, g1), (v2, g2) = both(net, algo, x, y, **kw)
    assert set(g1) == set(g2)
    assert abs(float(v1 - v2)) <= TOL * max(1.0, abs(float(v2)))
    for n in g2:
        assert rel(g1[n], g2[n]) <= TOL, (n, rel(g1[n], g2[n]))
    assert any(float(v.abs().max()) > 0 for n, v in g2.items() if n not in ("h0", "W_out"))


LEAKY = ["elman", "elman_leaky", "gru", "lstm", "alif", "user_adaptive", "user_mgu"]


@pytest.mark.parametrize("kind", LEAKY)
@pytest.mark.parametrize("name", ["eprop", "eprop_random", "snap1"])
def test_sequence_form_with_a_leaky_readout(kind, name):
    """Bellec et al.'s filtered eligibility traces: their adjoint filters the signal."""
    net = make(kind, readout_decay=0.6)
    x, y, mask = data()
    kw = {"mask": mask, "h0": random_state(net), "reward": reward}
    (v1, g1), (v2, g2) = both(net, rules(kind)[name], x, y, **kw)
    assert abs(float(v1 - v2)) <= TOL * max(1.0, abs(float(v2)))
    for n in g2:
        assert rel(g1[n], g2[n]) <= TOL, (n, rel(g1[n], g2[n]))


@pytest.mark.parametrize("kind", sorted(DIAGONAL))
def test_snap1_in_sequence_form_on_a_diagonal_cell_is_autograd(kind):
    """Theorem (Menick et al. 2021): where units do not couple SnAp-1 is exact RTRL."""
    net = make(kind)
    x, y, mask = data()
    h0 = random_state(net)
    _, ref = net_grads(net, x, y, mask=mask, state0=h0)  # autograd through net's forward
    for algo in (rnngrad.snap1(), rnngrad.rtrl()):
        assert algo.sequence is not None
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, mask=mask, h0=h0)
        assert max_rel_err(g, ref) <= TOL, algo.name


def test_sequence_form_declines_what_it_does_not_cover():
    """rtrl() on a network whose units couple keeps its dense influence: the step loop."""
    net = make("gru")
    algo = rnngrad.rtrl()
    x, y, _ = data()
    assert algo.sequence(net, x, y, torch.ones(T, B, **f64), net.init_state(B), "mse",
                         None) is None
    _, g = rnngrad.gradient(net, x, y, algorithm=algo)
    _, ref = rnngrad.gradient(net, x, y)
    assert max_rel_err(g, ref) <= TOL


# --- chunks: rnngrad.run carries the traces across the boundary ---------------------------

CHUNK_CASES = [(kind, name) for kind in [*NETS, "rnn"] for name in rules(kind)]


def _steps(net, algo, state, x, y, mask, dh):
    total, hs = None, []
    for t in range(x.shape[0]):
        state, out, g = algo.step(net, state, x[t], y[t], mask_t=mask[t], dh_t=dh[t])
        total = rnngrad.algorithms.base.add_grads(total, g)
        hs.append(out.h)
    return state, torch.stack(hs), total


def _flat(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, dict):
        return [t for k in sorted(v) for t in _flat(v[k])]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _flat(x)]
    return []


@pytest.mark.parametrize("kind,name", CHUNK_CASES)
def test_chunks_equal_single_steps(kind, name):
    """Chunks of 3, 3, 1 steps from a state carried in equal the 7 single steps: every
    gradient (h0 included), the outputs and the state carried out (traces too)."""
    net = make(kind)
    x, y, mask = data()
    g = torch.Generator().manual_seed(5)
    dh = 0.3 * torch.randn(T, B, net.hidden_size, generator=g, dtype=torch.float64)
    algo = rules(kind)[name]
    h0 = random_state(net)
    ref_state, ref_h, ref = _steps(net, algo, algo.init(net, B, h0=h0), x, y, mask, dh)
    state, total, hs = algo.init(net, B, h0=h0), None, []
    for s, e in ((0, 3), (3, 6), (6, 7)):
        state, out, gr = rnngrad.run(algo, net, state, x[s:e], y[s:e], mask=mask[s:e],
                                     dh=dh[s:e])
        total = rnngrad.algorithms.base.add_grads(total, gr)
        hs.append(out.h)
    assert rel(torch.cat(hs), ref_h) <= TOL
    assert set(total) == set(ref)
    for n in ref:
        assert rel(total[n], ref[n]) <= TOL, (n, rel(total[n], ref[n]))
    for a, b in zip(_flat(state), _flat(ref_state)):  # traces, c, h carried out
        assert rel(a, b) <= TOL
    # and the state works on: one more single step from each gives the same gradient
    _, _, g1 = algo.step(net, state, x[0], y[0])
    _, _, g2 = algo.step(net, ref_state, x[0], y[0])
    for n in g2:
        assert rel(g1[n], g2[n]) <= TOL


def test_chunk_uses_the_closed_form_for_the_trace_rules():
    from rnngrad.algorithms._chunk import _closed_form

    for kind in ("lstm", "stack_lru_alif", "user_adaptive", "rnn"):  # rnngrad.RNN too
        net = make(kind)
        assert _closed_form(rnngrad.eprop().init(net, B)), kind
        assert _closed_form(rnngrad.snap1().init(net, B)), kind


class _Drifting(Elman):
    """An Elman cell whose linearization writes its own weights (as an optimizer run from a
    callback would; its step stays pure): a chunk over it must refuse."""

    def linearize(self, params, state, x, *, need=()):
        with torch.no_grad():
            self.b_rec.add_(1e-3)
        return super().linearize(params, state, x, need=need)

    def linearize_sequence(self, params, inputs, state0, *, need=()):
        with torch.no_grad():
            self.b_rec.add_(1e-3)
        return super().linearize_sequence(params, inputs, state0, need=need)


def test_a_chunk_whose_weights_change_is_refused():
    net = rnngrad.Network([_Drifting(D, 4, **f64)], K, verify=False)  # (it would be refused)
    x, y, _ = data()
    algo = rnngrad.eprop()
    state = algo.init(net, B)
    with pytest.raises(RuntimeError, match=r"weights changed during the chunk \(cells.0.b_rec"):
        rnngrad.run(algo, net, state, x[:3], y[:3])


def test_a_chunks_state_is_stamped_like_a_steps():
    # the state a closed-form chunk returns carries its algorithm and is refused once consumed
    net = make("elman_leaky")
    x, y, _ = data()
    algo = rnngrad.eprop()
    s1, _, _ = rnngrad.run(algo, net, algo.init(net, B), x[:3], y[:3])
    with pytest.raises(TypeError, match="eprop"):
        rnngrad.snap1().step(net, s1, x[3], y[3])
    s2, _, g2 = algo.step(net, s1, x[3], y[3])
    try:  # stepping the chunk's state again: refused, or (its buffers untouched) the same
        _, _, again = algo.step(net, s1, x[3], y[3])
    except ValueError as e:
        assert "already consumed" in str(e)
    else:
        assert all(torch.equal(g2[n], again[n]) for n in g2)
    algo.step(net, s2, x[4], y[4])
    with pytest.raises(ValueError, match="already consumed"):  # a step's state, in a Network's
        algo.step(net, s2, x[4], y[4])                          # per-layer trace dicts


def test_run_rejects_bad_input():
    net = make("elman")
    x, y, _ = data()
    algo = rnngrad.snap1()
    state = algo.init(net, B)
    with pytest.raises(ValueError, match="dh must be a"):
        rnngrad.run(algo, net, state, x, y, dh=torch.zeros(T, B, 2, **f64))
    with pytest.raises(TypeError, match="rnngrad algorithm"):
        rnngrad.run("eprop", net, state, x, y)


@pytest.mark.parametrize("rule", ["snap1", "eprop"])
def test_a_large_undeclared_layer_is_left_to_the_step_loop(rule, monkeypatch):
    """Past DERIVED_LIMIT, an undeclared cell's (T B, S, S) Jacobian is not formed: the
    sequence slot declines (None) and gradient's step loop gives the same numbers."""
    from rnngrad.algorithms import _sequence

    net = make("user_mgu")
    x, y, mask = data()
    algo = getattr(rnngrad, rule)()
    _, g_seq = rnngrad.gradient(net, x, y, mask=mask, algorithm=algo)
    h0 = net.coerce_state(None, B)[0]
    assert algo.sequence(net, x, y, mask, h0, "mse", None) is not None
    monkeypatch.setattr(_sequence, "DERIVED_LIMIT", T * B * 25 - 1)  # S = 5: just past it
    assert algo.sequence(net, x, y, mask, h0, "mse", None) is None
    _, g_loop = rnngrad.gradient(net, x, y, mask=mask, algorithm=algo)
    assert max_rel_err(g_loop, g_seq) < 1e-10
    built_in = rnngrad.Network([Elman(D, 5, **f64)], K)  # a declared cell is never declined
    assert algo.sequence(built_in, x, y, mask, built_in.coerce_state(None, B)[0], "mse",
                         None) is not None
