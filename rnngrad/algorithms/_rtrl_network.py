"""Exact RTRL for any ``rnngrad.Network`` (Williams & Zipser 1989), layer by layer within each step.

For layer l with state s^l (flattened, S_l), output ``h^l_t = emit_l(theta_l, s^l_t,
h^{l-1}_t)`` (``h^0 = x``; for most cells ``emit`` is ``output(s^l_t)``) and the recurrent
parameters theta of layers 1..l (the influence of layer l on higher layers' parameters
is zero)::

    M^l_t  = J^l_t M^l_{t-1} + Jx^l_t Mh^{l-1}_t + Mbar^l_t       (B, S_l, N_{<=l})
    Mh^l_t = Gs^l_t M^l_t + Gx^l_t Mh^{l-1}_t + Gp^l_t            (B, H_l, N_{<=l}) d h^l_t / d theta
    J^l_t = d s^l_t / d s^l_{t-1},  Jx^l_t = d s^l_t / d h^{l-1}_t  the step's Jacobians
    Mbar^l_t = d s^l_t / d theta_l                                the immediate term, own columns
    Gs, Gx, Gp = d emit / d (s^l_t, h^{l-1}_t, theta_l)           Gp: own columns (zero for output())

    (gp_t, qs_t, qx_t) = the vjp of the top layer's emit at q_t = W_out^T dl_t/dz_t (+ dh_t)
    dL/dtheta = sum_t sum_b [qs_t^T M^L_t + qx_t^T Mh^{L-1}_t] + gp_t

With an initial state the sensitivity ``G^l_t = d s^l_t / d s_0`` (B, S_l, S) obeys the
same recursion without Mbar and Gp, ``G^l_0`` the identity on layer l's block.

Structured (``rtrl()``): ``J``, ``Jx`` and the immediate term come from the cell's
``linearize``; the immediate term of a parameter owned by units (row ``(g, i)`` moves
only unit i) is a diagonal add into the influence, no (B, S, N) tensor is formed; a
parameter owned by no unit enters only ``emit`` (checked) and has no immediate term. For
a diagonal cell (``Cell.diagonal``, checked by ``verify_diagonal``) ``J M`` goes unit by
unit through the cell's local blocks (``through_units``): O(B C^2 U N), not O(B S^2 N).
A cell that does not declare its immediate term gets the dense ``torch.func`` Jacobian
instead. ``rtrl(generic=True)`` uses ``vmap(jacrev)`` for everything: the second oracle.
Exact, online; time O(B S^2 N) per step, memory O(B S N). (One diagonal layer alone
does not come here: ``rtrl()`` then keeps per-unit traces, ``_traces_network``.)

A leaky readout (``readout_decay`` kappa > 0) reads ``hf_t = kappa hf_{t-1} + h^L_t``, so
its signal meets the filtered influence ``Hf_t = kappa Hf_{t-1} + Mh^L_t`` (B, H, N), one
more linear recurrence (``_leaky_readout``); a reward's ``dh_t`` meets ``Mh^L_t`` itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cells._derive import declares, dense_jacobians, verify_diagonal, verify_emit_only
from ..cells.base import Immediate
from . import _leaky_readout as _leak
from ._network import (
    as_state,
    bind,
    emit_vjp,
    output_influence,
    shown,
    split_flat,
    state_grad_form,
    unflatten_net_state,
    unit_mix,
    unshown,
)
from .base import Grads, StepOutput, immediate_signal, output_grads

__all__ = ["NetRTRLState", "init", "step", "add_immediate"]


class NetRTRLState(NamedTuple):
    h: tuple  # the network's state s_t, one state per layer (as ``shown``: RNN's (B, H) h_t)
    M: list  # per layer l: (B, S_l, N_{<=l}) influence d s^l_t / d theta_{1..l}
    G: list | None  # per layer l: (B, S_l, S) d s^l_t / d s_0; None unless h0 is tracked
    leak: _leak.Influence | None = None  # the leaky readout's filtered influence (kappa > 0)
    h0_tensor: bool = False  # h0 came as a tensor: grads["h0"] goes back as one
    spare: list | None = None  # per layer: the buffer J^l_t M^l_{t-1} is written into (M's shape)


def init(model, batch_size: int, h0, generic: bool = False) -> NetRTRLState:
    h0, as_tensor = as_state(model, h0, batch_size)
    net = bind(model)
    for cell in net.cells:
        if cell.diagonal and not generic:
            verify_diagonal(cell, "rtrl()")
        elif declares(cell, "immediate") and not generic:
            verify_emit_only(cell, "rtrl()")
    p = model.W_out
    kw = {"dtype": p.dtype, "device": p.device}
    track = h0 is not None
    h = model.init_state(batch_size) if h0 is None else h0
    widths = [sum(int(c.shape[-1]) for c in s) for s in h]
    M = [torch.zeros(batch_size, S, net.offsets[l + 1], **kw) for l, S in enumerate(widths)]
    G = None
    if track:
        total = sum(widths)
        G, off = [], 0
        for S in widths:
            g = torch.zeros(batch_size, S, total, **kw)
            g[:, :, off:off + S] = torch.eye(S, **kw)
            G.append(g)
            off += S
    leak = _leak.influence_init(model, batch_size, net.offsets[-1],
                                sum(widths) if track else None)
    return NetRTRLState(shown(model, h), M, G, leak, as_tensor, [torch.empty_like(m) for m in M])


def add_immediate(M: Tensor, imm: dict[str, Immediate], params: dict[str, Tensor],
                  blocks: dict, offset: int, C: int, U: int, who: str) -> None:
    """Add the structured immediate term into the influence M (B, C U, N) in place: for a
    parameter viewed as (G, U, P), its columns viewed as (B, C, U, G, U, P) get
    ``D[b, c, g, i] inp[b, i, j]`` on the diagonal of the two U axes."""
    B = M.shape[0]
    off = offset
    for name, p in params.items():
        n = p.numel()
        G = blocks.get(name)
        if G is None and name not in imm:  # owned by no unit: enters only emit (verified)
            off += n
            continue
        if G is None or name not in imm:
            raise ValueError(f"{who}: parameter {name!r} (shape {tuple(p.shape)}) has no "
                             "immediate term: rtrl() needs every parameter owned by a unit "
                             "(param_blocks) with its immediate term declared, or the dense "
                             "path, rtrl(generic=True)")
        P = n // (G * U)
        d = imm[name]
        if C == 1 and G == 1 and M.stride(2) == 1:
            # one component, one row per unit (Elman): unit i's row of p is the stretch
            # M[:, i, off + i P : off + (i + 1) P], a strided (B, U, P) view
            block = M.as_strided((B, U, P), (M.stride(0), M.stride(1) + P, 1),
                                 M.storage_offset() + off)
            if d.inp is None:
                block.add_(d.D.view(B, U, P))
            else:
                block.addcmul_(d.D.view(B, U, 1), d.rows())  # the mask applied (LIF)
            off += n
            continue
        block = M[:, :, off:off + n].view(B, C, U, G, U, P).diagonal(dim1=2, dim2=4)
        # block: (B, C, G, P, U)
        if d.inp is None:
            block.add_(d.D.permute(0, 1, 2, 4, 3))
        else:  # no (B, C, G, P, U) temporary: the product is added where it lands
            block.addcmul_(d.D.unsqueeze(3), d.rows().permute(0, 2, 1).unsqueeze(1).unsqueeze(1))
        off += n


def through_units(local: Tensor, M: Tensor) -> Tensor:
    """``J_t M`` for a diagonal cell: M (B, C U, N) through the per-unit blocks of J_t,
    local (B, U, C, C): ``M[b, (c, i), n] <- sum_c' local[b, i, c, c'] M[b, (c', i), n]``.
    O(B C^2 U N) instead of the dense O(B (C U)^2 N)."""
    B, U, C, _ = local.shape
    if C == 1:
        return M * local.view(B, U, 1)
    return unit_mix(local, M.view(B, C, U, -1), (B, U, 1)).view(M.shape)


def _spare(state: NetRTRLState, Ms: list) -> list | None:
    """The old influences' buffers, for the next step to write into."""
    return None if state.spare is None else list(state.M)


def step(model, generic: bool, state: NetRTRLState, x_t, target_t, mask_t, loss, dh_t):
    with torch.no_grad():
        net = bind(model)
        x = x_t
        states, Ms, Gs, ins = [], [], [], []
        Mh = Gh = None  # d h^{l-1}_t / d theta_{<l} (B, H, N_{<l}) and d h^{l-1}_t / d s_0
        h_prev = unshown(state.h)
        for l, (cell, p) in enumerate(zip(net.cells, net.params)):
            s = h_prev[l]
            diagonal = not generic and cell.diagonal
            lower = ("input_jacobian",) if l > 0 else ()
            if diagonal:  # verified in init: J_t acts unit by unit
                lin = cell.linearize(p, s, x, need=("local", "immediate") + lower)
                new, Jx, imm, Mbar = lin.state, lin.input_jacobian, lin.immediate, None
                M = through_units(lin.local, state.M[l])  # J^l_t M^l_{t-1}
            else:
                if generic or not declares(cell, "immediate"):
                    new, J, Jx, Mbar = dense_jacobians(cell, p, s, x)
                    imm = None
                else:
                    lin = cell.linearize(p, s, x, need=("jacobian", "immediate") + lower)
                    new, J, Jx, imm, Mbar = lin.state, lin.jacobian, lin.input_jacobian, \
                        lin.immediate, None
                # J^l_t M^l_{t-1}, into the buffer the step before last used (the state
                # given to a step is not used again: see algorithms.base)
                out = state.spare[l] if state.spare is not None else None
                M = torch.bmm(J, state.M[l], out=out)
            if l > 0:  # the same step, through the layer below's output: Jx^l_t dh^{l-1}_t/dtheta
                M[:, :, :net.offsets[l]].baddbmm_(Jx, Mh)
            a, b = net.offsets[l], net.offsets[l + 1]
            if imm is None:
                M[:, :, a:b] += Mbar
            else:
                C, U = len(new), cell.n_units
                add_immediate(M, imm, p, cell.param_blocks(), a, C, U, type(cell).__name__)
            if state.G is not None:
                Gl = through_units(lin.local, state.G[l]) if diagonal else \
                    torch.bmm(J, state.G[l])
                if l > 0:
                    Gl.baddbmm_(Jx, Gh)
                Gs.append(Gl)
            states.append(new)
            Ms.append(M)
            ins.append(x)
            if l < net.L - 1:  # what the next layer's input owes to theta_{<=l} (and s_0)
                Mh = output_influence(cell, p, new, x, M, Mh, (a, b))
                if state.G is not None:
                    Gh = output_influence(cell, p, new, x, Gl, Gh, None)
            x = cell.emit(p, new, x)
        h = x
        if state.leak is not None:  # a leaky readout: the filter on d h^L_t / d theta
            top, p, a = net.cells[-1], net.params[-1], net.offsets[-2]
            Mh = output_influence(top, p, states[-1], ins[-1], Ms[-1], Mh, (a, net.offsets[-1]))
            if state.G is not None:
                Gh = output_influence(top, p, states[-1], ins[-1], Gs[-1], Gh, None)
            leak, z, value, flat, d0, ro = _leak.influence_step(
                model, state.leak, h, Mh, Gh if state.G is not None else None, target_t,
                mask_t, loss, dh_t)
            grads = split_flat(flat, net, model)
            grads.update(ro)
            if d0 is not None:
                grads["h0"] = state_grad_form(unflatten_net_state(d0, tuple(states)),
                                              state.h0_tensor)
            new_state = NetRTRLState(shown(model, tuple(states)), Ms,
                                     Gs if state.G is not None else None, leak, state.h0_tensor,
                                     _spare(state, Ms))
            return new_state, StepOutput(h, z, value), grads
        z, value, dz, q = immediate_signal(model, h, target_t, mask_t, loss, dh_t)
        # q through the top layer's emit: its state, its input (the layer below's output)
        # and its own parameters directly
        dp, qs, dx = emit_vjp(net.cells[-1], net.params[-1], states[-1], ins[-1], q)
        B, S = qs.shape
        flat = (qs.reshape(1, B * S) @ Ms[-1].reshape(B * S, -1)).squeeze(0)
        if dx is not None and net.L > 1:
            lo = net.offsets[-2]
            flat[:lo] += (dx.reshape(1, -1) @ Mh.reshape(-1, lo)).squeeze(0)
        grads: Grads = split_flat(flat, net, model)
        for n, v in dp.items():
            grads[net.prefixes[-1] + n] = grads[net.prefixes[-1] + n] + v
        grads.update(output_grads(dz, h))
        if state.G is not None:
            d0 = torch.bmm(qs.unsqueeze(1), Gs[-1]).squeeze(1)  # (B, S_total)
            if dx is not None and net.L > 1:
                d0 += torch.bmm(dx.unsqueeze(1), Gh).squeeze(1)
            grads["h0"] = state_grad_form(unflatten_net_state(d0, tuple(states)),
                                          state.h0_tensor)
        new_state = NetRTRLState(shown(model, tuple(states)), Ms,
                                 Gs if state.G is not None else None, None, state.h0_tensor,
                                 _spare(state, Ms))
    return new_state, StepOutput(h, z, value), grads
