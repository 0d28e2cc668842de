"""Cells written only here, the way a user would write one: ``init_state``, ``step``,
``output`` and nothing else, so every algorithm takes the torch.func defaults on them."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from rnngrad.cells import Cell


def _uniform(*shape, H, dtype):
    return nn.Parameter(torch.empty(*shape, dtype=dtype).uniform_(-1 / math.sqrt(H), 1 / math.sqrt(H)))


class HState(NamedTuple):
    h: torch.Tensor


class MGU(Cell):
    """Minimal gated unit (Zhou et al. 2016) with the gate applied after U_n, as GRU's reset
    gate in PyTorch, 15 lines: f = sigmoid(W_f x + U_f h + b_f),
    n = tanh(W_n x + f * (U_n h) + b_n), h' = (1 - f) h + f n."""

    def __init__(self, input_size, hidden_size, *, dtype=torch.float64):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        H = hidden_size
        self.W = _uniform(2 * H, input_size, H=H, dtype=dtype)  # rows: f gate, then n
        self.U = _uniform(2 * H, H, H=H, dtype=dtype)
        self.b = _uniform(2 * H, H=H, dtype=dtype)

    def init_state(self, batch_size):
        return HState(self.W.new_zeros(batch_size, self.hidden_size))

    def step(self, params, state, x):
        H, h = self.hidden_size, state.h
        W, U, b = params["W"], params["U"], params["b"]
        f = torch.sigmoid(x @ W[:H].T + h @ U[:H].T + b[:H])
        n = torch.tanh(x @ W[H:].T + f * (h @ U[H:].T) + b[H:])
        return HState((1 - f) * h + f * n)

    def output(self, state):
        return state.h


class MGUResetBefore(MGU):
    """The original MGU, ``n = tanh(W_n x + U_n (f * h) + b_n)``: unit j's gate f_j reaches
    every unit's candidate through U_n, so the gate rows are not owned by their units."""

    def step(self, params, state, x):
        H, h = self.hidden_size, state.h
        W, U, b = params["W"], params["U"], params["b"]
        f = torch.sigmoid(x @ W[:H].T + h @ U[:H].T + b[:H])
        n = torch.tanh(x @ W[H:].T + (f * h) @ U[H:].T + b[H:])
        return HState((1 - f) * h + f * n)


class TanhGate(Cell):
    """h' = tanh(W_in x + W_rec h + b) * sigmoid(h) + 0.1 h."""

    def __init__(self, input_size, hidden_size, *, dtype=torch.float64):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        H = hidden_size
        self.W_in = _uniform(H, input_size, H=H, dtype=dtype)
        self.W_rec = _uniform(H, H, H=H, dtype=dtype)
        self.b = _uniform(H, H=H, dtype=dtype)

    def init_state(self, batch_size):
        return HState(self.W_in.new_zeros(batch_size, self.hidden_size))

    def step(self, params, state, x):
        h = state.h
        a = x @ params["W_in"].T + h @ params["W_rec"].T + params["b"]
        return HState(torch.tanh(a) * torch.sigmoid(h) + 0.1 * h)

    def output(self, state):
        return state.h


class VAState(NamedTuple):
    v: torch.Tensor
    a: torch.Tensor


class Adaptive(Cell):
    """Two state components per unit and an output that is not one of them:
    h = tanh(v - a); v' = 0.8 v + W x + U h + b; a' = 0.9 a + 0.1 h."""

    def __init__(self, input_size, hidden_size, *, dtype=torch.float64):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        H = hidden_size
        self.W = _uniform(H, input_size, H=H, dtype=dtype)
        self.U = _uniform(H, H, H=H, dtype=dtype)
        self.b = _uniform(H, H=H, dtype=dtype)

    def init_state(self, batch_size):
        z = self.W.new_zeros(batch_size, self.hidden_size)
        return VAState(z, z.clone())

    def step(self, params, state, x):
        h = self.output(state)
        v = 0.8 * state.v + x @ params["W"].T + h @ params["U"].T + params["b"]
        return VAState(v, 0.9 * state.a + 0.1 * h)

    def output(self, state):
        return torch.tanh(state.v - state.a)


class Diagonal(Cell):
    """Units that do not couple: h' = tanh(w * h + W x + b), w (H,)."""

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


class BrokenElman(Cell):
    """An Elman cell whose hand-derived backward pass is wrong by 0.1% on W_rec: what
    ``rnngrad check --cell`` exists to catch."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        from rnngrad.cells import Elman

        self.inner = Elman(input_size, hidden_size, dtype=torch.float64)
        self.input_size, self.hidden_size = input_size, hidden_size

    def init_state(self, batch_size):
        return self.inner.init_state(batch_size)

    def _own(self, params):
        return {k.removeprefix("inner."): v for k, v in params.items()}

    def step(self, params, state, x):
        return self.inner.step(self._own(params), state, x)

    def output(self, state):
        return state.h

    def forward_sequence(self, params, inputs, state0, *, cache=False):
        return self.inner.forward_sequence(self._own(params), inputs, state0, cache=cache)

    def backward_sequence(self, params, inputs, state0, cache, d_outputs, d_state=None, *,
                          input_grad=True):
        g, dx, d0 = self.inner.backward_sequence(self._own(params), inputs, state0, cache,
                                                 d_outputs, d_state, input_grad=input_grad)
        g = {f"inner.{k}": v * (1.001 if k == "W_rec" else 1.0) for k, v in g.items()}
        return g, dx, d0
