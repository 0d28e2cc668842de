"""bptt(checkpoint=c): exact for every c (dividing T or not), both paths, and memory
really bounded: only every c-th hidden state kept, segments of at most c recomputed."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import rnngrad
from rnngrad.check import CheckConfig, make_problem, reference_gradient, relative_error

TOL = 1e-10
# the module whose ``unroll`` every forward pass of an Elman layer runs (rnngrad.RNN included)
elman_module = importlib.import_module("rnngrad.cells.elman")
CONFIGS = (
    CheckConfig(T=7, B=3, D=2, H=4, K=3, activation="tanh", h0=True),
    CheckConfig(T=7, B=2, D=3, H=3, K=2, activation="relu", alpha=0.5, readout="softmax",
                loss="cross_entropy", mask="random"),
    CheckConfig(T=7, B=2, D=2, H=3, K=2, activation="sigmoid", alpha=0.3, readout="sigmoid",
                loss="bce", mask="last", h0=True),
    CheckConfig(T=7, B=2, D=2, H=3, K=2, activation="identity", readout="identity", loss="mse",
                reward=True, h0=True),
    CheckConfig(T=1, B=1, D=1, H=1, K=1, activation="softplus", h0=True),
)
IDS = [c.label() for c in CONFIGS]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("c", [1, 2, 3, 4, 6, 7, 12])
def test_checkpointed_bptt_matches_autograd(config, c):
    model, x, y, mask, h0, reward = make_problem(config, seed=21)
    _, ref = reference_gradient(model, x, y, loss=config.loss, mask=mask, h0=h0, reward=reward)
    algo = rnngrad.bptt(checkpoint=c)
    for a in (algo, algo._replace(sequence=None)):
        loss, grads = rnngrad.gradient(model, x, y, algorithm=a, loss=config.loss, mask=mask,
                                       h0=h0, reward=reward)
        assert relative_error(grads, ref) <= TOL
        plain, _ = rnngrad.gradient(model, x, y, loss=config.loss, mask=mask, h0=h0,
                                    reward=reward)
        assert torch.allclose(loss, plain, rtol=1e-12, atol=0)


def test_checkpointed_sensitivities_equal_bptt():
    config = CheckConfig(T=9, B=2, D=2, H=3, K=2, alpha=0.6)
    model, x, y, *_ = make_problem(config, seed=22)
    _, g = rnngrad.gradient(model, x, y, algorithm=rnngrad.bptt(sensitivities=True))
    for c in (2, 4, 9):
        algo = rnngrad.bptt(checkpoint=c, sensitivities=True)
        for a in (algo, algo._replace(sequence=None)):
            _, gc = rnngrad.gradient(model, x, y, algorithm=a)
            assert gc["u"].shape == (9, 2, 3)
            assert (gc["u"] - g["u"]).abs().max() <= TOL * g["u"].abs().max()


def test_step_path_keeps_only_every_cth_state():
    config = CheckConfig(T=10, B=2, D=2, H=3, K=2)
    model, x, y, *_ = make_problem(config, seed=23)
    c = 4
    algo = rnngrad.bptt(checkpoint=c)
    state = algo.init(model, 2)
    for t in range(config.T):
        state, _, g = algo.step(model, state, x[t], y[t])
        assert g is None
        assert len(state.ckpt) == (t + 1) // c + 1  # h_0, h_4, h_8: never one per step
    stored_h = sum(h.numel() for h in state.ckpt)
    assert stored_h == (config.T // c + 1) * 2 * 3
    # per step only x_t (B, D) and dl/dz_t (B, K) are kept, no hidden state
    assert all(t.shape == (2, 2) for t in state.xs) and all(t.shape == (2, 2) for t in state.dz)
    state, g = algo.flush(model, state)
    _, ref = reference_gradient(model, x, y)
    assert relative_error(g, ref) <= TOL
    assert not state.xs and len(state.ckpt) == 1


@pytest.mark.parametrize("T,c", [(10, 3), (16, 4), (5, 5)])
def test_sequence_path_recomputes_segments_of_at_most_c(monkeypatch, T, c):
    """Every forward pass the checkpointed sequence path runs covers at most c steps, so it
    never holds more than c hidden states at once (plus ceil(T/c) checkpoints)."""
    lengths = []
    real_unroll = elman_module.unroll

    def spy(model, inputs, h0, **kw):
        lengths.append(inputs.shape[0])
        return real_unroll(model, inputs, h0, **kw)

    monkeypatch.setattr(elman_module, "unroll", spy)
    config = CheckConfig(T=T, B=2, D=2, H=3, K=2)
    model, x, y, *_ = make_problem(config, seed=24)
    _, g = rnngrad.gradient(model, x, y, algorithm=rnngrad.bptt(checkpoint=c))
    assert max(lengths) <= c
    assert sum(lengths) == 2 * T  # one forward, one recomputation
    assert len(lengths) == 2 * math.ceil(T / c)
    _, ref = reference_gradient(model, x, y)
    assert relative_error(g, ref) <= TOL


def test_checkpoint_rejects_bad_c():
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match="checkpoint must be an int c >= 1"):
            rnngrad.bptt(checkpoint=bad)
    algo = rnngrad.bptt(checkpoint=5)
    assert algo.exact and not algo.online and algo.name == "bptt(checkpoint=5)"
