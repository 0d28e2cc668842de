"""Every algorithm on every kind of network: Elman, user cells defined only in tests
(cell_zoo), two- and three-layer mixed stacks (GRU and LSTM when the library has them).

Exact algorithms equal autograd through the network's own forward in float64 at relative
error <= 1e-10, through the whole-sequence path and the init/step/flush path; truncated
BPTT equals autograd with the state (every component) detached every k steps; SnAp-1 and
e-prop equal the exact gradient of the graph they differentiate; UORO is unbiased."""

from __future__ import annotations

import math

import pytest
import torch
from cell_zoo import MGU, Adaptive, Diagonal, MGUResetBefore, TanhGate
from net_reference import max_rel_err, net_grads, spatial_grads

import rnngrad
from rnngrad.cells import Elman

TOL = 1e-10
D, K = 3, 2


def _builtin(name):
    return getattr(rnngrad.cells, name, None)


def make_net(kind: str, *, readout="identity", seed=0) -> rnngrad.Network:
    torch.manual_seed(seed)
    f64 = {"dtype": torch.float64}
    GRU, LSTM = _builtin("GRU"), _builtin("LSTM")
    cells = {
        "elman": lambda: [Elman(D, 5, **f64)],
        "elman_leaky": lambda: [Elman(D, 4, alpha=0.4, activation="softplus", **f64)],
        "mgu": lambda: [MGU(D, 5)],
        "tanhgate": lambda: [TanhGate(D, 4)],
        "adaptive": lambda: [Adaptive(D, 4)],
        "stack2": lambda: [Elman(D, 4, **f64), MGU(4, 5)],
        "stack3": lambda: [MGU(D, 4), Adaptive(4, 3), Elman(3, 4, alpha=0.7, **f64)],
        "gru": lambda: [GRU(D, 4, **f64)],
        "lstm": lambda: [LSTM(D, 4, **f64)],
        "stack_lstm_gru": lambda: [LSTM(D, 4, **f64), GRU(4, 3, **f64)],
        "stack3_mixed": lambda: [GRU(D, 3, **f64), Elman(3, 4, **f64), LSTM(4, 3, **f64)],
        # issue 9's cells, v_th low enough that the units spike on these inputs
        "lif": lambda: [rnngrad.cells.LIF(D, 4, v_th=0.3, **f64)],
        "alif": lambda: [rnngrad.cells.ALIF(D, 4, v_th=0.3, beta=0.2, t_ref=2.0, **f64)],
        "lru": lambda: [rnngrad.cells.LRU(D, 4, **f64)],
        "elstm": lambda: [rnngrad.cells.ELSTM(D, 4, **f64)],
        "stack_lru_alif": lambda: [rnngrad.cells.LRU(D, 4, **f64),
                                   rnngrad.cells.ALIF(4, 3, v_th=0.3, **f64)],
    }[kind]()
    return rnngrad.Network(cells, K, readout=readout)


KINDS = ["elman", "elman_leaky", "mgu", "tanhgate", "adaptive", "stack2", "stack3"]
if _builtin("GRU") is not None and _builtin("LSTM") is not None:
    KINDS += ["gru", "lstm", "stack_lstm_gru", "stack3_mixed"]
if all(_builtin(c) is not None for c in ("LIF", "ALIF", "LRU", "ELSTM")):
    KINDS += ["lif", "alif", "lru", "elstm", "stack_lru_alif"]


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
    "bptt_ckpt1": lambda T: rnngrad.bptt(checkpoint=1),
    "bptt_ckpt3": lambda T: rnngrad.bptt(checkpoint=3),
    "tbptt_T": lambda T: rnngrad.tbptt(T),
    "tbptt_T+3": lambda T: rnngrad.tbptt(T + 3),
    "rtrl": lambda T: rnngrad.rtrl(),
    "rtrl_generic": lambda T: rnngrad.rtrl(generic=True),
}


def both_paths(algo):
    out = [algo]
    if algo.sequence is not None:
        out.append(algo._replace(sequence=None))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", EXACT)
def test_exact_algorithms_equal_autograd(kind, name):
    net = make_net(kind)
    x, y, mask = data()
    _, ref = net_grads(net, x, y, mask=mask)
    for algo in both_paths(EXACT[name](x.shape[0])):
        loss, g = rnngrad.gradient(net, x, y, algorithm=algo, mask=mask)
        assert set(g) == {n for n, _ in net.named_parameters()}
        assert max_rel_err(g, ref) <= TOL, (algo.name, max_rel_err(g, ref))


