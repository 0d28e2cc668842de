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

A layer's output is ``h_t = emit(params, s_t, x_t)``: the signal reaches its state
through the vjp of ``emit``, ``(gp, q_t, qx) = vjp(emit)(L_t)``; ``gp`` is the exact
same-step gradient of the parameters ``emit`` uses (those owned by no unit take it
alone, like ``W_out``), and ``qx`` joins ``q_t^T d s_t / d x_t`` in the error passed
down. For one layer and symmetric feedback this is the exact gradient of the graph in
which the previous state of every other unit is detached where it enters (SnAp-1), or
the unit's recurrent input too (e-prop); where units do not couple (``Cell.diagonal``)
SnAp-1's traces are exact RTRL, and ``rtrl()`` runs here with mode "local".
``W_out``, ``b_out`` get their exact gradient.

Zucchet et al. (2023)'s spatial RTRL (``rtrl(layers="spatial")``) is this engine with
each layer exact on its own: per-unit traces ("local") for a diagonal layer, and for a
layer whose units couple the dense influence of its own parameters ("dense")::

    M^l_t = J^l_t M^l_{t-1} + Mbar^l_t       (B, S_l, N_l)   grad theta_l = sum_t q^l_t^T M^l_t

Cost per step: time and memory O(B C sum_p |p|) for per-unit traces, constant in T;
O(B S_l^2 N_l) time and O(B S_l N_l) memory for a dense layer.

