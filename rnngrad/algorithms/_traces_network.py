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

Layout and cost of a step. A layer's owned parameters with the same rows per unit (G)
keep their traces side by side in one tensor (B, C, G, U, sum P) (``Group``; the per-name
``traces`` are views of it), so that one step is one pass of the unit blocks, one batched
outer product where the immediate terms share their factor and their row (the Elman
cell: ``alpha phi'(a_t)`` times ``[x_t; h_{t-1}; 1]``; ``baddbmm_``, with the decay as its
beta when the cell declares its eligibility Jacobian a constant, ``eligibility_decay``)
and one batched GEMV over the rows for the contraction (above 8 MiB block by block of
rows, each contracted in cache). Where the declared decay is 0 (Elman at alpha = 1) e-prop's
trace is its immediate term: it is never stored, and the step's gradient is one GEMM per
parameter, ``(sum_c q D)^T inp`` over the batch.

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
from ..cells.elman import ElmanState
from . import _leaky_readout as _leak
from ._network import (
    as_state,
    bind,
    check_real,
    emit_vjp,
    shown,
    state_grad_form,
    unit_mix,
)
from ._online import BLOCKED_ABOVE, row_blocks, rows_of, update_and_contract
from .base import Grads, StepOutput, output_grads, readout_step

__all__ = ["NetTraceState", "Group", "init", "step", "check_owned", "MODES",
           "eligibility_decay", "as_given"]

# per layer: per-unit traces through the local Jacobian (SnAp-1; exact RTRL for a
# diagonal cell) or the eligibility Jacobian (e-prop); or the dense influence of the
# layer's own parameters, from the cell's structure or from torch.func ("dense_generic")
MODES = ("local", "eligibility", "dense", "dense_generic")


class Plan:
    """Which parameters share a ``Group``, their columns, and the group's tensor viewed as
    rows (not a tuple, so that the state's stamp of version counters does not walk it)."""

    __slots__ = ("names", "cols", "widths", "rows", "dims", "owner", "whole", "slots")

    def __init__(self, names: tuple, cols: tuple, rows: Tensor | None = None) -> None:
        self.names = names  # the parameters, in ``named_parameters`` order
        self.cols = cols  # per parameter: (first column, width P) in the group's tensor
        self.widths = [w for _, w in cols]
        # the tensor is updated and contracted whole (else block by block of rows)
        self.whole = rows is None or rows.numel() * rows.element_size() <= BLOCKED_ABOVE
        self.rows = rows  # the group's X viewed as (B C, G U, P_total); None: not formed
        self.dims = None if rows is None else tuple(rows.shape)
        self.owner = None  # the layer's traces dict these views were handed out in
        self.slots = None  # the gradients' keys and shapes, for one binding (``_slots``)


class Group(NamedTuple):
    """The per-unit traces of a layer's parameters with the same rows per unit (G), side by
    side in one tensor: each parameter's trace is a view of columns of ``X``, so that one
    call updates and one batched GEMM contracts them all (Elman: ``[W_in | W_rec | b_rec]``,
    the presynaptic vector ``[x_t; h_{t-1}; 1]`` as one row)."""

    X: Tensor | None  # (B, C, G, U, P_total); None: not formed (a trace that is its immediate term)
    plan: Plan

    @property
    def names(self) -> tuple:
        return self.plan.names

    @property
    def cols(self) -> tuple:
        return self.plan.cols

    @property
    def rows(self) -> Tensor | None:
        return self.plan.rows


