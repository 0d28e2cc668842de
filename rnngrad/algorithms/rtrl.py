"""Real-time recurrent learning (Williams & Zipser 1989).

The influence matrix ``M_t = dh_t/dW`` of the recurrent parameters, stacked as
``W = [W_in | W_rec | b_rec]`` of shape (H, P), ``P = D + H + 1``, with the input
of step t ``pre_t = [x_t; h_{t-1}; 1]`` (P,)::

    a_t = W pre_t,   h_t = (1 - alpha) h_{t-1} + alpha phi(a_t)

    Mbar_t[k, i, j] = delta_ki pre_t[j]                         immediate term
    J_t             = (1 - alpha) I + alpha diag(phi'(a_t)) W_rec   dh_t/dh_{t-1}
    M_t             = (1 - alpha) M_{t-1} + alpha phi'(a_t) * (W_rec @ M_{t-1} + Mbar_t)

    q_t    = dl_t/dh_t = W_out^T dl_t/dz_t (+ dh_t, e.g. -dR/dh_t)   Williams & Zipser's q
    dL/dW  = sum_t q_t^T M_t,  dL/dW_out = sum_t dl_t/dz_t h_t^T,  dL/db_out = sum_t dl_t/dz_t

For alpha = 1 this is Williams & Zipser's ``M_t = J_t M_{t-1} + Mbar_t`` with ``J_t = D_t W_rec``.
``Mbar_t`` is only a diagonal add (the sensitivity lemma: ``da_k/dW_ij = delta_ki pre_j``);
the whole batch's ``W_rec @ M`` is one batched GEMM in which ``alpha phi'(a_t)`` is
folded into the left factor (``(alpha phi'(a_t) * W_rec) @ M``, (B, H, H) x (B, H, H P)),
and the leak ``(1 - alpha) M_{t-1}`` is the GEMM's accumulate term (``baddbmm``).

With an initial state h0 the sensitivity ``G_t = dh_t/dh_0`` (B, H, H) is carried too,
``G_t = J_t G_{t-1}``, ``G_0 = I``, and ``grads["h0"] = q_t^T G_t`` per example.

Layout: ``M`` is (B, H, H, P): ``M[b, k, i, j] = dh_t[b, k] / dW[i, j]``.

Exact, online: emits the gradient of step t's loss at step t. Time O(B H^2 (D + H + 1) H)
per step (O(H^4) per example), memory O(B H^2 (D + H + 1)) (O(H^3) per example),
both constant in T.

For any other ``rnngrad.Network`` (GRU, LSTM, stacks, a user's cell) the same recursion
runs layer by layer (``_rtrl_network``), with the immediate term structured where the
cell declares it. ``rtrl(generic=True)`` takes every Jacobian from ``torch.func``
(``vmap(jacrev)``), the influence stored flat as (B, S, N) over the N recurrent
parameters: the fallback for cells without declared structure, and a second oracle.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cells._derive import declares, verify_diagonal, verify_emit_only
from ..cells.activations import get_activation
from ..cells.elman import cell_step
from . import _rtrl_network as _net
from . import _traces_network as _traces
from ._network import check_network, check_real, is_rnn
from .base import Algorithm, Grads, StepOutput, immediate_signal, output_grads

__all__ = ["rtrl", "RTRLState"]


class RTRLState(NamedTuple):
    h: Tensor  # (B, H) h_t
    M: Tensor  # (B, H, H, P) influence dh_t/d[W_in | W_rec | b_rec]
    M_spare: Tensor  # (B, H, H, P) the buffer the next step writes M_{t+1} into
    G: Tensor | None  # (B, H, H) dh_t/dh_0, or None when h0 is not tracked
    G_spare: Tensor | None  # (B, H, H) its spare buffer


def _check_x(model, x_t: Tensor, h: Tensor) -> None:
    B, D = h.shape[0], model.input_size
    if x_t.dim() != 2 or tuple(x_t.shape) != (B, D):
        raise ValueError(f"x_t has shape {tuple(x_t.shape)} but the state expects ({B}, {D})")


LAYER_MODES = ("exact", "spatial")


def rtrl(*, generic: bool = False, layers: str = "exact", **removed) -> Algorithm:
    """Exact real-time recurrent learning.

    Args:
        generic: take every Jacobian from ``torch.func`` (``vmap(jacrev)``) instead of
            the structure the cells declare (the hand-derived Elman influence for
            ``rnngrad.RNN``; the structured immediate term for built-in cells).
        layers: how a stack of layers is treated. "exact": the influence of every
            parameter on every layer's state (``_rtrl_network``), the exact gradient.
            "spatial": Zucchet et al. (2023)'s rule (their "online" learning, code name
            online_full): exact RTRL within each layer (per-unit traces for a diagonal
            cell, the dense influence of the layer's own parameters otherwise), the error
            of each step passed down the stack within that step; an approximation (the
            paths from a layer's parameters through the memory of the layers above are
            dropped). Needs a stack of at least two layers.

    Works on any ``rnngrad.Network``. ``step`` emits the gradient of the step's loss
    every step (RTRL is online); ``flush`` has nothing pending. With
    ``init(model, B, h0=h0)`` it also emits ``grads["h0"]`` every step.

    A network of one layer whose units do not couple (``cell.diagonal``: LRU, eLSTM;
    checked once per cell) keeps per-unit traces, O(|params|) per example, no S x S
    influence: Zucchet et al. (2023), Irie et al. (2023). It is the same gradient. (With a
    leaky readout, ``readout_decay`` > 0, it keeps the layer's dense influence instead.)
    """
    if "cell" in removed:
        raise TypeError("rtrl(cell=f) was replaced by the cell protocol: subclass "
                        "rnngrad.cells.Cell (init_state, step, output) and train an "
                        "rnngrad.Network of it; rtrl() then works on it")
    if removed:
        raise TypeError(f"rtrl() got unexpected keyword arguments {sorted(removed)}")
    if not isinstance(generic, bool):
        raise TypeError(f"generic must be a bool, got {generic!r}")
    if not isinstance(layers, str) or layers not in LAYER_MODES:
        raise ValueError(f"unknown layers mode {layers!r}; known modes: 'exact' (the influence "
                         "of the whole stack, the exact gradient) and 'spatial' (exact RTRL "
                         "within each layer, the error passed down within the step; Zucchet "
                         "et al. 2023)")
    spatial = layers == "spatial"

    def init(model, batch_size: int, *, h0: Tensor | None = None) -> RTRLState:
        check_network(model, "rtrl()")
        check_real(model)
        model.init_state(1)  # real states only: a clear error before any probe
        if spatial:
            return _spatial_init(model, batch_size, h0, generic)
        if not generic and not is_rnn(model) and model.num_layers == 1 \
                and model.layers()[0][1].diagonal and model.readout_decay == 0.0:
            verify_diagonal(model.layers()[0][1], "rtrl()")
            return _traces.init(model, batch_size, h0, None)
        if generic or not is_rnn(model):
            if is_rnn(model):
                from ..cells.elman import ElmanState

                h0 = None if h0 is None else (ElmanState(h0),)
            return _net.init(model, batch_size, h0, generic)
        p = model.W_rec
        H, D = model.hidden_size, model.input_size
        P = D + H + 1
        kw = {"dtype": p.dtype, "device": p.device}
        if h0 is None:
            h, G, G_spare = torch.zeros(batch_size, H, **kw), None, None
        else:
            if tuple(h0.shape) != (batch_size, H):
                raise ValueError(f"h0 has shape {tuple(h0.shape)} but expected ({batch_size}, {H})")
            h = h0
            G = torch.eye(H, **kw).expand(batch_size, H, H).contiguous()
            G_spare = torch.empty_like(G)
        M = torch.zeros(batch_size, H, H, P, **kw)
        return RTRLState(h, M, torch.empty_like(M), G, G_spare)

    def step(model, state: RTRLState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        if isinstance(state, _traces.NetTraceState):  # one diagonal layer, or spatial
            return _traces.step(model, "local", state, x_t, target_t, mask_t, loss, dh_t)
        if isinstance(state, _net.NetRTRLState):
            new, out, grads = _net.step(model, generic, state, x_t, target_t, mask_t, loss,
                                        dh_t)
            if is_rnn(model) and "h0" in grads:
                grads["h0"] = grads["h0"][0].h
            return new, out, grads
        _check_x(model, x_t, state.h)
        with torch.no_grad():
            h_prev, M, M_new = state.h, state.M, state.M_spare
            B, H, _, P = M.shape
            D = P - H - 1
            alpha = model.alpha
            act = get_activation(model.activation)
            h, a, fa = cell_step(model.W_in, model.W_rec, model.b_rec, h_prev, x_t,
                                 activation=act, alpha=alpha)
            s = act.deriv(a, fa) * alpha  # (B, H) alpha phi'(a_t)
            sW = s.unsqueeze(2) * model.W_rec  # (B, H, H) alpha diag(phi'(a_t)) W_rec
            Mv, Nv = M.view(B, H, H * P), M_new.view(B, H, H * P)
            if alpha != 1.0:  # M_t = (1 - alpha) M_{t-1} + sW @ M_{t-1}
                torch.baddbmm(Mv, sW, Mv, beta=1.0 - alpha, out=Nv)
            else:
                torch.bmm(sW, Mv, out=Nv)
            # + alpha phi'(a_t)_k Mbar_t[k, i, j] = alpha phi'(a_t)_k delta_ki pre_t[j]
            pre = torch.cat([x_t, h_prev, torch.ones_like(h_prev[:, :1])], dim=1)  # (B, P)
            M_new.diagonal(dim1=1, dim2=2).add_(pre.unsqueeze(2) * s.unsqueeze(1))  # (B, P, H)

            G = None
            if state.G is not None:
                G = state.G_spare
                if alpha != 1.0:
                    torch.baddbmm(state.G, sW, state.G, beta=1.0 - alpha, out=G)
                else:
                    torch.bmm(sW, state.G, out=G)

            z, value, dz, q = immediate_signal(model, h, target_t, mask_t, loss, dh_t)
            gW = (q.view(1, B * H) @ M_new.view(B * H, H * P)).view(H, P)  # sum_b q^T M
            grads: Grads = {
                "W_in": gW[:, :D].contiguous(),
                "W_rec": gW[:, D:D + H].contiguous(),
                "b_rec": gW[:, D + H].contiguous(),
            }
            grads.update(output_grads(dz, h))
            if G is not None:
                grads["h0"] = torch.bmm(q.unsqueeze(1), G).squeeze(1)  # (B, H)
        new = RTRLState(h, M_new, M, G, state.G)
        return new, StepOutput(h, z, value), grads

    def flush(model, state: RTRLState):
        return state, None

    args = [a for a, on in (("generic=True", generic), ("layers='spatial'", spatial)) if on]
    return Algorithm(
        name=f"rtrl({', '.join(args)})",
        init=init,
        step=step,
        flush=flush,
        exact=not spatial,
        online=True,
        cost="time O(B S^2 N) per step (Elman: O(B H^3 (D + H + 1))), memory O(B S N), "
             "constant in T; S state size, N recurrent parameters. One diagonal layer "
             "(LRU, eLSTM): O(B C N) time and memory; layers='spatial': that per diagonal "
             "layer, O(B S_l^2 N_l) per other layer",
    )


def _spatial_init(model, batch_size: int, h0, generic: bool):
    """rtrl(layers="spatial"): the trace engine with each layer exact on its own."""
    check_network(model, "rtrl(layers='spatial')")
    if is_rnn(model) or model.num_layers < 2:
        raise ValueError(
            "rtrl(layers='spatial') passes the error down a stack of layers and needs at least "
            f"two; got a network of {model.num_layers} layer "
            f"({type(model.layers()[0][1]).__name__}). For one layer it is exact RTRL: use "
            "rtrl()")
    modes = []
    for _, cell in model.layers():
        if generic:
            modes.append("dense_generic")
        elif cell.diagonal:
            verify_diagonal(cell, "rtrl(layers='spatial')")
            modes.append("local")
        else:
            if declares(cell, "immediate"):  # its unowned parameters have no immediate term
                verify_emit_only(cell, "rtrl(layers='spatial')")
            modes.append("dense")
    return _traces.init(model, batch_size, h0, None, tuple(modes))
