"""BPTT, checkpointed BPTT and truncated BPTT for any ``rnngrad.Network``.

The stack is run layer by layer over a segment (layer l over every step, then layer
l + 1 on its outputs, as cuDNN does), and the adjoint pass goes top-down: each cell's
``backward_sequence`` (hand-derived for Elman, GRU and LSTM; a ``torch.func.vjp`` per
step for any other cell) turns ``dL/d outputs`` into its parameters' gradients,
``dL/d inputs`` (the layer below's ``dL/d outputs``) and ``dL/d state_0``::

    hbar^L_t = W_out^T dl_t/dz_t (- dR/dh^L_t)         the readout's (and reward's) signal
    for l = L .. 1:  (g_l, hbar^{l-1}, dL/ds^l_0) = backward_sequence_l(hbar^l, dL/ds^l_T)

Checkpointing (``c``) keeps the network state only every c steps and reruns each
segment forward, with cache, during the backward pass; the adjoint leaving a segment
at its start is the ``d_state`` of the segment before it. Truncation (``k``) runs the
same on chunks of k steps with ``d_state = 0`` at each chunk's end.

A leaky readout (``readout_decay`` kappa > 0) filters the readout's signal backwards,
``dzbar_t = dz_t + kappa dzbar_{t+1}`` (within a chunk for truncation), and
``hbar^L_t = W_out^T dzbar_t`` (``_leaky_readout``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..readouts import loss_and_grad, reward_grad
from . import _leaky_readout as _leak
from ._network import (
    Workspace,
    as_state,
    bind,
    net_step,
    pack_sensitivities,
    shown,
    stack_backward,
    stack_forward,
    state_grad_form,
    unshown,
)
from .base import Grads, StepOutput, add_grads, output_grads, readout_step

__all__ = ["NetBPTTState", "init", "step", "flush", "sequence", "truncated_sequence"]


class NetBPTTState(NamedTuple):
    h: tuple  # the network's state s_t, one state per layer (as ``shown``: RNN's (B, H) h_t)
    h_start: tuple  # the state before the pending steps (as ``shown``)
    track_h0: bool  # emit grads["h0"] (dL/d h_start) at the next flush
    xs: list  # pending x_t, each (B, D)
    dz: list  # pending dl/dz_t (weighted by mask / B), each (B, K)
    dh: list  # pending extra dl/dh^L_t (a reward's), each (B, H) or None
    ckpt: list  # the state at the start of every segment of c steps (h_start first; shown)
    dW_out: Tensor  # (K, H) sum_t dz_t^T h^L_t so far
    db_out: Tensor  # (K,)
    leak: _leak.Leak | None = None  # the leaky readout's filters (readout_decay > 0)
    steps: list | None = None  # pending per step: per layer (state_t, output_t); None: not kept
    h0_tensor: bool = False  # h0 came as a tensor: grads["h0"] goes back as one
    sensitivities: bool = False  # emit grads["u"] at the next flush


def init(model, batch_size: int, h0, *, keep: bool = False,
         sensitivities: bool = False) -> NetBPTTState:
    """``keep``: store each step's states, so that ``flush`` builds the cells' caches from
    them (``sequence_cache``) instead of rerunning the forward pass, where every cell can
    (``caches_from_states``); otherwise nothing more than the checkpoint is kept."""
    h0, as_tensor = as_state(model, h0, batch_size)
    track = h0 is not None
    if h0 is None:
        h0 = model.init_state(batch_size)
    keep = keep and all(getattr(c, "caches_from_states", False) for _, c in model.layers())
    h0 = shown(model, h0)
    return NetBPTTState(h0, h0, track, [], [], [], [h0], torch.zeros_like(model.W_out.detach()),
                        torch.zeros_like(model.b_out.detach()), _leak.init(model, batch_size),
                        [] if keep else None, as_tensor, sensitivities)


def step(model, c: int | None, state: NetBPTTState, x_t, target_t, mask_t, loss, dh_t):
    with torch.no_grad():
        net = bind(model)
        if state.steps is None:
            new, h = net_step(net, unshown(state.h), x_t)
        else:  # keep each layer's state and output for flush
            layers, x = [], x_t
            for cell, p, s in zip(net.cells, net.params, unshown(state.h)):
                s = cell.step(p, s, x)
                x = cell.emit(p, s, x)
                layers.append((s, x))
            new, h = tuple(s for s, _ in layers), x
            state.steps.append(layers)
        leak, hf, n_b = state.leak, h, 1.0
        if leak is None:
            z, value, dz = readout_step(model, h, target_t, mask_t, loss)
        else:  # dz_t/dW_out = hf_t, dz_t/db_out = c_t (since the last cut)
            leak, z, value, dz = _leak.step(model, leak, h, target_t, mask_t, loss)
            hf, n_b = leak.hf, leak.c
        if dz is None:
            dz = torch.zeros_like(z)
        dW_out = torch.addmm(state.dW_out, dz.T, hf)
        db_out = state.db_out + n_b * dz.sum(0)
        state.xs.append(x_t)
        state.dz.append(dz)
        state.dh.append(dh_t)
        if c is not None and len(state.xs) % c == 0:
            state.ckpt.append(shown(model, new))
    return state._replace(h=shown(model, new), dW_out=dW_out, db_out=db_out, leak=leak), \
        StepOutput(h, z, value), None


def _segments(net, c: int, n: int, inputs_of, hbar_of, ckpt: list,
              us: list | None = None) -> tuple[Grads, tuple]:
    """The adjoint pass over n steps, segment by segment from the last, each rerun forward
    from its checkpoint. ``us``: receives each layer's u_t over the n steps."""
    total: Grads | None = None
    carry = None
    parts: list = []
    for i in range((n - 1) // c, -1, -1):
        s, e = i * c, min(i * c + c, n)
        x = inputs_of(s, e)
        _, _, caches, ins = stack_forward(net, x, ckpt[i], cache=True)
        seg = [] if us is not None else None
        g, carry = stack_backward(net, ins, ckpt[i], caches, hbar_of(s, e), carry,
                                  sensitivities=seg)
        if seg is not None:
            parts.append(seg)
        total = add_grads(total, g)
    if us is not None:  # segments came last first
        us.extend(torch.cat([seg[l] for seg in parts[::-1]]) for l in range(net.L))
    return total, carry


def _kept_caches(net, state: NetBPTTState, xs: Tensor):
    """The cells' caches and layer inputs from the states the steps kept; None unless
    every cell builds its cache from them."""
    if state.steps is None:
        return None
    caches, ins, x = [], [], xs
    for l, (cell, p) in enumerate(zip(net.cells, net.params)):
        cache = cell.sequence_cache(p, x, unshown(state.h_start)[l],
                                    [st[l][0] for st in state.steps])
        if cache is None:
            return None
        caches.append(cache)
        ins.append(x)
        x = torch.stack([st[l][1] for st in state.steps])
    return caches, ins


def flush(model, c: int | None, state: NetBPTTState):
    n = len(state.xs)
    if n == 0:
        return state, None
    with torch.no_grad():
        net = bind(model)
        W_out = model.W_out.detach()

        def inputs_of(s, e):
            return torch.stack(state.xs[s:e])

        dzbar = _leak.backward_filter(torch.stack(state.dz), _leak.decay(model))

        def hbar_of(s, e):
            hbar = dzbar[s:e] @ W_out
            for j, dh in enumerate(state.dh[s:e]):
                if dh is not None:
                    hbar[j] += dh
            return hbar

        us = [] if state.sensitivities else None
        kept = _kept_caches(net, state, inputs_of(0, n)) if c is None else None
        if kept is not None:
            caches, ins = kept
            grads, d0 = stack_backward(net, ins, unshown(state.h_start), caches, hbar_of(0, n),
                                       None, sensitivities=us)
        else:
            ckpt = [unshown(s) for s in state.ckpt]
            grads, d0 = _segments(net, c or n, n, inputs_of, hbar_of, ckpt, us)
        grads["W_out"], grads["b_out"] = state.dW_out, state.db_out
        if state.track_h0:
            grads["h0"] = state_grad_form(d0, state.h0_tensor)
        if us is not None:
            grads["u"] = pack_sensitivities(us)
    h = unshown(state.h)
    fresh = init(model, h[0][0].shape[0], h, keep=state.steps is not None,
                 sensitivities=state.sensitivities)
    return fresh._replace(track_h0=False, leak=_leak.cut(state.leak)), grads


def _readout(model, hs: Tensor, targets, mask, loss, z0=None):
    """Loss, dl/dz (T, B, K) and the leaky readout's z_T (None for a plain readout) of a
    segment's outputs hs (T, B, H), from the leaky readout's state z0."""
    if _leak.decay(model) != 0.0:
        return _leak.sequence_readout(model, hs, targets, mask, loss, z0)
    T, B, H = hs.shape
    K = model.output_size
    W_out, b_out = model.W_out.detach(), model.b_out.detach()
    z = torch.addmm(b_out, hs.reshape(T * B, H), W_out.T).view(T, B, K)
    if targets is None:
        return hs.new_zeros(()), hs.new_zeros(T, B, K), None
    return (*loss_and_grad(z, targets, mask / B, loss=loss, readout_name=model.readout), None)


def sequence(model, c: int | None, inputs, targets, mask, h0, loss, reward, *,
             sensitivities: bool = False, workspace: Workspace | None = None):
    """Whole-sequence BPTT (``c`` None) or checkpointed BPTT over a network.
    ``workspace``: buffers the algorithm object keeps between calls (whole-sequence BPTT)."""
    T, B, _ = inputs.shape
    h0, as_tensor = as_state(model, h0, B)
    us = [] if sensitivities else None
    with torch.no_grad():
        net = bind(model)
        W_out = model.W_out.detach()
        if c is None:
            hs, _, caches, ins = stack_forward(net, inputs, h0, cache=True, workspace=workspace)
            value, dz, _ = _readout(model, hs, targets, mask, loss)
            dz = _leak.backward_filter(dz, _leak.decay(model))  # dzbar, the leaky readout's filter
            H, K = hs.shape[2], dz.shape[2]
            dz2 = dz.view(T * B, K)
            if workspace is not None:  # dL/dh^L_t, which the top cell may overwrite with u_t
                hbar = torch.mm(dz2, W_out, out=workspace.buffer("hbar", (T * B, H), hs))
            else:
                hbar = dz2 @ W_out
            hbar = hbar.view(T, B, H)
            if reward is not None:
                R, dR = reward_grad(reward, hs)
                value = value - R
                hbar.sub_(dR)
            grads, d0 = stack_backward(net, ins, h0, caches, hbar, None, sensitivities=us)
            grads.update(output_grads(dz2, hs.reshape(T * B, H)))
            if us is not None and workspace is not None:  # u may live in a kept buffer
                us = [u.clone() for u in us]
        else:
            value = inputs.new_zeros(())
            dz_all = inputs.new_zeros(T, B, model.output_size)
            dW_out, db_out = torch.zeros_like(W_out), torch.zeros_like(model.b_out.detach())
            ckpt, h = [], h0
            kappa, z0, hf, c_t = _leak.decay(model), None, None, 0.0
            for s in range(0, T, c):  # forward, keeping the state at each segment's start
                e = min(s + c, T)
                ckpt.append(h)
                hs, h, _, _ = stack_forward(net, inputs[s:e], h, cache=False)
                v, dz, z0 = _readout(model, hs, None if targets is None else targets[s:e],
                                     mask[s:e], loss, z0)
                value = value + v
                dz_all[s:e] = dz
                H = hs.shape[2]
                # the leaky readout: dz_t/dW_out = hf_t, dz_t/db_out = c_t (forward filters)
                hf_seg, c_seg = _leak.forward_filter(hs, kappa, hf, c_t)
                hf, c_t = hf_seg[-1], float(c_seg[-1])
                dW_out.addmm_(dz.reshape(-1, dz.shape[2]).T, hf_seg.reshape(-1, H))
                db_out += (dz * c_seg.view(-1, 1, 1)).sum((0, 1))
                del hs, hf_seg
            dz_all = _leak.backward_filter(dz_all, kappa)  # dzbar for hbar
            dR = None
            if reward is not None:  # R needs the whole trajectory
                hs_all = stack_forward(net, inputs, h0, cache=False)[0]
                R, dR = reward_grad(reward, hs_all)
                value = value - R
                del hs_all

            def hbar_of(s, e):
                hbar = dz_all[s:e] @ W_out
                return hbar if dR is None else hbar.sub_(dR[s:e])

            grads, d0 = _segments(net, c, T, lambda s, e: inputs[s:e], hbar_of, ckpt, us)
            grads["W_out"], grads["b_out"] = dW_out, db_out
        grads["h0"] = state_grad_form(d0, as_tensor)
        if us is not None:
            grads["u"] = pack_sensitivities(us)
    return value, grads


def truncated_sequence(model, k: int, inputs, targets, mask, h0, loss, reward):
    """TBPTT(k) over a network: BPTT on each chunk of k steps, the state carried forward
    and cut (``d_state = 0`` at each chunk's end); ``grads["h0"]`` from the first chunk."""
    T, B, _ = inputs.shape
    h0, as_tensor = as_state(model, h0, B)
    with torch.no_grad():
        net = bind(model)
        W_out = model.W_out.detach()
        value = inputs.new_zeros(())
        dR = None
        if reward is not None:
            hs_all = stack_forward(net, inputs, h0, cache=False)[0]
            R, dR = reward_grad(reward, hs_all)
            value = value - R
        total: Grads | None = None
        h, z0 = h0, None
        for s in range(0, T, k):
            e = min(s + k, T)
            hs, h_next, caches, ins = stack_forward(net, inputs[s:e], h, cache=True)
            v, dz, z0 = _readout(model, hs, None if targets is None else targets[s:e],
                                 mask[s:e], loss, z0)
            value = value + v
            dz = _leak.backward_filter(dz, _leak.decay(model))  # within the chunk
            hbar = dz @ W_out
            if dR is not None:
                hbar = hbar - dR[s:e]
            g, d0 = stack_backward(net, ins, h, caches, hbar, None)
            n, H = hs.shape[0], hs.shape[2]
            g.update(output_grads(dz.reshape(n * B, -1), hs.reshape(n * B, H)))
            if s == 0:
                g["h0"] = state_grad_form(d0, as_tensor)
            total = add_grads(total, g)
            h = tuple(type(st)(*(x.clone() for x in st)) for st in h_next)  # no view of the chunk
        return value, total