class NetTraceState(NamedTuple):
    h: tuple  # the network's state, one state per layer (as ``shown``: RNN's (B, H) h_t)
    traces: list  # per layer: dict owned parameter name -> M_p (B, C, G, U, P) (views of
    #               ``groups``' tensors); empty for a trace never formed; dense: (B, S_l, N_l)
    feedback: Tensor | None  # (K, H) fixed random feedback; None: W_out (the exact signal)
    c: list | None  # per layer (B, U, C, C): d s_t[., i] / d s_0[., i] along the kept paths;
    #                 dense: (B, S_l, S_l) d s^l_t / d s^l_0. None unless h0 is tracked
    modes: tuple | None = None  # per layer, one of MODES; None: the mode step is called with
    leak: _leak.Traces | None = None  # a leaky readout's filtered traces (kappa > 0)
    groups: list | None = None  # per layer: tuple of Group (None: dense; the list None: to
    #                             be regrouped from ``traces``, as a chunk leaves them)
    h0_tensor: bool = False  # h0 came as a tensor: grads["h0"] goes back as one

    def stamped(self) -> tuple:
        """What the validation's stamp of version counters reads (``base._stamp``): the
        buffers a step updates in place. ``groups`` is left out: a formed group's tensor is
        the base of the views in ``traces`` (one version counter), ``modes`` never change."""
        return (self.traces, self.feedback, self.c, self.leak)


def check_owned(model, who: str) -> None:
    """Every parameter that enters ``step`` must be owned by units (a parameter owned by
    none may enter only ``emit``), every state component per unit."""
    check_real(model)
    model.init_state(1)  # real states only: a clear error before any probe
    for _, cell in model.layers():
        check_units(cell, cell.init_state(1))
        verify_emit_only(cell, who)
        verify_ownership(cell, who)
        _verify_decay(cell, who)
    _leak.check_traces(model, who)


def eligibility_decay(cell) -> float | None:
    """The number c a cell declares as ``eligibility_decay``: its ``eligibility_jacobian``
    is ``c I`` for every example, unit and step (Elman: the leak 1 - alpha). None: not
    declared (the Jacobian is taken from ``linearize`` at every step)."""
    c = getattr(cell, "eligibility_decay", None)
    return None if c is None else float(c)


_decay_verified = None


def _verify_decay(cell, who: str) -> None:
    """A user's cell that declares ``eligibility_decay``: its ``eligibility_jacobian`` must
    be that constant times the identity (checked once per cell, on two probe points)."""
    global _decay_verified
    import weakref

    from ..cells._derive import _probe_points
    from ..cells.base import is_builtin

    c = eligibility_decay(cell)
    if c is None or is_builtin(type(cell)):
        return
    if _decay_verified is None:
        _decay_verified = weakref.WeakKeyDictionary()
    if _decay_verified.get(cell):
        return
    for params, state, x in _probe_points(cell):
        J = cell.linearize(params, state, x, need=("eligibility",)).eligibility
        eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
        err = float((J - c * eye).abs().max())
        if err > (1e-9 if J.dtype == torch.float64 else 1e-5):
            raise ValueError(f"{who}: {type(cell).__name__} declares eligibility_decay = {c}, "
                             f"but its eligibility_jacobian differs from {c} I by {err:.3g}; "
                             "declare eligibility_decay only for a constant Jacobian (or None)")
    _decay_verified[cell] = True


