"""rtrl(): the structured hand-derived path and the generic torch.func path against
autograd through a plain loop (float64, relative error <= 1e-10), per-step emissions,
custom cells, and online training."""

from __future__ import annotations

import pytest
import torch

import rnngrad
from rnngrad.check import (
    DEFAULT_CONFIGS,
    CheckConfig,
    make_problem,
    reference_gradient,
    relative_error,
)

TOL = 1e-10
CONFIGS = DEFAULT_CONFIGS + (
    CheckConfig(T=3, B=2, D=3, H=5, K=2, activation="relu", alpha=0.4, readout="identity",
                loss="bce", mask="last", h0=True),
)
IDS = [c.label() for c in CONFIGS]


@pytest.mark.parametrize("generic", [False, True], ids=["structured", "generic"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_rtrl_matches_autograd(config, generic):
    model, x, y, mask, h0, reward = make_problem(config, seed=3)
    _, ref = reference_gradient(model, x, y, loss=config.loss, mask=mask, h0=h0, reward=reward)
    loss, grads = rnngrad.gradient(model, x, y, algorithm=rnngrad.rtrl(generic=generic),
                                   loss=config.loss, mask=mask, h0=h0, reward=reward)
    assert set(grads) == set(ref)
    assert relative_error(grads, ref) <= TOL


@pytest.mark.parametrize("generic", [False, True], ids=["structured", "generic"])
def test_rtrl_emits_each_steps_own_gradient(generic):
    """What step t emits is the gradient of l_t alone (the prefix's BPTT), h0 included."""
    config = CheckConfig(T=5, B=2, D=2, H=3, K=2, activation="tanh", alpha=0.6, h0=True)
    model, x, y, _, h0, _ = make_problem(config, seed=1)
    algo = rnngrad.rtrl(generic=generic)
    state = algo.init(model, 2, h0=h0)
    for t in range(config.T):
        state, out, g = algo.step(model, state, x[t], y[t])
        assert g is not None and out.h.shape == (2, 3)
        only_t = torch.zeros(config.T, 2, dtype=x.dtype)
        only_t[t] = 1.0
        _, ref = reference_gradient(model, x, y, mask=only_t, h0=h0)
        assert relative_error(g, ref) <= TOL
    _, g = algo.flush(model, state)
    assert g is None


def test_rtrl_dh_term_and_no_target():
    """A step with only an immediate term dh_t (no target) gets q_t = dh_t."""
    config = CheckConfig(T=4, B=3, D=2, H=4, K=2)
    model, x, _, _, _, _ = make_problem(config, seed=2)
    c = torch.randn(4, 3, 4, dtype=x.dtype)

    def reward(h):
        return (c * h).sum()

    _, ref = reference_gradient(model, x, None, reward=reward)
    algo = rnngrad.rtrl()
    state = algo.init(model, 3)
    total = None
    for t in range(4):
        state, out, g = algo.step(model, state, x[t], None, dh_t=-c[t])
        assert float(out.loss) == 0.0
        total = rnngrad.algorithms.base.add_grads(total, g)
    assert relative_error(total, ref) <= TOL


def test_rtrl_custom_cell_matches_autograd():
    """rtrl() on a user's cell with no declared structure (the torch.func defaults):
    h' = tanh(W_in x + W_rec h + b) * sigmoid(h) + 0.1 h, against autograd."""
    from cell_zoo import TanhGate
    from net_reference import max_rel_err, net_grads

    torch.manual_seed(4)
    net = rnngrad.Network(TanhGate(3, 3), 2)
    net = net.double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    _, ref = net_grads(net, x, y, state0=net.coerce_state(h0, 2)[0])
    ref["h0"] = ref["h0"][0].h
    for algo in (rnngrad.rtrl(), rnngrad.rtrl(generic=True)):
        _, grads = rnngrad.gradient(net, x, y, algorithm=algo, h0=h0)
        assert max_rel_err(grads, ref) <= TOL


def test_rtrl_declares_exact_online():
    for algo in (rnngrad.rtrl(), rnngrad.rtrl(generic=True)):
        assert algo.exact and algo.online and algo.cost


def test_rtrl_bad_input():
    with pytest.raises(TypeError, match="replaced by the cell protocol"):
        rnngrad.rtrl(cell=3)
    model = rnngrad.RNN(2, 3, 1, dtype=torch.float64)
    algo = rnngrad.rtrl()
    state = algo.init(model, 4)
    with pytest.raises(ValueError, match=r"x_t has shape \(4, 3\) but the model and state expect \(4, 2\)"):
        algo.step(model, state, torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="h0 has shape"):
        algo.init(model, 4, h0=torch.zeros(3, 3, dtype=torch.float64))


def _sgd(model, grads, lr):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p -= lr * grads[n]


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_training_once_per_sequence_equals_bptt():
    """Updating once per sequence (update every T steps), RTRL training is BPTT training:
    the same parameters after several sequences, to round-off."""
    config = CheckConfig(T=6, B=3, D=2, H=4, K=2, activation="tanh", alpha=0.8)
    m_rtrl, x, y, _, _, _ = make_problem(config, seed=5)
    m_bptt, _, _, _, _, _ = make_problem(config, seed=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        xs = torch.randn(x.shape, generator=g, dtype=x.dtype)
        ys = torch.randn(y.shape, generator=g, dtype=y.dtype)
        for model, algo in ((m_rtrl, rnngrad.rtrl()), (m_bptt, rnngrad.bptt())):
            _, grads = rnngrad.gradient(model, xs, ys, algorithm=algo)
            _sgd(model, grads, 0.3)
    a, b = _params(m_rtrl), _params(m_bptt)
    assert (a - b).abs().max() <= TOL * b.abs().max()
    assert (a - _params(make_problem(config, seed=5)[0])).abs().max() > 1e-3  # it did train


def test_online_rtrl_agrees_with_frozen_weight_gradient_to_order_lr_squared():
    """Updating after every step, RTRL's M mixes gradients at different weights, so it is
    exact only as lr -> 0: theta_T(lr) = theta_0 - lr sum_t dl_t/dtheta(theta_0) + O(lr^2).
    The right side is one BPTT gradient at the frozen theta_0 (the sum of the prefix
    gradients). The gap must shrink 100x when lr shrinks 10x."""
    config = CheckConfig(T=8, B=2, D=2, H=3, K=2, activation="tanh")
    model0, x, y, _, _, _ = make_problem(config, seed=6)
    _, g_frozen = rnngrad.gradient(model0, x, y, algorithm=rnngrad.bptt())
    theta0 = _params(model0)
    g_flat = torch.cat([g_frozen[n].reshape(-1) for n, _ in model0.named_parameters()])

    gaps = []
    for lr in (1e-3, 1e-4):
        model = make_problem(config, seed=6)[0]
        algo = rnngrad.rtrl()
        state = algo.init(model, 2)
        for t in range(config.T):
            state, _, grads = algo.step(model, state, x[t], y[t])
            _sgd(model, grads, lr)
        gap = (_params(model) - (theta0 - lr * g_flat)).abs().max()
        assert gap < 1e-2 * lr * g_flat.abs().max()  # first order agrees
        gaps.append(float(gap))
    ratio = gaps[0] / gaps[1]
    assert 70.0 < ratio < 130.0, ratio  # second order: gap ~ lr^2
