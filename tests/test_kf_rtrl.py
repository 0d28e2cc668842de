"""KF-RTRL is unbiased: the mean of u (x) A over independent draws converges to RTRL's
influence (exact, by autograd) at the rate 1/sqrt(n)."""

import math

import pytest
import torch
from online_refs import exact_influence, make_data, make_model, run_steps

import rnngrad


def kf_samples(model, x1, n, seed):
    """n independent KF-RTRL estimates of M_T for the one sequence x1 (T, D): a batch of n
    copies of it, each example with its own signs. Returns (n, H, H, P)."""
    x = x1[:, None, :].expand(-1, n, -1).contiguous()
    state = run_steps(rnngrad.kf_rtrl(seed=seed), model, x)
    # M[k, i, j] ~ A[k, i] u[j]; A is stored (H, B, H)
    return state.A.permute(1, 0, 2)[:, :, :, None] * state.u[:, None, None, :]


def mean_error(samples, M):
    """||mean - M|| and the standard error sqrt(tr Cov / n) it should be close to."""
    n = samples.shape[0]
    mean = samples.mean(0)
    var = (samples - mean).square().sum() / (n - 1)
    return (mean - M).norm().item(), math.sqrt(var.item() / n)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_unbiased_influence(alpha):
    model = make_model(alpha=alpha, H=4, D=2)
    x, _, _ = make_data(T=5, B=1, D=2)
    M = exact_influence(model, x[:, 0])
    groups, n = 16, 500
    rms = []
    for n_i, seed in ((n, 0), (4 * n, 1)):
        s = kf_samples(model, x[:, 0], groups * n_i, seed).view(groups, n_i, *M.shape)
        errs = []
        for k in range(groups):
            err, se = mean_error(s[k], M)
            assert err <= 4 * se, (n_i, err, se)
            errs.append(err)
        rms.append(math.sqrt(sum(e * e for e in errs) / groups))
    # quadrupling n halves the (root-mean-square over groups) error: the 1/sqrt(n) rate
    assert 0.35 < rms[1] / rms[0] < 0.7, rms


def test_gradient_is_unbiased():
    """With n copies of one sequence the emitted gradient is the mean of n independent
    estimates of the exact gradient of that sequence."""
    model = make_model(H=4, D=2)
    x, y, _ = make_data(T=5, B=1, D=2)
    n = 20000
    X = x.expand(-1, n, -1).contiguous()
    Y = y.expand(-1, n, -1).contiguous()
    _, g = rnngrad.gradient(model, X, Y, algorithm=rnngrad.kf_rtrl(seed=5))
    _, exact = rnngrad.gradient(model, x, y)
    rel = ((g["W_rec"] - exact["W_rec"]).norm() / exact["W_rec"].norm()).item()
    assert rel < 0.1, rel
    torch.testing.assert_close(g["W_out"], exact["W_out"], rtol=1e-10, atol=1e-12)


def test_h0_and_bad_eps_raise():
    model = make_model()
    with pytest.raises(ValueError, match="h0"):
        rnngrad.kf_rtrl().init(model, 2, h0=torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps must be a positive float"):
        rnngrad.kf_rtrl(eps=0.0)


def test_fresh_noise_across_sequences_but_reproducible():
    model = make_model()
    x, y, _ = make_data()
    a = rnngrad.kf_rtrl(seed=1)
    g1 = rnngrad.gradient(model, x, y, algorithm=a)[1]["W_rec"]
    g2 = rnngrad.gradient(model, x, y, algorithm=a)[1]["W_rec"]
    g3 = rnngrad.gradient(model, x, y, algorithm=rnngrad.kf_rtrl(seed=1))[1]["W_rec"]
    assert not torch.equal(g1, g2) and torch.equal(g1, g3)