A leaky readout (``readout_decay`` kappa > 0; one layer whose output is ``output(state)``
unit by unit) gets Bellec et al.'s filtered eligibility traces: the trace of each unit's
output, ``e_p[g, i, j] = sum_c dh_i/ds[c, i] M_p[c, g, i, j]``, low-pass filtered,
``ebar_p <- kappa ebar_p + e_p``, meets the unfiltered signal: ``grad p = sum_t sum_b
L_t[i] ebar_p[g, i, j]`` (``_leaky_readout``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cells._derive import (
    check_units,
    declares,
    dense_jacobians,
    verify_emit_only,
    verify_ownership,
)
from ..cells.base import unflatten_state
from . import _leaky_readout as _leak
from ._network import bind, check_real, emit_vjp, unit_mix
from .base import Grads, StepOutput, output_grads, readout_step

__all__ = ["NetTraceState", "init", "step", "check_owned", "MODES"]

# per layer: per-unit traces through the local Jacobian (SnAp-1; exact RTRL for a
# diagonal cell) or the eligibility Jacobian (e-prop); or the dense influence of the
# layer's own parameters, from the cell's structure or from torch.func ("dense_generic")
MODES = ("local", "eligibility", "dense", "dense_generic")


class NetTraceState(NamedTuple):
    h: tuple  # the network's state, one state per layer
    traces: list  # per layer: dict owned parameter name -> M_p (B, C, G, U, P); dense: (B, S_l, N_l)
    feedback: Tensor | None  # (K, H) fixed random feedback; None: W_out (the exact signal)
    c: list | None  # per layer (B, U, C, C): d s_t[., i] / d s_0[., i] along the kept paths;
    #                 dense: (B, S_l, S_l) d s^l_t / d s^l_0. None unless h0 is tracked
    modes: tuple | None = None  # per layer, one of MODES; None: the mode step is called with
    leak: _leak.Traces | None = None  # a leaky readout's filtered traces (kappa > 0)


def check_owned(model, who: str) -> None:
    """Every parameter that enters ``step`` must be owned by units (a parameter owned by
    none may enter only ``emit``), every state component per unit."""
    check_real(model)
    model.init_state(1)  # real states only: a clear error before any probe
    for _, cell in model.layers():
        check_units(cell, cell.init_state(1))
        verify_emit_only(cell, who)
        verify_ownership(cell, who)
    _leak.check_traces(model, who)


def init(model, batch_size: int, h0: tuple | None, feedback: Tensor | None,
         modes: tuple | None = None) -> NetTraceState:
    _leak.check_traces(model, "rtrl(layers='spatial')" if modes and len(modes) > 1
                       else "the per-unit trace rules")
    h = model.init_state(batch_size) if h0 is None else h0
    traces, cs = [], []
    for l, ((_, cell), s) in enumerate(zip(model.layers(), h)):
        C, U = len(s), cell.n_units
        ref = s[0]
        if modes is not None and modes[l].startswith("dense"):
            S = sum(int(c.shape[-1]) for c in s)
            N = sum(p.numel() for p in cell.parameters())
            traces.append(ref.new_zeros(batch_size, S, N))
            if h0 is not None:
                cs.append(torch.eye(S, dtype=ref.dtype, device=ref.device)
                          .expand(batch_size, S, S).clone())
            continue
        blocks = cell.param_blocks()
        tr = {}
        for name, p in cell.named_parameters():
            G = blocks[name]
            if G is not None:
                tr[name] = p.new_zeros(batch_size, C, G, U, p.numel() // (G * U)).detach()
        traces.append(tr)
        if h0 is not None:
            eye = torch.eye(C, dtype=ref.dtype, device=ref.device)
            cs.append(eye.expand(batch_size, U, C, C).clone())
    leak = None
    if _leak.decay(model) != 0.0:  # one layer of per-unit traces (check_traces)
        leak = _leak.traces_init(model, traces[0], cs[0] if h0 is not None else None)
    return NetTraceState(h, traces, feedback, cs if h0 is not None else None,
                         None if modes is None else tuple(modes), leak)


def _dense_layer(cell, p, s, x, M: Tensor, G: Tensor | None, generic: bool, need_jx: bool):
    """One step of a layer's own exact influence: ``M <- J M + Mbar`` (B, S_l, N_l), and
    ``G <- J G``. Returns ``(state_t, M, G, Jx)``."""
    from ._rtrl_network import add_immediate

    if generic or not declares(cell, "immediate"):
        new, J, Jx, Mbar = dense_jacobians(cell, p, s, x)
        M = torch.bmm(J, M).add_(Mbar)
    else:
        need = ("jacobian", "immediate") + (("input_jacobian",) if need_jx else ())
        lin = cell.linearize(p, s, x, need=need)
        new, J, Jx = lin.state, lin.jacobian, lin.input_jacobian
        M = torch.bmm(J, M)
        add_immediate(M, lin.immediate, p, cell.param_blocks(), 0, len(new), cell.n_units,
                      type(cell).__name__)
    return new, M, None if G is None else torch.bmm(J, G), Jx


def _through_unit(J: Tensor, M: Tensor) -> Tensor:
    """``M[b, c, ..., i, j] <- sum_c' J[b, i, c, c'] M[b, c', ..., i, j]`` (M: (B, C, G, U, P))."""
    B, U, C, _ = J.shape
    if C == 1:
        return M.mul_(J.view(B, 1, 1, U, 1))
    return unit_mix(J, M, (B, 1, U, 1))


def _contract(q: Tensor, M: Tensor) -> Tensor:
    """``grad[g, i, j] = sum_b sum_c q[b, c, i] M[b, c, g, i, j]`` (q (B, C, U), M (B, C, G,
    U, P)). For large traces one multiply-accumulate per (b, c) into a (G, U, P) sum,
    reading M once (an einsum batches over the units and copies M into that layout, 3x
    slower at H = 1024); for small ones the einsum (fewer ops)."""
    B, C, G, U, P = M.shape
    if G * U * P < 16384:
        return torch.einsum("bci,bcgij->gij", q, M)
    acc = torch.mul(M[0, 0], q[0, 0].view(1, U, 1))
    for b in range(B):
        for c in range(C):
            if b or c:
                acc.addcmul_(M[b, c], q[b, c].view(1, U, 1))
    return acc


def step(model, mode: str, state: NetTraceState, x_t, target_t, mask_t, loss, dh_t):
    with torch.no_grad():
        net = bind(model)
        modes = state.modes if state.modes is not None else (mode,) * net.L
        x = x_t
        states, traces, jxs, cs, ins = [], [], [], [], []
        for l, (cell, p) in enumerate(zip(net.cells, net.params)):
            m = modes[l]
            if m.startswith("dense"):
                G0 = None if state.c is None else state.c[l]
                new, tr, c, Jx = _dense_layer(cell, p, state.h[l], x, state.traces[l], G0,
                                              m == "dense_generic", l > 0)
            else:
                need = (m, "immediate") + (("input_jacobian",) if l > 0 else ())
                lin = cell.linearize(p, state.h[l], x, need=need)
                new, Jx = lin.state, lin.input_jacobian
                J = lin.local if m == "local" else lin.eligibility
                tr = {}
                for name, M in state.traces[l].items():
                    M = _through_unit(J, M)
                    d = lin.immediate[name]
                    if d.inp is None:
                        M = M.add_(d.D)
                    else:
                        M = M.addcmul_(d.D.unsqueeze(-1), d.rows().unsqueeze(1).unsqueeze(1))
                    tr[name] = M
                c = None if state.c is None else torch.matmul(J, state.c[l])
            traces.append(tr)
            jxs.append(Jx)
            cs.append(c)
            states.append(new)
            ins.append(x)
            x = cell.emit(p, new, x)
        h = x
        if state.leak is not None:  # a leaky readout: Bellec's filtered traces, one layer
            leak, z, value, g, d0, ro = _leak.traces_step(
                model, state.leak, net.cells[0], states[0], traces[0], cs[0], h,
                state.feedback, target_t, mask_t, loss, dh_t)
            grads = None
            if target_t is not None or dh_t is not None:
                grads = {net.prefixes[0] + n: g[n].reshape(v.shape) if n in g
                         else v.new_zeros(v.shape) for n, v in net.params[0].items()}
                grads.update(ro)
                if d0 is not None:
                    grads["h0"] = (type(states[0])(*d0.unbind(1)),)
            new = NetTraceState(tuple(states), traces, state.feedback,
                                cs if state.c is not None else None, state.modes, leak)
            return new, StepOutput(h, z, value), grads
        z, value, dz = readout_step(model, h, target_t, mask_t, loss)
        fb = model.W_out.detach() if state.feedback is None else state.feedback
        L = None if dz is None else dz @ fb
        if dh_t is not None:
            L = dh_t if L is None else L + dh_t
        grads: Grads | None = None
        if L is not None or dz is not None:
            grads = {}
            d0 = [None] * net.L
            g = L  # dL/dh^l_t arriving at layer l's output: the signal, then passed down
            for l in range(net.L - 1, -1, -1):
                cell, s, prm = net.cells[l], states[l], net.params[l]
                C, U = len(s), cell.n_units
                dp, qs, dx = ({}, None, None) if g is None else emit_vjp(cell, prm, s, ins[l], g)
                if torch.is_tensor(traces[l]):  # a dense layer: q^T M over its own columns
                    flat = (qs.reshape(1, -1) @ traces[l].reshape(-1, traces[l].shape[2])
                            ).squeeze(0) if qs is not None else None
                    off = 0
                    for name, v in prm.items():
                        k = v.numel()
                        grads[net.prefixes[l] + name] = (v.new_zeros(v.shape) if flat is None
                                                         else flat[off:off + k].view(v.shape))
                        off += k
                else:
                    for name, v in prm.items():
                        M = traces[l].get(name)
                        if M is None or qs is None:  # owned by no unit: emit's term alone
                            d = dp.pop(name, None)
                            grads[net.prefixes[l] + name] = v.new_zeros(v.shape) if d is None \
                                else d.reshape(v.shape)
                        else:
                            grads[net.prefixes[l] + name] = _contract(qs.view(-1, C, U), M) \
                                .reshape(v.shape)
                for name, v in dp.items():  # emit's same-step term, of owned parameters
                    gp = grads[net.prefixes[l] + name]
                    gp.add_(v.reshape(gp.shape))
                if state.c is not None:
                    ref = s[0]
                    if torch.is_tensor(traces[l]):
                        S = cs[l].shape[1]
                        dc = (ref.new_zeros(ref.shape[0], S) if qs is None else
                              torch.bmm(qs.unsqueeze(1), cs[l]).squeeze(1))
                        d0[l] = unflatten_state(dc, s)
                    else:
                        dc = (ref.new_zeros(ref.shape[0], C, U) if qs is None else
                              torch.einsum("bci,bicd->bdi", qs.view(-1, C, U), cs[l]))
                        d0[l] = type(s)(*dc.unbind(1))
                if l > 0 and qs is not None:  # the same step's error, passed down
                    g = torch.bmm(qs.unsqueeze(1), jxs[l]).squeeze(1)
                    if dx is not None:
                        g = g + dx
            if dz is None:
                grads["W_out"] = torch.zeros_like(model.W_out.detach())
                grads["b_out"] = torch.zeros_like(model.b_out.detach())
            else:
                grads.update(output_grads(dz, h))
            if state.c is not None:
                grads["h0"] = tuple(d0)
        new = NetTraceState(tuple(states), traces, state.feedback,
                            cs if state.c is not None else None, state.modes)
    return new, StepOutput(h, z, value), grads
