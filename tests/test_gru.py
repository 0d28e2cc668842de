"""rnngrad.cells.GRU: PyTorch's equations, layout and initialisation; its declared
structure in closed form; its hand-derived BPTT's contract (float64 throughout; the
cross-cell checks against torch.func and autograd are in test_cells.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rnngrad.cells import GRU, GRUState
from rnngrad.network import Network

DT = torch.float64


def copy_to_torch(cell: GRU, mod: nn.Module, suffix: str = "") -> None:
    with torch.no_grad():
        getattr(mod, "weight_ih" + suffix).copy_(cell.W_ih)
        getattr(mod, "weight_hh" + suffix).copy_(cell.W_hh)
        getattr(mod, "bias_ih" + suffix).copy_(cell.b_ih)
        getattr(mod, "bias_hh" + suffix).copy_(cell.b_hh)


def test_parameters_follow_pytorch():
    D, H = 7, 33
    cell = GRU(D, H)
    shapes = {k: tuple(v.shape) for k, v in cell.named_parameters()}
    assert shapes == {"W_ih": (3 * H, D), "W_hh": (3 * H, H), "b_ih": (3 * H,), "b_hh": (3 * H,)}
    bound = 1 / math.sqrt(H)
    for name, p in cell.named_parameters():
        p = p.detach()
        assert p.dtype == torch.float32
        assert float(p.abs().max()) <= bound, name
        assert float(p.abs().max()) > 0.8 * bound, name  # spread over the whole interval
    cell64 = GRU(2, 3, dtype=DT, device="cpu")
    assert all(p.dtype == DT and p.device.type == "cpu" for p in cell64.parameters())
    s0 = cell64.init_state(4)
    assert isinstance(s0, GRUState) and torch.equal(s0.h, torch.zeros(4, 3, dtype=DT))
    assert cell64.n_units == 3 and cell64.param_blocks() == dict.fromkeys(
        ("W_ih", "W_hh", "b_ih", "b_hh"), 3)


@pytest.mark.parametrize("sizes", [(0, 3), (3, 0), (2.0, 3), (True, 3)])
def test_bad_sizes(sizes):
    with pytest.raises(ValueError, match="must be a positive int"):
        GRU(*sizes)


def test_step_equals_torch_gru_cell():
    D, H, B = 4, 6, 5
    cell = GRU(D, H, dtype=DT)
    ref = nn.GRUCell(D, H, dtype=DT)
    copy_to_torch(cell, ref)
    x, h = torch.randn(B, D, dtype=DT), torch.randn(B, H, dtype=DT)
    new = cell.step(cell.params(), GRUState(h), x)
    assert isinstance(new, GRUState)
    assert torch.allclose(new.h, ref(x, h), rtol=0, atol=1e-14)
    assert torch.equal(cell.output(new), new.h)


def test_sequence_equals_torch_gru():
    D, H, B, T = 3, 8, 4, 9
    cell = GRU(D, H, dtype=DT)
    ref = nn.GRU(D, H, dtype=DT)
    copy_to_torch(cell, ref, "_l0")
    x, h0 = torch.randn(T, B, D, dtype=DT), torch.randn(B, H, dtype=DT)
    with torch.no_grad():
        outs, sT, cache = cell.forward_sequence(cell.params(), x, GRUState(h0))
        ref_out, ref_h = ref(x, h0.unsqueeze(0))
    assert cache is None
    assert torch.allclose(outs, ref_out, rtol=0, atol=1e-13)
    assert torch.allclose(sT.h, ref_h[0], rtol=0, atol=1e-13)


def test_structure_in_closed_form():
    """The e-prop Jacobian is the carry z_t, and the n gate's factor through W_hh is r_t
    times its factor through W_ih (the reset gate scales W_hn h + b_hn)."""
    D, H, B = 3, 4, 5
    cell = GRU(D, H, dtype=DT)
    p = cell.params()
    x, h = torch.randn(B, D, dtype=DT), torch.randn(B, H, dtype=DT)
    lin = cell.linearize(p, GRUState(h), x, need=("eligibility", "immediate"))
    with torch.no_grad():
        gi = x @ p["W_ih"].T + p["b_ih"]
        gh = h @ p["W_hh"].T + p["b_hh"]
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    assert lin.eligibility.shape == (B, H, 1, 1)
    assert torch.allclose(lin.eligibility[:, :, 0, 0], z, rtol=0, atol=1e-15)
    imm = lin.immediate
    assert imm["W_ih"].D.shape == (B, 1, 3, H) and imm["W_ih"].inp.shape == (B, 1, D)
    assert imm["b_hh"].inp.shape == (B, 1, 1) and bool((imm["b_hh"].inp == 1).all())
    assert torch.equal(imm["W_hh"].inp[:, 0], h)
    Di, Dh = imm["W_ih"].D[:, 0], imm["W_hh"].D[:, 0]
    assert torch.equal(Di[:, :2], Dh[:, :2])
    assert torch.allclose(Dh[:, 2], r * Di[:, 2], rtol=0, atol=1e-15)


def test_forward_sequence_under_autograd_is_differentiable():
    """With parameters that require grad, the outputs come from a loop of step and carry
    a graph (the in-place fast path would break autograd); the cache is still returned."""
    D, H, B, T = 3, 4, 2, 5
    cell = GRU(D, H, dtype=DT)
    x, h0 = torch.randn(T, B, D, dtype=DT), torch.randn(B, H, dtype=DT)
    outs, sT, cache = cell.forward_sequence(cell.params(), x, GRUState(h0), cache=True)
    assert outs.requires_grad and cache is not None
    (g,) = torch.autograd.grad(outs.sum(), cell.W_hh)
    d_out = torch.ones(T, B, H, dtype=DT)
    grads, _, _ = cell.backward_sequence(cell.params(), x, GRUState(h0), cache, d_out)
    assert torch.allclose(grads["W_hh"], g, rtol=1e-12, atol=1e-14)
    assert not grads["W_hh"].requires_grad


def test_cache_serves_one_backward_and_arguments_stay():
    """backward_sequence writes over the cache's gates: a second use is a clear error;
    the caller's d_outputs, d_state, state0 and inputs are left as they were."""
    D, H, B, T = 2, 3, 2, 4
    cell = GRU(D, H, dtype=DT)
    p = {k: v.detach() for k, v in cell.params().items()}
    x, s0 = torch.randn(T, B, D, dtype=DT), GRUState(torch.randn(B, H, dtype=DT))
    d_out, d_state = torch.randn(T, B, H, dtype=DT), GRUState(torch.randn(B, H, dtype=DT))
    keep = [t.clone() for t in (x, s0.h, d_out, d_state.h)]
    _, _, cache = cell.forward_sequence(p, x, s0, cache=True)
    first = cell.backward_sequence(p, x, s0, cache, d_out, d_state)
    assert all(torch.equal(a, b) for a, b in zip(keep, (x, s0.h, d_out, d_state.h)))
    with pytest.raises(ValueError, match="used by an earlier backward_sequence"):
        cell.backward_sequence(p, x, s0, cache, d_out, d_state)
    _, _, cache = cell.forward_sequence(p, x, s0, cache=True)
    second = cell.backward_sequence(p, x, s0, cache, d_out, d_state)
    assert all(torch.equal(first[0][k], second[0][k]) for k in first[0])
    assert torch.equal(first[1], second[1]) and torch.equal(first[2].h, second[2].h)


