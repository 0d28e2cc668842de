"""KF-RTRL: Kronecker-factored RTRL (Mujika, Meier & Steger 2018, "Approximating real-time
recurrent learning with random Kronecker factors", NeurIPS).

For theta = [W_rec | W_in | b_rec] (H x P) the immediate influence is a Kronecker product,
``Mbar_t[k, i, j] = pre_t^j D_t[k, i]`` with ``D_t = diag(alpha phi'(a_t))``, and J_t acts
on the unit axis only. KF-RTRL carries, per example, ``M_t[k, i, j] ~ u_t^j A_t[k, i]``
(u: (P,), A: (H, H)) and folds the two Kronecker terms of
``M_t = u_{t-1} (x) J_t A_{t-1} + pre_t (x) D_t`` into one with random signs::

    c1, c2 ~ independent +-1 signs
    p1  = sqrt((||J_t A_{t-1}|| + eps) / (||u_{t-1}|| + eps))
    p2  = sqrt((||D_t|| + eps) / (||pre_t|| + eps))
    u_t = c1 p1 u_{t-1} + c2 p2 pre_t
    A_t = c1 / p1 J_t A_{t-1} + c2 / p2 D_t
    grad[i, j] = sum_t (A_t^T q_t)^i u_t^j,    q_t = W_out^T dl_t/dz_t (+ dl_t/dh_t)

with ``J_t A = (1 - alpha) A + alpha diag(phi'(a_t)) W_rec A``; u_0 = 0, A_0 = 0.
``E[c1 c2] = 0`` removes the cross terms, so ``E[u_t (x) A_t] = M_t`` (unbiased); p1, p2
balance the norms of the two factors, which minimises the variance (Mujika et al.,
Lemma 1). ``W_rec A`` for the whole batch is one (H, H) x (H, B H) GEMM (A is stored
(H, B, H) for that); ``W_out`` and ``b_out`` get their exact gradient.

It takes one Elman layer: ``rnngrad.RNN`` or ``rnngrad.Network(Elman(...))`` with a plain
readout (the cell type is checked; any other network gets an error naming these). The
GEMM writes into a spare (H, B, H) buffer (two alternate, as ``rtrl()``'s influence), J_t,
the scalings and ``D_t`` are applied in place, u is updated in place and ``A_t^T q_t`` is
one batched GEMV: no step allocates anything of A's size. The signs are drawn a block of
32 steps per generator call into a buffer of the state (``_signs``).

Approximate (unbiased, lower variance than UORO). Online. Cost per step:
time O(B H^3 + B H (D + K)), memory O(B H (H + D)), constant in T.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _signs
from ._online import (
    Work,
    check_seed,
    emit,
    forward,
    generator_for,
    learning_signal,
    workspace,
)
from .base import Algorithm, StepOutput

__all__ = ["kf_rtrl", "KFState"]


class KFState(NamedTuple):
    h: Tensor  # (B, H) h_t
    u: Tensor  # (B, P) u_t, the factor over the columns of [W_rec | W_in | b_rec]
    A: Tensor  # (H, B, H) A_t[k, b, i]: example b's factor over (unit k, row i)
    A_spare: Tensor | None = None  # (H, B, H) the buffer the next step writes A_{t+1} into
    work: Work | None = None  # buffers reused by every step
    signs: Tensor | None = None  # (BLOCK, 2, B) a block of the signs c1, c2, drawn in one call
    sign_pos: int = _signs.BLOCK  # the next step's row of ``signs``


class ElmanView:
    """A network of one Elman layer under the flat names ``rnngrad.RNN`` has (what the
    Elman-form rules read); ``names`` maps them to the network's parameter names."""

    def __init__(self, model) -> None:
        ((prefix, cell),) = model.layers()
        self.W_in, self.W_rec, self.b_rec = cell.W_in, cell.W_rec, cell.b_rec
        self.activation, self.alpha = cell.activation, cell.alpha
        self.hidden_size, self.input_size = cell.hidden_size, cell.input_size
        self.W_out, self.b_out, self.readout = model.W_out, model.b_out, model.readout
        self.names = {n: prefix + n for n in ("W_in", "W_rec", "b_rec")}


def elman_view(model, who: str) -> ElmanView:
    """The model as one Elman layer, or a clear error naming the networks ``who`` takes."""
    from ..cells.elman import Elman

    layers = list(getattr(model, "layers", list)())
    if (len(layers) == 1 and isinstance(layers[0][1], Elman)
            and not getattr(model, "readout_decay", 0.0)):
        return ElmanView(model)
    cells = ", ".join(type(c).__name__ for _, c in layers)
    extra = " and a leaky readout" if getattr(model, "readout_decay", 0.0) else ""
    raise ValueError(
        f"{who} is defined for one Elman layer phi(W_in x + W_rec h + b) (the Kronecker "
        "factorisation of its immediate term): rnngrad.RNN or rnngrad.Network(Elman(...)) "
        f"with a plain readout; got {type(model).__name__}"
        f"{f' with cells {cells}' if cells else ''}{extra}. uoro() is the unbiased estimate "
        "for any cell")


