"""The ``torch.func`` defaults behind ``Cell``'s optional structure.

Everything here works for any cell whose ``step`` is a pure, batched function; a cell
that declares its structure by hand (the built-in ones) never comes here for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev, vjp, vmap
from torch.func import jvp as _torch_jvp

from .base import Immediate, Linearization, flatten_state, state_widths, unflatten_state

__all__ = ["linearize", "forward_sequence", "backward_sequence", "unit_blocks",
           "check_units", "jvp", "emit_vjp", "emit_jacobians", "verify_diagonal",
           "verify_emit_only"]

_jvp_ready = False


def jvp(*args, **kwargs):
    """``torch.func.jvp``. Its first call in a process loads torch's forward-mode
    decompositions through ``torch.jit.script``, which torch 2.13 reports as deprecated;
    that warning is about torch's internals, not the caller's code, so it is silenced
    for that one call."""
    global _jvp_ready
    if _jvp_ready:
        return _torch_jvp(*args, **kwargs)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                                category=DeprecationWarning)
        out = _torch_jvp(*args, **kwargs)
    _jvp_ready = True
    return out


def check_units(cell, state) -> tuple[int, int]:
    """(C, U) when every state component is (B, U); a clear error otherwise."""
    U = cell.n_units
    widths = state_widths(state)
    fields = getattr(type(state), "_fields", None) or [str(i) for i in range(len(state))]
    bad = [(f, w) for f, w in zip(fields, widths) if w != U]
    if bad:
        desc = ", ".join(f"{f} has width {w}" for f, w in bad)
        raise ValueError(f"{type(cell).__name__} has {U} units but its state component(s) "
                         f"{desc}: per-unit traces (SnAp-1, e-prop) need every state component "
                         f"to be (B, n_units); declare n_units or local_jacobian to fit")
    return len(widths), U


def unit_blocks(J: Tensor, C: int, U: int) -> Tensor:
    """(B, S, S) with S = C U -> the per-unit diagonal blocks (B, U, C, C)."""
    B = J.shape[0]
    return J.reshape(B, C, U, C, U).diagonal(dim1=2, dim2=4).permute(0, 3, 1, 2)


def _detached(params) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in params.items()}


def _immediate_by_jvp(cell, params, state, x, name: str, G: int) -> Immediate:
    """``d state_t[c, i] / d p[g, i, j]`` for every unit at once: one jvp per (g, j),
    with the tangent set on row ``(g, i)`` for every unit i. A row owned by unit i moves
    only unit i's state within one step, so output (c, i) of that jvp is the entry
    for unit i alone."""
    p = params[name]
    U = cell.n_units
    P = p[0].numel() if p.dim() > 1 else 1
    like = state

    def f(pv):
        q = dict(params)
        q[name] = pv
        return flatten_state(cell.step(q, like, x))

    # tangents: (G*P, G, U, P), row (g, j) is 1 on [g, :, j]
    eye = torch.eye(G * P, dtype=p.dtype, device=p.device).view(G * P, G, 1, P)
    tangents = eye.expand(G * P, G, U, P).reshape(G * P, *p.shape)

    def one(t):
        return jvp(f, (p,), (t,))[1]

    out = vmap(one)(tangents)  # (G*P, B, S)
    B = out.shape[1]
    C = len(state)
    return Immediate(out.view(G, P, B, C, U).permute(2, 3, 0, 4, 1))


def _overrides(cell, method: str) -> bool:
    from .base import Cell

    return getattr(type(cell), method) is not getattr(Cell, method)


def linearize(cell, params, state, x: Tensor, need: tuple) -> Linearization:
    """The default ``Cell.linearize``: a method the cell overrides answers for its field;
    the rest comes from ``torch.func`` (one ``vmap(jacrev)`` for the Jacobians, jvps
    for the immediate term)."""
    unknown = set(need) - {"local", "eligibility", "immediate", "jacobian", "input_jacobian"}
    if unknown:
        raise ValueError(f"linearize: unknown fields {sorted(unknown)}")
    params = _detached(params)
    new = cell.step(params, state, x)
    out: dict[str, Any] = {}
    own = {"local": "local_jacobian", "eligibility": "eligibility_jacobian",
           "immediate": "immediate", "jacobian": "jacobian",
           "input_jacobian": "input_jacobian"}
    derive = []
    for field in need:
        if _overrides(cell, own[field]):
            out[field] = getattr(cell, own[field])(params, state, x)
        elif field == "eligibility" and _overrides(cell, "local_jacobian"):
            out[field] = cell.local_jacobian(params, state, x)
        else:
            derive.append(field)
    if {"jacobian", "input_jacobian", "local", "eligibility"} & set(derive):
        f = cell._single(params, state)
        J, Jx = vmap(jacrev(f, argnums=(1, 2)), in_dims=(None, 0, 0))(
            params, flatten_state(state), x)
        if "jacobian" in derive:
            out["jacobian"] = J
        if "input_jacobian" in derive:
            out["input_jacobian"] = Jx
        if "local" in derive or "eligibility" in derive:
            C, U = check_units(cell, state)
            blocks = unit_blocks(J, C, U)
            for field in ("local", "eligibility"):
                if field in derive:
                    out[field] = blocks
    if "immediate" in derive:
        imm = {}
        for name, G in cell.param_blocks().items():
            if G is not None:
                imm[name] = _immediate_by_jvp(cell, params, state, x, name, G)
        out["immediate"] = imm
    return Linearization(new, **out)


def _step_out(cell):
    def f(p, s, x):
        s2 = cell.step(p, s, x)
        return s2, cell.emit(p, s2, x)

    return f


def emit_vjp(cell, params, state, x: Tensor, g: Tensor):
    """The default ``Cell.emit_vjp``: one batched ``torch.func.vjp`` of ``emit``."""
    params = _detached(params)
    _, fn = vjp(lambda p, s, xx: cell.emit(p, s, xx), params, state, x)
    dp, ds, dx = fn(g)
    return dp, flatten_state(ds), dx


def emit_jacobians(cell, params, state, x: Tensor):
    """The default ``Cell.emit_jacobians``: ``vmap(jacrev)`` of ``emit`` for one example."""
    params = _detached(params)

    def single(p, s, xx):
        st = unflatten_state(s.unsqueeze(0), state)
        return cell.emit(p, st, xx.unsqueeze(0)).squeeze(0)

    dp, Gs, Gx = vmap(jacrev(single, argnums=(0, 1, 2)), in_dims=(None, 0, 0))(
        params, flatten_state(state), x)
    B, H = Gs.shape[0], Gs.shape[1]
    Gp = torch.cat([dp[n].reshape(B, H, -1) for n in params], dim=2)
    return Gs, Gx, Gp


def forward_sequence(cell, params, inputs: Tensor, state0, cache: bool):
    T = inputs.shape[0]
    outs = []
    s = state0
    fns: list | None = [] if cache else None
    if cache:
        params = _detached(params)
        f = _step_out(cell)
        for t in range(T):
            (s, h), fn = vjp(f, params, s, inputs[t])
            fns.append(fn)
            outs.append(h)
    else:
        for t in range(T):
            s = cell.step(params, s, inputs[t])
            outs.append(cell.emit(params, s, inputs[t]))
    return torch.stack(outs), s, fns


def backward_sequence(cell, params, inputs: Tensor, state0, cache, d_outputs: Tensor,
                      d_state: Any, input_grad: bool):
    if cache is None:
        raise ValueError("backward_sequence needs the cache of forward_sequence(..., cache=True)")
    T = inputs.shape[0]
    ds = d_state if d_state is not None else type(state0)(*(torch.zeros_like(s) for s in state0))
    grads = None
    dxs: list = [None] * T
    for t in range(T - 1, -1, -1):
        gp, ds, dx = cache[t]((ds, d_outputs[t]))
        grads = dict(gp) if grads is None else {k: grads[k] + v for k, v in gp.items()}
        dxs[t] = dx
    d_inputs = torch.stack(dxs) if input_grad else None
    return grads, d_inputs, ds


def declares(cell, field: str) -> bool:
    """True when the cell supplies ``field`` itself (overrides ``linearize`` or the
    single method), rather than leaving it to the torch.func default."""
    method = {"local": "local_jacobian", "eligibility": "eligibility_jacobian",
              "immediate": "immediate", "jacobian": "jacobian",
              "input_jacobian": "input_jacobian"}[field]
    return _overrides(cell, "linearize") or _overrides(cell, method)


def dense_jacobians(cell, params, state, x: Tensor):
    """Everything RTRL needs, by one ``vmap(jacrev)`` over (params, state, x), with no
    assumption on the cell's structure: ``(state_t, J (B, S, S), Jx (B, S, D),
    Mbar (B, S, N))``, Mbar's columns the parameters flattened in ``params`` order."""
    params = _detached(params)
    f = cell._single(params, state)
    dp, J, Jx = vmap(jacrev(f, argnums=(0, 1, 2)), in_dims=(None, 0, 0))(
        params, flatten_state(state), x)
    B, S = J.shape[0], J.shape[1]
    Mbar = torch.cat([dp[n].reshape(B, S, -1) for n in params], dim=2)
    return cell.step(params, state, x), J, Jx, Mbar


