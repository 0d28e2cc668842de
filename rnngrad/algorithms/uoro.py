"""UORO: unbiased online recurrent optimization (Tallec & Ollivier 2018, "Unbiased online
recurrent optimization", ICLR; arXiv 2017).

RTRL's influence ``M_t = dh_t/dtheta`` (H x |theta|, theta = [W_rec | W_in | b_rec]) obeys
``M_t = J_t M_{t-1} + Mbar_t``. UORO carries, per example, a rank-one estimate
``M_t ~ h~_t theta~_t^T`` that is unbiased (``E[h~ theta~^T] = M``)::

    nu        ~ independent +-1 signs                                   (H,)
    Mbar^T nu = (nu * alpha phi'(a_t)) pre_t^T                          rank one, (H, P)
    rho0 = sqrt((||theta~_{t-1}|| + eps) / (||J_t h~_{t-1}|| + eps))
    rho1 = sqrt((||Mbar^T nu|| + eps) / (||nu|| + eps))
    h~_t     = rho0 J_t h~_{t-1} + rho1 nu
    theta~_t = theta~_{t-1} / rho0 + (Mbar^T nu) / rho1
    grad     = sum_t (q_t . h~_t) theta~_t,   q_t = W_out^T dl_t/dz_t (+ dl_t/dh_t)

with ``J_t h~ = (1 - alpha) h~ + alpha phi'(a_t) * (W_rec h~)`` (one GEMM for the batch),
h~_0 = 0, theta~_0 = 0. Unbiasedness: given the past, the cross terms of
``h~_t theta~_t^T`` carry one factor nu and vanish in expectation, and
``E[nu nu^T] = I`` turns the last term into ``Mbar_t``. The scale factors rho0, rho1
minimise the variance of that estimate (Tallec & Ollivier, Prop. 1) and do not depend
on the current nu (``||Mbar^T nu|| = ||alpha phi'|| ||pre||`` for signs), so they keep
it unbiased. The noise is independent across the batch; ``W_out`` and ``b_out`` get
their exact gradient.

On one Elman layer (``rnngrad.RNN``, ``Network(Elman(...))``, a cell-type check) the
online step is fused: theta~ is updated in place (the scaling by 1/rho0, then the outer
product by ``baddbmm_``), its norm for the next step's rho0 is taken right after (and
kept in the state, so theta~ is not read for it again), and the gradient is one GEMV
over the batch; above 8 MiB block by block of rows, each while in cache. The signs are
drawn a block of 32 steps per generator call (``_signs``) into a buffer of the state.

Over a whole sequence with fixed weights (``rnngrad.gradient``, the ``sequence`` slot)
theta~ is never formed (``_uoro_sequence``): it stays a weighted sum of the steps'
rank-one terms, its norm comes from per-example Gram matrices over time and the gradient
is one GEMM per parameter group over the stacked (T B) rows, as in BPTT; the sequential
part is ``J_t h~`` (one GEMM a step on Elman and, from their declared structure, on GRU,
LSTM and LIF/ALIF) and O(B T) scalars a step. It applies to one layer whose cell declares
a factored immediate term (every built-in cell; LIF/ALIF's W_rec with its diagonal
masked) and a plain readout, and draws the same signs as the online steps, so the two
give the same gradient to round-off; other networks run the online steps.

Approximate (unbiased, high variance). Online. Cost per step: time O(B H (H + D + K)),
memory O(B H (H + D + 1)) (theta~ per example), constant in T.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _signs
from . import _uoro_network as _net
from . import _uoro_sequence as _seq
from ._network import check_network
from ._online import (
    Work,
    check_seed,
    emit,
    forward,
    generator_for,
    learning_signal,
    row_blocks,
    workspace,
)
from .base import Algorithm, StepOutput
from .kf_rtrl import ElmanView

__all__ = ["uoro", "UOROState"]


class UOROState(NamedTuple):
    h: Tensor  # (B, H) h_t
    h_tilde: Tensor  # (B, H) h~_t
    theta_tilde: Tensor  # (B, H, P) theta~_t, over [W_rec | W_in | b_rec]
    work: Work | None = None  # buffers reused by every step
    theta_norm: Tensor | None = None  # (B,) ||theta~_t|| per example, for the next step's rho0
    signs: Tensor | None = None  # (BLOCK, B, H) a block of signs nu, drawn in one call
    sign_pos: int = _signs.BLOCK  # the next step's row of ``signs`` (BLOCK: draw a new block)


def uoro(*, seed: int = 0, eps: float = 1e-7) -> Algorithm:
    """UORO (Tallec & Ollivier 2018): an unbiased rank-one estimate of RTRL's influence.

    Args:
        seed: seeds the random signs nu. The generator is seeded once and continues
            across ``init`` calls, so successive sequences draw fresh signs.
        eps: the regulariser of the scale factors rho0, rho1 (> 0); it keeps them finite
            when h~ or theta~ vanish (at the start) and does not bias the estimate.

    The gradient w.r.t. an initial state is not estimated: ``init`` with ``h0`` raises.

    Any ``rnngrad.Network``: the stack is one state, and the step's jvp (``J_t h~``) and
    per-example vjp (``Mbar_t^T nu``) come from ``torch.func`` (``_uoro_network``).
    """
    check_seed(seed)
    from .._checks import check_positive_float

    eps = check_positive_float("eps", eps)
    gens: dict = {}

    def init(model, batch_size: int, *, h0: Tensor | None = None) -> UOROState:
        if h0 is not None:
            raise ValueError("uoro() does not estimate the gradient w.r.t. the initial state h0; "
                             "call init without h0 (the state then starts at zero)")
        check_network(model, "uoro()")
        if not _is_elman(model):
            return _net.init(model, batch_size)
        model = ElmanView(model)
        p = model.W_rec
        H, D = model.hidden_size, model.input_size
        kw = {"dtype": p.dtype, "device": p.device}
        return UOROState(torch.zeros(batch_size, H, **kw), torch.zeros(batch_size, H, **kw),
                         torch.zeros(batch_size, H, H + D + 1, **kw), workspace(model, batch_size),
                         torch.zeros(batch_size, **kw),
                         torch.empty(_signs.BLOCK, batch_size, H, **kw))

    def step(model, state: UOROState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        if not _is_elman(model):
            # compiled (rnngrad.compile): the block of signs was filled outside, see compile_io
            gen = None if torch.compiler.is_compiling() else \
                generator_for(gens, model.W_out.device, seed)
            return _net.step(model, gen, eps, state, x_t, target_t, mask_t, loss, dh_t)
        model = ElmanView(model)
        alpha = model.alpha
        with torch.no_grad():
            f = forward(model, state.h, x_t, target_t, mask_t, loss, state.work)
            d = f.dphi if alpha == 1.0 else f.dphi * alpha  # alpha phi'(a_t)
            B, H = f.h.shape
            gen = None if torch.compiler.is_compiling() else \
                generator_for(gens, f.h.device, seed)  # compiled: the block filled outside
            signs, pos, nu = _signs.take(gen, state.signs, state.sign_pos, f.h)
            h_t, th = state.h_tilde, state.theta_tilde
            Jh = d * (h_t @ model.W_rec.T)  # J_t h~ = (1 - alpha) h~ + alpha phi' W_rec h~
            if alpha != 1.0:
                Jh = Jh.add_(h_t, alpha=1.0 - alpha)
            norm_th = state.theta_norm  # taken at the end of the last step
            norm_Jh = Jh.norm(dim=1)
            norm_Mnu = d.norm(dim=1) * f.pre.norm(dim=1)
            rho0 = ((norm_th + eps) / (norm_Jh + eps)).sqrt_()  # (B,)
            rho1 = ((norm_Mnu + eps) / (math.sqrt(H) + eps)).sqrt_()  # (B,)
            h_new = torch.addcmul(rho1.unsqueeze(1) * nu, rho0.unsqueeze(1), Jh)
            u3 = (nu * d).div_(rho1.unsqueeze(1)).unsqueeze(2)  # Mbar^T nu / rho1 = u pre^T
            inv_rho0, pre3 = rho0.reciprocal().view(B, 1, 1), f.pre.unsqueeze(1)
            q = learning_signal(f.dz, model.W_out, dh_t)
            s = None if q is None else (q * h_new).sum(1).unsqueeze(0)  # q_t . h~_t, (1, B)
            G = None
            blocks = row_blocks(th)
            if blocks is None:
                # theta~_t = theta~_{t-1} / rho0 + u pre^T in place; its norm (the next step's
                # rho0); sum_b (q_t . h~_t) theta~_t: one GEMV over the batch
                if B > 1 and torch.compiler.is_compiling():
                    # rnngrad.compile: one broadcast multiply-add inductor fuses in place (a
                    # baddbmm_ stays an extern call into a new buffer copied back)
                    th.mul_(inv_rho0).addcmul_(u3, pre3)
                else:
                    th.mul_(inv_rho0).baddbmm_(u3, pre3)
                norm_th = torch.linalg.vector_norm(th.view(B, -1), dim=1)
                if s is not None:
                    G = torch.mm(s, th.view(B, -1)).view(H, -1)
            else:  # the same, block by block of rows, each while it is in cache
                G = None if s is None else th.new_empty(H, th.shape[2])
                norms = []
                for rows in blocks:
                    X = th[:, rows]
                    X.mul_(inv_rho0).baddbmm_(u3[:, rows], pre3)
                    norms.append(torch.linalg.vector_norm(X, dim=(1, 2)))
                    if G is not None:
                        torch.mm(s, X.reshape(B, -1), out=G[rows].view(1, -1))
                norm_th = torch.linalg.vector_norm(torch.stack(norms, 1), dim=1)
            grads = emit(model, f, G)
            if grads is not None:
                grads = {model.names.get(k, k): v for k, v in grads.items()}
        new = state._replace(h=f.h, h_tilde=h_new, theta_tilde=th, theta_norm=norm_th,
                             signs=signs, sign_pos=pos)
        return new, StepOutput(f.h, f.z, f.loss), grads

    def flush(model, state: UOROState):
        return state, None

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        from ..gradient import _step_loop

        zero = all(not bool((c != 0).any()) for c in _leaves(h0))
        if not zero:
            raise ValueError("uoro() does not estimate the gradient w.r.t. the initial state "
                             "h0; start from the zero state")
        gen = generator_for(gens, model.W_out.device, seed)
        out = _seq.sequence(model, gen, eps, inputs, targets, mask, h0, loss, reward)
        if out is None:  # a stack, a leaky readout or a dense immediate: the online steps
            return _step_loop(algo, model, inputs, targets, mask, h0, loss, reward, False)
        return out

    step.__rnngrad_compile_io__ = _signs.compile_io(
        lambda state: generator_for(gens, state.signs.device, seed))
    algo = Algorithm(
        name=f"uoro(seed={seed})",
        init=init,
        step=step,
        flush=flush,
        exact=False,
        online=True,
        cost="time O(B H (H + D + K)) per step; memory O(B H (H + D + 1)); over a sequence "
             "(one layer): BPTT's GEMMs plus O(B min(T, 256) (H + D)) a step for its Gram matrices",
        sequence=sequence,
        rng=gens,
    )
    return algo


def _is_elman(model) -> bool:
    """One Elman layer and a plain readout: the fused Elman step (``rnngrad.RNN`` is one)."""
    from ..cells.elman import Elman

    layers = model.layers()
    return (len(layers) == 1 and isinstance(layers[0][1], Elman)
            and not getattr(model, "readout_decay", 0.0))


def _leaves(x):
    if isinstance(x, Tensor):
        return [x]
    return [t for v in x for t in _leaves(v)]
