"""UORO for any ``rnngrad.Network``: the stack's state flattened to s (B, S), the
recurrent parameters flattened to theta (N); only a jvp and a vjp of the step (whose
layers see the outputs ``emit`` gives of the layers below)::

    J_t h~          jvp of s_t = F(theta, s_{t-1}, x_t) in s, tangent h~    (batched)
    Mbar_t^T nu     vjp of F in theta, cotangent nu, per example (vmap)     (B, N)

then the same update as the Elman path (``uoro.py``): rho0, rho1, ``h~ <- rho0 J h~ +
rho1 nu``, ``theta~ <- theta~ / rho0 + Mbar^T nu / rho1``, ``grad = sum_t (q_t . h~_t)
theta~_t`` with ``q_t`` the readout's signal on the top layer's state. Where a cell's
output depends on parameters (``emit``), ``q_t`` goes back through the stack's outputs
at step t onto the whole state, and those parameters also get the exact same-step term
of ``emit`` (as ``W_out`` does).

A leaky readout (``readout_decay`` kappa > 0) reads ``r_t = kappa r_{t-1} + h^L_t``: r joins
the flattened state (``_leaky_readout.augment``), so h~ and the signs nu cover it and the
estimate of its influence, which the readout's signal meets, stays unbiased.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import vjp, vmap

from ..cells._derive import jvp
from . import _leaky_readout as _leak
from . import _signs
from ._network import bind, flatten_net_state, output_into_state, split_flat, unflatten_net_state
from .base import StepOutput, output_grads, readout_step

__all__ = ["NetUOROState", "init", "step"]


class NetUOROState(NamedTuple):
    h: tuple  # the network's state, one state per layer
    h_tilde: Tensor  # (B, S) h~_t over the flattened state
    theta_tilde: Tensor  # (B, N) theta~_t over the flattened recurrent parameters
    leak: _leak.Leak | None = None  # a leaky readout (kappa > 0); h~ then also covers r = hf
    signs: Tensor | None = None  # (BLOCK, B, S) a block of signs nu, drawn in one call
    sign_pos: int = _signs.BLOCK  # the next step's row of ``signs``


def init(model, batch_size: int) -> NetUOROState:
    net = bind(model)
    h = model.init_state(batch_size)
    S = flatten_net_state(h).shape[1]
    p = model.W_out
    kw = {"dtype": p.dtype, "device": p.device}
    leak = _leak.init(model, batch_size)
    if leak is not None:
        S += leak.hf.shape[1]
    return NetUOROState(h, torch.zeros(batch_size, S, **kw),
                        torch.zeros(batch_size, net.offsets[-1], **kw), leak,
                        torch.empty(_signs.BLOCK, batch_size, S, **kw))


def _flat_step(net, like):
    def F(params, s, x):
        state = unflatten_net_state(s, like)
        new = []
        for cell, p, st in zip(net.cells, params, state):
            st = cell.step(p, st, x)
            x = cell.emit(p, st, x)
            new.append(st)
        return flatten_net_state(tuple(new))

    return F


def _top_output(net, like):
    """``G(params, s_t, x_t) -> h^L_t``: the stack's output from its new state, through
    every layer's ``emit`` (a layer's input is the output of the one below)."""

    def G(params, s, x):
        state = unflatten_net_state(s, like)
        for cell, p, st in zip(net.cells, params, state):
            x = cell.emit(p, st, x)
        return x

    return G


def step(model, gen, eps: float, state: NetUOROState, x_t, target_t, mask_t, loss, dh_t):
    with torch.no_grad():
        net = bind(model)
        params = net.params
        s = flatten_net_state(state.h)
        F = _flat_step(net, state.h)
        S0 = s.shape[1]  # the cells' state; a leaky readout's filter r follows it
        if state.leak is not None:
            F = _leak.augment(F, _top_output(net, state.h), _leak.decay(model), S0)
            s = torch.cat([s, state.leak.hf], 1)
        B, S = s.shape
        s_new, Jh = jvp(lambda v: F(params, v, x_t), (s,), (state.h_tilde,))
        signs, pos, nu = _signs.take(gen, state.signs, state.sign_pos, s)

        th = state.theta_tilde
        rho0 = ((th.norm(dim=1) + eps) / (Jh.norm(dim=1) + eps)).sqrt_()
        factors = None if state.leak is not None or net.L > 1 else _factors(net, state.h[0],
                                                                            x_t, nu)
        if factors is not None:
            # a factored immediate term: m_t is f inp^T per parameter, added in place into
            # theta~'s rows of that parameter (no (B, N) tensor per step)
            # ||(f inp^T) * mask||^2 = sum_r f_r^2 sum_p mask_rp inp_p^2 (a 0/1 mask)
            norm2 = sum((f * f).sum(1) * (i * i).sum(1) if m is None
                        else ((i * i) @ m.T * (f * f)).sum(1) for _, f, i, m in factors)
            rho1 = ((norm2.sqrt() + eps) / (nu.norm(dim=1) + eps)).sqrt_()
            th.div_(rho0.unsqueeze(1))
            inv1 = rho1.reciprocal().unsqueeze(1)
            for off, f, i, m in factors:
                R, P = f.shape[1], i.shape[1]
                blk = th[:, off:off + R * P].view(B, R, P)
                blk.baddbmm_((f * inv1).unsqueeze(2), i.unsqueeze(1))
                if m is not None:  # theta~ keeps the structural zeros
                    blk.mul_(m)
        else:
            def per_example(s1, x1, nu1):
                def f1(p):
                    return F(p, s1.unsqueeze(0), x1.unsqueeze(0)).squeeze(0)

                _, fn = vjp(f1, params)
                (gp,) = fn(nu1)
                return torch.cat([g.reshape(-1) for layer in gp for g in layer.values()])

            Mnu = vmap(per_example)(s, x_t, nu)  # (B, N): Mbar_t^T nu per example
            rho1 = ((Mnu.norm(dim=1) + eps) / (nu.norm(dim=1) + eps)).sqrt_()
            th = th.div_(rho0.unsqueeze(1)).addcdiv_(Mnu, rho1.unsqueeze(1))  # in place
        h_tilde = torch.addcmul(rho1.unsqueeze(1) * nu, rho0.unsqueeze(1), Jh)
        new_state = unflatten_net_state(s_new, state.h)
        emits = any(c.emits for c in net.cells)
        h = _top_output(net, state.h)(params, s_new, x_t) if emits else \
            net.cells[-1].output(new_state[-1])
        if state.leak is not None:
            def top_vjp(g):  # a reward's dh_t through the stack's output, onto the cells' state
                _, fn = vjp(lambda p, v: _top_output(net, state.h)(p, v, x_t), params,
                            s_new[:, :S0])
                return fn(g)

            leak, z, value, c, direct, ro = _leak.uoro_signal(
                model, state.leak, h, h_tilde, S0, top_vjp, target_t, mask_t, loss, dh_t)
            grads = None
            if target_t is not None or dh_t is not None:
                grads = split_flat(c @ th, net, model)
                for prefix, layer in zip(net.prefixes, direct or ()):
                    for n, v in layer.items():
                        grads[prefix + n] = grads[prefix + n] + v
                grads.update(ro)
            return (NetUOROState(new_state, h_tilde, th, leak, signs, pos),
                    StepOutput(h, z, value), grads)
        z, value, dz = readout_step(model, h, target_t, mask_t, loss)
        q = None if dz is None else dz @ model.W_out.detach()
        if dh_t is not None:
            q = dh_t if q is None else q + dh_t
        grads = None
        if q is not None or dz is not None:
            direct = None
            if q is None:
                flat = th.new_zeros(th.shape[1])
            elif emits:  # q through every emit: onto the whole state, and the direct term
                _, fn = vjp(lambda p, v: _top_output(net, state.h)(p, v, x_t), params, s_new)
                direct, top = fn(q)
                flat = (top * h_tilde).sum(1) @ th  # q_t . h~_t over the stack's state
            else:
                top = output_into_state(net.cells[-1], new_state[-1], q)  # (B, S_L)
                c = (top * h_tilde[:, S - top.shape[1]:]).sum(1)  # q_t . h~_t
                flat = c @ th
            grads = split_flat(flat, net, model)
            if direct is not None:  # emit's own parameters, exact at this step (like W_out)
                for prefix, layer in zip(net.prefixes, direct):
                    for n, v in layer.items():
                        grads[prefix + n] = grads[prefix + n] + v
            if dz is None:
                grads["W_out"] = torch.zeros_like(model.W_out.detach())
                grads["b_out"] = torch.zeros_like(model.b_out.detach())
            else:
                grads.update(output_grads(dz, h))
    return NetUOROState(new_state, h_tilde, th, None, signs, pos), StepOutput(h, z, value), grads


def _factors(net, state, x_t, nu):
    """``[(offset in theta~, f (B, R), inp (B, P), mask (R, P) or None)]``: the step's
    ``m_t = Mbar_t^T nu`` of a one-layer network as one rank-one term per parameter
    (``(f inp^T) * mask``), from the cell's declared immediate term (``f[g, i] = sum_c
    nu[c, i] D[c, g, i]``, the mask its structural zeros, LIF's W_rec diagonal); None where
    it is dense, per unit or masked by other than 0/1 (then the per-example vjp)."""
    cell, params = net.cells[0], net.params[0]
    U = cell.n_units
    if any(int(c.shape[-1]) != U for c in state):
        return None
    lin = cell.linearize(params, state, x_t, need=("immediate",))
    imm = lin.immediate
    B, C = nu.shape[0], len(state)
    nu3 = nu.view(B, C, U)
    out, off = [], 0
    for name, p in params.items():
        im = imm.get(name) if imm is not None else None
        if im is None:  # a parameter the step does not use (only emit does)
            off += p.numel()
            continue
        if im.inp is None or im.inp.dim() != 3 or im.inp.shape[1] != 1 or im.D.dim() != 4 \
                or im.D.shape[1] != C or im.D.shape[3] != U \
                or im.D.shape[2] * U * im.inp.shape[2] != p.numel():
            return None
        mask = getattr(im, "mask", None)
        if mask is not None:
            if tuple(mask.shape) != (U, im.inp.shape[2]) \
                    or not bool(((mask == 0) | (mask == 1)).all()):
                return None
            mask = mask.repeat(im.D.shape[2], 1)  # (G U, P): the same for every gate
        f = torch.einsum("bcu,bcgu->bgu", nu3, im.D).reshape(B, -1)
        out.append((off, f, im.inp.squeeze(1), mask))
        off += p.numel()
    return out