_verified: Any = None


def verify_ownership(cell, who: str) -> None:
    """For a cell that does not declare its immediate term: check, once per cell, that each
    parameter row it says a unit owns moves only that unit within one step (the structural
    zeros the per-unit traces rely on), on random parameters, state and input. Raises a
    clear error naming the parameter, the row and the unit it moves."""
    global _verified
    import weakref

    if _verified is None:
        _verified = weakref.WeakKeyDictionary()
    if declares(cell, "immediate") or _verified.get(cell):
        return
    g = torch.Generator().manual_seed(0)
    named = dict(cell.named_parameters())
    params = {n: torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * 0.5
              for n, p in named.items()}
    state = cell.init_state(2)
    state = type(state)(*(torch.randn(s.shape, generator=g, dtype=s.dtype).to(s.device) * 0.5
                          for s in state))
    x = torch.randn(2, cell.input_size, generator=g, dtype=state[0].dtype).to(state[0].device)
    C, U = check_units(cell, state)
    f = cell._single(params, state)
    dp = vmap(jacrev(f, argnums=0), in_dims=(None, 0, 0))(params, flatten_state(state), x)
    for name, G in cell.param_blocks().items():
        if G is None:
            continue
        P = named[name].numel() // (G * U)
        d = dp[name].reshape(2, C, U, G, U, P).abs()
        scale = float(d.max()) or 1.0
        off = d.clone()
        off.diagonal(dim1=2, dim2=4).zero_()
        if float(off.max()) > 1e-9 * scale:
            idx = (off == off.max()).nonzero()[0].tolist()
            _, _, moved, gg, owner, _ = idx
            raise ValueError(
                f"{who}: parameter {name!r} of {type(cell).__name__} (shape "
                f"{tuple(named[name].shape)}) is not owned row by row: row {gg * U + owner} "
                f"(unit {owner} under the gate-major layout, G={G}) moves unit {moved} within "
                "one step, so per-unit traces would drop part of its immediate term. Declare "
                "param_blocks() (None for it) and immediate() to match, or use rtrl() or uoro()")
    _verified[cell] = True


