"""UORO is unbiased: the mean of h~ theta~^T over independent draws converges to RTRL's
influence (exact, by autograd) at the rate 1/sqrt(n)."""

import pytest
import torch
from online_refs import (
    check_fresh_noise_but_reproducible,
    check_h0_and_eps_raise,
    check_unbiased_gradient,
    check_unbiased_influence,
    make_model,
    run_steps,
)
from test_network_algorithms import D, K, data, make_net

import rnngrad
from rnngrad.algorithms import _signs
from rnngrad.algorithms import _uoro_sequence as _seq
from rnngrad.algorithms._network import trajectory
from rnngrad.algorithms.base import add_grads
from rnngrad.cells import Elman


def uoro_samples(model, x1, n, seed):
    """n independent UORO estimates of M_T for the one sequence x1 (T, D): a batch of n
    copies of it, each example with its own signs. Returns (n, H, H, P)."""
    x = x1[:, None, :].expand(-1, n, -1).contiguous()
    state = run_steps(rnngrad.uoro(seed=seed), model, x)
    return state.h_tilde[:, :, None, None] * state.theta_tilde[:, None, :, :]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_unbiased_influence(alpha):
    check_unbiased_influence(uoro_samples, alpha)


def test_gradient_is_unbiased():
    check_unbiased_gradient(rnngrad.uoro)


def test_h0_and_bad_eps_raise():
    check_h0_and_eps_raise(rnngrad.uoro)


def test_fresh_noise_across_sequences_but_reproducible():
    check_fresh_noise_but_reproducible(rnngrad.uoro)


# --- the whole-sequence form against the online steps -------------------------------------

SEQ_KINDS = ["elman", "elman_leaky", "gru", "lstm", "lru", "elstm", "mgu", "lif", "alif",
             "stack2"]


def _online_sum(algo, net, x, y, mask, dh=None, loss="mse"):
    state = algo.init(net, x.shape[1])
    total = None
    for t in range(x.shape[0]):
        state, _, g = algo.step(net, state, x[t], y[t], mask_t=mask[t], loss=loss,
                                dh_t=None if dh is None else dh[t])
        total = add_grads(total, g)
    state, g = algo.flush(net, state)
    return add_grads(total, g)


def _rel(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-300)).item() for k in b)


@pytest.mark.parametrize("kind", ["rnn", "rnn_leaky", *SEQ_KINDS])
@pytest.mark.parametrize("chunk", [None, 3])
def test_sequence_equals_online_steps(kind, chunk, monkeypatch):
    """rnngrad.gradient (the sequence form where it applies: theta~ as a weighted sum of
    rank-one terms, chunks of 3 steps forcing the carried theta~) equals the sum of what
    init / step / flush emit with the same seed, to 1e-10 in float64; twice in a row (the
    generator continues the same way on both paths)."""
    if chunk is not None:
        monkeypatch.setattr(_seq, "CHUNK", chunk)
    if kind.startswith("rnn"):
        net = make_model(D=D, H=5, K=K, alpha=0.5 if kind == "rnn_leaky" else 1.0)
    else:
        net = make_net(kind)
    x, y, mask = data(T=8)
    seq, onl = rnngrad.uoro(seed=3), rnngrad.uoro(seed=3)
    for _ in range(2):
        _, g = rnngrad.gradient(net, x, y, mask=mask, algorithm=seq)
        ref = _online_sum(onl, net, x, y, mask)
        assert set(g) == set(ref)
        assert _rel(g, ref) <= 1e-10, kind