def _plan(cell) -> list[tuple[int, Plan]]:
    """The owned parameters grouped by G, in order: ``[(G, Plan)]``."""
    U = cell.n_units
    blocks = cell.param_blocks()
    by_g: dict = {}
    for name, p in cell.named_parameters():
        G = blocks[name]
        if G is not None:
            by_g.setdefault(G, []).append((name, p.numel() // (G * U)))
    out = []
    for G, members in by_g.items():
        cols, off = [], 0
        for _, P in members:
            cols.append((off, P))
            off += P
        out.append((G, Plan(tuple(n for n, _ in members), tuple(cols))))
    return out


def _never_formed(cell, mode: str, leaky: bool) -> bool:
    """e-prop's trace through a zero eligibility Jacobian is the step's immediate term: kept
    in factored form, never stored (unless a leaky readout filters it)."""
    return mode == "eligibility" and not leaky and eligibility_decay(cell) == 0.0


def _groups(cell, traces: dict, B: int, C: int, U: int, formed: bool, like: Tensor):
    """A layer's groups, and its traces as views of them (``traces``' values copied in; a
    trace missing from it starts at zero)."""
    groups, views = [], {}
    for G, plan in _plan(cell):
        if not formed:
            groups.append(Group(None, plan))
            continue
        X = like.new_zeros(B, C, G, U, sum(w for _, w in plan.cols))
        for n, (a, w) in zip(plan.names, plan.cols):
            views[n] = X.narrow(4, a, w)
            if n in traces:
                views[n].copy_(traces[n])
        groups.append(Group(X, Plan(plan.names, plan.cols, X.view(B * C, G * U, X.shape[4]))))
    order = {n: views[n] for n in (n for n, _ in cell.named_parameters()) if n in views}
    for g in groups:
        g.plan.owner = order
    return tuple(groups), order


def init(model, batch_size: int, h0, feedback: Tensor | None,
         modes: tuple | None = None) -> NetTraceState:
    _leak.check_traces(model, "rtrl(layers='spatial')" if modes and len(modes) > 1
                       else "the per-unit trace rules")
    h0, as_tensor = as_state(model, h0, batch_size)
    h = model.init_state(batch_size) if h0 is None else h0
    leaky = _leak.decay(model) != 0.0
    traces, cs, groups = [], [], []
    for l, ((_, cell), s) in enumerate(zip(model.layers(), h)):
        C, U = len(s), cell.n_units
        ref = s[0]
        if modes is not None and modes[l].startswith("dense"):
            S = sum(int(c.shape[-1]) for c in s)
            N = sum(p.numel() for p in cell.parameters())
            traces.append(ref.new_zeros(batch_size, S, N))
            groups.append(None)
            if h0 is not None:
                cs.append(torch.eye(S, dtype=ref.dtype, device=ref.device)
                          .expand(batch_size, S, S).clone())
            continue
        formed = modes is None or not _never_formed(cell, modes[l], leaky)
        like = next(iter(cell.parameters())).detach()
        grp, tr = _groups(cell, {}, batch_size, C, U, formed, like)
        traces.append(tr)
        groups.append(grp)
        if h0 is not None:
            eye = torch.eye(C, dtype=ref.dtype, device=ref.device)
            cs.append(eye.expand(batch_size, U, C, C).clone())
    leak = None
    if leaky:  # one layer of per-unit traces (check_traces)
        leak = _leak.traces_init(model, traces[0], cs[0] if h0 is not None else None)
    return NetTraceState(shown(model, h), traces, feedback, cs if h0 is not None else None,
                         None if modes is None else tuple(modes), leak, groups, as_tensor)


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


def _rows_signal(q: Tensor, G: int) -> Tensor:
    """q (B, C, U) -> (B C, G U): the signal of every row of a (B C, G U, P) trace view."""
    B, C, U = q.shape
    if G == 1:
        return q.reshape(B * C, U)
    return q.reshape(B * C, 1, U).expand(B * C, G, U).reshape(B * C, G * U)


def _contract(q: Tensor, M: Tensor) -> Tensor:
    """``grad[g, i, j] = sum_b sum_c q[b, c, i] M[b, c, g, i, j]`` (q (B, C, U), M (B, C, G,
    U, P), a view of columns of a group's tensor or a tensor of its own): one batched GEMV
    over the rows ``(g, i)`` (their (B C, P) blocks are strided views, not copies)."""
    B, C, G, U, P = M.shape
    return update_and_contract(M.reshape(B * C, G * U, P), _unchanged, _rows_signal(q, G)) \
        .view(G, U, P)


def _unchanged(X, rows) -> None:
    return None


def _shared_row(imms: list) -> Tensor | None:
    """The group's immediate terms as one factor times one row (B, 1, P_total), when every
    parameter's term is factored with a row shared by the units, no mask, and the same
    factor D (Elman: ``alpha phi'(a_t)`` times ``[x_t; h_{t-1}; 1]``); None otherwise."""
    first = imms[0]
    D = first.D
    rows = []
    for d in imms:
        inp = d.inp
        if inp is None or d.mask is not None or inp.shape[1] != 1 or d.D is not D:
            return None
        rows.append(inp)
    return first.inp if len(rows) == 1 else torch.cat(rows, dim=2)


def _advance(grp: Group, imm: dict, J: Tensor | None, decay: float | None,
             qs: Tensor | None, C: int, U: int) -> Tensor | None:
    """One step of a group's traces, ``M <- J M + I`` in place (``decay``: J = decay I), and
    when the signal qs (B, C U) is given, ``sum_b sum_c q M`` (G U, P_total) of the new M:
    for one component and a shared row (the Elman cell), each block of rows updated (one
    batched outer product, with the decay as its beta) and contracted while in cache."""
    plan = grp.plan
    X3 = plan.rows  # (B C, G U, P)
    BC, GU, P = plan.dims
    G = GU // U
    imms = list(map(imm.__getitem__, plan.names))
    row = _shared_row(imms)
    if qs is None:
        L = None
    elif C == 1 and G == 1:
        L = qs
    else:
        L = _rows_signal(qs.view(-1, C, U), G)
    if row is not None and C == 1:
        Dv = imms[0].D.reshape(BC, GU, 1)
        if plan.whole:  # one block: no closures
            if BC > 1 and torch.compiler.is_compiling():
                # rnngrad.compile: the outer product as one broadcast multiply-add that inductor
                # fuses in place (a baddbmm_ stays an external call into a new buffer, copied
                # back: Elman SnAp-1, B = 16, H = 256 measured 3041 against 653 us a step);
                # at B = 1 baddbmm_ stays (the fused loop was 2x slower at H = 1024)
                if decay is not None:
                    X3.mul_(decay)
                else:
                    X3.mul_(J.reshape(BC, U, 1) if G == 1 else
                            _rows_signal(J.reshape(BC, 1, U), G).unsqueeze(2))
                X3.addcmul_(Dv, row)
            elif decay is not None:
                X3.baddbmm_(Dv, row, beta=decay)
            elif G == 1:
                X3.mul_(J.reshape(BC, U, 1)).baddbmm_(Dv, row)
            else:
                X3.mul_(_rows_signal(J.reshape(BC, 1, U), G).unsqueeze(2)).baddbmm_(Dv, row)
            if L is None:
                return None
            if BC == 1:  # one example: a row scaling
                return (X3 * L.unsqueeze(2)).view(GU, P)
            return torch.bmm(L.T.contiguous().unsqueeze(1), X3.transpose(0, 1)).view(GU, P)
        if decay is not None:
            def update(Xb, rows):
                Xb.baddbmm_(rows_of(Dv, rows), row, beta=decay)
        else:
            scale = J.reshape(BC, U, 1) if G == 1 else \
                _rows_signal(J.reshape(BC, 1, U), G).unsqueeze(2)  # (B, G U, 1)

            def update(Xb, rows):
                Xb.mul_(rows_of(scale, rows)).baddbmm_(rows_of(Dv, rows), row)
        return _update_and_contract(X3, update, L)
    X = grp.X
    B = X.shape[0]
    if row is not None and torch.compiler.is_compiling():
        return _advance_fused(X, imms[0].D, row, J, decay, L, C, G, U, P)
    if decay is not None:
        if decay != 1.0:
            X.mul_(decay)
    else:
        _through_unit(J, X)
    if row is not None:  # several components: one batched outer product per component
        D = imms[0].D
        for c in range(C):
            X[:, c].view(B, GU, P).baddbmm_(D[:, c].reshape(B, GU, 1), row)
    else:
        for (a, w), d in zip(grp.cols, imms):
            M = X.narrow(4, a, w)
            if d.inp is None:
                M.add_(d.D)
            else:
                M.addcmul_(d.D.unsqueeze(-1), d.rows().unsqueeze(1).unsqueeze(1))
    if L is None:
        return None
    return _update_and_contract(X3, _unchanged, L)


def _advance_fused(X: Tensor, D: Tensor, row: Tensor, J: Tensor | None, decay: float | None,
                   L: Tensor | None, C: int, G: int, U: int, P: int) -> Tensor | None:
    """``_advance`` of several components with a shared row, under ``rnngrad.compile``: the
    unit blocks and the outer products as one broadcast expression that inductor fuses into
    one pass over X, copied back (``unit_mix``'s in-place steps and a ``baddbmm_`` per
    component become strided kernels and external calls into new buffers copied back: LSTM
    e-prop at B = 1, H = 64 measured 134-139 us a step against 114 before the group
    layout). One example: the contraction (a row scaling) fused into the same pass; several:
    the batched GEMV of ``_advance`` over the updated X (a reduction over the batch in the
    fused pass measured 1354 against 869 us at B = 16, H = 64)."""
    B = X.shape[0]
    Dv = D.reshape(B, C, G, U, 1)
    rv = row.view(B, 1, 1, P)
    Jb = None if J is None else J.reshape(B, U, C, C)
    Lv = None if L is None else L.reshape(B, C, G, U, 1)
    comps, gm = [], None
    for c in range(C):  # each component a (B, G, U, P) expression of X's components
        acc = Dv[:, c] * rv
        if decay is not None:
            if decay != 0.0:
                acc = acc + X[:, c] * decay
        else:
            for d in range(C):
                acc = acc + Jb[:, :, c, d].reshape(B, 1, U, 1) * X[:, d]
        comps.append(acc)
        if Lv is not None and B == 1:
            gm = acc * Lv[:, c] if gm is None else gm + acc * Lv[:, c]
    X.copy_(torch.stack(comps, 1))
    if L is None:
        return None
    if B == 1:
        return gm.view(G * U, P)
    return torch.bmm(L.T.contiguous().unsqueeze(1), X.view(B * C, G * U, P).transpose(0, 1)) \
        .view(G * U, P)


def _update_and_contract(X: Tensor, update, L: Tensor | None) -> Tensor | None:
    """``_online.update_and_contract`` (the update block by block of rows above its size
    limit, each block contracted in cache), with one example contracted as a row scaling."""
    if L is not None and X.shape[0] == 1 and row_blocks(X) is None:
        update(X, None)
        return (X * L.unsqueeze(2)).view(X.shape[1], X.shape[2])
    return update_and_contract(X, update, L)


def _immediate_only(grp: Group, imm: dict, qs: Tensor, C: int, U: int, params: dict,
                    prefix: str, grads: dict) -> None:
    """``sum_b sum_c q M`` for a trace that is its immediate term (never formed), into
    ``grads``: ``M[b, c, g, i, j] = D[b, c, g, i] inp[b, i or 0, j]``, so with w = sum_c q D
    (B, G U) a parameter whose row is shared by the units takes one GEMM ``w^T inp`` over
    the batch (Elman: ``(q alpha phi')^T [x_t | h_{t-1} | 1]``), never a (B, H, P) tensor.
    ``qs`` (B, C U): the signal on the layer's state."""
    B = qs.shape[0]
    Dw = wT = None  # w^T of the last factor D (the parameters of a group often share it)
    plan = grp.plan
    for name, (key, shape) in zip(plan.names, _slots(plan, prefix, params)):
        d = imm[name]
        inp = d.inp
        if inp is None:
            g = torch.einsum("bci,bcgij->gij", qs.view(B, C, U), d.D)
        else:
            if d.D is not Dw:
                Dw = d.D
                w = _weighted(qs, Dw, C, U)  # (B, G U)
                wT = w.T
            if inp.shape[1] == 1:
                g = torch.mm(wT, inp.reshape(B, -1))  # (G U, P)
                if d.mask is not None:
                    g = g.view(-1, U, g.shape[1]) * d.mask
            else:
                g = torch.einsum("bgi,bij->gij", w.view(B, -1, U), d.rows())
        grads[key] = g if shape is None or g.shape == shape else g.view(shape)


def _weighted(qs: Tensor, D: Tensor, C: int, U: int) -> Tensor:
    """``w[b, g, i] = sum_c q[b, c, i] D[b, c, g, i]`` as (B, G U), from qs (B, C U) and the
    factor D (B, C, G, U)."""
    B = qs.shape[0]
    G = D.shape[2]
    if C == 1:
        if G == 1:
            return D.view(B, U) * qs  # (B, 1, 1, U): a view for any strides
        return (D.reshape(B, G, U) * qs.view(B, 1, U)).view(B, G * U)
    q = qs.view(B, C, U)
    w = D[:, 0] * q[:, 0].unsqueeze(1)
    for c in range(1, C):
        w = w.addcmul_(D[:, c], q[:, c].unsqueeze(1))
    return w.view(B, G * U)


def _current_groups(state: NetTraceState, l: int, cell, C: int, U: int, B: int, leaky: bool,
                    mode: str, decay: float | None):
    """Layer l's groups and traces: the state's, or (a state a chunk left, with traces of
    its own) regrouped from its traces, copied once."""
    traces = state.traces[l]
    if state.groups is not None:
        grp = state.groups[l]
        if grp and grp[0].plan.owner is traces and (grp[0].X is not None or decay == 0.0):
            return grp, traces
    like = next(iter(cell.parameters())).detach()
    return _groups(cell, traces, B, C, U, not _never_formed(cell, mode, leaky), like)


def as_given(model, before: NetTraceState, after: NetTraceState, grads):
    """A state a chunk left (``_sequence.chunk``: the states as tuples, traces of its own)
    in the form ``before`` had: ``rnngrad.RNN``'s h as its tensor, grads["h0"] as h0 came."""
    after = after._replace(h=shown(model, after.h), h0_tensor=before.h0_tensor)
    if grads is not None and isinstance(grads.get("h0"), tuple):
        grads["h0"] = state_grad_form(grads["h0"], before.h0_tensor)
    return after, grads


class _Layer:
    """What a layer's online step takes from its cell and mode alone, not from the step's
    values: derived once per binding (kept in ``Bound.memo``, rebuilt with it)."""

    __slots__ = ("cell", "p", "prefix", "mode", "dense", "generic", "local", "has_decay",
                 "emits", "U", "needs")

    def __init__(self, cell, p: dict, prefix: str, mode: str, l: int) -> None:
        self.cell, self.p, self.prefix, self.mode = cell, p, prefix, mode
        self.dense = mode[0] == "d"  # "dense", "dense_generic"
        self.generic = mode == "dense_generic"
        self.local = mode == "local"
        # a declared constant eligibility Jacobian (its value read at every step)
        self.has_decay = mode == "eligibility" and eligibility_decay(cell) is not None
        self.emits = cell.emits
        self.U = cell.n_units
        jx = ("input_jacobian",) if l else ()
        self.needs = (("immediate",) + jx, ("immediate", mode) + jx)  # [decay is None]


def _layers(model, net, modes: tuple | None, mode: str) -> tuple:
    """``(per-layer _Layer list, flat_state)`` for this binding and modes."""
    key = ("traces", modes if modes is not None else mode)
    got = net.memo.get(key)
    if got is None:
        ms = modes if modes is not None else (mode,) * net.L
        got = ([_Layer(c, p, pre, m, l) for l, (c, p, pre, m)
                in enumerate(zip(net.cells, net.params, net.prefixes, ms))],
               getattr(model, "flat_state", False))
        net.memo[key] = got
    return got


def _slots(plan: Plan, prefix: str, prm: dict) -> list:
    """Per parameter of a group: its gradient's key and, where a (G U, P) block is not its
    shape, that shape (kept on the plan for this binding's parameters)."""
    got = plan.slots
    if got is not None and got[0] is prm and got[1] == prefix:
        return got[2]
    out = []
    for n, (_, w) in zip(plan.names, plan.cols):
        shape = prm[n].shape
        out.append((prefix + n, None if shape == (shape.numel() // w, w) else shape))
    if not torch.compiler.is_compiling():  # a traced step: an attribute set is a guard
        plan.slots = (prm, prefix, out)
    return out


_NO_TERMS: dict = {}  # emit's same-step terms of a cell whose output is its state: none
#                       (read only: ``pop`` of an absent name, ``items``)


def step(model, mode: str, state: NetTraceState, x_t, target_t, mask_t, loss, dh_t):
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return _step(model, mode, state, x_t, target_t, mask_t, loss, dh_t)
    prev = torch.is_grad_enabled()  # no_grad's context manager costs a microsecond a step
    torch._C._set_grad_enabled(False)
    try:
        return _step(model, mode, state, x_t, target_t, mask_t, loss, dh_t)
    finally:
        torch._C._set_grad_enabled(prev)


def _step(model, mode: str, state: NetTraceState, x_t, target_t, mask_t, loss, dh_t):
    net = bind(model)
    lays, flat = _layers(model, net, state.modes, mode)
    leaky = state.leak is not None
    h_prev = (ElmanState(state.h),) if isinstance(state.h, Tensor) else state.h  # unshown
    x = x_t
    B = x_t.shape[0]
    sc, sgroups, straces = state.c, state.groups, state.traces
    states, traces, groups, lins, jxs, cs, ins = [], [], [], [], [], [], []
    for l, lay in enumerate(lays):
        cell, p = lay.cell, lay.p
        tr = straces[l]
        c = None
        if lay.dense:
            new, tr, c, Jx = _dense_layer(cell, p, h_prev[l], x, tr,
                                          None if sc is None else sc[l], lay.generic, l > 0)
            grp = lin = None
        else:
            decay = cell.eligibility_decay if lay.has_decay else None
            lin = cell.linearize(p, h_prev[l], x, need=lay.needs[decay is None])
            new, Jx = lin.state, lin.input_jacobian
            J = None if decay is not None else (lin.local if lay.local else lin.eligibility)
            grp = None if sgroups is None else sgroups[l]
            if not (grp and grp[0].plan.owner is tr and (grp[0].X is not None
                                                         or decay == 0.0)):
                grp, tr = _current_groups(state, l, cell, len(new), lay.U, B, leaky,
                                          lay.mode, decay)
            lin = (lin.immediate, J, decay)
            if sc is not None:
                c = sc[l] * decay if J is None else torch.matmul(J, sc[l])
        traces.append(tr)
        groups.append(grp)
        lins.append(lin)
        jxs.append(Jx)
        cs.append(c)
        states.append(new)
        ins.append(x)
        x = cell.emit(p, new, x) if lay.emits else cell.output(new)
    h = x
    if leaky:  # a leaky readout: Bellec's filtered traces, one layer
        for l in range(net.L):
            if lins[l] is not None:
                for grp in groups[l]:
                    _advance(grp, lins[l][0], lins[l][1], lins[l][2], None, len(states[l]),
                                 net.cells[l].n_units)
        leak, z, value, g, d0, ro = _leak.traces_step(
            model, state.leak, net.cells[0], states[0], traces[0], cs[0], h,
            state.feedback, target_t, mask_t, loss, dh_t)
        grads = None
        if target_t is not None or dh_t is not None:
            grads = {net.prefixes[0] + n: g[n].reshape(v.shape) if n in g
                     else v.new_zeros(v.shape) for n, v in net.params[0].items()}
            grads.update(ro)
            if d0 is not None:
                grads["h0"] = state_grad_form((type(states[0])(*d0.unbind(1)),),
                                              state.h0_tensor)
        new = NetTraceState(shown(model, tuple(states)), traces, state.feedback,
                            cs if state.c is not None else None, state.modes, leak,
                            groups, state.h0_tensor)
        return new, StepOutput(h, z, value), grads
    z, value, dz = readout_step(model, h, target_t, mask_t, loss)
    fb = state.feedback  # no_grad: no graph
    if fb is None:
        fb = model._parameters.get("W_out")  # not nn.Module's __getattr__
        if fb is None:
            fb = model.W_out
    L = None if dz is None else dz @ fb
    if dh_t is not None:
        L = dh_t if L is None else L + dh_t
    grads: Grads | None = None
    if L is None and dz is None:  # no signal: the traces move on, nothing is emitted
        for l in range(net.L):
            if lins[l] is not None:
                for grp in groups[l]:
                    if grp.X is not None:
                        _advance(grp, lins[l][0], lins[l][1], lins[l][2], None, len(states[l]),
                                 net.cells[l].n_units)
    else:
        grads = {}
        nl = len(states)
        d0 = [None] * nl
        g = L  # dL/dh^l_t arriving at layer l's output: the signal, then passed down
        for l in range(nl - 1, -1, -1):
            lay = lays[l]
            cell, s, prm = lay.cell, states[l], lay.p
            C, U = len(s), lay.U
            if g is None:
                dp, qs, dx = _NO_TERMS, None, None
            elif not lay.emits and C == 1 and cell.output(s) is s[0]:
                dp, qs, dx = _NO_TERMS, g, None  # the output is the state: the signal is q
            else:
                dp, qs, dx = emit_vjp(cell, prm, s, ins[l], g)
            if lay.dense:  # a dense layer: q^T M over its own columns
                flat_g = (qs.reshape(1, -1) @ traces[l].reshape(-1, traces[l].shape[2])
                          ).squeeze(0) if qs is not None else None
                off = 0
                for name, v in prm.items():
                    k = v.numel()
                    grads[lay.prefix + name] = (v.new_zeros(v.shape) if flat_g is None
                                                else flat_g[off:off + k].view(v.shape))
                    off += k
            else:
                imm, J, decay = lins[l]
                prefix, done = lay.prefix, 0
                for grp in groups[l]:
                    if grp.X is None:  # never formed: the immediate term alone
                        if qs is not None:
                            _immediate_only(grp, imm, qs, C, U, prm, prefix, grads)
                            done += len(grp.plan.names)
                        continue
                    gm = _advance(grp, imm, J, decay, qs, C, U)
                    if gm is None:
                        continue
                    plan = grp.plan
                    slots = _slots(plan, prefix, prm)
                    # (G U, P) column blocks, views
                    parts = torch.split_with_sizes(gm, plan.widths, 1) \
                        if len(slots) > 1 else (gm,)
                    for (key, shape), t in zip(slots, parts):
                        grads[key] = t if shape is None else t.view(shape)
                    done += len(slots)
                if done < len(prm):
                    for name, v in prm.items():
                        key = prefix + name
                        if key not in grads:  # owned by no unit: emit's term alone
                            d = dp.pop(name, None)
                            grads[key] = v.new_zeros(v.shape) if d is None \
                                else d.reshape(v.shape)
            for name, v in dp.items():  # emit's same-step term, of owned parameters
                gp = grads[lay.prefix + name]
                gp.add_(v.reshape(gp.shape))
            if sc is not None:
                ref = s[0]
                if lay.dense:
                    S = cs[l].shape[1]
                    dc = (ref.new_zeros(ref.shape[0], S) if qs is None else
                          torch.bmm(qs.unsqueeze(1), cs[l]).squeeze(1))
                    d0[l] = unflatten_state(dc, s)
                else:
                    if qs is None:
                        dc = ref.new_zeros(ref.shape[0], C, U)
                    elif C == 1:
                        dc = (qs * cs[l].view(-1, U)).unsqueeze(1)
                    else:
                        dc = torch.einsum("bci,bicd->bdi", qs.view(-1, C, U), cs[l])
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
        if sc is not None:
            grads["h0"] = state_grad_form(tuple(d0), state.h0_tensor)
    new = NetTraceState(states[0].h if flat else tuple(states), traces, state.feedback,
                        cs if sc is not None else None, state.modes, None, groups,
                        state.h0_tensor)
    return new, StepOutput(h, z, value), grads
