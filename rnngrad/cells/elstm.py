"""The element-wise LSTM (eLSTM) of Irie, Gopalakrishnan & Schmidhuber (2023, "Exploring the
promise and limits of real-time recurrent learning", arXiv 2305.19044; "QuasiLSTM" in
their code): an LSTM whose recurrent weights are vectors, so that units do not couple
through time and RTRL is exact at the cost of per-unit traces.

Shapes: x_t (B, D), c_t and h_t (B, H). Gates in the order z, f (rows of ``W`` and
entries of ``w``, ``b``: z's block of H, then f's)::

    z_t = tanh(W_z x_t + w_z * c_{t-1} + b_z)        (B, H) candidate
    f_t = sigmoid(W_f x_t + w_f * c_{t-1} + b_f)     (B, H) forget gate
    c_t = f_t * c_{t-1} + (1 - f_t) * z_t            (B, H) the state
    o_t = sigmoid(W_o x_t + R_o c_t + b_o)           (B, H) output gate, on c_t (not c_{t-1})
    h_t = o_t * c_t                                  (B, H) the output (emit)

The output gate couples units (R_o is a full matrix) but does not feed back: its
parameters ``W_o, R_o, b_o`` enter only the output and are owned by no unit.

Declared structure (C = 1; ``W, w, b`` owned row by row, G = 2), with
``k_z = (1 - f_t)(1 - z_t^2)`` and ``k_f = (c_{t-1} - z_t) f_t (1 - f_t)``::

    local = eligibility   f_t + k_z w_z + k_f w_f          (B, H, 1, 1): every path within
                          the unit (there is no other: e-prop's eligibility is the same)
    immediate             W: ([k_z, k_f], x_t),  w: ([k_z, k_f] c_{t-1}, 1),  b: ([k_z, k_f], 1)
    jacobian              diag(local)                      (B, H, H)
    input_jacobian        diag(k_z) W_z + diag(k_f) W_f    (B, H, D)

Irie et al.'s RTRL keeps exactly these traces; ``rnngrad.rtrl()`` finds the diagonal
declaration and does the same.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .base import Cell, Immediate, Linearization, check_factory, check_number
from .elman import check_sizes
from .gru import gate_sum

__all__ = ["ELSTM", "ELSTMState"]


class ELSTMState(NamedTuple):
    c: Tensor  # (B, H)


class ELSTM(Cell):
    """Irie et al. (2023)'s element-wise LSTM; see the module docstring.

    Args:
        input_size: D.  hidden_size: H.
        forget_bias: added to b_f at initialisation (Irie et al.: 0).
        dtype, device: of the parameters.

    Parameters: ``W (2H, D)``, ``w (2H,)``, ``b (2H,)`` (gates z, f), drawn N(0, 0.1^2) as in
    Irie et al.'s code; the output gate's ``W_o (H, D)``, ``R_o (H, H)``, ``b_o (H,)``, drawn
    U(-1/sqrt(D + H), 1/sqrt(D + H)) (their ``nn.Linear(D + H, H)``). State: ``ELSTMState(c)``.
    """

    diagonal = True

    def __init__(self, input_size: int, hidden_size: int, *, forget_bias: float = 0.0,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_sizes(input_size=input_size, hidden_size=hidden_size)
        check_factory(dtype, device)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.forget_bias = check_number("forget_bias", forget_bias)
        kw = {"dtype": dtype, "device": device}
        H, Dn = hidden_size, input_size
        self.W = nn.Parameter(torch.empty(2 * H, Dn, **kw))
        self.w = nn.Parameter(torch.empty(2 * H, **kw))
        self.b = nn.Parameter(torch.empty(2 * H, **kw))
        self.W_o = nn.Parameter(torch.empty(H, Dn, **kw))
        self.R_o = nn.Parameter(torch.empty(H, H, **kw))
        self.b_o = nn.Parameter(torch.empty(H, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H = self.hidden_size
        bound = 1.0 / math.sqrt(self.input_size + H)
        with torch.no_grad():
            for p in (self.W, self.w, self.b):
                p.normal_(0.0, 0.1)
            self.b[H:] += self.forget_bias
            for p in (self.W_o, self.R_o, self.b_o):
                p.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}"

    def param_blocks(self) -> dict[str, int | None]:
        return {"W": 2, "w": 2, "b": 2, "W_o": None, "R_o": None, "b_o": None}

    def init_state(self, batch_size: int) -> ELSTMState:
        p = self.W
        return ELSTMState(torch.zeros(batch_size, self.hidden_size, dtype=p.dtype,
                                      device=p.device))

    def _gates(self, params, state: ELSTMState, x: Tensor):
        c_prev = state.c
        a = torch.addmm(params["b"], x, params["W"].T) + params["w"] * c_prev.repeat(1, 2)
        a_z, a_f = a.chunk(2, 1)
        z, f = torch.tanh(a_z), torch.sigmoid(a_f)
        return z, f, ELSTMState(torch.lerp(z, c_prev, f))  # f c_{t-1} + (1 - f) z

    def step(self, params, state: ELSTMState, x: Tensor) -> ELSTMState:
        return self._gates(params, state, x)[-1]

    def emit(self, params, state: ELSTMState, x: Tensor) -> Tensor:
        o = torch.sigmoid(torch.addmm(params["b_o"], x, params["W_o"].T)
                          + state.c @ params["R_o"].T)
        return o * state.c

    def linearize(self, params, state: ELSTMState, x: Tensor, *, need=()) -> Linearization:
        z, f, new = self._gates(params, state, x)
        if not need:
            return Linearization(new)
        B, H = z.shape
        c_prev = state.c
        k_z = (1 - f) * (1 - z * z)                       # d c_t / d a_z
        k_f = (c_prev - z) * f * (1 - f)                  # d c_t / d a_f
        K = torch.stack((k_z, k_f), 1)                    # (B, 2, H)
        w_z, w_f = params["w"].chunk(2)
        out = {}
        if {"local", "eligibility", "jacobian"} & set(need):
            loc = f + k_z * w_z + k_f * w_f               # d c_t / d c_{t-1}
            if "local" in need:
                out["local"] = loc.view(B, H, 1, 1)
            if "eligibility" in need:
                out["eligibility"] = loc.view(B, H, 1, 1).clone()
            if "jacobian" in need:
                out["jacobian"] = torch.diag_embed(loc)
        if "immediate" in need:
            ones = z.new_ones(B, 1, 1)
            K4 = K.unsqueeze(1)                           # (B, 1, 2, H)
            out["immediate"] = {"W": Immediate(K4, x.unsqueeze(1)),
                                "w": Immediate(K4 * c_prev.view(B, 1, 1, H), ones),
                                "b": Immediate(K4, ones)}
        if "input_jacobian" in need:
            out["input_jacobian"] = gate_sum(K, params["W"])
        return Linearization(new, **out)