def test_errors():
    cell = GRU(3, 4, dtype=DT)
    p, s0 = cell.params(), cell.init_state(2)
    with pytest.raises(ValueError, match=r"inputs has shape \(5, 2, 2\) but GRU expects \(T, B, 3\)"):
        cell.forward_sequence(p, torch.zeros(5, 2, 2, dtype=DT), s0)
    x = torch.zeros(5, 2, 3, dtype=DT)
    with pytest.raises(ValueError, match="needs the cache"):
        cell.backward_sequence(p, x, s0, None, torch.zeros(5, 2, 4, dtype=DT))
    with pytest.raises(TypeError, match="cache must come from GRU.forward_sequence"):
        cell.backward_sequence(p, x, s0, (1, 2, 3), torch.zeros(5, 2, 4, dtype=DT))
    with torch.no_grad():
        _, _, cache = cell.forward_sequence(p, x, s0, cache=True)
    with pytest.raises(ValueError, match=r"d_outputs has shape \(5, 2, 3\) but expected \(5, 2, 4\)"):
        cell.backward_sequence(p, x, s0, cache, torch.zeros(5, 2, 3, dtype=DT))


def test_stack_in_a_network():
    net = Network([GRU(3, 5, dtype=DT), GRU(5, 4, dtype=DT)], 2)
    y, h = net(torch.randn(6, 3, 3, dtype=DT))
    assert y.shape == (6, 3, 2) and h.shape == (6, 3, 4)
    names = {n for n, _ in net.named_parameters()}
    assert {"cells.0.W_ih", "cells.0.W_hh", "cells.0.b_ih", "cells.1.b_hh", "W_out"} <= names
