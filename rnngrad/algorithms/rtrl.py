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

Every model is an ``rnngrad.Network`` (``rnngrad.RNN`` is one Elman layer under flat
names) and runs this recursion layer by layer (``_rtrl_network``), from what each cell
declares: the Elman cell's ``linearize`` gives ``J_t`` and the factored immediate term,
so ``J_t M_{t-1}`` is one batched GEMM and ``Mbar_t`` a diagonal add per parameter.
The influence is stored as (B, S, N): ``M[b, k, n] = dh_t[b, k] / dtheta_n`` over the N
recurrent parameters flattened in ``named_parameters()`` order (W_in, W_rec, b_rec).

Exact, online: emits the gradient of step t's loss at step t. Time O(B H^2 (D + H + 1) H)
per step (O(H^4) per example), memory O(B H^2 (D + H + 1)) (O(H^3) per example),
both constant in T.

``rtrl(generic=True)`` takes every Jacobian from ``torch.func`` (``vmap(jacrev)``):
the fallback for cells without declared structure, and a second oracle.
"""

from __future__ import annotations

from torch import Tensor

from ..cells._derive import declares, verify_diagonal, verify_emit_only
from . import _rtrl_network as _net
from . import _sequence as _seq
from . import _traces_network as _traces
from ._network import check_network, check_real
from .base import Algorithm

__all__ = ["rtrl"]


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

    def init(model, batch_size: int, *, h0=None):
        check_network(model, "rtrl()")
        check_real(model)
        model.init_state(1)  # real states only: a clear error before any probe
        if spatial:
            return _spatial_init(model, batch_size, h0, generic)
        if not generic and model.num_layers == 1 \
                and model.layers()[0][1].diagonal and model.readout_decay == 0.0:
            verify_diagonal(model.layers()[0][1], "rtrl()")
            return _traces.init(model, batch_size, h0, None, ("local",))
        return _net.init(model, batch_size, h0, generic)

    def step(model, state, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        if isinstance(state, _traces.NetTraceState):  # one diagonal layer, or spatial
            return _traces.step(model, "local", state, x_t, target_t, mask_t, loss, dh_t)
        return _net.step(model, generic, state, x_t, target_t, mask_t, loss, dh_t)

    def flush(model, state):
        return state, None

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        # per-unit traces (one diagonal layer) or spatial: the adjoint of their recursion
        # (_sequence), at BPTT's cost; any other model: the step loop
        modes = _sequence_modes(model, generic, spatial)
        if modes is None:
            return None  # rnngrad.gradient then runs the steps
        return _seq.sequence(model, modes, None, inputs, targets, mask, h0, loss, reward)

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
        # rtrl(generic=True) keeps the dense influence everywhere but in spatial mode
        sequence=None if generic and not spatial else sequence,
    )


def _sequence_modes(model, generic: bool, spatial: bool) -> tuple | None:
    """The per-layer trace modes rtrl() runs ``_traces_network`` with on this model (one
    diagonal layer, or spatial), after the same checks as init; None: the dense influence."""
    check_network(model, "rtrl()")
    check_real(model)
    model.init_state(1)
    if spatial:
        return _spatial_init(model, 1, None, generic).modes
    if not generic and model.num_layers == 1 \
            and model.layers()[0][1].diagonal and model.readout_decay == 0.0:
        verify_diagonal(model.layers()[0][1], "rtrl()")
        return ("local",)
    return None


def _spatial_init(model, batch_size: int, h0, generic: bool):
    """rtrl(layers="spatial"): the trace engine with each layer exact on its own."""
    check_network(model, "rtrl(layers='spatial')")
    if model.num_layers < 2:
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