@pytest.mark.parametrize("kind", ["mgu", "adaptive", "stack3"] + (["lstm"] if "lstm" in KINDS else []))
@pytest.mark.parametrize("name", EXACT)
def test_exact_with_h0_reward_and_cross_entropy(kind, name):
    net = make_net(kind, readout="softmax")
    x, y, mask = data(T=6, loss="cross_entropy")
    s0 = random_state(net, 3)
    _, ref = net_grads(net, x, y, loss="cross_entropy", mask=mask, state0=s0, reward=reward)
    for algo in both_paths(EXACT[name](6)):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, loss="cross_entropy", mask=mask,
                                h0=s0, reward=reward)
        assert isinstance(g["h0"], tuple) and len(g["h0"]) == net.num_layers
        assert max_rel_err(g, ref) <= TOL, (algo.name, max_rel_err(g, ref))


@pytest.mark.parametrize("kind", ["stack2", "adaptive"] + (["lstm", "stack_lstm_gru"] if "lstm" in KINDS else []))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_tbptt_equals_autograd_detached_every_k(kind, k):
    net = make_net(kind)
    x, y, mask = data(T=7)
    s0 = random_state(net, 3)
    _, ref = net_grads(net, x, y, mask=mask, state0=s0, detach_every=k)
    for algo in both_paths(rnngrad.tbptt(k)):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo, mask=mask, h0=s0)
        assert max_rel_err(g, ref) <= TOL, (algo.name, max_rel_err(g, ref))


def test_h0_in_the_form_it_was_given():
    net = make_net("elman")
    x, y, _ = data()
    h = torch.randn(5, dtype=torch.float64)  # shared over the batch: summed gradient
    _, g = rnngrad.gradient(net, x, y, h0=h)
    assert g["h0"].shape == (5,)
    _, g2 = rnngrad.gradient(net, x, y, h0=h.expand(3, 5).contiguous())
    torch.testing.assert_close(g["h0"], g2["h0"].sum(0), rtol=1e-12, atol=1e-14)
    net = make_net("adaptive")
    s0 = random_state(net, 3)[0]
    _, g = rnngrad.gradient(net, x, y, h0=s0)  # one layer's state alone
    assert type(g["h0"]).__name__ == type(s0).__name__


@pytest.mark.parametrize("kind", KINDS)
def test_online_step_sums_equal_gradient(kind):
    """init / step / flush with every online algorithm sums to what gradient returns."""
    net = make_net(kind)
    x, y, mask = data()
    for algo in (rnngrad.rtrl(), rnngrad.tbptt(2), rnngrad.bptt(), rnngrad.snap1(),
                 rnngrad.eprop(), rnngrad.uoro(seed=3)):
        _, ref = rnngrad.gradient(net, x, y, algorithm=algo._replace(sequence=None)
                                  if algo.sequence else algo, mask=mask)
        if algo.rng is not None:  # a fresh generator for the repeat
            algo = rnngrad.uoro(seed=3)
        state = algo.init(net, 3)
        total = None
        for t in range(5):
            state, out, g = algo.step(net, state, x[t], y[t], mask_t=mask[t])
            assert out.h.shape == (3, net.hidden_size) and out.z.shape == (3, K)
            total = rnngrad.algorithms.base.add_grads(total, g)
        state, g = algo.flush(net, state)
        total = rnngrad.algorithms.base.add_grads(total, g)
        assert max_rel_err(total, ref) <= TOL, algo.name


# --- the approximations -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mgu", "tanhgate", "adaptive", "stack2", "stack3"])
def test_snap1_is_the_gradient_of_the_unit_cut_graph(kind):
    net = make_net(kind)
    x, y, mask = data(T=6)
    s0 = random_state(net, 3)
    ref = spatial_grads(net, x, y, mask=mask, state0=s0)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.snap1(), mask=mask, h0=s0)
    assert max_rel_err(g, ref) <= TOL, max_rel_err(g, ref)
    # on a user's cell without a declared eligibility Jacobian, e-prop carries its traces
    # through the same per-unit blocks: with symmetric feedback it is the same gradient
    _, ge = rnngrad.gradient(net, x, y, algorithm=rnngrad.eprop(), mask=mask, h0=s0)
    if kind != "stack2" and kind != "stack3":
        assert max_rel_err(ge, ref) <= TOL


