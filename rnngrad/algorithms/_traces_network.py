"""Per-unit traces for any ``rnngrad.Network``: SnAp-1, e-prop and RFLO beyond the Elman cell.

Each layer keeps, for every parameter p it owns (viewed as (G, U, P): row ``(g, i)``
owned by unit i), the influence of p on the state of the unit that owns it::

    M_p[b, c, g, i, j] ~ d s_t[c, i] / d p[g, i, j]                      (B, C, G, U, P)
    M_p <- J_t[i] M_p + Mbar_p          J_t[i] (C, C): the unit's own block of ds_t/ds_{t-1}

SnAp-1 (Menick et al. 2021) takes ``J_t[i]`` = ``local_jacobian`` (every path within
unit i); e-prop (Bellec et al. 2020) takes ``eligibility_jacobian`` (the unit's
recurrent input held fixed: its internal dynamics only). The learning signal of the
top layer is ``L_t = B dl_t/dz_t (+ dh_t)`` with ``B = W_out^T`` (exact immediate signal)
or a fixed random matrix, mapped onto the state through ``output``; a lower layer's
signal is the upper layer's passed down through the same step (Zucchet et al.'s
"spatial" backprop: exact within the step, no path through upper layers' memory)::

    q^L_t = (d h^L / d s^L)^T L_t,   q^{l-1}_t = (d s^l_t / d s^{l-1}_t)^T q^l_t
    grad p[g, i, j] = sum_t sum_b sum_c q_t[b, c, i] M_p[b, c, g, i, j]

For one layer and symmetric feedback this is the exact gradient of the graph in which
the previous state of every other unit is detached where it enters (SnAp-1), or the
unit's recurrent input too (e-prop). ``W_out``, ``b_out`` get their exact gradient.
Cost per step: time and memory O(B C sum_p |p|), constant in T.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cells._derive import check_units, verify_ownership
from ._network import bind, output_into_state
from .base import Grads, StepOutput, output_grads, readout_step

__all__ = ["NetTraceState", "init", "step", "check_owned"]


class NetTraceState(NamedTuple):
    h: tuple  # the network's state, one state per layer
    traces: list  # per layer: dict own parameter name -> M_p (B, C, G, U, P)
    feedback: Tensor | None  # (K, H) fixed random feedback; None: W_out (the exact signal)
    c: list | None  # per layer (B, U, C, C): d s_t[., i] / d s_0[., i] along the kept paths


def check_owned(model, who: str) -> None:
    """Every recurrent parameter must be owned by units, every state component per unit."""
    for prefix, cell in model.layers():
        blocks = cell.param_blocks()
        for name, p in cell.named_parameters():
            if blocks.get(name) is None:
                raise ValueError(
                    f"{who} keeps per-unit traces and needs every parameter owned by a unit "
                    f"(shape (G * n_units, ...), row g * n_units + i owned by unit i), but "
                    f"{prefix}{name} of {type(cell).__name__} has shape {tuple(p.shape)} with "
                    f"n_units = {cell.n_units}; declare param_blocks() for it")
        check_units(cell, cell.init_state(1))
        verify_ownership(cell, who)


def init(model, batch_size: int, h0: tuple | None, feedback: Tensor | None) -> NetTraceState:
    h = model.init_state(batch_size) if h0 is None else h0
    traces, cs = [], []
    for (_, cell), s in zip(model.layers(), h):
        C, U = len(s), cell.n_units
        blocks = cell.param_blocks()
        tr = {}
        for name, p in cell.named_parameters():
            G = blocks[name]
            tr[name] = p.new_zeros(batch_size, C, G, U, p.numel() // (G * U)).detach()
        traces.append(tr)
        if h0 is not None:
            eye = torch.eye(C, dtype=s[0].dtype, device=s[0].device)
            cs.append(eye.expand(batch_size, U, C, C).clone())
    return NetTraceState(h, traces, feedback, cs if h0 is not None else None)


def _through_unit(J: Tensor, M: Tensor) -> Tensor:
    """``M[b, c, ..., i, j] <- sum_c' J[b, i, c, c'] M[b, c', ..., i, j]`` (M: (B, C, G, U, P))."""
    B, U, C, _ = J.shape
    if C == 1:
        return M.mul_(J.view(B, 1, 1, U, 1))
    return torch.einsum("bicd,bdgij->bcgij", J, M)


def step(model, mode: str, state: NetTraceState, x_t, target_t, mask_t, loss, dh_t):
    with torch.no_grad():
        net = bind(model)
        x = x_t
        states, traces, lins, cs = [], [], [], []
        for l, (cell, p) in enumerate(zip(net.cells, net.params)):
            need = (mode, "immediate") + (("input_jacobian",) if l > 0 else ())
            lin = cell.linearize(p, state.h[l], x, need=need)
            J = lin.local if mode == "local" else lin.eligibility
            tr = {}
            for name, M in state.traces[l].items():
                M = _through_unit(J, M)
                d = lin.immediate[name]
                if d.inp is None:
                    M = M.add_(d.D)
                else:
                    M = M.addcmul_(d.D.unsqueeze(-1), d.inp.unsqueeze(1).unsqueeze(1))
                tr[name] = M
            if state.c is not None:
                cs.append(torch.matmul(J, state.c[l]))
            traces.append(tr)
            lins.append(lin)
            states.append(lin.state)
            x = cell.output(lin.state)
        h = x
        z, value, dz = readout_step(model, h, target_t, mask_t, loss)
        fb = model.W_out.detach() if state.feedback is None else state.feedback
        L = None if dz is None else dz @ fb
        if dh_t is not None:
            L = dh_t if L is None else L + dh_t
        grads: Grads | None = None
        if L is not None or dz is not None:
            grads = {}
            d0 = [None] * net.L
            qs = None if L is None else output_into_state(net.cells[-1], states[-1], L)
            for l in range(net.L - 1, -1, -1):
                cell, s = net.cells[l], states[l]
                C, U = len(s), cell.n_units
                for name, M in traces[l].items():
                    full = net.prefixes[l] + name
                    shape = net.params[l][name].shape
                    if qs is None:
                        grads[full] = M.new_zeros(shape)
                    else:
                        g = torch.einsum("bci,bcgij->gij", qs.view(-1, C, U), M)
                        grads[full] = g.reshape(shape)
                if state.c is not None:
                    dc = (torch.zeros(s[0].shape[0], C, U, dtype=s[0].dtype, device=s[0].device)
                          if qs is None else
                          torch.einsum("bci,bicd->bdi", qs.view(-1, C, U), cs[l]))
                    d0[l] = type(s)(*dc.unbind(1))
                if l > 0 and qs is not None:  # the same step's error, passed down
                    below = torch.bmm(qs.unsqueeze(1), lins[l].input_jacobian).squeeze(1)
                    qs = output_into_state(net.cells[l - 1], states[l - 1], below)
            if dz is None:
                grads["W_out"] = torch.zeros_like(model.W_out.detach())
                grads["b_out"] = torch.zeros_like(model.b_out.detach())
            else:
                grads.update(output_grads(dz, h))
            if state.c is not None:
                grads["h0"] = tuple(d0)
        new = NetTraceState(tuple(states), traces, state.feedback,
                            cs if state.c is not None else None)
    return new, StepOutput(h, z, value), grads
