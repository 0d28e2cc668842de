"""The leaky readout of ``Network(readout_decay=kappa)`` (Bellec et al. 2020) in every algorithm.

    z_t = kappa z_{t-1} + W_out h_t + b_out,   z_0 = 0,   y_t = g(z_t)

so ``z_t = W_out hf_t + c_t b_out`` with the filtered output and its bias count::

    hf_t = kappa hf_{t-1} + h_t      (B, H)     = d z_t / d W_out (rows)
    c_t  = kappa c_{t-1} + 1         ()         = d z_t / d b_out

What each algorithm does with it (dz_t = dl_t/dz_t, weighted by mask / B):

- BPTT, checkpointed, truncated: the backward filter ``dzbar_t = dz_t + kappa dzbar_{t+1}``
  (from the last step of the segment that is differentiated: within a chunk for TBPTT,
  whose chunks cut the readout's state as they cut the cells'), then
  ``hbar_t = W_out^T dzbar_t``, ``dW_out = sum_t dzbar_t h_t^T``, ``db_out = sum_t dzbar_t``.
  Forward-only passes (checkpointing) use the equal ``sum_t dz_t hf_t^T``, ``sum_t c_t dz_t``.
- RTRL: the filtered influence ``Hf_t = kappa Hf_{t-1} + d h_t / d theta`` (the readout's
  filter is one more linear recurrence), ``grad = sum_t (W_out^T dz_t) . Hf_t``.
- the per-unit trace rules (e-prop, SnAp-1, RFLO): Bellec's filtered eligibility trace,
  ``ebar_t = kappa ebar_{t-1} + e_t`` with ``e_t`` the trace of the unit's output, times
  the unfiltered learning signal ``B dz_t``.
- UORO: the filter's state joins the recurrent state (it is a linear recurrence), so the
  rank-one estimate covers its influence too and stays unbiased.

In every case a reward's ``dh_t`` (``-dR/dh_t``) acts on h_t directly: it pairs with the
unfiltered influence. The readout's state ``z`` is carried by the online algorithms for
the value; the gradient's filters ``hf, c`` restart where an algorithm cuts the state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..readouts import loss_and_grad

__all__ = ["decay", "Leak", "init", "cut", "step", "sequence_readout", "backward_filter",
           "forward_filter"]


def decay(model) -> float:
    """kappa: the model's ``readout_decay`` (0 for rnngrad.RNN and plain readouts)."""
    return float(getattr(model, "readout_decay", 0.0))


class Leak(NamedTuple):
    z: Tensor  # (B, K) z_t, the readout's state: what the next step's value builds on
    hf: Tensor  # (B, H) hf_t since the last cut: d z_t / d W_out
    c: float  # c_t since the last cut: d z_t / d b_out


def init(model, batch_size: int) -> Leak | None:
    """The filter before the first step; None for a plain readout (kappa = 0)."""
    if decay(model) == 0.0:
        return None
    W = model.W_out.detach()
    return Leak(W.new_zeros(batch_size, W.shape[0]), W.new_zeros(batch_size, W.shape[1]), 0.0)


def cut(leak: Leak | None) -> Leak | None:
    """The gradient's filters restart (a cut of the state); the value carries on."""
    if leak is None:
        return None
    return Leak(leak.z, torch.zeros_like(leak.hf), 0.0)


def step(model, leak: Leak, h: Tensor, target_t: Tensor | None, mask_t: Tensor | None,
         loss: str) -> tuple[Leak, Tensor, Tensor, Tensor | None]:
    """One step of the leaky readout: ``(leak_t, z_t (B, K), loss (), dz_t (B, K) or None)``;
    ``leak_t.hf`` and ``leak_t.c`` give the readout's gradients ``dz^T hf``, ``c sum dz``."""
    kappa = decay(model)
    W_out, b_out = model.W_out.detach(), model.b_out.detach()
    z = torch.addmm(b_out, h, W_out.T).add_(leak.z, alpha=kappa)
    new = Leak(z, torch.add(h, leak.hf, alpha=kappa), kappa * leak.c + 1.0)
    if target_t is None:
        return new, z, z.new_zeros(()), None
    B = h.shape[0]
    w = (torch.ones(B, dtype=h.dtype, device=h.device) if mask_t is None else mask_t) / B
    value, dz = loss_and_grad(z, target_t, w, loss=loss, readout_name=model.readout)
    return new, z, value, dz


