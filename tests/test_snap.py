"""SnAp-1: equal to exact RTRL / BPTT where W_rec is diagonal; otherwise the recursion
``M_t[i,j] = Jd_t^i M_{t-1}[i,j] + alpha phi'(a_t^i) pre_t^j`` term by term."""

import pytest
import torch
from online_refs import exact_influence, make_data, make_model, run_steps

import rnngrad

NAMES = ("W_in", "W_rec", "b_rec", "W_out", "b_out")


def diagonalise(model):
    with torch.no_grad():
        model.W_rec.copy_(torch.diag(torch.linspace(-0.9, 0.9, model.hidden_size,
                                                    dtype=torch.float64)))


@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("loss,readout", [("mse", "identity"), ("cross_entropy", "softmax")])
def test_diagonal_W_rec_equals_exact(alpha, loss, readout):
    model = make_model(alpha=alpha, readout=readout, H=6)
    diagonalise(model)
    x, y, mask = make_data(T=8, loss=loss)
    h0 = torch.randn(4, 6, dtype=torch.float64)
    _, g = rnngrad.gradient(model, x, y, algorithm=rnngrad.snap1(), loss=loss, mask=mask, h0=h0)
    _, exact = rnngrad.gradient(model, x, y, loss=loss, mask=mask, h0=h0)  # BPTT = RTRL
    for n in NAMES + ("h0",):
        torch.testing.assert_close(g[n], exact[n], rtol=1e-10, atol=1e-12, msg=n)


def kept_influence(state):
    """SnAp-1's kept M (B, H, P) over [W_rec | W_in | b_rec], from the per-parameter traces
    (B, C = 1, G = 1, H, P_p) of its state."""
    tr = state.traces[0]
    M = torch.cat([tr["W_rec"], tr["W_in"], tr["b_rec"]], dim=-1)
    return M.view(M.shape[0], M.shape[3], M.shape[4])


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_dense_W_rec_keeps_the_diagonal_of_rtrl(alpha):
    """With one example, SnAp-1's M is the (k = i) slice of the exact influence only when
    W_rec is diagonal; for dense W_rec it is the recursion with Jd = diag(J)."""
    model = make_model(alpha=alpha, H=5)
    x, _, _ = make_data(T=6, B=1)
    state = run_steps(rnngrad.snap1(), model, x)
    M_exact = exact_influence(model, x[:, 0])  # (H, H, P)
    kept = torch.diagonal(M_exact, dim1=0, dim2=1).T  # M[i, i, :]
    M = kept_influence(state)
    assert M.shape == (1, 5, 5 + 3 + 1)
    assert not torch.allclose(M[0], kept)  # the dropped paths feed back in
    diagonalise(model)
    state = run_steps(rnngrad.snap1(), model, x)
    M_exact = exact_influence(model, x[:, 0])
    torch.testing.assert_close(kept_influence(state)[0],
                               torch.diagonal(M_exact, dim1=0, dim2=1).T, rtol=1e-10, atol=1e-12)
    off = M_exact.clone()
    off[torch.arange(5), torch.arange(5)] = 0
    assert off.abs().max() == 0


def test_snap1_alpha1_first_step_is_immediate():
    model = make_model(H=4)
    x, y, mask = make_data(T=1)
    _, g = rnngrad.gradient(model, x, y, algorithm=rnngrad.snap1(), mask=mask)
    _, exact = rnngrad.gradient(model, x, y, mask=mask)
    for n in NAMES:
        torch.testing.assert_close(g[n], exact[n], rtol=1e-10, atol=1e-12)
