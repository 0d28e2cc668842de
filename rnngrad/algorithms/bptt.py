"""Backpropagation through time, written out by hand (Werbos 1990).

Forward (DESIGN.md's notation)::

    a_t = W_in x_t + W_rec h_{t-1} + b_rec,  h_t = (1 - alpha) h_{t-1} + alpha phi(a_t)
    z_t = W_out h_t + b_out

Backward, from ``u_{T+1} = 0`` and ``delta_{T+1} = 0``::

    hbar_t  = W_out^T dl/dz_t (+ dl/dh_t from a reward)       immediate term
    delta_t = hbar_t + W_rec^T u_{t+1} + (1 - alpha) delta_{t+1}   dL/dh_t, total
    u_t     = alpha phi'(a_t) * delta_t                         dL/da_t = dL/db_rec(t)

    dW_rec = sum_t u_t h_{t-1}^T,  dW_in = sum_t u_t x_t^T,  db_rec = sum_t u_t
    dW_out = sum_t dl/dz_t h_t^T,  db_out = sum_t dl/dz_t
    dh_0   = W_rec^T u_1 + (1 - alpha) delta_1                  (initial state)

For alpha = 1 this is recurrent backprop's (Almeida 1987; Pineda 1987)
``x^(t) = W^T u(t+1) + dR/dx(t)``, ``u(t) = D(t) x^(t)``.
``u_t`` is the sensitivity of the loss to the bias at step t (the sensitivity
lemma, ``dL/dW_rec = sum_t u_t h_{t-1}^T``); ``bptt(sensitivities=True)`` returns it
as ``grads["u"]`` (T, B, H).

Only the u recursion is sequential (one (B, H) x (H, H) GEMM per step); every weight
gradient is then one GEMM over the stacked (T*B) rows.

Exact. Not online: memory O(T B (D + H)), time O(T B H (D + H)) per sequence.

Checkpointing (``bptt(checkpoint=c)``; Chen et al. 2016, "Training deep nets with
sublinear memory cost"): keep h only at ``t = 0, c, 2c, ...``, and in the backward
pass recompute each segment's h_t and phi'(a_t) from its checkpoint; the adjoint
``dL/dh`` at a segment's start (this pass's ``dh_0``) is the immediate term added
at the previous segment's last step. Same gradient, memory O((T/c + c) B H) for
the states.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
from torch import Tensor

from ..cells.activations import get_activation
from ..cells.elman import backward, cell_step, unroll
from ..readouts import loss_and_grad, reward_grad
from . import _bptt_network as _net
from ._network import is_rnn
from .base import Algorithm, Grads, StepOutput, immediate_signal, output_grads, readout_step

__all__ = ["bptt", "BPTTState", "CheckpointState", "backward", "checkpointed_bptt"]


class BPTTState(NamedTuple):
    h: Tensor  # (B, H) current hidden state h_t
    h_start: Tensor  # (B, H) hidden state before the pending segment
    track_h0: bool  # emit grads["h0"] (gradient w.r.t. h_start) at the next flush
    xs: list  # pending x_t, each (B, D)
    hs: list  # pending h_t, each (B, H)
    dphi: list  # pending phi'(a_t), each (B, H)
    hbar: list  # pending immediate terms dl/dh_t, each (B, H)
    dz: list  # pending dl/dz_t (weighted by mask / B), each (B, K)


def _no_sensitivities(model, sensitivities: bool) -> None:
    if sensitivities:
        raise ValueError(f"bptt(sensitivities=True) returns u_t = dL/db_rec(t) of the Elman cell "
                         f"and needs an rnngrad.RNN; got {type(model).__name__} with cells "
                         f"{', '.join(type(c).__name__ for _, c in model.layers())}")


def bptt(*, sensitivities: bool = False, checkpoint: int | None = None) -> Algorithm:
    """Exact backpropagation through time.

    Args:
        sensitivities: also return the per-step sensitivities ``u_t = dL/db_rec(t)``
            as ``grads["u"]`` of shape (T, B, H).
        checkpoint: None stores the whole trajectory. An int c >= 1 keeps the hidden
            state only every c steps and recomputes each segment of c steps during the
            backward pass (see ``checkpointed_bptt``): exact, with memory
            O((T/c + c) B H + T B (D + K)) instead of O(T B (D + H)); c ~ sqrt(T)
            minimises it. The price is one more forward pass.

    Online use: ``step`` stores the trajectory and emits nothing; ``flush`` runs the
    backward pass over everything since the last flush and cuts the state there.
    """
    if checkpoint is not None:
        return checkpointed_bptt(checkpoint, sensitivities=sensitivities)

    def init(model, batch_size: int, *, h0: Tensor | None = None) -> BPTTState:
        if not is_rnn(model):
            _no_sensitivities(model, sensitivities)
            return _net.init(model, batch_size, h0)
        p = model.W_rec
        track = h0 is not None
        if h0 is None:
            h0 = torch.zeros(batch_size, model.hidden_size, dtype=p.dtype, device=p.device)
        return BPTTState(h0, h0, track, [], [], [], [], [])

    def step(model, state: BPTTState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        if not is_rnn(model):
            return _net.step(model, None, state, x_t, target_t, mask_t, loss, dh_t)
        with torch.no_grad():
            act = get_activation(model.activation)
            h, a, fa = cell_step(model.W_in, model.W_rec, model.b_rec, state.h, x_t,
                                 activation=act, alpha=model.alpha)
            z, value, dz, hbar = immediate_signal(model, h, target_t, mask_t, loss, dh_t)
            state.xs.append(x_t)
            state.hs.append(h)
            state.dphi.append(act.deriv(a, fa))
            state.hbar.append(hbar)
            state.dz.append(dz)
        return state._replace(h=h), StepOutput(h, z, value), None

    def flush(model, state: BPTTState):
        if not is_rnn(model):
            return _net.flush(model, None, state)
        if not state.xs:
            return state, None
        with torch.no_grad():
            hs = torch.stack(state.hs)
            T, B, H = hs.shape
            grads, u, dh0 = backward(model, torch.stack(state.xs), state.h_start, hs,
                                     torch.stack(state.dphi), torch.stack(state.hbar))
            dz = torch.stack(state.dz)
            grads.update(output_grads(dz.view(T * B, -1), hs.view(T * B, H)))
            if state.track_h0:
                grads["h0"] = dh0
            if sensitivities:
                grads["u"] = u
        h = state.h
        return BPTTState(h, h, False, [], [], [], [], []), grads

    # The fast path's two (T, B, H) buffers (h, and dl/dh overwritten by u) are kept
    # between calls of this algorithm object, per thread: re-allocating ~T*B*H*4 bytes
    # each call costs page faults (about 10% of the time at T=200, B=64, H=256). They
    # never leak out: what is returned is computed into new tensors or copied.
    workspace = threading.local()

    def buffer(name: str, shape: tuple, like: Tensor) -> Tensor:
        buf = getattr(workspace, name, None)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            setattr(workspace, name, buf)
        return buf

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        if not is_rnn(model):
            _no_sensitivities(model, sensitivities)
            return _net.sequence(model, None, inputs, targets, mask, h0, loss, reward)
        T, B, _ = inputs.shape
        H, K = model.hidden_size, model.output_size
        with torch.no_grad():
            # vanilla tanh/sigmoid cell: phi' comes from h_t inside the backward loop, so
            # no (T, B, H) buffer of phi' is made (large buffers cost page faults)
            per_step = model.alpha == 1.0 and get_activation(model.activation).deriv_from_output
            hs, dphi = unroll(model, inputs, h0, need_deriv=not per_step,
                              out=buffer("h", (T, B, H), inputs) if per_step else None)
            h2 = hs.view(T * B, H)
            if targets is not None:
                z = torch.addmm(model.b_out, h2, model.W_out.T).view(T, B, K)
                value, dz = loss_and_grad(z, targets, mask / B, loss=loss,
                                          readout_name=model.readout)
            else:
                value, dz = hs.new_zeros(()), hs.new_zeros(T, B, K)
            dz2 = dz.view(T * B, K)
            if per_step:
                hbar = torch.mm(dz2, model.W_out, out=buffer("u", (T * B, H), inputs))
            else:
                hbar = dz2 @ model.W_out
            hbar = hbar.view(T, B, H)
            if reward is not None:
                R, dR = reward_grad(reward, hs)
                value = value - R
                hbar.sub_(dR)
            grads, u, dh0 = backward(model, inputs, h0, hs, dphi, hbar, overwrite=True)
            grads.update(output_grads(dz2, h2))
            grads["h0"] = dh0
            if sensitivities:
                grads["u"] = u.clone() if per_step else u
        return value, grads

    return Algorithm(
        name="bptt(sensitivities=True)" if sensitivities else "bptt()",
        init=init,
        step=step,
        flush=flush,
        exact=True,
        online=False,
        cost="time O(B H (D + H)) per step; memory O(T B (D + H)), grows with T",
        sequence=sequence,
    )


class CheckpointState(NamedTuple):
    h: Tensor  # (B, H) current hidden state h_t
    h_start: Tensor  # (B, H) hidden state before the pending steps
    track_h0: bool  # emit grads["h0"] (gradient w.r.t. h_start) at the next flush
    xs: list  # pending x_t, each (B, D)
    dz: list  # pending dl/dz_t (weighted by mask / B), each (B, K)
    dh: list  # pending extra immediate terms dh_t, each (B, H) or None
    ckpt: list  # h at the start of every segment of c steps: h_start, h_c, h_2c, ..., each (B, H)
    dW_out: Tensor  # (K, H) sum_t dz_t^T h_t so far: the readout gradient needs no stored h
    db_out: Tensor  # (K,)


def _segments_backward(model, c: int, inputs_of, ckpt: list, hbar_of, n: int,
                       sensitivities: bool) -> tuple[Grads, Tensor, Tensor | None]:
    """The backward pass over n steps, segment by segment from the last, recomputing each.

    ``inputs_of(s, e)`` -> x_s..x_{e-1} (e - s, B, D); ``hbar_of(s, e)`` -> their immediate
    terms (e - s, B, H); ``ckpt[i]`` is h before step i*c. The adjoint leaving a segment
    at its start, ``dL/dh_start`` (``backward``'s dh0), is the extra immediate term of
    the previous segment's last step. Returns (grads of W_in, W_rec, b_rec; dL/dh_0; u).
    """
    total: Grads | None = None
    carry = None
    us = []
    for i in range((n - 1) // c, -1, -1):
        s, e = i * c, min(i * c + c, n)
        x = inputs_of(s, e)
        hs, dphi = unroll(model, x, ckpt[i])  # recomputed: only ckpt[i] was kept
        hbar = hbar_of(s, e)
        if carry is not None:
            hbar[-1] += carry
        grads, u, carry = backward(model, x, ckpt[i], hs, dphi, hbar)
        if sensitivities:
            us.append(u)
        total = grads if total is None else {k: total[k] + v for k, v in grads.items()}
        del hs, dphi, hbar, u
    u_all = torch.cat(us[::-1]) if sensitivities else None
    return total, carry, u_all


def checkpointed_bptt(c: int, *, sensitivities: bool = False) -> Algorithm:
    """Exact BPTT that stores h only every c steps and recomputes segments backward.

    Forward: h_0, h_c, h_2c, ... are kept (T/c states), with the inputs and dl/dz_t
    (the readout gradients dW_out, db_out accumulate on the fly). Backward, from the
    last segment to the first: rerun the segment's forward pass from its checkpoint
    (h_t and phi'(a_t) for c steps), run ``backward`` on it with the adjoint of the
    later segments added to its last immediate term, and drop it. Peak memory
    O((T/c + c) B H) for the states plus O(T B (D + K)) for inputs and dl/dz (the
    caller holds the inputs anyway); with a reward, ``dR/dh_t`` (T, B, H) is also
    kept, since R is a function of the whole trajectory.

    Also ``bptt(checkpoint=c)``. Use via ``rnngrad.gradient`` (the sequence path) or
    init/step/flush (the step path stores x_t, dl/dz_t and every c-th h_t).
    """
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ValueError(f"checkpoint must be an int c >= 1 (store h every c steps) or None, "
                         f"got {c!r}")

    def init(model, batch_size: int, *, h0: Tensor | None = None) -> CheckpointState:
        if not is_rnn(model):
            _no_sensitivities(model, sensitivities)
            return _net.init(model, batch_size, h0)
        p = model.W_rec
        track = h0 is not None
        if h0 is None:
            h0 = torch.zeros(batch_size, model.hidden_size, dtype=p.dtype, device=p.device)
        return CheckpointState(h0, h0, track, [], [], [], [h0], torch.zeros_like(model.W_out),
                               torch.zeros_like(model.b_out))

    def step(model, state: CheckpointState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        if not is_rnn(model):
            return _net.step(model, c, state, x_t, target_t, mask_t, loss, dh_t)
        with torch.no_grad():
            h, _, _ = cell_step(model.W_in, model.W_rec, model.b_rec, state.h, x_t,
                                activation=model.activation, alpha=model.alpha)
            z, value, dz = readout_step(model, h, target_t, mask_t, loss)
            if dz is None:
                dz = torch.zeros_like(z)
            dW_out = torch.addmm(state.dW_out, dz.T, h)
            db_out = state.db_out + dz.sum(0)
            state.xs.append(x_t)
            state.dz.append(dz)
            state.dh.append(dh_t)
            if len(state.xs) % c == 0:
                state.ckpt.append(h)
        return state._replace(h=h, dW_out=dW_out, db_out=db_out), StepOutput(h, z, value), None

    def flush(model, state: CheckpointState):
        if not is_rnn(model):
            return _net.flush(model, c, state)
        n = len(state.xs)
        if n == 0:
            return state, None
        with torch.no_grad():
            W_out = model.W_out

            def inputs_of(s, e):
                return torch.stack(state.xs[s:e])

            def hbar_of(s, e):
                hbar = torch.stack(state.dz[s:e]) @ W_out
                for j, dh in enumerate(state.dh[s:e]):
                    if dh is not None:
                        hbar[j] += dh
                return hbar

            grads, dh0, u = _segments_backward(model, c, inputs_of, state.ckpt, hbar_of, n,
                                               sensitivities)
            grads["W_out"], grads["b_out"] = state.dW_out, state.db_out
            if state.track_h0:
                grads["h0"] = dh0
            if sensitivities:
                grads["u"] = u
        h = state.h
        return init(model, h.shape[0], h0=h)._replace(track_h0=False), grads

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        if not is_rnn(model):
            _no_sensitivities(model, sensitivities)
            return _net.sequence(model, c, inputs, targets, mask, h0, loss, reward)
        T, B, _ = inputs.shape
        H, K = model.hidden_size, model.output_size
        with torch.no_grad():
            value = inputs.new_zeros(())
            dz_all = inputs.new_zeros(T, B, K)
            dW_out, db_out = torch.zeros_like(model.W_out), torch.zeros_like(model.b_out)
            ckpt = []
            h = h0
            for s in range(0, T, c):  # forward, keeping h at the start of each segment
                e = min(s + c, T)
                ckpt.append(h)
                hs, _ = unroll(model, inputs[s:e], h, need_deriv=False)
                if targets is not None:
                    h2 = hs.view((e - s) * B, H)
                    z = torch.addmm(model.b_out, h2, model.W_out.T).view(e - s, B, K)
                    v, dz = loss_and_grad(z, targets[s:e], mask[s:e] / B, loss=loss,
                                          readout_name=model.readout)
                    value = value + v
                    dz_all[s:e] = dz
                    dz2 = dz.view((e - s) * B, K)
                    dW_out.addmm_(dz2.T, h2)
                    db_out += dz2.sum(0)
                h = hs[-1].clone()  # a view would keep the whole segment alive
                del hs
            dR = None
            if reward is not None:  # R needs the whole trajectory
                hs_all, _ = unroll(model, inputs, h0, need_deriv=False)
                R, dR = reward_grad(reward, hs_all)
                value = value - R
                del hs_all

            def inputs_of(s, e):
                return inputs[s:e]

            def hbar_of(s, e):
                hbar = dz_all[s:e] @ model.W_out
                return hbar if dR is None else hbar - dR[s:e]

            grads, dh0, u = _segments_backward(model, c, inputs_of, ckpt, hbar_of, T,
                                               sensitivities)
            grads["W_out"], grads["b_out"] = dW_out, db_out
            grads["h0"] = dh0
            if sensitivities:
                grads["u"] = u
        return value, grads

    name = f"bptt(checkpoint={c}, sensitivities=True)" if sensitivities else f"bptt(checkpoint={c})"
    return Algorithm(
        name=name,
        init=init,
        step=step,
        flush=flush,
        exact=True,
        online=False,
        cost=f"time O(B H (D + H)) per step plus one recomputed forward; memory "
             f"O((T/c + c) B H + T B (D + K)) with c={c}",
        sequence=sequence,
    )