def test_snap1_equals_rtrl_when_units_do_not_couple():
    torch.manual_seed(0)
    net = rnngrad.Network(Diagonal(D, 5), K)
    x, y, mask = data(T=8)
    s0 = random_state(net, 3)
    _, exact = rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl(), mask=mask, h0=s0)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.snap1(), mask=mask, h0=s0)
    assert max_rel_err(g, exact) <= TOL
    # and where they couple it is an approximation
    net = make_net("mgu")
    _, exact = rnngrad.gradient(net, x, y, mask=mask)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.snap1(), mask=mask)
    assert max_rel_err(g, exact) > 1e-4


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_network_of_one_elman_layer_matches_rnn_for_every_algorithm(alpha):
    """The generic paths on Network([Elman]) equal rnngrad.RNN's hand-derived paths
    (same weights): the Elman cell's declared structure means the same equations."""
    torch.manual_seed(0)
    rnn = rnngrad.RNN(D, 5, K, alpha=alpha, dtype=torch.float64)
    cell = Elman(D, 5, alpha=alpha, dtype=torch.float64)
    net = rnngrad.Network(cell, K)
    with torch.no_grad():
        for n in ("W_in", "W_rec", "b_rec"):
            getattr(cell, n).copy_(getattr(rnn, n))
        net.W_out.copy_(rnn.W_out)
        net.b_out.copy_(rnn.b_out)
    x, y, mask = data(T=6)
    h0 = torch.randn(3, 5, dtype=torch.float64)
    for make in (rnngrad.snap1, rnngrad.eprop, lambda: rnngrad.eprop("random", seed=2),
                 rnngrad.rflo, rnngrad.bptt, rnngrad.rtrl):
        _, a = rnngrad.gradient(rnn, x, y, algorithm=make(), mask=mask, h0=h0)
        _, b = rnngrad.gradient(net, x, y, algorithm=make(), mask=mask, h0=h0)
        for n in ("W_in", "W_rec", "b_rec", "W_out", "b_out", "h0"):
            torch.testing.assert_close(b[n if n in ("W_out", "b_out", "h0") else f"cells.0.{n}"],
                                       a[n], rtol=1e-10, atol=1e-12, msg=f"{make}: {n}")


def test_rflo_and_kf_rtrl_name_the_cells_they_support():
    net = make_net("mgu")
    x, y, _ = data()
    with pytest.raises(ValueError, match=r"rflo\(\) is defined for the Elman form.*MGU"):
        rnngrad.gradient(net, x, y, algorithm=rnngrad.rflo())
    with pytest.raises(ValueError, match=r"kf_rtrl\(\) is defined for one Elman layer.*MGU"):
        rnngrad.gradient(net, x, y, algorithm=rnngrad.kf_rtrl())
    # RFLO on a stack of Elman layers is e-prop with random feedback
    torch.manual_seed(0)
    net = rnngrad.Network([Elman(D, 4, alpha=0.5, dtype=torch.float64),
                           Elman(4, 3, dtype=torch.float64)], K)
    _, a = rnngrad.gradient(net, x, y, algorithm=rnngrad.rflo(seed=4))
    _, b = rnngrad.gradient(net, x, y, algorithm=rnngrad.eprop("random", seed=4))
    assert max_rel_err(a, b) == 0.0


def test_rows_that_move_other_units_are_refused_by_the_trace_rules():
    torch.manual_seed(0)
    net = rnngrad.Network(MGUResetBefore(D, 4), K)
    x, y, _ = data()
    for algo in (rnngrad.snap1(), rnngrad.eprop()):
        with pytest.raises(ValueError, match=r"parameter 'W' of MGUResetBefore .* is not owned "
                                             r"row by row: row \d+ \(unit \d+.*moves unit \d+"):
            rnngrad.gradient(net, x, y, algorithm=algo)
    # the exact algorithms and UORO need no ownership
    _, ref = net_grads(net, x, y)
    for algo in (rnngrad.bptt(), rnngrad.rtrl()):
        assert max_rel_err(rnngrad.gradient(net, x, y, algorithm=algo)[1], ref) <= TOL
    rnngrad.gradient(net, x, y, algorithm=rnngrad.uoro())


