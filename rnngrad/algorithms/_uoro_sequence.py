"""UORO over a whole sequence with fixed weights, at about BPTT's cost: theta~ is never
formed; it stays a weighted sum of the step's rank-one terms.

The online recursion (``uoro.py``) per example, with ``m_t = Mbar_t^T nu_t``::

    h~_t     = rho0_t J_t h~_{t-1} + rho1_t nu_t
    theta~_t = theta~_{t-1} / rho0_t + m_t / rho1_t
    g        = sum_t (q_t . h~_t) theta~_t

For a cell whose immediate term is factored (``Immediate(D, inp, mask)`` with one input
row per example, every built-in cell), ``m_t`` is, per parameter, a rank-one matrix
``f_t inp_t^T`` with ``f_t[g, i] = sum_c nu_t[c, i] D_t[c, g, i]`` (Elman: ``f = nu *
alpha phi'(a_t)``, ``inp = pre_t``), times the 0/1 mask of its structural zeros where one
is declared (LIF/ALIF: W_rec's diagonal). Then, with ``c[t, tau] = (1 / rho1_tau)
prod_{tau < sigma <= t} 1 / rho0_sigma``::

    theta~_t = sum_{tau <= t} c[t, tau] m_tau
    ||theta~_t||^2 = ||theta~_{t-1}||^2 / rho0^2 + 2 <theta~_{t-1}, m_t> / (rho0 rho1)
                     + ||m_t||^2 / rho1^2,   <theta~_{t-1}, m_t> = sum_tau c[t-1, tau] G[t, tau]
    G[t, tau] = <m_t, m_tau> = sum_params (f_t . f_tau) (inp_t . inp_tau)   (batched GEMMs)
                (a mask: less the same over its zeros, the products f_t[r] inp_t[p] there)
    g = sum_{t, b} w_t[b] m_t[b],  w_t = lambda_t / rho1_t,
        lambda_t = (q_t . h~_t) + lambda_{t+1} / rho0_{t+1}                  (reverse scan)

so the gradient is, per group of parameters sharing f (their inputs stacked), one GEMM
over the stacked (T B) rows, as in BPTT, and the only sequential work is ``J_t h~`` and
O(B T) scalars a step for the norms. ``J_t h~`` is one GEMM a step on Elman; on a cell that
declares its linearization (GRU, LSTM, LIF/ALIF) it comes from the declared structure,
the per-unit blocks ``local`` plus one GEMM over the recurrent weights (``_structured_jv``,
checked once per cell against ``torch.func.jvp``); on a diagonal cell (LRU, eLSTM) the
blocks alone; otherwise a double backward through the step. The linearization of every
step is one call on the (T B) rows. Sequences are cut into blocks of up to ``CHUNK``
steps (``_chunk``): theta~ is formed at each block's end (one batched GEMM per group) and
its inner products with the next block's ``m_t`` are one more.

Equal to the online init / step / flush sum (the same signs, ``_signs``) to round-off.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import _signs

CHUNK = 256  # steps per Gram block: (B, CHUNK, CHUNK) scalars


class Factors:
    """The rank-one factors of ``m_t`` for the whole sequence.

    fs: list of (T, B, R) tensors; inps: list of (T, B, P) tensors or None (a bias: ones);
    pairs: (name, index into fs, index into inps, the parameter's shape); masks: per pair,
    None or the 0/1 pattern (R, P) of the parameter's structural zeros (LIF's W_rec
    diagonal): then ``m_t = (f_t inp_t^T) * mask``.

    The pairs that share a factor f form a group whose inputs are stacked (T, B, sum P):
    one GEMM per group for its Gram matrices, its gradient and its theta~, as for one
    parameter ``[W_1 | W_2 | ...]``.
    """

    def __init__(self, fs, inps, pairs, masks=None):
        self.fs, self.inps, self.pairs = fs, inps, pairs
        self.masks = [None] * len(pairs) if masks is None else masks
        ones = None
        self.groups = []  # (fi, inp (T, B, P), mask (R, P) or None, [(name, p0, p1, shape)])
        for fi, f in enumerate(fs):
            parts, ms, names, off = [], [], [], 0
            for (name, fj, ii, shape), m in zip(pairs, self.masks):
                if fj != fi:
                    continue
                inp = inps[ii]
                if inp is None:
                    if ones is None:
                        ones = f.new_ones(f.shape[0], f.shape[1], 1)
                    inp = ones
                P = inp.shape[2]
                parts.append(inp)
                ms.append(m)
                names.append((name, off, off + P, shape))
                off += P
            if not parts:
                continue
            inp = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
            mask = None
            if any(m is not None for m in ms):
                R = f.shape[2]
                mask = torch.cat([f.new_ones(R, p1 - p0) if m is None else m
                                  for m, (_, p0, p1, _) in zip(ms, names)], 1)
            self.groups.append((fi, inp, mask, names))


def _gram(X: Tensor) -> Tensor:
    """(K, B, R) -> (B, K, K) per-example inner products over time."""
    Xb = X.transpose(0, 1)
    return torch.bmm(Xb, Xb.transpose(1, 2))


def _holes(mask: Tensor):
    """A 0/1 mask (R, P) -> (rows, cols, keep): the entries of the smaller set, its zeros
    (keep False: the Gram matrix of the masked term is the full one less theirs) or its
    ones (keep True: the Gram matrix is theirs alone)."""
    zeros = (mask == 0).nonzero()
    keep = 2 * zeros.shape[0] > mask.numel()
    idx = (mask != 0).nonzero() if keep else zeros
    rows, cols = idx[:, 0], idx[:, 1]
    n = rows.numel()
    if n:  # a shifted diagonal (LIF's W_rec in its group): two slices instead of gathers
        ar = torch.arange(n, device=mask.device)
        r0, c0 = int(rows[0]), int(cols[0])
        if torch.equal(rows - r0, ar) and torch.equal(cols - c0, ar):
            return slice(r0, r0 + n), slice(c0, c0 + n), keep
    return rows, cols, keep


def _take(X: Tensor, idx) -> Tensor:
    """X[..., idx] over the last axis: a slice, or a gather."""
    return X[..., idx] if isinstance(idx, slice) else X.index_select(X.dim() - 1, idx)


def _block_gram(fs, inps, holes) -> Tensor:
    """(B, K, K): <m_t, m_tau> over a block, the sum over groups of (f_t . f_tau)
    (inp_t . inp_tau), less the Gram matrix of the products f_t[r] inp_t[p] over a mask's
    zeros (or only that over its ones; ``_holes``)."""
    G = None
    for f, inp, hl in zip(fs, inps, holes):
        if hl is not None and hl[2]:
            term = _gram(_take(f, hl[0]) * _take(inp, hl[1]))
        else:
            term = _gram(f).mul_(_gram(inp))
            if hl is not None:
                term.sub_(_gram(_take(f, hl[0]) * _take(inp, hl[1])))
        G = term if G is None else G.add_(term)
    return G


def run(Jv, nu: Tensor, fac: Factors, Q: Tensor, eps: float) -> dict:
    """The UORO gradient of the recurrent parameters (name -> tensor of the pair's shape).

    Jv(t, v): J_t v (B, S); nu (T, B, S) the signs; fac: the factors of m_t;
    Q (T, B, S): the readout's signal on the state (zeros where a step has no loss).
    """
    T, B, S = nu.shape
    like = nu
    h = nu.new_zeros(B, S)
    n2 = nu.new_zeros(B, 1)
    theta = None  # per group (B, R, P): theta~ at the block's start, formed past the first
    grads = {}
    chunk = _chunk(T, fac)
    holes = [None if m is None else _holes(m) for _, _, m, _ in fac.groups]
    hbuf = like.new_empty(min(chunk, T), B, S)  # h~_t of the block's steps
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        K = t1 - t0
        fs = [fac.fs[fi][t0:t1] for fi, _, _, _ in fac.groups]
        inps = [inp[t0:t1] for _, inp, _, _ in fac.groups]
        G = _block_gram(fs, inps, holes)
        Gd = G.diagonal(dim1=1, dim2=2).T  # (K, B) ||m_t||^2
        # rho1 = sqrt(||m_t|| / ||nu_t||): it does not depend on the signs' values
        r1 = ((Gd.sqrt() + eps) / (nu[t0:t1].norm(dim=2) + eps)).sqrt_()
        # X[:, t] = <theta~_now, m_t> for the block's steps t (theta~_now: after the step
        # just done), kept up to date by one scaling and one fused add a step:
        # X <- X / rho0_k + G[:, k] / rho1_k; <theta~_{k-1}, m_k> is then X[:, k]
        X = like.new_zeros(B, K)
        if theta is not None:  # <theta~_{t0}, m_t>; theta~_{t0} keeps its masked entries zero
            for f, inp, th in zip(fs, inps, theta):
                fb, ib = f.transpose(0, 1), inp.transpose(0, 1)  # (B, K, R), (B, K, P)
                if th.shape[1] <= th.shape[2]:
                    X += (torch.bmm(fb, th) * ib).sum(2)
                else:
                    X += (torch.bmm(ib, th.transpose(1, 2)) * fb).sum(2)
        inv0 = like.new_empty(K, B, 1)  # 1 / rho0_t
        # per step, everything that does not wait for rho0, for the whole block at once,
        # and every step's rows as views made in one call each (shapes (B, 1) for scalars)
        inv1 = r1.reciprocal()
        nu1 = nu[t0:t1] * r1.unsqueeze(2)  # rho1_t nu_t
        two1 = (inv1 * 2.0).unsqueeze(2)
        last = (Gd * inv1.square()).unsqueeze(2)  # ||m_t||^2 / rho1^2
        Gt = G.transpose(0, 1)  # (K, B, K): row t of every example's Gram matrix
        steps = zip(nu1.unbind(0), two1.unbind(0), last.unbind(0), Gt.unbind(0),
                    inv1.unsqueeze(2).unbind(0), inv0.unbind(0), hbuf.unbind(0), X.split(1, 1))
        nrm = n2.sqrt()
        for k, (nu1k, two1k, lastk, Gk, inv1k, inv0k, hk, Xk) in enumerate(steps):
            Jh = Jv(t0 + k, h)
            rho0 = nrm.add_(eps).div_(
                torch.linalg.vector_norm(Jh, dim=1, keepdim=True).add_(eps)).sqrt_()
            h = torch.addcmul(nu1k, rho0, Jh, out=hk)
            inv = torch.reciprocal(rho0, out=inv0k)
            # ||theta~_t||^2 = (||theta~_{t-1}||^2 / rho0 + 2 cross / rho1) / rho0 + last
            n2.mul_(inv).addcmul_(Xk, two1k).mul_(inv).add_(lastk).clamp_(min=0.0)
            nrm = n2.sqrt()
            X.mul_(inv).addcmul_(Gk, inv1k)
        inv0 = inv0.view(K, B)
        s = torch.linalg.vecdot(Q[t0:t1], hbuf[:K])  # (K, B): q_t . h~_t
        # g = sum_t s_t theta~_t, reordered: lambda_t = s_t + lambda_{t+1} / rho0_{t+1}
        lams = s.clone()
        for k in range(K - 2, -1, -1):
            torch.addcmul(s[k], lams[k + 1], inv0[k + 1], out=lams[k])
        w = lams * inv1
        lam = lams[0]
        beta = lam * inv0[0]  # the weight of theta~_{t0}
        for j, (f, inp, (_, _, mask, names)) in enumerate(zip(fs, inps, fac.groups)):
            wf = (f * w.unsqueeze(2)).reshape(K * B, -1)
            g = wf.T @ inp.reshape(K * B, -1)  # (R, P): one GEMM for the group
            if theta is not None:
                g.view(1, -1).addmm_(beta.unsqueeze(0), theta[j].reshape(B, -1))
            if mask is not None:
                g.mul_(mask)
            for name, p0, p1, _ in names:
                part = g[:, p0:p1]
                grads[name] = part if name not in grads else grads[name] + part
        if t1 < T:  # theta~_{t1} = a theta~_{t0} + sum_tau c[t1, tau] m_tau, per group
            # c[t1, tau] = (1 / rho1_tau) prod_{tau < sigma < t1} 1 / rho0_sigma; a = prod 1 / rho0
            tail = torch.ones_like(inv0)
            if K > 1:
                tail[:-1] = inv0[1:].flip(0).cumprod(0).flip(0)
            v = inv1 * tail  # (K, B)
            a = tail[0] * inv0[0]
            new = []
            for j, (f, inp, (_, _, mask, _)) in enumerate(zip(fs, inps, fac.groups)):
                fv = (f * v.unsqueeze(2)).permute(1, 2, 0)  # (B, R, K)
                if theta is None:
                    th = torch.bmm(fv, inp.transpose(0, 1))
                else:
                    th = torch.baddbmm(theta[j].mul_(a.view(B, 1, 1)), fv, inp.transpose(0, 1))
                if mask is not None:
                    th.mul_(mask)
                new.append(th)
            theta = new
    out = {}
    for name, _, _, shape in fac.pairs:
        g = grads[name]
        out[name] = g if shape is None else g.reshape(shape)
    return out


def _chunk(T: int, fac: Factors) -> int:
    """Steps per Gram block. A block of C steps costs B T C (R + P + n) multiply-adds for
    the Gram matrices (n: a mask's entries taken apart); cutting the sequence costs
    2 B T R P more (theta~ formed at each cut and its inner products with the next block's
    terms), weighted 3 (measured: the (B, R, P) theta~ is read and written through
    transposed operands, at about a third of the Gram GEMMs' rate): cut where that is
    cheaper (small R P against R + P: many small groups, as the LRU's), never above
    ``CHUNK``."""
    gram = sum(fac.fs[fi].shape[2] + inp.shape[2] + (0 if m is None else min(
        int((m == 0).sum()), int((m != 0).sum()))) for fi, inp, m, _ in fac.groups)
    form = 6 * sum(fac.fs[fi].shape[2] * inp.shape[2] for fi, inp, _, _ in fac.groups)
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
    """Any cell with factored immediates (``linearize(need=("immediate",))``, masked or
    not); None when an immediate is dense or per unit, or a mask is not 0/1.

    The linearization of every step in one call on the (T B) rows where the cell declares
    its own (``linearize_sequence``, or ``linearize`` after its forward). ``J_t v`` without
    autodiff where the cell's declared structure gives it (``_structured_jv``: the units
    couple only through parameters whose input row is the previous output, checked
    against ``torch.func.jvp``); else the diagonal cells' per-unit blocks, else a double
    backward or forward mode through the step."""
    from ..cells._derive import jvp
    from ..cells.base import Cell, flatten_state, unflatten_state

    T, B, _ = inputs.shape
    N = T * B
    U = cell.n_units
    widths = [int(c.shape[-1]) for c in state0]
    if any(w != U for w in widths):
        return None
    C = len(widths)
    S = C * U
    like = state0[0]
    # a diagonal cell (units do not couple, verified once per cell) declares J_t itself
    diagonal = bool(getattr(cell, "diagonal", False))
    if diagonal:
        from ..cells._derive import verify_diagonal

        verify_diagonal(cell, "uoro()")
    both = getattr(cell, "linearize_sequence", None)
    own = type(cell).linearize is not Cell.linearize
    need = ("immediate", "local") if (diagonal or both is not None) else ("immediate",)
    if (both is not None or own) and _pairs(
            cell.linearize(params, state0, inputs[0], need=("immediate",)).immediate,
            params, C, U) is None:  # a dense or per-unit term: known from one step's B rows
        return None
    if both is not None:  # the forward and the linearization of every step together
        prev, new, outs, lin = both(params, inputs, state0, need=need)
        imm, local = lin.immediate, lin.local
    elif own:  # the cell's forward, then its linearization on the (T B) rows at once
        from ._sequence import trajectory_states

        prev, new, outs = trajectory_states(cell, params, inputs, state0)
        lin = cell.linearize(params, type(prev)(*(c.reshape(N, -1) for c in prev)),
                             inputs.reshape(N, -1), need=need)
        imm, local = lin.immediate, lin.local
    else:  # a derived linearization: step by step (B rows each), its structure checked first
        prev = outs = None
        st, sts, steps, locals_ = state0, [], [], []
        for t in range(T):
            lin = cell.linearize(params, st, inputs[t], need=need)
            if t == 0 and _pairs(lin.immediate, params, C, U) is None:
                return None
            steps.append(lin.immediate)
            if diagonal:
                locals_.append(lin.local)
            st = lin.state
            sts.append(st)
        new = type(state0)(*(torch.stack(c) for c in zip(*sts)))  # (T, B, U) components
        memo: dict = {}  # a factor or input row shared by parameters stays shared
        imm = {name: _cat_immediate([s[name] for s in steps], memo) for name in steps[0]}
        local = torch.cat(locals_) if diagonal else None
    found = _pairs(imm, params, C, U)
    if found is None:
        return None
    pairs, fkeys, ikeys, masks = found
    nu = signs(gen, T, B, S, like)
    nu3 = nu.view(N, C, 1, U)
    fs = []
    for name in fkeys:
        Dn = imm[name].D  # (N, C, G, U)
        f = Dn[:, 0] * nu3[:, 0]  # sum_c nu[c] D[c], without an (N, C, G, U) temporary
        for c in range(1, C):
            f.addcmul_(Dn[:, c], nu3[:, c])
        fs.append(f.reshape(T, B, -1))
    inps = [imm[name].inp.reshape(T, B, -1) for name in ikeys]
    fac = Factors(fs, inps, pairs, masks)

    s_first = flatten_state(state0)

    def state_at(t):  # s_{t-1} flattened (B, S): the state step t starts from
        return s_first if t == 0 else torch.cat([c[t - 1] for c in new], -1)

    def F(t, s):
        return flatten_state(cell.step(params, unflatten_state(s, state0), inputs[t]))

    def Jv_forward(t, v):
        return jvp(lambda s: F(t, s), (state_at(t),), (v,))[1]

    def Jv_reverse(t, v):
        # J v as the vjp of (u -> J^T u) (double backward): about half the cost of
        # torch.func's forward mode on these cells
        with torch.enable_grad():
            s = state_at(t).detach().requires_grad_(True)
            out = F(t, s)
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, s, u, create_graph=True)
            (Jv,) = torch.autograd.grad(g, u, v, allow_unused=True)
        return torch.zeros_like(v) if Jv is None else Jv

    Jv = None
    if local is not None and prev is not None:
        Jv = _structured_jv(cell, params, prev, imm, local, pairs, T, B, C, U, diagonal)
        if Jv is not None and not diagonal \
                and not _checked(cell, "structured", state_at, T, Jv_forward, Jv):
            Jv = None
    if Jv is None:
        Jv = Jv_reverse if _checked(cell, "reverse", state_at, T, Jv_forward, Jv_reverse) \
            else Jv_forward

    state_all = type(state0)(*(c.reshape(N, U) for c in new))
    x_all = inputs.reshape(N, -1)
    emits = cell.emits
    if outs is None:
        outs = (cell.emit(params, state_all, x_all) if emits else cell.output(state_all))
    h_all = outs.reshape(T, B, -1)

    def into_state(q):
        q2 = q.reshape(N, -1)
        if emits:
            d_params, d_state, _ = cell.emit_vjp(params, state_all, x_all, q2)
            return d_state.reshape(T, B, S), d_params
        declared = getattr(cell, "output_vjp", None)  # closed form (LIF/ALIF)
        if declared is not None:
            return declared(state_all, q2).reshape(T, B, S), None
        from ._network import output_into_state

        return output_into_state(cell, state_all, q2).reshape(T, B, S), None

    return h_all, nu, fac, Jv, into_state


def _cat_immediate(ims, memo: dict):
    """The immediates of the steps (B rows each) -> one on the (T B) rows."""
    from ..cells.base import Immediate

    def cat(key, parts):
        if key not in memo:
            memo[key] = torch.cat(parts)
        return memo[key]

    first = ims[0]
    D = cat(id(first.D), [im.D for im in ims])
    inp = None if first.inp is None else cat(id(first.inp), [im.inp for im in ims])
    return Immediate(D, inp, getattr(first, "mask", None))


def _pairs(imm, params, C: int, U: int):
    """``(pairs, fkeys, ikeys, masks)`` from the declared immediates: which parameters share
    a factor D or an input row (by identity), each pair's mask as (R, P) (None: no mask);
    None where a term is dense, per unit, or its mask is not 0/1."""
    pairs, fids, iids, fkeys, ikeys, masks = [], {}, {}, [], [], []
    for name, im in imm.items():
        if im.inp is None or im.inp.dim() != 3 or im.inp.shape[1] != 1 \
                or im.D.dim() != 4 or im.D.shape[1] != C or im.D.shape[3] != U:
            return None
        Gn, P = im.D.shape[2], im.inp.shape[2]
        if Gn * U * P != params[name].numel():
            return None
        mask = getattr(im, "mask", None)
        if mask is not None:
            if tuple(mask.shape) != (U, P) or not bool(((mask == 0) | (mask == 1)).all()):
                return None
            mask = mask.repeat(Gn, 1)  # (G U, P): the same pattern for every gate
        fi = fids.setdefault(id(im.D), len(fids))
        if fi == len(fkeys):
            fkeys.append(name)
        ii = iids.setdefault(id(im.inp), len(iids))
        if ii == len(ikeys):
            ikeys.append(name)
        pairs.append((name, fi, ii, params[name].shape))
        masks.append(mask)
    return pairs, fkeys, ikeys, masks


def _structured_jv(cell, params, prev, imm, local, pairs, T, B, C, U, diagonal):
    """``J_t v`` from the declared structure, no autodiff: with ``y = (d out / d s_{t-1}) v``
    (per unit) and the recurrent parameters W_p (those whose input row is the previous
    output ``out_{t-1}``, with their masks)::

        J_t v [c, i] = sum_c' L_t[i, c, c'] v[c', i] + sum_p sum_g D_p[c, g, i] (W'_p[g] y)[i]

    L_t the cell's per-unit blocks ``local`` (every path within unit i, the W_p diagonal's
    included) and W'_p = W_p with the diagonal of every gate's block zeroed (the paths
    between units). One GEMM over the stacked recurrent weights a step and about C^2 + 2C
    elementwise operations; a diagonal cell (no W_p) only the blocks. None where no
    recurrent parameter is found or the output is not per unit (the caller checks the
    result against ``torch.func.jvp``)."""
    N = T * B
    S = C * U
    rec = []  # (D (N, C, G, U), W' (G U, U))
    c0 = None
    if not diagonal:
        rows = type(prev)(*(c.reshape(N, U) for c in prev))
        probe = type(prev)(*(c[:B] for c in rows))
        c0 = next((k for k, comp in enumerate(probe) if cell.output(probe) is comp), None)
        if c0 is not None:  # the output is a component of the state: compare every row
            out_prev, check = rows[c0], slice(None)
        else:  # compare the rows of three steps (the caller's jvp check covers the rest)
            ts = sorted({0, T // 2, T - 1})
            idx = torch.cat([torch.arange(t * B, (t + 1) * B) for t in ts]).to(rows[0].device)
            out_prev = cell.output(type(rows)(*(c.index_select(0, idx) for c in rows)))
            check = idx
        if out_prev.dim() != 2 or out_prev.shape[1] != U:
            return None
        seen = {}
        for name, _, _, _ in pairs:
            im = imm[name]
            key = id(im.inp)
            if key not in seen:
                seen[key] = im.inp.shape[2] == U and torch.equal(im.inp[check, 0], out_prev)
            if seen[key]:
                Gn = im.D.shape[2]
                W = params[name].detach().reshape(Gn, U, U).clone()
                W.diagonal(dim1=1, dim2=2).zero_()
                mask = getattr(im, "mask", None)
                if mask is not None:
                    W.mul_(mask)
                rec.append((im.D, W.view(Gn * U, U)))
        if not rec:
            return None
        vjp_ = getattr(cell, "output_vjp", None)
        if c0 is None and vjp_ is not None:  # O_t from the closed form, a step at a time
            ones_b = rows[0].new_ones(B, U)  # (in cache: cheaper than over the (T B) rows)

            def O_at(t):
                return vjp_(type(prev)(*(c[t] for c in prev)), ones_b).view(B, C, U)
        elif c0 is None:  # O[n, c, i] = d out_i / d s[c, i]: the output's slopes, per unit
            ones = rows[0].new_ones(N, U)
            with torch.enable_grad():
                st = type(rows)(*(c.detach().requires_grad_(True) for c in rows))
                gs = torch.autograd.grad(cell.output(st), list(st), ones, allow_unused=True)
            O = torch.cat([torch.zeros_like(c) if g is None else g for g, c in zip(gs, rows)], 1)
            O = O.reshape(T, B, C, U)

            def O_at(t):
                return O[t]
    # [c, c', i]: a strided view of the cell's (N, U, C, C) blocks (no copy), read C^2
    # times a step into a contiguous result
    Lt = local.reshape(T, B, U, C, C).permute(0, 1, 3, 4, 2)
    if rec:
        Dcat = rec[0][0] if len(rec) == 1 else torch.cat([D for D, _ in rec], 2)
        WT = (rec[0][1] if len(rec) == 1 else torch.cat([W for _, W in rec], 0)).T.contiguous()
        Gt = Dcat.shape[2]
        Dt = Dcat.view(T, B, C, Gt, U)

    def Jv(t, v):
        v3 = v.view(B, C, U)
        out = v.new_empty(B, C, U)
        Lk = Lt[t]
        torch.mul(Lk[:, :, 0], v3[:, :1], out=out)
        for c in range(1, C):
            out.addcmul_(Lk[:, :, c], v3[:, c:c + 1])
        if rec:
            if c0 is not None:
                y = v3[:, c0]
            else:
                Ok = O_at(t)
                y = Ok[:, 0] * v3[:, 0]
                for c in range(1, C):
                    y.addcmul_(Ok[:, c], v3[:, c])
            Wy = torch.mm(y, WT).view(B, 1, Gt, U)
            Dk = Dt[t]
            for g in range(Gt):
                out.addcmul_(Dk[:, :, g], Wy[:, :, g])
        return out.view(B, S)

    return Jv


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _checked(cell, kind: str, state_at, T: int, ref, cand) -> bool:
    """``_agrees`` once per cell, path, dtype and device (what it checks is the cell's
    structure, not its parameters' values)."""
    seen = _CHECKED.setdefault(cell, {})
    s0 = state_at(0)
    key = (kind, s0.dtype, s0.device.type)
    if key not in seen:
        seen[key] = _agrees(ref, cand, s0, T)
    return seen[key]


def _agrees(ref, cand, s0: Tensor, T: int) -> bool:
    """Whether ``cand`` (a cheaper J v) equals forward mode's ``ref`` on one random tangent
    at the first two steps (a cell whose backward is not itself differentiable, e.g. a
    custom autograd Function, fails here or raises): the cheap path only where it is right."""
    g = torch.Generator(device=s0.device).manual_seed(0)
    tol = 1e-10 if s0.dtype == torch.float64 else 1e-4
    for t in range(min(2, T)):
        v = torch.randn(s0.shape, generator=g, device=s0.device, dtype=s0.dtype)
        try:
            a, b = ref(t, v), cand(t, v)
        except RuntimeError:
            return False
        if not bool((a - b).norm() <= tol * (a.norm() + b.norm() + 1e-30)):
            return False
    return True
