"""rnngrad.cells.LSTM: PyTorch's equations, layout and initialisation; its declared
structure in closed form; its hand-derived BPTT's contract (float64 throughout; the
cross-cell checks against torch.func and autograd are in test_cells.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rnngrad.cells import LSTM, LSTMState
from rnngrad.cells.base import flatten_state
from rnngrad.network import Network

DT = torch.float64


def copy_to_torch(cell: LSTM, mod: nn.Module, suffix: str = "") -> None:
    with torch.no_grad():
        getattr(mod, "weight_ih" + suffix).copy_(cell.W_ih)
        getattr(mod, "weight_hh" + suffix).copy_(cell.W_hh)
        getattr(mod, "bias_ih" + suffix).copy_(cell.b_ih)
        getattr(mod, "bias_hh" + suffix).copy_(cell.b_hh)


def test_parameters_follow_pytorch():
    D, H = 7, 33
    cell = LSTM(D, H)
    shapes = {k: tuple(v.shape) for k, v in cell.named_parameters()}
    assert shapes == {"W_ih": (4 * H, D), "W_hh": (4 * H, H), "b_ih": (4 * H,), "b_hh": (4 * H,)}
    bound = 1 / math.sqrt(H)
    for name, p in cell.named_parameters():
        p = p.detach()
        assert p.dtype == torch.float32
        assert float(p.abs().max()) <= bound, name
        assert float(p.abs().max()) > 0.8 * bound, name
    cell64 = LSTM(2, 3, dtype=DT, device="cpu")
    assert all(p.dtype == DT and p.device.type == "cpu" for p in cell64.parameters())
    s0 = cell64.init_state(4)
    assert isinstance(s0, LSTMState) and s0._fields == ("h", "c")
    assert all(torch.equal(s, torch.zeros(4, 3, dtype=DT)) for s in s0)
    assert s0.h.data_ptr() != s0.c.data_ptr()
    assert cell64.param_blocks() == dict.fromkeys(("W_ih", "W_hh", "b_ih", "b_hh"), 4)


@pytest.mark.parametrize("sizes", [(0, 3), (3, -1), (3, 2.5)])
def test_bad_sizes(sizes):
    with pytest.raises(ValueError, match="must be a positive int"):
        LSTM(*sizes)


def test_step_equals_torch_lstm_cell():
    D, H, B = 4, 6, 5
    cell = LSTM(D, H, dtype=DT)
    ref = nn.LSTMCell(D, H, dtype=DT)
    copy_to_torch(cell, ref)
    x = torch.randn(B, D, dtype=DT)
    h, c = torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT)
    new = cell.step(cell.params(), LSTMState(h, c), x)
    ref_h, ref_c = ref(x, (h, c))
    assert isinstance(new, LSTMState)
    assert torch.allclose(new.h, ref_h, rtol=0, atol=1e-14)
    assert torch.allclose(new.c, ref_c, rtol=0, atol=1e-14)
    assert torch.equal(cell.output(new), new.h)


def test_sequence_equals_torch_lstm():
    D, H, B, T = 3, 8, 4, 9
    cell = LSTM(D, H, dtype=DT)
    ref = nn.LSTM(D, H, dtype=DT)
    copy_to_torch(cell, ref, "_l0")
    x = torch.randn(T, B, D, dtype=DT)
    h0, c0 = torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT)
    with torch.no_grad():
        outs, sT, cache = cell.forward_sequence(cell.params(), x, LSTMState(h0, c0))
        ref_out, (ref_h, ref_c) = ref(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
    assert cache is None
    assert torch.allclose(outs, ref_out, rtol=0, atol=1e-13)
    assert torch.allclose(sT.h, ref_h[0], rtol=0, atol=1e-13)
    assert torch.allclose(sT.c, ref_c[0], rtol=0, atol=1e-13)


def test_structure_in_closed_form():
    """e-prop: only the cell path remains (f_t, and o_t tanh'(c_t) f_t into h); the
    jacobian's c_{t-1} columns are diagonal; state order is [h | c]."""
    D, H, B = 3, 4, 5
    cell = LSTM(D, H, dtype=DT)
    p = cell.params()
    x = torch.randn(B, D, dtype=DT)
    state = LSTMState(torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT))
    lin = cell.linearize(p, state, x, need=("eligibility", "jacobian", "immediate"))
    with torch.no_grad():
        a = x @ p["W_ih"].T + p["b_ih"] + state.h @ p["W_hh"].T + p["b_hh"]
        f, o = torch.sigmoid(a[:, H:2 * H]), torch.sigmoid(a[:, 3 * H:])
        c = f * state.c + torch.sigmoid(a[:, :H]) * torch.tanh(a[:, 2 * H:3 * H])
        k = o * (1 - torch.tanh(c) ** 2)
    e = lin.eligibility
    assert e.shape == (B, H, 2, 2)
    assert torch.equal(e[..., 0], torch.zeros(B, H, 2, dtype=DT))
    assert torch.allclose(e[..., 1, 1], f, rtol=0, atol=1e-15)
    assert torch.allclose(e[..., 0, 1], k * f, rtol=0, atol=1e-15)
    J = lin.jacobian.view(B, 2, H, 2, H)
    assert torch.allclose(J[:, 1, :, 1], torch.diag_embed(f), rtol=0, atol=1e-15)
    assert torch.allclose(J[:, 0, :, 1], torch.diag_embed(k * f), rtol=0, atol=1e-15)
    assert torch.allclose(flatten_state(lin.state)[:, H:], c, rtol=0, atol=1e-15)
    D4 = lin.immediate["W_hh"].D
    assert D4.shape == (B, 2, 4, H)
    assert torch.equal(D4[:, 1, 3], torch.zeros(B, H, dtype=DT))  # o does not move c
    assert all(lin.immediate[n].D is D4 for n in ("W_ih", "b_ih", "b_hh"))


