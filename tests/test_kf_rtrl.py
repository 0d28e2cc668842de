"""KF-RTRL is unbiased: the mean of u (x) A over independent draws converges to RTRL's
influence (exact, by autograd) at the rate 1/sqrt(n)."""

import pytest
from online_refs import (
    check_fresh_noise_but_reproducible,
    check_h0_and_eps_raise,
    check_unbiased_gradient,
    check_unbiased_influence,
    run_steps,
)

import rnngrad


def kf_samples(model, x1, n, seed):
    """n independent KF-RTRL estimates of M_T for the one sequence x1 (T, D): a batch of n
    copies of it, each example with its own signs. Returns (n, H, H, P)."""
    x = x1[:, None, :].expand(-1, n, -1).contiguous()
    state = run_steps(rnngrad.kf_rtrl(seed=seed), model, x)
    # M[k, i, j] ~ A[k, i] u[j]; A is stored (H, B, H)
    return state.A.permute(1, 0, 2)[:, :, :, None] * state.u[:, None, None, :]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_unbiased_influence(alpha):
    check_unbiased_influence(kf_samples, alpha)


def test_gradient_is_unbiased():
    check_unbiased_gradient(rnngrad.kf_rtrl)


def test_h0_and_bad_eps_raise():
    check_h0_and_eps_raise(rnngrad.kf_rtrl)


def test_fresh_noise_across_sequences_but_reproducible():
    check_fresh_noise_but_reproducible(rnngrad.kf_rtrl)


def test_takes_one_elman_layer_and_names_the_supported_networks():
    """kf_rtrl() checks the cell type: Network(Elman) runs (equal to rnngrad.RNN, see
    test_uoro), any other cell or a leaky readout is refused naming what it takes."""
    import torch

    from rnngrad.cells import GRU, Elman

    x = torch.randn(4, 2, 3, dtype=torch.float64)
    y = torch.randn(4, 2, 2, dtype=torch.float64)
    net = rnngrad.Network(Elman(3, 4, dtype=torch.float64), 2)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.kf_rtrl())
    assert set(g) == {n for n, _ in net.named_parameters()}
    for bad, what in ((rnngrad.Network(GRU(3, 4, dtype=torch.float64), 2), "cells GRU"),
                      (rnngrad.Network(Elman(3, 4, dtype=torch.float64), 2,
                                       readout_decay=0.5), "leaky readout")):
        with pytest.raises(ValueError, match=rf"one Elman layer.*Network\(Elman.*{what}"):
            rnngrad.gradient(bad, x, y, algorithm=rnngrad.kf_rtrl())