def test_sequence_equals_online_with_a_reward_and_cross_entropy():
    net = make_net("gru", readout="softmax")
    x, y, mask = data(T=6, loss="cross_entropy")

    def reward(h):
        return (h[-1] ** 2).sum() * 0.3

    _, g = rnngrad.gradient(net, x, y, mask=mask, loss="cross_entropy", reward=reward,
                            algorithm=rnngrad.uoro(seed=1))
    dh = torch.zeros(6, 3, net.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        hs = trajectory(net, x, net.init_state(3))
    dh[-1] = -2 * 0.3 * hs[-1]  # -dR/dh_T
    ref = _online_sum(rnngrad.uoro(seed=1), net, x, y, mask, dh=dh, loss="cross_entropy")
    assert _rel(g, ref) <= 1e-10


def test_sequence_refuses_h0():
    net = make_net("gru")
    x, y, _ = data(T=4)
    h0 = net.init_state(3)
    h0 = (type(h0[0])(torch.ones_like(h0[0][0])),)
    with pytest.raises(ValueError, match="initial state"):
        rnngrad.gradient(net, x, y, h0=h0, algorithm=rnngrad.uoro())


def test_signs_are_drawn_a_block_at_a_time_and_buffers_are_reused():
    """One generator call per BLOCK steps; theta~ and the block keep their storage."""
    net = make_model(D=D, H=5, K=K)
    x, y, _ = data(T=_signs.BLOCK + 3)
    algo = rnngrad.uoro(seed=2)
    state = algo.init(net, 3)
    state, _, _ = algo.step(net, state, x[0], y[0])
    ptrs = (state.theta_tilde.data_ptr(), state.signs.data_ptr())
    gen = algo.rng["cpu"]
    before = gen.get_state()
    for t in range(1, _signs.BLOCK):
        state, _, _ = algo.step(net, state, x[t], y[t])
    assert torch.equal(gen.get_state(), before)  # still the first block
    state, _, _ = algo.step(net, state, x[_signs.BLOCK], y[_signs.BLOCK])
    assert not torch.equal(gen.get_state(), before)  # a new block, in one call
    assert (state.theta_tilde.data_ptr(), state.signs.data_ptr()) == ptrs


def test_network_elman_takes_the_fused_step_and_equals_rnn():
    """rnngrad.RNN and Network(Elman) with the same weights emit the same numbers online."""
    rnn = make_model(D=D, H=5, K=K)
    net = rnngrad.Network(Elman(D, 5, dtype=torch.float64), K)
    net.load_state_dict({("cells.0." + k if k in ("W_in", "W_rec", "b_rec") else k): v
                         for k, v in rnn.state_dict().items()})
    x, y, mask = data(T=5)
    for factory in (rnngrad.uoro, rnngrad.kf_rtrl):
        a = _online_sum(factory(seed=4), rnn, x, y, mask)
        b = _online_sum(factory(seed=4), net, x, y, mask)
        for k, v in a.items():
            name = "cells.0." + k if k in ("W_in", "W_rec", "b_rec") else k
            torch.testing.assert_close(b[name], v, rtol=1e-13, atol=1e-15)


def test_network_step_updates_theta_in_place():
    """On a one-layer network with a factored immediate term (GRU) the online step adds
    m_t into theta~ in place: theta~ and the sign block keep their storage."""
    net = make_net("gru")
    x, y, _ = data(T=4)
    algo = rnngrad.uoro(seed=2)
    state = algo.init(net, 3)
    ptrs = (state.theta_tilde.data_ptr(), state.signs.data_ptr())
    for t in range(4):
        state, _, _ = algo.step(net, state, x[t], y[t])
    assert (state.theta_tilde.data_ptr(), state.signs.data_ptr()) == ptrs


def test_gradient_with_h0_raises_on_both_paths():
    """A given h0, zero or not, is refused (UORO does not estimate dL/dh0), by the sequence
    form as by the online init."""
    net = make_model(D=D, H=5, K=K)
    x, y, _ = data(T=4)
    for h0 in (torch.zeros(3, 5, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)):
        for algo in (rnngrad.uoro(), rnngrad.uoro()._replace(sequence=None)):
            with pytest.raises(ValueError, match="initial state h0"):
                rnngrad.gradient(net, x, y, h0=h0, algorithm=algo)


@pytest.mark.parametrize("kind", ["lif", "alif"])
def test_spiking_gradient_is_unbiased_and_has_no_self_connections(kind):
    """LIF/ALIF declare W_rec's immediate term as one shared input row with the diagonal
    masked (no self-connections): UORO's m_t keeps those entries zero, on the sequence
    form and online, and the mean of n independent estimates (n copies of one sequence)
    is BPTT's gradient through the same surrogate."""
    f64 = {"dtype": torch.float64}
    torch.manual_seed(0)
    cell = (rnngrad.cells.LIF(2, 4, v_th=0.3, **f64) if kind == "lif"
            else rnngrad.cells.ALIF(2, 4, v_th=0.3, beta=0.2, t_ref=2.0, **f64))
    net = rnngrad.Network(cell, 2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1, 2, generator=g, **f64) * 2
    y = torch.randn(6, 1, 2, generator=g, **f64)
    n = 20000
    X, Y = x.expand(-1, n, -1).contiguous(), y.expand(-1, n, -1).contiguous()
    _, est = rnngrad.gradient(net, X, Y, algorithm=rnngrad.uoro(seed=5))
    _, exact = rnngrad.gradient(net, x, y)
    for name in ("cells.0.W_in", "cells.0.W_rec"):
        rel = ((est[name] - exact[name]).norm() / exact[name].norm()).item()
        assert rel < 0.1, (name, rel)
    assert torch.equal(est["cells.0.W_rec"].diagonal(), torch.zeros(4, **f64))
    online = _online_sum(rnngrad.uoro(seed=5), net, X[:, :50], Y[:, :50],
                         torch.ones(6, 50, **f64))
    assert torch.equal(online["cells.0.W_rec"].diagonal(), torch.zeros(4, **f64))


@pytest.mark.parametrize("kind", ["gru", "lstm", "lif", "alif", "lru", "elstm"])
def test_structured_jv_equals_forward_mode_at_every_step(kind):
    """The sequence form's J_t v from the declared structure (the cell's per-unit blocks
    and one GEMM over the recurrent weights) equals torch.func's jvp of the step, at every
    step, on random tangents."""
    from rnngrad.algorithms._network import bind
    from rnngrad.cells._derive import jvp

    net = make_net(kind)
    x, _, _ = data(T=6)
    b = bind(net)
    cell, params = b.cells[0], b.params[0]
    s0 = cell.init_state(x.shape[1])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        h_all, nu, fac, Jv, _ = _seq._generic(cell, params, x, s0, gen, 1e-7)
    assert Jv.__qualname__.startswith("_structured_jv")
    st, g = s0, torch.Generator().manual_seed(1)
    for t in range(x.shape[0]):
        s = torch.cat(tuple(st), -1)
        v = torch.randn(s.shape, generator=g, dtype=s.dtype)

        def F(u, t=t, st=st):
            parts = torch.split(u, [c.shape[-1] for c in st], -1)
            return torch.cat(tuple(cell.step(params, type(st)(*parts), x[t])), -1)

        ref = jvp(F, (s,), (v,))[1]
        torch.testing.assert_close(Jv(t, v), ref, rtol=1e-12, atol=1e-12)
        st = cell.step(params, st, x[t])


@pytest.mark.parametrize("pattern", ["offdiag", "random_sparse", "random_dense"])
def test_masked_gram_equals_the_dense_one(pattern):
    """<m_t, m_tau> of a masked rank-one term ((f inp^T) * mask) from the Gram matrices of
    f and inp less (or only) the masked entries' products, against the dense terms."""
    g = torch.Generator().manual_seed(0)
    K, B, R, P = 5, 3, 6, 7
    f = torch.randn(K, B, R, generator=g, dtype=torch.float64)
    inp = torch.randn(K, B, P, generator=g, dtype=torch.float64)
    if pattern == "offdiag":
        mask = torch.ones(R, P, dtype=torch.float64)
        mask[:, 1:].fill_diagonal_(0.0)
    else:
        p = 0.2 if pattern == "random_sparse" else 0.8
        mask = (torch.rand(R, P, generator=g) > p).to(torch.float64)
    m = f.unsqueeze(3) * inp.unsqueeze(2) * mask  # (K, B, R, P)
    ref = torch.einsum("kbrp,lbrp->bkl", m, m)
    G = _seq._block_gram([f], [inp], [_seq._holes(mask)])
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-12)