def test_forward_sequence_under_autograd_is_differentiable():
    D, H, B, T = 3, 4, 2, 5
    cell = LSTM(D, H, dtype=DT)
    x = torch.randn(T, B, D, dtype=DT)
    s0 = LSTMState(torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT))
    outs, sT, cache = cell.forward_sequence(cell.params(), x, s0, cache=True)
    assert outs.requires_grad and sT.c.requires_grad and cache is not None
    (g,) = torch.autograd.grad(outs.sum() + sT.c.sum(), cell.W_ih)
    grads, _, _ = cell.backward_sequence(cell.params(), x, s0, cache,
                                         torch.ones(T, B, H, dtype=DT),
                                         LSTMState(torch.zeros(B, H, dtype=DT),
                                                   torch.ones(B, H, dtype=DT)))
    assert torch.allclose(grads["W_ih"], g, rtol=1e-12, atol=1e-14)


def test_cache_serves_one_backward_and_arguments_stay():
    D, H, B, T = 2, 3, 2, 4
    cell = LSTM(D, H, dtype=DT)
    p = {k: v.detach() for k, v in cell.params().items()}
    x = torch.randn(T, B, D, dtype=DT)
    s0 = LSTMState(torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT))
    d_out = torch.randn(T, B, H, dtype=DT)
    d_state = LSTMState(torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT))
    keep = [t.clone() for t in (x, d_out, *d_state, *s0)]
    _, _, cache = cell.forward_sequence(p, x, s0, cache=True)
    first = cell.backward_sequence(p, x, s0, cache, d_out, d_state)
    assert all(torch.equal(a, b) for a, b in zip(keep, (x, d_out, *d_state, *s0)))
    with pytest.raises(ValueError, match="this LSTM cache was used by an earlier backward"):
        cell.backward_sequence(p, x, s0, cache, d_out, d_state)
    _, _, cache = cell.forward_sequence(p, x, s0, cache=True)
    second = cell.backward_sequence(p, x, s0, cache, d_out, d_state)
    assert all(torch.equal(first[0][k], second[0][k]) for k in first[0])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


def test_errors():
    cell = LSTM(3, 4, dtype=DT)
    p, s0 = cell.params(), cell.init_state(2)
    with pytest.raises(ValueError, match=r"inputs has shape \(5, 3\) but LSTM expects \(T, B, 3\)"):
        cell.forward_sequence(p, torch.zeros(5, 3, dtype=DT), s0)
    x = torch.zeros(5, 2, 3, dtype=DT)
    with pytest.raises(ValueError, match="needs the cache"):
        cell.backward_sequence(p, x, s0, None, torch.zeros(5, 2, 4, dtype=DT))
    with torch.no_grad():
        _, _, cache = cell.forward_sequence(p, x, s0, cache=True)
    with pytest.raises(ValueError, match=r"d_outputs has shape \(4, 2, 4\) but expected \(5, 2, 4\)"):
        cell.backward_sequence(p, x, s0, cache, torch.zeros(4, 2, 4, dtype=DT))


def test_stack_in_a_network():
    net = Network([LSTM(3, 5, dtype=DT), LSTM(5, 4, dtype=DT)], 2)
    y, h = net(torch.randn(6, 3, 3, dtype=DT))
    assert y.shape == (6, 3, 2) and h.shape == (6, 3, 4)
    assert [type(s).__name__ for s in net.init_state(3)] == ["LSTMState", "LSTMState"]


def test_forget_bias_opens_the_forget_gate_and_nothing_else():
    torch.manual_seed(0)
    plain = LSTM(3, 4)
    torch.manual_seed(0)
    opened = LSTM(3, 4, forget_bias=2.5)
    for name, p in plain.named_parameters():
        q = dict(opened.named_parameters())[name]
        if name == "b_ih":
            assert torch.equal(q[4:8], p[4:8] + 2.5)
            assert torch.equal(torch.cat((q[:4], q[8:])), torch.cat((p[:4], p[8:])))
        else:
            assert torch.equal(p, q)
    for bad in (float("nan"), "1", True, float("inf")):
        with pytest.raises(ValueError, match="forget_bias must be a finite number"):
            LSTM(3, 4, forget_bias=bad)