# ---- the diagonal declaration, checked -------------------------------------------------

_diag_verified: Any = None
_emit_only_verified: Any = None


def _probe_points(cell):
    """(params, state, x) to probe the cell at: its own parameters, then a random draw
    (a structural coupling shows at either; a probe that is not finite is skipped)."""
    g = torch.Generator().manual_seed(1)
    named = {n: p.detach() for n, p in cell.named_parameters()}
    like = cell.init_state(2)

    def rand(t, scale=0.5):
        return torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) * scale

    state = type(like)(*(rand(s) for s in like))
    x = torch.randn(2, cell.input_size, generator=g, dtype=like[0].dtype).to(like[0].device)
    yield named, state, x
    yield {n: rand(p) for n, p in named.items()}, state, x


def _tol(t: Tensor) -> float:
    return 1e-9 if t.dtype == torch.float64 else 1e-5


def _step_jvp(cell, params, state, x, name: str | None, tangents: Tensor) -> Tensor:
    """d state_t (flattened, (K, B, S)) along K tangents of the previous state (name None,
    tangents (K, B, S)) or of parameter ``name`` (tangents (K, *shape))."""
    if name is None:
        s = flatten_state(state)

        def f(v):
            return flatten_state(cell.step(params, unflatten_state(v, state), x))

        return vmap(lambda t: jvp(f, (s,), (t,))[1])(tangents)

    def fp(v):
        q = dict(params)
        q[name] = v
        return flatten_state(cell.step(q, state, x))

    return vmap(lambda t: jvp(fp, (params[name],), (t,))[1])(tangents)


