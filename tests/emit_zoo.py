"""User cells for the ``emit`` protocol and the ``diagonal`` declaration, written the way a
user would (``init_state``, ``step``, ``emit``, ``param_blocks``, ``diagonal`` and nothing
else), so every algorithm takes the torch.func defaults on them."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from rnngrad.cells import Cell


def _uniform(*shape, H, dtype=torch.float64):
    b = 1 / math.sqrt(H)
    return nn.Parameter(torch.empty(*shape, dtype=dtype).uniform_(-b, b))


class HState(NamedTuple):
    h: torch.Tensor


class PQState(NamedTuple):
    p: torch.Tensor
    q: torch.Tensor


class Readout(Cell):
    """Units that couple, and an output with parameters and a skip from the input:
    h' = tanh(W x + U h + b); y = tanh(V h + E x) + 0.5 h."""

    def __init__(self, input_size, hidden_size, *, dtype=torch.float64):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        H = hidden_size
        self.W = _uniform(H, input_size, H=H, dtype=dtype)
        self.U = _uniform(H, H, H=H, dtype=dtype)
        self.b = _uniform(H, H=H, dtype=dtype)
        self.V = _uniform(H, H, H=H, dtype=dtype)
        self.E = _uniform(H, input_size, H=H, dtype=dtype)

    def init_state(self, batch_size):
        return HState(self.W.new_zeros(batch_size, self.hidden_size))

    def param_blocks(self):
        return {"W": 1, "U": 1, "b": 1, "V": None, "E": None}

    def step(self, params, state, x):
        return HState(torch.tanh(x @ params["W"].T + state.h @ params["U"].T + params["b"]))

    def emit(self, params, state, x):
        return torch.tanh(state.h @ params["V"].T + x @ params["E"].T) + 0.5 * state.h


class DiagEmit(Cell):
    """Units that do not couple (declared), two components per unit, an emit with its own
    parameters: p' = sigmoid(a) p + tanh(W x + b); q' = 0.9 q + w tanh(p');
    y = tanh(V p + E x) * q (elementwise)."""

    diagonal = True

    def __init__(self, input_size, hidden_size, *, dtype=torch.float64):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        H = hidden_size
        self.a = nn.Parameter(torch.linspace(-1.0, 2.0, H, dtype=dtype))
        self.W = _uniform(H, input_size, H=H, dtype=dtype)
        self.b = _uniform(H, H=H, dtype=dtype)
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, H, dtype=dtype))
        self.V = _uniform(H, H, H=H, dtype=dtype)
        self.E = _uniform(H, input_size, H=H, dtype=dtype)

    def init_state(self, batch_size):
        z = self.W.new_zeros(batch_size, self.hidden_size)
        return PQState(z, z.clone())

    def param_blocks(self):
        return {"a": 1, "W": 1, "b": 1, "w": 1, "V": None, "E": None}

    def step(self, params, state, x):
        p = torch.sigmoid(params["a"]) * state.p + torch.tanh(x @ params["W"].T + params["b"])
        return PQState(p, 0.9 * state.q + params["w"] * torch.tanh(p))

    def emit(self, params, state, x):
        return torch.tanh(state.p @ params["V"].T + x @ params["E"].T) * state.q


class DiagPlain(Cell):
    """A declared diagonal cell with the default output: h' = tanh(w h + W x + b)."""

    diagonal = True

    def __init__(self, input_size, hidden_size, *, dtype=torch.float64):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        H = hidden_size
        self.w = nn.Parameter(torch.linspace(-0.9, 0.9, H, dtype=dtype))
        self.W = _uniform(H, input_size, H=H, dtype=dtype)
        self.b = _uniform(H, H=H, dtype=dtype)

    def init_state(self, batch_size):
        return HState(self.W.new_zeros(batch_size, self.hidden_size))

    def step(self, params, state, x):
        return HState(torch.tanh(params["w"] * state.h + x @ params["W"].T + params["b"]))

    def output(self, state):
        return state.h


class FakeDiagonal(DiagPlain):
    """Declares diagonal = True, but unit j's state reaches unit j + 1 (a shift)."""

    def step(self, params, state, x):
        h = state.h
        shifted = torch.cat((h[:, -1:], h[:, :-1]), dim=1)
        return HState(torch.tanh(params["w"] * h + 0.3 * shifted + x @ params["W"].T
                                 + params["b"]))


class SharedRow(DiagPlain):
    """Declares diagonal = True, but the input weights of unit 0 also drive unit 1."""

    def step(self, params, state, x):
        u = x @ params["W"].T
        u = u + torch.cat((torch.zeros_like(u[:, :1]), u[:, :1], torch.zeros_like(u[:, 2:])), 1)
        return HState(torch.tanh(params["w"] * state.h + u + params["b"]))


class SneakyEmit(Readout):
    """Says V is owned by no unit (emit only), but V also enters step."""

    def step(self, params, state, x):
        h = torch.tanh(x @ params["W"].T + state.h @ params["U"].T + params["b"])
        return HState(h + 0.1 * state.h @ params["V"].T)


class ComplexState(DiagPlain):
    """A state kept as one complex tensor: what rnngrad refuses."""

    def init_state(self, batch_size):
        return HState(torch.zeros(batch_size, self.hidden_size, dtype=torch.complex128))