def kf_rtrl(*, seed: int = 0, eps: float = 1e-7) -> Algorithm:
    """KF-RTRL (Mujika et al. 2018): an unbiased Kronecker-factored estimate of RTRL.

    Args:
        seed: seeds the random signs c1, c2 (per example, per step). The generator is
            seeded once and continues across ``init`` calls.
        eps: regulariser of the scale factors p1, p2 (> 0).

    The gradient w.r.t. an initial state is not estimated: ``init`` with ``h0`` raises.
    """
    check_seed(seed)
    from .._checks import check_positive_float

    eps = check_positive_float("eps", eps)
    gens: dict = {}

    def init(model, batch_size: int, *, h0: Tensor | None = None) -> KFState:
        if h0 is not None:
            raise ValueError("kf_rtrl() does not estimate the gradient w.r.t. the initial "
                             "state h0; call init without h0 (the state then starts at zero)")
        model = elman_view(model, "kf_rtrl()")
        p = model.W_rec
        H, D = model.hidden_size, model.input_size
        kw = {"dtype": p.dtype, "device": p.device}
        A = torch.zeros(H, batch_size, H, **kw)
        return KFState(torch.zeros(batch_size, H, **kw), torch.zeros(batch_size, H + D + 1, **kw),
                       A, torch.empty_like(A), workspace(model, batch_size),
                       torch.empty(_signs.BLOCK, 2, batch_size, **kw))

    def step(model, state: KFState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        model = elman_view(model, "kf_rtrl()")
        alpha = model.alpha
        with torch.no_grad():
            f = forward(model, state.h, x_t, target_t, mask_t, loss, state.work)
            d = f.dphi if alpha == 1.0 else f.dphi * alpha  # alpha phi'(a_t)
            B, H = f.h.shape
            gen = None if torch.compiler.is_compiling() else \
                generator_for(gens, f.h.device, seed)  # compiled: the block filled outside
            signs, pos, c = _signs.take(gen, state.signs, state.sign_pos, f.h)
            A = state.A
            # W_rec A for the whole batch: one (H, H) x (H, B H) GEMM into the spare buffer
            JA = torch.mm(model.W_rec, A.view(H, B * H), out=state.A_spare.view(H, B * H))
            JA = JA.view(H, B, H).mul_(d.T.unsqueeze(2))  # alpha phi'(a_t^k) (W_rec A)[k, b, i]
            if alpha != 1.0:
                JA = JA.add_(A, alpha=1.0 - alpha)
            norm_JA = torch.linalg.vector_norm(JA, dim=(0, 2))  # (B,)
            p1 = ((norm_JA + eps) / (state.u.norm(dim=1) + eps)).sqrt_()
            p2 = ((d.norm(dim=1) + eps) / (f.pre.norm(dim=1) + eps)).sqrt_()
            # u_t = c1 p1 u_{t-1} + c2 p2 pre_t, in place
            u = state.u.mul_((c[0] * p1).unsqueeze(1)).addcmul_((c[1] * p2).unsqueeze(1), f.pre)
            A_new = JA.mul_((c[0] / p1).view(1, B, 1))
            A_new.diagonal(dim1=0, dim2=2).add_(d * (c[1] / p2).unsqueeze(1))  # + D_t
            q = learning_signal(f.dz, model.W_out, dh_t)
            G = None
            if q is not None:
                # (A_t^T q_t)[b, i] = sum_k q_t[b, k] A_t[k, b, i]: a batched GEMV over examples
                r = torch.bmm(q.unsqueeze(1), A_new.transpose(0, 1)).squeeze(1)  # (B, H)
                G = r.T @ u
            grads = emit(model, f, G)
            if grads is not None:
                grads = {model.names.get(k, k): v for k, v in grads.items()}
        new = state._replace(h=f.h, u=u, A=A_new, A_spare=A, signs=signs, sign_pos=pos)
        return new, StepOutput(f.h, f.z, f.loss), grads

    def flush(model, state: KFState):
        return state, None

    step.__rnngrad_compile_io__ = _signs.compile_io(
        lambda state: generator_for(gens, state.signs.device, seed))
    return Algorithm(
        name=f"kf_rtrl(seed={seed})",
        init=init,
        step=step,
        flush=flush,
        exact=False,
        online=True,
        cost="time O(B H^3 + B H (D + K)) per step; memory O(B H (H + D))",
        rng=gens,
    )