def verify_emit_only(cell, who: str) -> None:
    """Check, once per cell, that the parameters it gives to no unit (``param_blocks``
    None) do not enter ``step``: they may then take their gradient from ``emit`` alone, at
    the same step. Raises a clear error naming the parameter otherwise."""
    global _emit_only_verified
    import weakref

    if _emit_only_verified is None:
        _emit_only_verified = weakref.WeakKeyDictionary()
    if _emit_only_verified.get(cell):
        return
    unowned = [n for n, G in cell.param_blocks().items() if G is None]
    for params, state, x in _probe_points(cell) if unowned else ():
        new = flatten_state(cell.step(params, state, x))
        scale = max(1.0, float(new.abs().max()))
        for name in unowned:
            g = torch.Generator().manual_seed(2)
            p = params[name]
            t = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device).unsqueeze(0)
            d = _step_jvp(cell, params, state, x, name, t)
            if not bool(torch.isfinite(d).all()):
                continue
            if float(d.abs().max()) > _tol(d) * scale:
                raise ValueError(
                    f"{who}: parameter {name!r} of {type(cell).__name__} (shape "
                    f"{tuple(p.shape)}) is owned by no unit (param_blocks gives None) but "
                    "enters step: its influence on the state would be dropped. Give it to "
                    "units in param_blocks() (shape (G * n_units, ...)) or use it only in emit")
    _emit_only_verified[cell] = True


