"""Exact RTRL for any ``rnngrad.Network`` (seed 001), layer by layer within each step.

For layer l with state s^l (flattened, S_l) and the recurrent parameters theta of
layers 1..l (the influence of layer l on higher layers' parameters is zero)::

    M^l_t = J^l_t M^l_{t-1} + K^l_t M^{l-1}_t + Mbar^l_t        (B, S_l, N_{<=l})
    J^l_t = d s^l_t / d s^l_{t-1}                                 (B, S_l, S_l)
    K^l_t = d s^l_t / d h^{l-1}_t . d h^{l-1}_t / d s^{l-1}_t      (B, S_l, S_{l-1}), the same step
    Mbar^l_t = d s^l_t / d theta_l                                the immediate term, own columns

    q_t  = (d h^L_t / d s^L_t)^T (W_out^T dl_t/dz_t (+ dh_t))      (B, S_L)
    dL/dtheta = sum_t sum_b q_t^T M^L_t

With an initial state the sensitivity ``G^l_t = d s^l_t / d s_0`` (B, S_l, S) obeys the
same recursion without Mbar, ``G^l_0`` the identity on layer l's block.

Structured (``rtrl()``): ``J``, ``K`` and the immediate term come from the cell's
``linearize``; the immediate term of a parameter owned by units (row ``(g, i)`` moves
only unit i) is a diagonal add into the influence, no (B, S, N) tensor is formed.
A cell that does not declare its immediate term gets the dense ``torch.func``
Jacobian instead. ``rtrl(generic=True)`` uses ``vmap(jacrev)`` for everything: the
second oracle. Exact, online; time O(B S^2 N) per step, memory O(B S N).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cells._derive import declares, dense_jacobians
from ..cells.base import Immediate
from ._network import (
    bind,
    output_into_state,
    split_flat,
    through_output,
    unflatten_net_state,
)
from .base import Grads, StepOutput, immediate_signal, output_grads

__all__ = ["NetRTRLState", "init", "step", "add_immediate"]


class NetRTRLState(NamedTuple):
    h: tuple  # the network's state s_t, one state per layer
    M: list  # per layer l: (B, S_l, N_{<=l}) influence d s^l_t / d theta_{1..l}
    G: list | None  # per layer l: (B, S_l, S) d s^l_t / d s_0; None unless h0 is tracked


def init(model, batch_size: int, h0: tuple | None) -> NetRTRLState:
    net = bind(model)
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
    return NetRTRLState(h, M, G)


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
        if G is None or name not in imm:
            raise ValueError(f"{who}: parameter {name!r} (shape {tuple(p.shape)}) has no "
                             "immediate term: rtrl() needs every parameter owned by a unit "
                             "(param_blocks) with its immediate term declared, or the dense "
                             "path, rtrl(generic=True)")
        P = n // (G * U)
        block = M[:, :, off:off + n].view(B, C, U, G, U, P).diagonal(dim1=2, dim2=4)
        d = imm[name]  # block: (B, C, G, P, U)
        if d.inp is None:
            block.add_(d.D.permute(0, 1, 2, 4, 3))
        else:
            block.add_(d.D.unsqueeze(3) * d.inp.permute(0, 2, 1).unsqueeze(1).unsqueeze(1))
        off += n


def step(model, generic: bool, state: NetRTRLState, x_t, target_t, mask_t, loss, dh_t):
    with torch.no_grad():
        net = bind(model)
        x = x_t
        states, Ms, Gs = [], [], []
        for l, (cell, p) in enumerate(zip(net.cells, net.params)):
            s = state.h[l]
            if generic or not declares(cell, "immediate"):
                new, J, Jx, Mbar = dense_jacobians(cell, p, s, x)
                imm = None
            else:
                need = ("jacobian", "immediate") + (("input_jacobian",) if l > 0 else ())
                lin = cell.linearize(p, s, x, need=need)
                new, J, Jx, imm, Mbar = lin.state, lin.jacobian, lin.input_jacobian, \
                    lin.immediate, None
            M = torch.bmm(J, state.M[l])  # J^l_t M^l_{t-1}
            K = None
            if l > 0:  # the same step, through the layer below: K^l_t M^{l-1}_t
                K = through_output(net.cells[l - 1], states[l - 1], Jx)
                lo = net.offsets[l]
                M[:, :, :lo].baddbmm_(K, Ms[l - 1])
            a, b = net.offsets[l], net.offsets[l + 1]
            if imm is None:
                M[:, :, a:b] += Mbar
            else:
                C, U = len(new), cell.n_units
                add_immediate(M, imm, p, cell.param_blocks(), a, C, U, type(cell).__name__)
            if state.G is not None:
                Gl = torch.bmm(J, state.G[l])
                if K is not None:
                    Gl.baddbmm_(K, Gs[l - 1])
                Gs.append(Gl)
            states.append(new)
            Ms.append(M)
            x = cell.output(new)
        h = x
        z, value, dz, q = immediate_signal(model, h, target_t, mask_t, loss, dh_t)
        qs = output_into_state(net.cells[-1], states[-1], q)  # (B, S_L)
        B, S = qs.shape
        flat = (qs.reshape(1, B * S) @ Ms[-1].reshape(B * S, -1)).squeeze(0)
        grads: Grads = split_flat(flat, net, model)
        grads.update(output_grads(dz, h))
        if state.G is not None:
            d0 = torch.bmm(qs.unsqueeze(1), Gs[-1]).squeeze(1)  # (B, S_total)
            grads["h0"] = unflatten_net_state(d0, tuple(states))
        new_state = NetRTRLState(tuple(states), Ms, Gs if state.G is not None else None)
    return new_state, StepOutput(h, z, value), grads