def sequence_readout(model, hs: Tensor, targets, mask: Tensor, loss: str,
                     z0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Loss, dl/dz (T, B, K) and z_T of a segment's outputs hs (T, B, H) from the readout's
    state z0 (None: zeros)."""
    T, B, H = hs.shape
    kappa = decay(model)
    W_out, b_out = model.W_out.detach(), model.b_out.detach()
    z = torch.addmm(b_out, hs.reshape(T * B, H), W_out.T).view(T, B, -1)
    prev = z0
    for t in range(T):
        if prev is not None:
            z[t].add_(prev, alpha=kappa)
        prev = z[t]
    if targets is None:
        return hs.new_zeros(()), torch.zeros_like(z), z[-1].clone()
    value, dz = loss_and_grad(z, targets, mask / B, loss=loss, readout_name=model.readout)
    return value, dz, z[-1].clone()


def backward_filter(dz: Tensor, kappa: float) -> Tensor:
    """``dzbar_t = dz_t + kappa dzbar_{t+1}`` over a segment (T, B, K), from its last step;
    dz itself when kappa = 0."""
    if kappa == 0.0:
        return dz
    out = dz.clone()
    for t in range(dz.shape[0] - 2, -1, -1):
        out[t].add_(out[t + 1], alpha=kappa)
    return out


def forward_filter(hs: Tensor, kappa: float, hf0: Tensor | None = None, c0: float = 0.0):
    """``hf_t = kappa hf_{t-1} + h_t`` (T, B, H) and ``c_t = kappa c_{t-1} + 1`` (T,) over a
    segment from ``(hf0, c0)``; hs itself and ones when kappa = 0."""
    T = hs.shape[0]
    if kappa == 0.0:
        return hs, hs.new_ones(T)
    hf = hs.clone()
    c = []
    prev, cp = hf0, c0
    for t in range(T):
        if prev is not None:
            hf[t].add_(prev, alpha=kappa)
        prev = hf[t]
        cp = kappa * cp + 1.0
        c.append(cp)
    return hf, hs.new_tensor(c)


def _readout_grads(leak: Leak, dz: Tensor | None, model) -> dict[str, Tensor]:
    """The exact readout gradients at a step: ``dz^T hf`` and ``c sum_b dz``."""
    if dz is None:
        return {"W_out": torch.zeros_like(model.W_out.detach()),
                "b_out": torch.zeros_like(model.b_out.detach())}
    return {"W_out": dz.T @ leak.hf, "b_out": leak.c * dz.sum(0)}


# ---- RTRL: the filtered influence ---------------------------------------------------------


class Influence(NamedTuple):
    readout: Leak
    Hf: Tensor  # (B, H, N) sum_s kappa^{t-s} d h^L_s / d theta
    Gf: Tensor | None  # (B, H, S) the same for d h^L_s / d s_0; None unless h0 is tracked


def influence_init(model, batch_size: int, N: int, S: int | None) -> Influence | None:
    leak = init(model, batch_size)
    if leak is None:
        return None
    H = leak.hf.shape[1]
    Gf = None if S is None else leak.hf.new_zeros(batch_size, H, S)
    return Influence(leak, leak.hf.new_zeros(batch_size, H, N), Gf)


def influence_step(model, inf: Influence, h: Tensor, Mh: Tensor, Gh: Tensor | None,
                   target_t, mask_t, loss: str, dh_t: Tensor | None):
    """RTRL's signal with a leaky readout. ``Mh`` (B, H, N) = d h^L_t / d theta, ``Gh``
    (B, H, S) = d h^L_t / d s_0. Returns ``(inf_t, z, loss, flat (N,), d0 (B, S) or None,
    readout grads)``: ``flat = sum_b (W_out^T dz_t) Hf_t + dh_t Mh``."""
    kappa = decay(model)
    readout, z, value, dz = step(model, inf.readout, h, target_t, mask_t, loss)
    Hf = Mh.add(inf.Hf, alpha=kappa)
    Gf = None if Gh is None else Gh.add(inf.Gf, alpha=kappa)
    B, H, N = Hf.shape
    flat = Hf.new_zeros(N)
    d0 = None if Gf is None else Gf.new_zeros(B, Gf.shape[2])
    for q, Mq, Gq in ((None if dz is None else dz @ model.W_out.detach(), Hf, Gf),
                      (dh_t, Mh, Gh)):  # a reward acts on h_t itself: unfiltered
        if q is None:
            continue
        flat += (q.reshape(1, B * H) @ Mq.reshape(B * H, N)).squeeze(0)
        if d0 is not None:
            d0 += torch.bmm(q.unsqueeze(1), Gq).squeeze(1)
    new = Influence(readout, Hf, Gf)
    return new, z, value, flat, d0, _readout_grads(readout, dz, model)


# ---- the per-unit trace rules: Bellec's filtered eligibility traces --------------------------


class Traces(NamedTuple):
    readout: Leak
    E: dict  # own parameter name -> (B, G, U, P) sum_s kappa^{t-s} e_s, e = d h_i / d p[g, i, j]
    cf: Tensor | None  # (B, U, C) the same for d h_i / d s_0[., i]; None unless h0 is tracked


_unit_local: object = None


def check_traces(model, who: str) -> None:
    """A leaky readout with per-unit traces: one layer whose output is ``output(state)``,
    unit by unit (h_i a function of unit i's state), checked once per cell."""
    global _unit_local
    if decay(model) == 0.0:
        return
    layers = model.layers()
    if len(layers) != 1:
        raise ValueError(
            f"{who} with a leaky readout (readout_decay = {decay(model):g}) is defined for one "
            f"layer; this network has {len(layers)}: the readout's filter of a lower layer's "
            "same-step signal does not factor per unit (it would need an (H x |params|) trace "
            "per example). Use bptt(), rtrl() or uoro(), or readout_decay = 0")
    cell = layers[0][1]
    if cell.emits:
        raise ValueError(
            f"{who} with a leaky readout needs a cell whose output is output(state); "
            f"{type(cell).__name__} writes emit(params, state, x), whose own parameters would "
            "need a filtered (H x |params|) trace. Use bptt(), rtrl(generic=True) or uoro()")
    import weakref

    if _unit_local is None:
        _unit_local = weakref.WeakKeyDictionary()
    if _unit_local.get(cell):
        return
    from torch.func import jacrev, vmap

    from ..cells.base import unflatten_state

    g = torch.Generator().manual_seed(0)
    like = cell.init_state(2)
    s = torch.randn(2, sum(int(c.shape[-1]) for c in like), generator=g,
                    dtype=like[0].dtype).to(like[0].device)
    J = vmap(jacrev(lambda v: cell.output(unflatten_state(v.unsqueeze(0), like)).squeeze(0)))(s)
    H, U, C = J.shape[1], cell.n_units, len(like)
    ok = H == U
    if ok:
        off = J.reshape(2, H, C, U).clone()
        off.diagonal(dim1=1, dim2=3).zero_()
        ok = float(off.abs().max()) == 0.0
    if not ok:
        raise ValueError(
            f"{who} with a leaky readout filters each unit's output trace, but the output of "
            f"{type(cell).__name__} is not unit by unit (output i depends on other units' "
            "state, or the output width differs from n_units). Use bptt(), rtrl() or uoro()")
    _unit_local[cell] = True


def traces_init(model, traces: dict, c0) -> Traces | None:
    leak = init(model, next(iter(traces.values())).shape[0] if traces else 1)
    if leak is None:
        return None
    E = {n: M.new_zeros(M.shape[0], *M.shape[2:]) for n, M in traces.items()}
    cf = None if c0 is None else c0.new_zeros(c0.shape[:3])
    return Traces(leak, E, cf)


def _output_derivative(cell, state) -> Tensor:
    """(B, C, U): ``d h_i / d s[c, i]`` for an output that is unit by unit (checked):
    the vjp of ``output`` at a cotangent of ones (one-hot for a state component)."""
    from ._network import output_into_state

    ref = state[0]
    ones = ref.new_ones(ref.shape[0], cell.hidden_size)
    return output_into_state(cell, state, ones).view(ref.shape[0], len(state), -1)


def traces_step(model, tr: Traces, cell, state, traces: dict, c: Tensor | None, h: Tensor,
                feedback: Tensor | None, target_t, mask_t, loss: str, dh_t: Tensor | None):
    """The trace rules' signal with a leaky readout, one layer: the trace of each unit's
    output ``e_p = sum_c dh_i/ds[c, i] M_p[c]``, filtered ``ebar_p <- kappa ebar_p + e_p``,
    and ``grad p = sum_b L_t ebar_p`` with ``L_t = B dz_t`` (Bellec's filtered eligibility
    trace), plus a reward's ``dh_t`` on the unfiltered ``e_p``. The filters are updated in
    place. Returns ``(tr_t, z, loss, grads (own names), d0 (B, C, U) or None, readout
    grads)``."""
    kappa = decay(model)
    readout, z, value, dz = step(model, tr.readout, h, target_t, mask_t, loss)
    Dout = _output_derivative(cell, state)  # (B, C, U)
    B, C, U = Dout.shape
    fb = model.W_out.detach() if feedback is None else feedback
    L = None if dz is None else dz @ fb
    if L is not None and mask_t is not None and not bool(mask_t.any()):
        L = None  # a step that does not count (most of a trial before its recall window)
    grads = {}
    # components the output does not read (a refractory counter) add nothing: skipped
    live = [k for k, on in enumerate(Dout.ne(0).any(2).any(0).tolist()) if on] or [0]
    for n, M in traces.items():
        e = M[:, live[0]] * Dout[:, live[0]].view(B, 1, U, 1)  # (B, G, U, P): the output's trace
        for k in live[1:]:
            e.addcmul_(M[:, k], Dout[:, k].view(B, 1, U, 1))
        E = tr.E[n].mul_(kappa).add_(e)
        g = M.new_zeros(M.shape[2:])
        for q, trace in ((L, E), (dh_t, e)):  # a reward acts on h_t itself: unfiltered
            if q is not None:
                g += torch.einsum("bi,bgij->gij", q, trace)
        grads[n] = g
    cf = d0 = None
    if c is not None:  # d h_i / d s_0[d, i] along the kept paths, filtered the same way
        e0 = torch.einsum("bci,bicd->bid", Dout, c)
        cf = tr.cf.mul_(kappa).add_(e0)
        d0 = Dout.new_zeros(B, C, U)
        for q, trace in ((L, cf), (dh_t, e0)):
            if q is not None:
                d0 += (q.unsqueeze(2) * trace).transpose(1, 2)
    return Traces(readout, tr.E, cf), z, value, grads, d0, _readout_grads(readout, dz, model)


# ---- UORO: the filter joins the state ---------------------------------------------------------


def augment(F, top_output, kappa: float, S: int):
    """``F'(params, [s; r], x) = [F(params, s, x); kappa r + h(F(params, s, x))]``: the flat
    step with the readout's filter r (B, H) appended to the state (B, S)."""

    def F2(params, s2, x):
        s_new = F(params, s2[..., :S], x)
        return torch.cat([s_new, kappa * s2[..., S:] + top_output(params, s_new, x)], -1)

    return F2


def uoro_signal(model, leak: Leak, h: Tensor, h_tilde: Tensor, S: int, top_vjp,
                target_t, mask_t, loss: str, dh_t: Tensor | None):
    """UORO's ``sum_b (q_t . h~_t)`` over the augmented state: the readout's signal
    ``W_out^T dz_t`` on the filter's block, a reward's ``dh_t`` through the stack's output
    onto the cells' block (``top_vjp(dh) -> (direct param grads, (B, S))``). Returns
    ``(leak_t, z, loss, c (B,) or None, direct or None, readout grads)``."""
    readout, z, value, dz = step(model, leak, h, target_t, mask_t, loss)
    c = direct = None
    if dz is not None:
        c = ((dz @ model.W_out.detach()) * h_tilde[:, S:]).sum(1)
    if dh_t is not None:
        direct, top = top_vjp(dh_t)
        cd = (top * h_tilde[:, :S]).sum(1)
        c = cd if c is None else c + cd
    return readout, z, value, c, direct, _readout_grads(readout, dz, model)
