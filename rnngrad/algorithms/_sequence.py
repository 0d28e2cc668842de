"""The truncated rules in sequence form: the adjoint of their forward recursion.

Every per-unit trace rule of ``_traces_network`` (e-prop, RFLO, SnAp-1, RTRL on a
diagonal cell, Zucchet et al.'s spatial RTRL) is a forward recursion, linear in its
trace, whose transition is block-diagonal over units (DESIGN.md, "One engine")::

    M_t = D_t M_{t-1} + I_t      D_t (B, U, C, C): what the rule keeps of d s_t / d s_{t-1}
    g   = sum_t q_t^T M_t        q_t (B, C, U): the rule's signal on the state at step t

(``D_t``: ``local_jacobian`` for SnAp-1 and diagonal RTRL, ``eligibility_jacobian`` for
e-prop and RFLO; ``I_t``: the cell's ``immediate`` term.) With the weights fixed over
the sequence the double sum reorders into reverse mode::

    lambda_t = q_t + D_{t+1}^T lambda_{t+1},   lambda_{T+1} = 0      O(B U C^2) a step
    g        = sum_t lambda_t^T I_t,           dL/ds_0 = D_1^T lambda_1

and since ``I_t`` on gate g's rows is ``D_imm[t, b, c, g, i] inp[t, b, j]``, g is one GEMM
``(sum_c lambda D_imm)^T inp`` per parameter over the stacked (T B) rows: BPTT's shape,
without BPTT's ``W_rec^T`` product per step. Everything but the lambda recursion is
computed on the stacked rows at once: the cell's ``linearize`` (and ``emit_vjp``) are
batched functions, so the states of every step, stacked as (T B) rows, go through them
in one call; a cell that declares nothing gets them from ``torch.func`` the same way.

The signal is what the online steps use: the top layer's ``L_t = B dl_t/dz_t (+ dh_t)``
(``B = W_out^T`` or a fixed random matrix) through ``emit``'s vjp onto the state, a lower
layer's the same step's signal passed down through ``d s^l_t / d h^{l-1}_t`` (one vjp of
``step`` over the stacked rows). A leaky readout (``readout_decay`` kappa) filters the
signal backwards, ``Lbar_t = L_t + kappa Lbar_{t+1}``: the adjoint of Bellec et al.'s
filtered eligibility trace ``ebar_t = kappa ebar_{t-1} + e_t``. A layer that spatial RTRL
keeps dense (its units couple) is exact BPTT within the layer, its input held fixed: the
cell's ``backward_sequence`` with the passed-down signal as the output's cotangent.

A chunk of k steps with the trace ``M_{t0}`` carried in (``run``)::

    g_chunk = sum_t lambda_t^T I_t + (D_{t0+1}^T lambda_{t0+1})^T M_{t0}
    M_{t1}  = Pi_{t0+1..t1} M_{t0} + sum_t Pi_{t+1..t1} I_t    Pi: products of D, per unit

the second a scaled copy of ``M_{t0}`` and one batched GEMM over the chunk's steps.
Every form is tested equal to the online steps' sum (float64, 1e-10,
tests/test_sequence_forms.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import vjp

from ..cells._derive import declares
from ..cells.base import flatten_state
from ..readouts import reward_grad
from . import _leaky_readout as _leak
from ._network import bind, emit_vjp
from .base import Grads, output_grads

__all__ = ["sequence", "chunk", "trajectory_states"]


def trajectory_states(cell, params: dict, inputs: Tensor, s0) -> tuple[Any, Any, Tensor]:
    """A layer over the segment: ``(prev, new, outputs)``, prev and new the states before
    and after each step as states of (T, B, n_c) components, outputs (T, B, H).

    (A cell that declares ``linearize_sequence(params, inputs, s0, need=...) -> (prev, new,
    outputs, Linearization on the (T B) rows)`` gives the forward and the linearization
    together: the LSTM's from the gates its forward keeps. ``sequence`` adds to ``need``
    "weigh" (the immediate terms may come as ``Immediate.weigh``, D never built) and
    "emit_vjp": the cell may then return a fifth item, ``emit_vjp`` on the (T B) rows from
    what its forward kept, a function g (T B, H) -> ``(d_params, d_state (T B, S), d_x or
    None)``: the spiking cells' slopes, the LRU's output layer.)
    A cell may declare ``forward_states(params, inputs, s0) -> (state of (T + 1, B, n_c)
    components, outputs (T, B, H))`` (LSTM, LIF/ALIF: their fast forward, keeping every
    state); a cell whose state is its output (Elman, GRU) runs its own ``forward_sequence``
    (one GEMM for the inputs of every step); any other steps ``step``."""
    T = inputs.shape[0]
    declared = getattr(cell, "forward_states", None)
    if declared is not None:  # the cell's own whole-sequence forward, keeping its states
        full, out = declared(params, inputs, s0)  # components (T + 1, B, n_c)
        return type(s0)(*(f[:-1] for f in full)), type(s0)(*(f[1:] for f in full)), out
    if len(s0) == 1 and not cell.emits and cell.output(s0) is s0[0]:
        hs, _, _ = cell.forward_sequence(params, inputs, s0, cache=False)
        prev = torch.cat((s0[0].unsqueeze(0), hs[:-1]))
        return type(s0)(prev), type(s0)(hs), hs
    comps: list[list[Tensor]] = [[c] for c in s0]
    s = s0
    for t in range(T):
        s = cell.step(params, s, inputs[t])
        for k, c in enumerate(s):
            comps[k].append(c)
    full = [torch.stack(c) for c in comps]  # (T + 1, B, n_c)
    prev = type(s0)(*(f[:-1] for f in full))
    new = type(s0)(*(f[1:] for f in full))
    if cell.emits:
        B = inputs.shape[1]
        out = cell.emit(params, _rows(new), inputs.reshape(T * B, -1)).view(T, B, -1)
    else:
        out = cell.output(new)
    return prev, new, out


def _rows(state) -> Any:
    """A state of (T, B, n) components -> the same state of (T B, n) rows."""
    return type(state)(*(c.reshape(-1, c.shape[-1]) for c in state))


def _transpose_apply(J: Tensor, lam: Tensor) -> Tensor:
    """``out[b, d, i] = sum_c J[b, i, c, d] lam[b, c, i]``: D^T lambda per unit (J (B, U, C, C),
    lam (B, C, U)) -> (B, C, U)."""
    B, U, C, _ = J.shape
    if C == 1:
        return J.view(B, 1, U) * lam
    return (J.permute(0, 3, 2, 1) * lam.unsqueeze(1)).sum(2)


def _adjoint(Js: Tensor, q: Tensor, lam_end: Tensor | None = None, zeros=(),
             owned: bool = False) -> Tensor:
    """``lambda_t = q_t + D_{t+1}^T lambda_{t+1}`` backwards over the segment: Js (T, B, U, C, C)
    with Js[t] the step-t transition, q (T, B, C, U); ``lam_end`` is ``D_{T+1}^T lambda_{T+1}``
    arriving from after the segment (None: zero); ``zeros`` the block entries (c, d) that
    the cell declares zero at every step (``block_zeros``), skipped. Returns lambda
    (T, B, C, U), a new tensor (q itself where every entry is declared zero: only read;
    written over q where the caller ``owned`` it)."""
    T = q.shape[0]
    B, U, C, _ = Js.shape[1:]
    if lam_end is None and len(zeros) == C * C:  # nothing carries lambda back: q itself
        return q
    lam = q if owned else q.clone()
    if lam_end is not None:
        lam[T - 1] += lam_end
    if C == 1:
        Jv = Js.view(T, B, 1, U)
        for t in range(T - 2, -1, -1):
            lam[t].addcmul_(Jv[t + 1], lam[t + 1])
        return lam
    # the blocks' entries as contiguous (T, B, U) tensors (a view where the cell built them
    # so, one copy otherwise); the entries declared zero (e-prop's held-fixed paths) are
    # skipped: at most C^2 fused multiply-adds a step on (B, U) rows
    Je = Js.permute(3, 4, 0, 1, 2)
    # (a block shared over steps or examples stays a view)
    if 0 not in Je.stride()[2:] and Je.stride()[2:] != (B * U, U, 1):
        Je = Je.contiguous()
    terms = [(c, d, Je[c, d].unbind(0)) for d in range(C) for c in range(C)
             if (c, d) not in zeros]
    lams = [lam[:, :, c].unbind(0) for c in range(C)]
    for t in range(T - 2, -1, -1):
        for c, d, J in terms:
            lams[d][t].addcmul_(J[t + 1], lams[c][t + 1])
    return lam


def _weighted(lam: Tensor, D: Tensor) -> Tensor:
    """``w[n, g, i] = sum_c lam[n, c, i] D[n, c, g, i]`` (lam (N, C, U), D (N, C, G, U))."""
    C = D.shape[1]
    w = D[:, 0] * lam[:, 0].unsqueeze(1)
    for c in range(1, C):  # no (N, C, G, U) temporary
        w.addcmul_(D[:, c], lam[:, c].unsqueeze(1))
    return w


def _param_grad(lam: Tensor, imm, shape, memo: dict) -> Tensor:
    """``sum_n lam_n^T I_n`` for one parameter viewed as (G, U, P): one GEMM over the stacked
    rows where the immediate term factors with a shared input row. ``memo`` keeps the
    weighted signal of a factor D that several parameters share (a gate's W, U and b)."""
    if imm.inp is None:  # dense (N, C, G, U, P)
        return torch.einsum("nci,ncgij->gij", lam, imm.D).reshape(shape)
    src = imm.D if imm.weigh is None else imm.weigh
    key = (id(src), id(imm.inp), id(imm.mask))  # two biases of one gate: one product
    if key in memo:
        return memo[key].reshape(shape)
    memo[key] = g = _factored_grad(lam, imm, memo)
    return g.reshape(shape)


def _factored_grad(lam: Tensor, imm, memo: dict) -> Tensor:
    src = imm.D if imm.weigh is None else imm.weigh
    w = memo.get(id(src))
    if w is None:  # (N, G, U)
        w = memo[id(src)] = _weighted(lam, imm.D) if imm.weigh is None else imm.weigh(lam)
    N, G, U = w.shape
    inp = imm.inp
    if inp.shape[1] == 1:
        P = inp.shape[2]
        if P == 1:  # a bias: ones
            g = (w.reshape(N, G * U).T @ inp.reshape(N)).view(G, U, 1)
        else:
            g = (w.reshape(N, G * U).T @ inp.reshape(N, P)).view(G, U, P)
        return g if imm.mask is None else g * imm.mask
    return torch.einsum("ngi,nij->gij", w, imm.rows())


def _carry_traces(Js: Tensor, imm: dict, M0: dict, T: int, B: int) -> dict:
    """``M_{t1} = Pi_{t0+1..t1} M_{t0} + sum_t Pi_{t+1..t1} I_t`` per parameter (M (B, C, G,
    U, P)): the running products of the per-unit blocks from the chunk's end, applied to
    every step's immediate term, summed over the steps by one batched GEMM."""
    U, C = Js.shape[2], Js.shape[3]
    eye = torch.eye(C, dtype=Js.dtype, device=Js.device)
    Pi = [None] * T  # Pi[t] = Pi_{t+1..t1} (B, U, C, C)
    cur = eye.expand(B, U, C, C)
    for t in range(T - 1, -1, -1):
        Pi[t] = cur
        cur = cur @ Js[t] if C > 1 else cur * Js[t]
    Pall = cur  # Pi_{t0+1..t1}
    Pis = torch.stack(Pi)  # (T, B, U, C, C)
    out = {}
    for name, M in M0.items():
        d = imm[name]
        G, P = M.shape[2], M.shape[4]
        # scaled copy of the carried trace: Pall applied per unit
        new = torch.einsum("bicd,bdgij->bcgij", Pall, M) if C > 1 else \
            M * Pall.view(B, 1, 1, U, 1)
        Dimm = d.D.reshape(T, B, C, G, U) if d.inp is not None else d.D.reshape(T, B, C, G, U, P)
        # R[t, b, c, g, i] = sum_d Pi_t[b, i, c, d] D_imm[t, b, d, g, i]
        R = torch.einsum("tbicd,tbdgi->tbcgi", Pis, Dimm) if d.inp is not None else \
            torch.einsum("tbicd,tbdgij->tbcgij", Pis, Dimm)
        if d.inp is None:
            new += R.sum(0)
        elif d.inp.shape[1] == 1:
            inp = d.inp.reshape(T, B, P)
            # per example: (C G U, T) x (T, P), batched over b
            add = torch.bmm(R.permute(1, 2, 3, 4, 0).reshape(B, C * G * U, T),
                            inp.transpose(0, 1)).view(B, C, G, U, P)
            new += add if d.mask is None else add * d.mask
        else:
            inp = d.rows().reshape(T, B, U, P)
            new += torch.einsum("tbcgi,tbij->bcgij", R, inp)
        out[name] = new
    return out


# A layer that declares no linearization gets it from torch.func over all (T B) rows at
# once, a (T B, S, S) Jacobian: past this many numbers the step loop (B rows at a time)
# is faster and fits in memory (benchmarks/indrnn_example.md: an undeclared IndRNN at
# H = 256, T = 200, B = 64 took 156x BPTT in sequence form against 56x stepping).
DERIVED_LIMIT = 1 << 26


def _derived_too_large(model, modes: tuple, h0, T: int, B: int) -> bool:
    """True when some layer's undeclared linearization would exceed ``DERIVED_LIMIT``."""
    net_layers = [c for _, c in model.layers()]
    for cell, s0, mode in zip(net_layers, h0, modes):
        if mode.startswith("dense") or hasattr(cell, "linearize_sequence"):
            continue
        field = "local" if mode == "local" else "eligibility"
        if declares(cell, field) and declares(cell, "immediate"):
            continue
        S = sum(t.shape[-1] for t in (s0 if isinstance(s0, tuple) else (s0,)))
        if T * B * S * S > DERIVED_LIMIT:
            return True
    return False


def sequence(model, modes: tuple, feedback: Tensor | None, inputs: Tensor, targets, mask: Tensor,
             h0, loss: str, reward, *, dh: Tensor | None = None, carry=None):
    """The rule's gradient over the segment (weights fixed), as its online steps emit it.

    ``modes`` per layer: "local" (SnAp-1, diagonal RTRL), "eligibility" (e-prop, RFLO),
    "dense" / "dense_generic" (spatial RTRL's layer whose units couple). ``feedback`` (K, H)
    or None for ``W_out``. ``h0``: per-layer states.
    ``carry``: for a chunk, ``(traces, c, leak_z)`` of the online state at the chunk's
    start (see ``chunk``); then returns also what the state carries out.

    Returns ``(loss, grads)`` (``grads["h0"]`` per layer), or with
    ``carry`` ``(loss, grads, states_T, traces_T, c_T, out)``; None (without ``carry``) to
    leave a large undeclared layer to the step loop (``DERIVED_LIMIT``).
    """
    if isinstance(h0, Tensor):  # one Elman layer's h (rnngrad.RNN's flat form)
        from ..cells.elman import ElmanState

        h0 = (ElmanState(h0),)
    T, B, _ = inputs.shape
    if carry is None and _derived_too_large(model, modes, h0, T, B):
        return None
    with torch.no_grad():
        net = bind(model)
        x = inputs
        layers = []  # per layer: (prev, new, inputs, linearization or None)
        for cell, p, s0, mode in zip(net.cells, net.params, h0, modes):
            both = getattr(cell, "linearize_sequence", None)
            if both is not None and not mode.startswith("dense"):  # declared: forward + lin
                # a whole segment: the immediate term is only ever weighed by lambda
                need = (mode, "immediate") if carry is not None else (mode, "immediate", "weigh")
                res = both(p, x, s0, need=(*need, "emit_vjp"))
                (prev, new, out, lin), ovjp = res[:4], (res[4] if len(res) > 4 else None)
            else:
                (prev, new, out), lin, ovjp = trajectory_states(cell, p, x, s0), None, None
            layers.append((prev, new, x, lin, ovjp))
            x = out
        hs = x  # (T, B, H) the top layer's outputs
        H = hs.shape[2]
        kappa = _leak.decay(model)
        z0 = None if carry is None else carry[2]
        if targets is None:
            value, dz = hs.new_zeros(()), None
            zT = None
        else:
            value, dz, zT = _leak.sequence_readout(model, hs, targets, mask, loss, z0)
            dz = _leak.backward_filter(dz, kappa)
        W_out = model.W_out.detach()
        fb = W_out if feedback is None else feedback
        sig = None if dz is None else dz @ fb
        if reward is not None:
            R, dR = reward_grad(reward, hs)
            value = value - R
            dh = -dR if dh is None else dh - dR
        if dh is not None:
            sig = dh.clone() if sig is None else sig + dh
        grads: Grads = {}
        d0: list = [None] * net.L
        traces_out: list = [None] * net.L
        c_out: list = [None] * net.L
        g = None if sig is None else sig.reshape(T * B, H)  # dL/dh^l rows of layer l's output
        for l in range(net.L - 1, -1, -1):
            cell, p = net.cells[l], net.params[l]
            prev, new, X, lin, ovjp = layers[l]
            mode = modes[l]
            Xr = X.reshape(T * B, -1)
            pr, nr = _rows(prev), _rows(new)
            C, U = len(new), cell.n_units
            if g is None:  # no signal reaches this layer
                dp, qs, dx = {}, None, None
            elif ovjp is not None:  # from what the cell's forward kept
                dp, qs, dx = ovjp(g)
            elif not cell.emits and hasattr(cell, "output_vjp"):  # declared in closed form
                dp, qs, dx = {}, cell.output_vjp(nr, g), None
            else:
                dp, qs, dx = emit_vjp(cell, p, nr, Xr, g)
            if mode.startswith("dense"):
                if carry is not None:
                    raise ValueError("a chunk of spatial RTRL with a dense layer has no closed "
                                     "form here")
                gl, ds0 = _dense_layer(cell, p, X, h0[l], g, T, B)
                dp = {}  # backward_sequence's gradient holds emit's own term already
                for name, v in p.items():
                    grads[net.prefixes[l] + name] = gl[name].reshape(v.shape) if name in gl \
                        else v.new_zeros(v.shape)
                d0[l] = ds0
            else:
                if lin is None:  # every step's linearization at once, on the (T B) rows
                    lin = cell.linearize(p, pr, Xr, need=(mode, "immediate"))
                J = (lin.local if mode == "local" else lin.eligibility)
                Js = J.reshape(T, B, U, C, C)
                tr0 = None if carry is None else carry[0][l]
                if qs is None:
                    lam = None
                else:
                    declared = getattr(cell, "block_zeros", None)
                    zeros = () if declared is None else declared(mode, C)
                    # the signal from the cell's own emit_vjp, not passed down: lambda
                    # may take its place
                    lam = _adjoint(Js, qs.view(T, B, C, U), zeros=zeros,
                                   owned=ovjp is not None and l == 0)
                memo: dict = {}
                for name, v in p.items():
                    imm = lin.immediate.get(name)
                    if imm is None or lam is None:
                        gp = v.new_zeros(v.shape)
                    else:
                        gp = _param_grad(lam.view(T * B, C, U), imm, v.shape, memo)
                    if tr0 is not None and lam is not None and name in tr0:
                        w0 = _transpose_apply(Js[0], lam[0])  # (B, C, U)
                        gp = gp + _contract(w0, tr0[name]).reshape(v.shape)
                    grads[net.prefixes[l] + name] = gp
                s0 = h0[l]
                if lam is None:
                    d0[l] = type(s0)(*(torch.zeros_like(c) for c in s0))
                else:
                    dc = _transpose_apply(Js[0], lam[0])  # (B, C, U): D_1^T lambda_1
                    if carry is not None and carry[1] is not None:
                        dc = torch.einsum("bci,bicd->bdi", dc, carry[1][l])
                    d0[l] = type(s0)(*dc.unbind(1))
                if carry is not None:
                    traces_out[l] = _carry_traces(Js, lin.immediate, tr0, T, B)
                    if carry[1] is not None:
                        Pall = carry[1][l]
                        for t in range(T):
                            Pall = Js[t] @ Pall if C > 1 else Js[t] * Pall
                        c_out[l] = Pall
            for name, v in dp.items():  # emit's same-step term
                key = net.prefixes[l] + name
                grads[key] = grads[key] + v.reshape(grads[key].shape)
            if l > 0:  # the same step's error, passed down: (d s_t / d x_t)^T q_t (+ dx)
                if qs is None:
                    g = None if dx is None else dx
                else:
                    _, fn = vjp(lambda xx, cell=cell, p=p, pr=pr:
                                flatten_state(cell.step(p, pr, xx)), Xr)
                    (gx,) = fn(qs)
                    g = gx if dx is None else gx + dx
        if dz is None:
            grads["W_out"] = torch.zeros_like(W_out)
            grads["b_out"] = torch.zeros_like(model.b_out.detach())
        else:
            grads.update(output_grads(dz.reshape(T * B, -1), hs.reshape(T * B, H)))
        grads["h0"] = tuple(d0)
    if carry is None:
        return value, grads
    states_T = tuple(type(new)(*(c[-1] for c in new)) for _, new, _, _, _ in layers)
    return value, grads, states_T, traces_out, c_out if carry[1] is not None else None, (hs, zT)


def _contract(q: Tensor, M: Tensor) -> Tensor:
    from ._traces_network import _contract as contract

    return contract(q, M)


def _dense_layer(cell, p, X: Tensor, s0, g: Tensor | None, T: int, B: int):
    """Exact BPTT within one layer, its input held fixed: the layer's own gradient with
    ``g`` (T B, H) the cotangent of its outputs, and ``dL/ds_0``."""
    _, _, cache = cell.forward_sequence(p, X, s0, cache=True)
    d_out = X.new_zeros(T, B, cell.hidden_size) if g is None else g.view(T, B, -1)
    grads, _, ds0 = cell.backward_sequence(p, X, s0, cache, d_out, None, input_grad=False)
    return grads, ds0


def chunk(model, state, inputs: Tensor, targets, mask: Tensor, loss: str, dh: Tensor | None):
    """k steps of a per-unit trace rule in closed form from its online state (a
    ``NetTraceState``, weights fixed over the chunk): ``(state_after, (h (k, B, H),
    z_T), loss, grads)``, the grads the sum of what the k steps emit."""
    from ._traces_network import NetTraceState

    modes = state.modes
    carry = (state.traces, state.c, None)
    value, grads, sT, traces, c, (hs, _) = sequence(
        model, modes, state.feedback, inputs, targets, mask, state.h, loss, None, dh=dh,
        carry=carry)
    if state.c is None:
        grads.pop("h0", None)
    new = NetTraceState(sT, traces, state.feedback, c, state.modes, None)
    return new, hs, value, grads
