"""tbptt(k): equal to BPTT for k >= T; for k < T equal to autograd with the state detached
every k steps; one gradient every k steps, the remainder at flush, h0 in the first only."""

from __future__ import annotations

import pytest
import torch

import rnngrad
from rnngrad.check import CheckConfig, make_problem, reference_gradient, relative_error

TOL = 1e-10
CONFIGS = (
    CheckConfig(T=7, B=3, D=2, H=4, K=3, activation="tanh", h0=True),
    CheckConfig(T=8, B=2, D=3, H=3, K=2, activation="sigmoid", alpha=0.5, readout="softmax",
                loss="cross_entropy", mask="random", h0=True),
    CheckConfig(T=6, B=2, D=2, H=3, K=2, activation="softplus", alpha=0.7, readout="sigmoid",
                loss="mse", reward=True, h0=True),
    CheckConfig(T=5, B=1, D=1, H=1, K=1, activation="relu", readout="sigmoid", loss="bce"),
)
IDS = [c.label() for c in CONFIGS]


def _paths(algo):
    return [algo, algo._replace(sequence=None)]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_tbptt_k_at_least_T_is_bptt(config):
    model, x, y, mask, h0, reward = make_problem(config, seed=11)
    _, ref = reference_gradient(model, x, y, loss=config.loss, mask=mask, h0=h0, reward=reward)
    for k in (config.T, config.T + 1, 10 * config.T):
        for algo in _paths(rnngrad.tbptt(k)):
            _, grads = rnngrad.gradient(model, x, y, algorithm=algo, loss=config.loss, mask=mask,
                                        h0=h0, reward=reward)
            assert relative_error(grads, ref) <= TOL


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_tbptt_equals_autograd_with_detached_state(config, k):
    model, x, y, mask, h0, reward = make_problem(config, seed=12)
    _, ref = reference_gradient(model, x, y, loss=config.loss, mask=mask, h0=h0, reward=reward,
                                detach_every=k)
    _, full = reference_gradient(model, x, y, loss=config.loss, mask=mask, h0=h0, reward=reward)
    for algo in _paths(rnngrad.tbptt(k)):
        _, grads = rnngrad.gradient(model, x, y, algorithm=algo, loss=config.loss, mask=mask,
                                    h0=h0, reward=reward)
        assert relative_error(grads, ref) <= TOL
    if config.H > 1:  # truncation really changes the gradient (the test can tell them apart)
        assert relative_error(grads, full) > 1e-6


def test_tbptt_emission_schedule_and_h0_first_chunk_only():
    config = CheckConfig(T=7, B=2, D=2, H=3, K=2, h0=True)
    model, x, y, _, h0, _ = make_problem(config, seed=13)
    k = 3
    algo = rnngrad.tbptt(k)
    state = algo.init(model, 2, h0=h0)
    emitted = []
    for t in range(config.T):
        state, out, g = algo.step(model, state, x[t], y[t])
        assert torch.equal(out.h, state.h)
        if g is not None:
            emitted.append((t, g))
    state, g_last = algo.flush(model, state)
    assert [t for t, _ in emitted] == [2, 5]
    assert g_last is not None  # the remainder: step 6
    assert "h0" in emitted[0][1] and "h0" not in emitted[1][1] and "h0" not in g_last
    # each emission is its chunk's own truncated gradient
    for (_t, g), (s, e) in zip(emitted + [(6, g_last)], [(0, 3), (3, 6), (6, 7)], strict=True):
        mask = torch.zeros(config.T, 2, dtype=x.dtype)
        mask[s:e] = 1.0
        _, ref = reference_gradient(model, x, y, mask=mask, h0=h0, detach_every=k)
        if s > 0:
            ref.pop("h0")
        assert relative_error(g, ref) <= TOL
    assert algo.flush(model, state)[1] is None


def test_tbptt_declares_and_rejects():
    algo = rnngrad.tbptt(4)
    assert algo.online and not algo.exact and "k=4" in algo.name
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="tbptt needs a truncation length"):
            rnngrad.tbptt(bad)
