"""UORO over a whole sequence with fixed weights, at about BPTT's cost: theta~ is never
formed; it stays a weighted sum of the step's rank-one terms.

The online recursion (``uoro.py``) per example, with ``m_t = Mbar_t^T nu_t``::

    h~_t     = rho0_t J_t h~_{t-1} + rho1_t nu_t
    theta~_t = theta~_{t-1} / rho0_t + m_t / rho1_t
    g        = sum_t (q_t . h~_t) theta~_t

For a cell whose immediate term is factored (``Immediate(D, inp)`` with one input row per
example, every built-in cell), ``m_t`` is, per parameter, a rank-one matrix
``f_t inp_t^T`` with ``f_t[g, i] = sum_c nu_t[c, i] D_t[c, g, i]`` (Elman: ``f = nu *
alpha phi'(a_t)``, ``inp = pre_t``). Then, with ``c[t, tau] = (1 / rho1_tau)
prod_{tau < sigma <= t} 1 / rho0_sigma``::

    theta~_t = sum_{tau <= t} c[t, tau] m_tau
    ||theta~_t||^2 = ||theta~_{t-1}||^2 / rho0^2 + 2 <theta~_{t-1}, m_t> / (rho0 rho1)
                     + ||m_t||^2 / rho1^2,   <theta~_{t-1}, m_t> = sum_tau c[t-1, tau] G[t, tau]
    G[t, tau] = <m_t, m_tau> = sum_params (f_t . f_tau) (inp_t . inp_tau)   (batched GEMMs)
    g = sum_{t, b} w_t[b] m_t[b],  w_t = lambda_t / rho1_t,
        lambda_t = (q_t . h~_t) + lambda_{t+1} / rho0_{t+1}                  (reverse scan)

so the gradient is, per parameter, one GEMM over the stacked (T B) rows, as in BPTT, and
the only sequential work is ``J_t h~`` (one GEMM a step on Elman; a ``torch.func.jvp`` of
the cell's step otherwise) and O(B T) scalars a step for the norms. Sequences longer
than ``CHUNK`` steps are cut into chunks: theta~ is formed at each chunk's end (one
batched GEMM) and its inner products with the next chunk's ``m_t`` are one more.

Equal to the online init / step / flush sum (the same signs, ``_signs``) to round-off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _signs

CHUNK = 256  # steps per Gram block: (B, CHUNK, CHUNK) scalars


class Factors:
    """The rank-one factors of ``m_t`` for the whole sequence.

    fs: list of (T, B, R) tensors; inps: list of (T, B, P) tensors or None (a bias: ones);
    pairs: (name, index into fs, index into inps, the parameter's shape).
    """

    def __init__(self, fs, inps, pairs):
        self.fs, self.inps, self.pairs = fs, inps, pairs


def _gram(X: Tensor) -> Tensor:
    """(K, B, R) -> (B, K, K) per-example inner products over time."""
    Xb = X.transpose(0, 1)
    return torch.bmm(Xb, Xb.transpose(1, 2))


def run(Jv, nu: Tensor, fac: Factors, Q: Tensor, eps: float) -> dict:
    """The UORO gradient of the recurrent parameters (name -> tensor of the pair's shape).

    Jv(t, v): J_t v (B, S); nu (T, B, S) the signs; fac: the factors of m_t;
    Q (T, B, S): the readout's signal on the state (zeros where a step has no loss).
    """
    T, B, S = nu.shape
    like = nu
    h = nu.new_zeros(B, S)
    n2 = nu.new_zeros(B)
    theta = None  # per pair (B, R, P): theta~ at the chunk's start, formed past the first
    grads = {}
    chunk = _chunk(T, fac)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        K = t1 - t0
        fs = [f[t0:t1] for f in fac.fs]
        inps = [None if i is None else i[t0:t1] for i in fac.inps]
        Gf = [_gram(f) for f in fs]
        Gi = [None if i is None else _gram(i) for i in inps]
        G = None
        for _, fi, ii, _ in fac.pairs:
            term = Gf[fi] if Gi[ii] is None else Gf[fi] * Gi[ii]
            G = term.clone() if G is None else G.add_(term)
        Gd = G.diagonal(dim1=1, dim2=2).T  # (K, B) ||m_t||^2
        # rho1 = sqrt(||m_t|| / ||nu_t||): it does not depend on the signs' values
        r1 = ((Gd.sqrt() + eps) / (nu[t0:t1].norm(dim=2) + eps)).sqrt_()
        kappa = None  # (K, B) <theta~_{t0}, m_t>
        if theta is not None:
            kappa = like.new_zeros(B, K)
            for (_, fi, ii, _), th in zip(fac.pairs, theta):
                f = fs[fi].permute(1, 2, 0)  # (B, R, K)
                if inps[ii] is None:
                    kappa += (th * f).sum(1)
                else:
                    kappa += (torch.bmm(th, inps[ii].permute(1, 2, 0)) * f).sum(1)
            kappa = kappa.T
        v = like.new_zeros(B, K)  # v[:, tau] = c[t, tau]: theta~_t's weights on this chunk
        a = like.new_ones(B)  # theta~_t's weight on theta~_{t0}
        inv0 = like.new_empty(K, B)  # 1 / rho0_t
        s = like.new_empty(K, B)  # q_t . h~_t
        # per step, everything that does not wait for rho0, for the whole chunk at once
        inv1 = r1.reciprocal()
        nu1 = nu[t0:t1] * r1.unsqueeze(2)  # rho1_t nu_t
        two1 = inv1 * 2.0
        last = Gd * inv1.square()  # ||m_t||^2 / rho1^2
        Gt = G.transpose(0, 1)  # (K, B, K): row t of every example's Gram matrix
        Qc = Q[t0:t1]
        nrm = n2.sqrt()
        for k in range(K):
            Jh = Jv(t0 + k, h)
            rho0 = ((nrm + eps) / (torch.linalg.vector_norm(Jh, dim=1) + eps)).sqrt_()
            h = torch.addcmul(nu1[k], rho0.unsqueeze(1), Jh)
            cross = torch.linalg.vecdot(v, Gt[k])  # <theta~_{t-1}, m_t> (carried part below)
            if kappa is not None:
                cross.addcmul_(a, kappa[k])
            inv = torch.reciprocal(rho0, out=inv0[k])
            # ||theta~_t||^2 = (||theta~_{t-1}||^2 / rho0 + 2 cross / rho1) / rho0 + last
            n2 = n2.mul(inv).addcmul_(cross, two1[k]).mul_(inv).add_(last[k]).clamp_(min=0.0)
            nrm = n2.sqrt()
            v.mul_(inv.unsqueeze(1))
            v[:, k] = inv1[k]
            if kappa is not None:
                a.mul_(inv)
            torch.linalg.vecdot(Qc[k], h, out=s[k])
        # g = sum_t s_t theta~_t, reordered: lambda_t = s_t + lambda_{t+1} / rho0_{t+1}
        w = like.new_empty(K, B)
        lam = s[K - 1].clone()
        torch.mul(lam, inv1[K - 1], out=w[K - 1])
        for k in range(K - 2, -1, -1):
            lam = torch.addcmul(s[k], lam, inv0[k + 1])
            torch.mul(lam, inv1[k], out=w[k])
        beta = lam * inv0[0]  # the weight of theta~_{t0}
        for j, (name, fi, ii, _) in enumerate(fac.pairs):
            wf = (fs[fi] * w.unsqueeze(2)).reshape(K * B, -1)
            g = wf.sum(0).unsqueeze(1) if inps[ii] is None else wf.T @ inps[ii].reshape(K * B, -1)
            if theta is not None:
                g = g + (beta @ theta[j].reshape(B, -1)).view_as(g)
            grads[name] = g if name not in grads else grads[name] + g
        if t1 < T:  # theta~_{t1} = a theta~_{t0} + sum_tau c[t1, tau] m_tau, per pair
            new = []
            for j, (_, fi, ii, _) in enumerate(fac.pairs):
                fv = (fs[fi] * v.T.unsqueeze(2)).permute(1, 2, 0)  # (B, R, K)
                th = (fv.sum(2, keepdim=True) if inps[ii] is None
                      else torch.bmm(fv, inps[ii].transpose(0, 1)))
                if theta is not None:
                    th = th + a.view(B, 1, 1) * theta[j]
                new.append(th)
            theta = new
    return {name: grads[name] if shape is None else grads[name].reshape(shape)
            for name, _, _, shape in fac.pairs}


def _chunk(T: int, fac: Factors) -> int:
    """Steps per Gram block. A block of C steps costs B T C (R + P) multiply-adds for the
    Gram matrices; cutting the sequence costs 2 B T R P more (theta~ formed at each cut and
    its inner products with the next block's terms): cut where that is cheaper (small H,
    long T), never above ``CHUNK``."""
    gram = sum(f.shape[2] for f in fac.fs) + sum(1 if i is None else i.shape[2]
                                                   for i in fac.inps)
    form = 2 * sum(fac.fs[fi].shape[2] * (1 if fac.inps[ii] is None else fac.inps[ii].shape[2])
                   for _, fi, ii, _ in fac.pairs)
    best, cost = min(T, CHUNK), min(T, CHUNK) * gram + (form if T > CHUNK else 0)
    for c in (128, 64, 32):
        if c < best and c * gram + form < cost:
            best, cost = c, c * gram + form
    return best


def signs(gen, T: int, B: int, S: int, like: Tensor) -> Tensor:
    return _signs.blocks(gen, T, (B, S), like)


# ---- drivers: the forward pass, the factors and J_t v of one layer --------------------------


def _readout(model, h_all: Tensor, targets, mask: Tensor, loss: str, dh):
    """z, the loss, the readout's exact gradients and q_t = dl_t/dh_t (T, B, H) or None."""
    from ..readouts import loss_and_grad
    from .base import output_grads

    T, B, H = h_all.shape
    W_out, b_out = model.W_out.detach(), model.b_out.detach()
    z = torch.addmm(b_out, h_all.reshape(T * B, H), W_out.T).view(T, B, -1)
    if targets is None:
        value, q = z.new_zeros(()), None
        ro = {"W_out": torch.zeros_like(W_out), "b_out": torch.zeros_like(b_out)}
    else:
        value, dz = loss_and_grad(z, targets, mask / B, loss=loss, readout_name=model.readout)
        dz2 = dz.reshape(T * B, -1)
        ro = output_grads(dz2, h_all.reshape(T * B, H))
        q = (dz2 @ W_out).view(T, B, H)
    if dh is not None:
        q = dh if q is None else q + dh
    return value, q, ro


def applies(model) -> bool:
    """One layer, no leaky readout, a cell whose immediate term is factored (checked when
    the forward pass meets it): the sequence form. Otherwise the online steps."""
    return model.num_layers == 1 and not getattr(model, "readout_decay", 0.0)


def sequence(model, gen, eps: float, inputs: Tensor, targets, mask: Tensor, h0, loss: str,
             reward):
    """``(loss, grads)`` of UORO over the sequence, or None where the sequence form does not
    apply (the caller then runs the online steps)."""
    from ..cells.elman import Elman
    from ..readouts import reward_grad
    from ._network import bind

    if not applies(model):
        return None
    net = bind(model)
    cell, params = net.cells[0], net.params[0]
    state0 = h0[0] if isinstance(h0, tuple) else cell.init_state(h0.shape[0])
    with torch.no_grad():
        fwd = (_elman if isinstance(cell, Elman) else _generic)(cell, params, inputs, state0,
                                                               gen, eps)
        if fwd is None:
            return None
        h_all, nu, fac, Jv, into_state = fwd
        dh = None
        value_r = None
        if reward is not None:
            R, dR = reward_grad(reward, h_all)
            value_r, dh = R, -dR
        value, q, ro = _readout(model, h_all, targets, mask, loss, dh)
        if value_r is not None:
            value = value - value_r
        T, B, S = nu.shape
        if q is None:
            Q = nu.new_zeros(T, B, S)
            d_direct = None
        else:
            Q, d_direct = into_state(q)
        g = run(Jv, nu, fac, Q, eps)
        if "[W_rec | W_in | b_rec]" in g:  # the Elman layout
            G = g.pop("[W_rec | W_in | b_rec]")
            H, D = cell.hidden_size, cell.input_size
            g["W_rec"], g["W_in"], g["b_rec"] = G[:, :H], G[:, H:H + D], G[:, H + D]
        grads = {}
        for prefix, names in zip(net.prefixes, net.names):
            for full in names:
                own = full[len(prefix):]
                # a parameter the step does not use (only emit does) gets zero from the trace
                grads[full] = g[own] if own in g else torch.zeros_like(params[own])
                if d_direct is not None and own in d_direct:
                    grads[full] = grads[full] + d_direct[own]
        grads.update(ro)
    return value, grads


def _elman(cell, params, inputs, state0, gen, eps):
    """The Elman layer: unroll's forward (the input projection of every step as one GEMM),
    ``m_t = (nu_t * alpha phi'(a_t)) pre_t^T`` and ``J_t v = (1 - alpha) v + alpha phi'(a_t)
    * (W_rec v)``."""
    from ..cells.elman import _View, unroll

    T, B, D = inputs.shape
    H = cell.hidden_size
    alpha = cell.alpha
    h0 = state0.h
    hs, dphi = unroll(_View(params, cell), inputs, h0, need_deriv=True)
    d = dphi if alpha == 1.0 else dphi * alpha
    pre = torch.cat([torch.cat([h0.unsqueeze(0), hs[:-1]]), inputs,
                     inputs.new_ones(T, B, 1)], 2)
    nu = signs(gen, T, B, H, hs)
    fac = Factors([nu * d], [pre], [("[W_rec | W_in | b_rec]", 0, 0, None)])
    W_rec_T = params["W_rec"].T

    def Jv(t, v):
        Jh = d[t] * (v @ W_rec_T)
        return Jh if alpha == 1.0 else Jh.add_(v, alpha=1.0 - alpha)

    def into_state(q):
        return q, None

    return hs, nu, fac, Jv, into_state


def _generic(cell, params, inputs, state0, gen, eps):
    """Any cell with factored immediates (``linearize(need=("immediate",))``); J_t v by
    ``torch.func.jvp`` of its step. None when an immediate is dense or per-unit."""
    from ..cells._derive import jvp
    from ..cells.base import flatten_state, unflatten_state

    T, B, _ = inputs.shape
    U = cell.n_units
    widths = [int(c.shape[-1]) for c in state0]
    if any(w != U for w in widths):
        return None
    C = len(widths)
    S = C * U
    like = state0[0]
    st = state0
    flats = [flatten_state(st)]
    fs: list[list[Tensor]] = []
    inps: list[list[Tensor]] = []
    pairs = None
    fkeys, ikeys = [], []
    # a diagonal cell (units do not couple, verified once per cell) declares J_t itself:
    # its per-unit C x C blocks (``local``), so J_t v needs no autodiff
    diagonal = bool(getattr(cell, "diagonal", False))
    if diagonal:
        from ..cells._derive import verify_diagonal

        verify_diagonal(cell, "uoro()")
    need = ("immediate", "local") if diagonal else ("immediate",)
    locals_: list[Tensor] = []
    lin = cell.linearize(params, st, inputs[0], need=need)
    nu = None  # drawn once the first step shows the sequence form applies
    for t in range(T):
        if t > 0:
            lin = cell.linearize(params, st, inputs[t], need=need)
        if diagonal:
            locals_.append(lin.local)
        imm = lin.immediate
        st = lin.state
        flats.append(flatten_state(st))
        if pairs is None:  # which parameters share a factor or an input (by identity)
            pairs, fids, iids = [], {}, {}
            for name, im in imm.items():
                if im.inp is None or im.inp.dim() != 3 or im.inp.shape[1] != 1 \
                        or im.D.dim() != 4 or im.D.shape[1] != C or im.D.shape[3] != U:
                    return None
                Gn, P = im.D.shape[2], im.inp.shape[2]
                if Gn * U * P != params[name].numel():
                    return None
                fi = fids.setdefault(id(im.D), len(fids))
                if fi == len(fkeys):
                    fkeys.append(name)
                ii = iids.setdefault(id(im.inp), len(iids))
                if ii == len(ikeys):
                    ikeys.append(name)
                pairs.append((name, fi, ii, params[name].shape))
            fs = [[] for _ in fkeys]
            inps = [[] for _ in ikeys]
            nu = signs(gen, T, B, S, like)
        nu_t = nu[t].view(B, C, U)
        for j, name in enumerate(fkeys):
            fs[j].append(torch.einsum("bcu,bcgu->bgu", nu_t, imm[name].D).reshape(B, -1))
        for j, name in enumerate(ikeys):
            inps[j].append(imm[name].inp.squeeze(1))
    fac = Factors([torch.stack(f) for f in fs], [torch.stack(i) for i in inps], pairs)
    s_all = torch.stack(flats)  # (T + 1, B, S)

    def F(t, s):
        return flatten_state(cell.step(params, unflatten_state(s, state0), inputs[t]))

    def Jv_forward(t, v):
        return jvp(lambda s: F(t, s), (s_all[t],), (v,))[1]

    def Jv_reverse(t, v):
        # J v as the vjp of (u -> J^T u) (double backward): about half the cost of
        # torch.func's forward mode on these cells
        with torch.enable_grad():
            s = s_all[t].detach().requires_grad_(True)
            out = F(t, s)
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, s, u, create_graph=True)
            (Jv,) = torch.autograd.grad(g, u, v, allow_unused=True)
        return torch.zeros_like(v) if Jv is None else Jv

    def Jv_local(t, v):  # J v [c, i] = sum_c' local[i, c, c'] v[c', i]
        vu = v.view(B, C, U).transpose(1, 2).unsqueeze(3)  # (B, U, C, 1)
        return torch.matmul(locals_[t], vu).squeeze(3).transpose(1, 2).reshape(B, S)

    if diagonal:
        Jv = Jv_local
    elif _reverse_agrees(Jv_forward, Jv_reverse, s_all):
        Jv = Jv_reverse
    else:
        Jv = Jv_forward

    state_all = unflatten_state(s_all[1:].reshape(T * B, S), state0)
    x_all = inputs.reshape(T * B, -1)
    emits = cell.emits
    h_all = (cell.emit(params, state_all, x_all) if emits else cell.output(state_all))
    h_all = h_all.reshape(T, B, -1)

    def into_state(q):
        q2 = q.reshape(T * B, -1)
        if emits:
            d_params, d_state, _ = cell.emit_vjp(params, state_all, x_all, q2)
            return d_state.reshape(T, B, S), d_params
        from ._network import output_into_state

        return output_into_state(cell, state_all, q2).reshape(T, B, S), None

    return h_all, nu, fac, Jv, into_state


def _reverse_agrees(fwd, rev, s_all: Tensor) -> bool:
    """Whether the double-backward J v equals forward mode's on one random tangent at the
    first two steps (a cell whose backward is not itself differentiable, e.g. a custom
    autograd Function, fails here or raises): the cheap path only where it is right."""
    g = torch.Generator(device=s_all.device).manual_seed(0)
    tol = 1e-10 if s_all.dtype == torch.float64 else 1e-4
    for t in range(min(2, s_all.shape[0] - 1)):
        v = torch.randn(s_all.shape[1:], generator=g, device=s_all.device, dtype=s_all.dtype)
        try:
            a, b = fwd(t, v), rev(t, v)
        except RuntimeError:
            return False
        if not bool((a - b).norm() <= tol * (a.norm() + b.norm() + 1e-30)):
            return False
    return True