def verify_diagonal(cell, who: str) -> None:
    """Check, once per cell, what ``diagonal = True`` promises (``Cell`` docstring): the
    state Jacobian is block-diagonal over units, each owned parameter row moves only its
    unit, and unowned parameters enter only ``emit``.

    Probe (cheap at any size, 2 C + 2 jvps per parameter): for a random tangent w and r_j
    random per unit, the jvp along ``r_j w`` (unit j's entries scaled by r_j) must equal
    r_i times the jvp along w, unit by unit; any cross-unit term breaks that. On a failure
    the coupling is located (one jvp per unit) and named."""
    global _diag_verified
    import weakref

    if _diag_verified is None:
        _diag_verified = weakref.WeakKeyDictionary()
    if _diag_verified.get(cell):
        return
    name_c = type(cell).__name__
    like = cell.init_state(2)
    C, U = check_units(cell, like)
    fields = getattr(type(like), "_fields", None) or [str(i) for i in range(C)]
    blocks = cell.param_blocks()
    checked = False
    for params, state, x in _probe_points(cell):
        ref = like[0]
        r = 0.5 + torch.rand(U, generator=torch.Generator().manual_seed(3),
                             dtype=ref.dtype).to(ref.device)
        B = ref.shape[0]
        gen = torch.Generator().manual_seed(4)
        new = flatten_state(cell.step(params, state, x))
        floor = 1.0 + float(new.abs().max())  # the size round-off is relative to
        # the previous state, component by component: tangents w_c, then r w_c
        w = (0.5 + torch.rand(B, U, generator=gen, dtype=ref.dtype)).to(ref.device)
        tang = torch.zeros(2 * C, B, C, U, dtype=ref.dtype, device=ref.device)
        for c in range(C):
            tang[c, :, c] = w
            tang[C + c, :, c] = r * w
        out = _step_jvp(cell, params, state, x, None, tang.view(2 * C, B, C * U))
        if not bool(torch.isfinite(out).all()):
            continue
        checked = True
        out = out.view(2 * C, B, C, U)
        for c in range(C):
            bad = _mismatch(out[c], out[C + c], r, floor)
            if bad is not None:
                i = bad
                onehot = torch.zeros(U, B, C, U, dtype=ref.dtype, device=ref.device)
                onehot[torch.arange(U), :, c, torch.arange(U)] = 1.0
                cols = _step_jvp(cell, params, state, x, None, onehot.view(U, B, C * U))
                cols = cols.view(U, B, C, U)[:, :, :, i].abs().amax(dim=1)  # (U_j, C')
                cols[i] = 0.0
                j, c2 = divmod(int(cols.argmax()), C)
                raise ValueError(
                    f"{who}: {name_c} declares diagonal = True but its units couple: "
                    f"d state_t.{fields[c2]}[{i}] / d state_(t-1).{fields[c]}[{j}] = "
                    f"{float(cols[j, c2]):.3g} (unit {j} moves unit {i} within one step). "
                    "Per-unit traces would drop that path: set diagonal = False (rtrl() then "
                    "keeps the dense influence) or make step keep the units apart")
        for pname, G in blocks.items():
            if G is None:
                continue
            p = params[pname]
            rows = r.repeat(G).view(-1, *([1] * (p.dim() - 1)))
            wp = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
            t = torch.stack((wp, rows * wp))
            o = _step_jvp(cell, params, state, x, pname, t).view(2, B, C, U)
            bad = _mismatch(o[0], o[1], r, floor)
            if bad is not None:
                i = bad
                onehot = torch.zeros(U, G, U, dtype=p.dtype, device=p.device)
                onehot[torch.arange(U), :, torch.arange(U)] = 1.0
                t = onehot.view(U, G * U, *([1] * (p.dim() - 1))).expand(U, *p.shape)
                cols = _step_jvp(cell, params, state, x, pname, t).view(U, B, C, U)
                cols = cols[:, :, :, i].abs().amax(dim=(1, 2))
                cols[i] = 0.0
                j = int(cols.argmax())
                raise ValueError(
                    f"{who}: {name_c} declares diagonal = True but parameter {pname!r} (shape "
                    f"{tuple(p.shape)}, G={G}) is not owned row by row: the rows of unit {j} "
                    f"move unit {i} within one step. Declare param_blocks() to match or set "
                    "diagonal = False")
    if not checked:
        raise ValueError(f"{who}: could not verify that {name_c} is diagonal: its step is not "
                         "finite at the probe points (its own parameters and a random draw)")
    verify_emit_only(cell, who)
    _diag_verified[cell] = True


def _mismatch(plain: Tensor, scaled: Tensor, r: Tensor, floor: float) -> int | None:
    """The unit i where ``scaled[..., i] != r_i plain[..., i]`` most (plain, scaled
    (B, C, U)), or None when they agree to round-off (relative to ``floor`` at least)."""
    diff = (scaled - r * plain).abs().amax(dim=(0, 1))
    scale = max(float(plain.abs().max()) * float(r.max()), floor)
    if float(diff.max()) <= _tol(plain) * scale:
        return None
    return int(diff.argmax())