def _per_step_bias_reference(layers, W_out, b_out, x, y, h0):
    """Loss and u^l_t = dL/da^l_t by autograd: a zero per-step bias e^l_t (T, B, H_l) added to
    each Elman layer's pre-activation, the gradient taken with respect to it."""
    T, B, _ = x.shape
    es = [torch.zeros(T, B, c.hidden_size, dtype=x.dtype, requires_grad=True) for c in layers]
    hs = list(h0)
    outs = []
    for t in range(T):
        inp = x[t]
        for l, c in enumerate(layers):
            a = inp @ c.W_in.T + hs[l] @ c.W_rec.T + c.b_rec + es[l][t]
            f = {"tanh": torch.tanh, "softplus": torch.nn.functional.softplus}[c.activation](a)
            hs[l] = torch.lerp(hs[l], f, c.alpha)
            inp = hs[l]
        outs.append(inp @ W_out.T + b_out)
    loss = 0.5 * ((torch.stack(outs) - y) ** 2).sum() / B
    return torch.autograd.grad(loss, es)


@pytest.mark.parametrize("kind", ["elman", "elman_leaky", "stack_elman"])
def test_sensitivities_on_elman_networks(kind):
    """bptt(sensitivities=True) on a Network of Elman layers: u^l_t = dL/da^l_t, by autograd
    through a zero per-step bias (float64, 1e-10); one tensor for one layer, a tuple per layer
    for a stack; the same from the whole-sequence path, the step path and checkpointing."""
    torch.manual_seed(3)
    f64 = {"dtype": torch.float64}
    layers = {"elman": [Elman(D, 5, **f64)],
              "elman_leaky": [Elman(D, 4, alpha=0.4, activation="softplus", **f64)],
              "stack_elman": [Elman(D, 4, **f64), Elman(4, 3, alpha=0.6, **f64)]}[kind]
    net = rnngrad.Network(layers, K)
    x, y, _ = data()
    h0 = [0.3 * torch.randn(x.shape[1], c.hidden_size, **f64) for c in layers]
    ref = _per_step_bias_reference(layers, net.W_out, net.b_out, x, y, h0)
    state0 = tuple(type(c.init_state(1))(h) for c, h in zip(layers, h0))
    for algo in (rnngrad.bptt(sensitivities=True), rnngrad.bptt(checkpoint=2, sensitivities=True)):
        for a in (algo, algo._replace(sequence=None)):
            _, g = rnngrad.gradient(net, x, y, algorithm=a, h0=state0)
            u = g["u"] if len(layers) > 1 else (g["u"],)
            assert isinstance(g["u"], tuple) == (len(layers) > 1)
            for got, want in zip(u, ref):
                assert got.shape == want.shape
                assert float((got - want).norm() / want.norm()) <= TOL


def test_sensitivities_equal_on_rnn_and_network():
    model = rnngrad.RNN(D, 4, K, alpha=0.7, dtype=torch.float64)
    net = rnngrad.Network(Elman(D, 4, alpha=0.7, dtype=torch.float64), K)
    net.load_state_dict({("cells.0." + k if k not in ("W_out", "b_out") else k): v
                         for k, v in model.state_dict().items()})
    x, y, _ = data()
    algo = rnngrad.bptt(sensitivities=True)
    assert torch.equal(rnngrad.gradient(model, x, y, algorithm=algo)[1]["u"],
                       rnngrad.gradient(net, x, y, algorithm=algo)[1]["u"])


def test_sensitivities_need_cells_that_give_them():
    net = make_net("mgu")
    x, y, _ = data()
    for algo in (rnngrad.bptt(sensitivities=True), rnngrad.bptt(checkpoint=3, sensitivities=True)):
        with pytest.raises(ValueError, match=r"bptt\(sensitivities=True\) returns u_t.*MGU "
                                             r"\(layer 0\) do not give them"):
            rnngrad.gradient(net, x, y, algorithm=algo)
        with pytest.raises(ValueError, match=r"MGU \(layer 0\) do not give them"):
            algo.init(net, 2)


# --- UORO: unbiased on any network --------------------------------------------------------


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


@pytest.mark.parametrize("kind", ["adaptive", "stack2"])
def test_uoro_is_unbiased_on_networks(kind):
    net = make_net(kind)
    x, _, _ = data(T=4, B=1)
    M = _exact_influence(net, x[:, 0])
    groups, n = 8, 400
    X = x.expand(-1, groups * n, -1).contiguous()
    algo = rnngrad.uoro(seed=0)
    state = algo.init(net, groups * n)
    for t in range(4):
        state, _, _ = algo.step(net, state, X[t], None)
    s = (state.h_tilde[:, :, None] * state.theta_tilde[:, None, :]).view(groups, n, *M.shape)
    for k in range(groups):
        mean = s[k].mean(0)
        se = math.sqrt((s[k] - mean).square().sum().item() / (n - 1) / n)
        assert (mean - M).norm().item() <= 4 * se
