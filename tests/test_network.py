"""rnngrad.Network: construction, the cell contract checked up front, the state's forms,
and the errors a user meets with a wrong cell, a wrong state or mixed layers."""

from __future__ import annotations

import pytest
import torch
from cell_zoo import MGU, Adaptive, HState

import rnngrad
from rnngrad.cells import GRU, LSTM, Elman


def test_names_shapes_and_forward():
    net = rnngrad.Network([GRU(3, 4), LSTM(4, 5)], 2, readout="softmax")
    names = [n for n, _ in net.named_parameters()]
    assert names[:2] == ["W_out", "b_out"] and net.W_out.shape == (2, 5)  # own ones first
    assert names[2:6] == ["cells.0.W_ih", "cells.0.W_hh", "cells.0.b_ih", "cells.0.b_hh"]
    assert (net.input_size, net.hidden_size, net.output_size, net.num_layers) == (3, 5, 2, 2)
    y, h = net(torch.randn(6, 7, 3))
    assert y.shape == (6, 7, 2) and h.shape == (6, 7, 5)
    torch.testing.assert_close(y.sum(-1), torch.ones(6, 7))
    assert net.recurrent_names() == names[2:]


def test_rnn_is_the_one_elman_layer_network():
    rnn = rnngrad.RNN(3, 4, 2)
    assert isinstance(rnn, rnngrad.Network) and rnn.num_layers == 1
    assert [n for n, _ in rnn.named_parameters()] == ["W_in", "W_rec", "b_rec", "W_out", "b_out"]
    (prefix, cell), = rnn.layers()
    assert prefix == "" and isinstance(cell, Elman) and cell.W_rec is rnn.W_rec
    rnn64 = rnn.double()  # the cell follows the module's conversions
    assert rnn64.layers()[0][1].W_rec.dtype == torch.float64


class WrongType(MGU):
    def step(self, params, state, x):
        return super().step(params, state, x).h  # a tensor, not the state


class WrongShape(MGU):
    def step(self, params, state, x):
        return HState(super().step(params, state, x).h[:, :-1])


class WrongOutput(MGU):
    def output(self, state):
        return state.h.sum(1)


class Raises(MGU):
    def step(self, params, state, x):
        raise RuntimeError("boom")


@pytest.mark.parametrize("cls,match", [
    (WrongType, r"step must return a HState .* got Tensor"),
    (WrongShape, r"step returned state.h of \(2, 3\) torch.float64 but the state has \(2, 4\)"),
    (WrongOutput, r"its output must be \(B, hidden_size\) = \(2, 4\), got \(2,\)"),
    (Raises, r"step\(params, state, x\) raised .* RuntimeError: boom"),
])
def test_a_cell_that_breaks_the_protocol_is_named_at_construction(cls, match):
    with pytest.raises(TypeError, match=match):
        rnngrad.Network(cls(3, 4), 2)


def test_layers_must_chain_and_share_dtype():
    with pytest.raises(ValueError, match=r"cells\[1\] \(GRU\) has input_size 3 but cells\[0\] "
                                         r"outputs 4"):
        rnngrad.Network([GRU(3, 4), GRU(3, 4)], 2)
    with pytest.raises(TypeError, match=r"cells\[1\] has dtype torch.float64 but cells\[0\] has "
                                        r"torch.float32"):
        rnngrad.Network([GRU(3, 4), GRU(4, 4).double()], 2)
    with pytest.raises(TypeError, match="must be an rnngrad.cells.Cell"):
        rnngrad.Network([GRU(3, 4), torch.nn.GRU(4, 4)], 2)
    with pytest.raises(TypeError, match="use Network.from_torch"):
        rnngrad.Network(torch.nn.LSTM(3, 4), 2)
    with pytest.raises(ValueError, match="cells is empty"):
        rnngrad.Network([], 2)
    with pytest.raises(ValueError, match="output_size must be a positive int"):
        rnngrad.Network(GRU(3, 4), 0)


def test_h0_forms_and_errors():
    net = rnngrad.Network([LSTM(3, 4), Adaptive(4, 2, dtype=torch.float32)], 2)
    s, spec = net.coerce_state(None, 5)
    assert len(s) == 2 and s[0].c.shape == (5, 4) and s[1].a.shape == (5, 2)
    good = net.init_state(5)
    net.coerce_state(good, 5)
    net.coerce_state([good[0], (torch.zeros(2), torch.zeros(5, 2))], 5)  # (n,) is shared
    with pytest.raises(ValueError, match=r"h0 holds 1 layer state\(s\) but the network has 2"):
        net.coerce_state([good[0]], 5)
    with pytest.raises(TypeError, match=r"h0\[0\] is a tensor but LSTM's state has 2 components"):
        net.coerce_state([torch.zeros(5, 4), good[1]], 5)
    with pytest.raises(ValueError, match=r"h0\[0\].c has shape \(5, 3\) but expected \(5, 4\)"):
        net.coerce_state([good[0]._replace(c=torch.zeros(5, 3)), good[1]], 5)
    with pytest.raises(TypeError, match=r"h0\[1\].v has dtype torch.float64"):
        net.coerce_state([good[0], good[1]._replace(v=torch.zeros(5, 2, dtype=torch.float64))], 5)
    bad = good[0]._replace(h=torch.full((5, 4), float("nan")))
    with pytest.raises(ValueError, match=r"h0\[0\].h contains NaN or Inf"):
        net.coerce_state([bad, good[1]], 5)
    with pytest.raises(TypeError, match="must be a state of the network"):
        net.coerce_state("zeros", 5)


def test_online_state_from_another_network_or_algorithm_is_refused():
    net = rnngrad.Network(GRU(3, 4), 2)
    other = rnngrad.Network(GRU(3, 5), 2)
    algo = rnngrad.rtrl()
    state = algo.init(net, 2)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"the state does not fit this model"):
        algo.step(other, state, x)
    with pytest.raises(TypeError, match=r"state is a NetRTRLState, which rtrl\(\) make"):
        rnngrad.snap1().step(net, state, x)
