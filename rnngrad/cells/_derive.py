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


# ---- a user's cell, checked when a network is built and when it is first used ----------

def _slots(cell, target) -> list[tuple[Any, str]]:
    """(module, key) of every slot of ``cell`` holding the Parameter object ``target``."""
    return [(m, k) for m in cell.modules() for k, v in m._parameters.items() if v is target]


class _Swapped:
    """Within the block, the module's own parameter ``target`` (every slot of it) reads as
    ``value``; restored on exit. The caller's tensors are never written."""

    def __init__(self, cell, target, value) -> None:
        self.slots = _slots(cell, target)
        self.target, self.value = target, torch.nn.Parameter(value)

    def __enter__(self):
        for m, k in self.slots:
            m._parameters[k] = self.value
        return self.value

    def __exit__(self, *exc) -> None:
        for m, k in self.slots:
            m._parameters[k] = self.target


def _emit_name(cell) -> str:
    return "emit" if cell.emits else "output"


def _run_step_emit(cell, params, state, x):
    new = cell.step(params, state, x)
    return flatten_state(new), cell.emit(params, new, x), new


def _depends(out: Tensor, base: Tensor | None, q: Tensor) -> bool:
    """``out`` moved when ``q`` replaced a parameter (value), or is in q's graph."""
    if base is not None and not torch.equal(out, base):
        return True
    if not out.requires_grad:
        return False
    (g,) = torch.autograd.grad(out, q, torch.ones_like(out), allow_unused=True)
    return g is not None


def verify_reads(cell, label: str) -> None:
    """Refuse a cell whose ``step`` or ``output``/``emit`` reads a parameter through ``self``
    instead of ``params`` (the algorithms pass detached tensors in ``params``: a parameter
    read through self would get a zero gradient from every one of them), and a parameter
    that neither reads through ``params`` (its gradient would be zero too).

    Probe: one step on a batch of 2 with ``params`` fresh copies that require grad; then,
    parameter by parameter, the same step with the module's own parameter swapped for a
    random tensor that requires grad: an output that moves, or depends on it in autograd's
    graph, reads it through self. The module's tensors are never written."""
    named = dict(cell.named_parameters())
    if not named:
        return
    like = next(iter(named.values()))
    g = torch.Generator().manual_seed(5)

    def rand(shape) -> Tensor:
        return torch.randn(shape, generator=g, dtype=like.dtype).to(like.device)

    with torch.no_grad():
        state0 = cell.init_state(2)
    x = rand((2, cell.input_size))
    emit = _emit_name(cell)
    with torch.enable_grad():
        params = {n: p.detach().clone().requires_grad_(True) for n, p in named.items()}
        state = type(state0)(*(s + 0.1 * rand(s.shape) for s in state0))
        try:
            base_s, base_h, new = _run_step_emit(cell, params, state, x)
            if not (bool(torch.isfinite(base_s).all()) and bool(torch.isfinite(base_h).all())):
                raise ValueError
        except Exception:  # a cell that needs its own initial state: probe from there
            state = state0
            base_s, base_h, new = _run_step_emit(cell, params, state, x)
        again_s, again_h, _ = _run_step_emit(cell, params, state, x)
        steady = torch.equal(again_s, base_s) and torch.equal(again_h, base_h)
        for n, p in named.items():
            for method in ("step", emit):
                with _Swapped(cell, p, rand(p.shape)) as q:
                    try:
                        if method == "step":
                            out, ref = flatten_state(cell.step(params, state, x)), base_s
                        else:
                            out, ref = cell.emit(params, new, x), base_h
                        read = _depends(out, ref if steady else None, q)
                    except Exception:  # only the module's own parameter changed: it is read
                        read = True
                if read:
                    raise ValueError(_self_read_message(cell, label, method, n))
        outs = [t for t in (base_s, base_h) if t.requires_grad]
        used = torch.autograd.grad(outs, list(params.values()), [torch.ones_like(t) for t in outs],
                                   allow_unused=True) if outs else [None] * len(params)
    for n, d in zip(params, used):
        if d is None:
            raise ValueError(
                f"{label}: parameter {n!r} of {type(cell).__name__} is not read through params "
                f"by step or {emit}, so every algorithm would give it a zero gradient (they "
                f"differentiate step and {emit}, never init_state). Read it as params[{n!r}] "
                "there; a learned initial state is given as h0= to rnngrad.gradient instead, "
                "and a constant is a buffer (self.register_buffer)")


def _self_read_message(cell, label: str, method: str, name: str) -> str:
    mod, _, leaf = name.rpartition(".")
    fix = f"write params[{name!r}] instead of self.{name}"
    holder = cell.get_submodule(mod) if mod else None
    if isinstance(holder, torch.nn.ParameterList):
        fix = f"write params[{name!r}] instead of self.{mod}[{leaf}]"
    elif isinstance(holder, torch.nn.ParameterDict):
        fix = f"write params[{name!r}] instead of self.{mod}[{leaf!r}]"
    elif mod:
        keys = ", ".join(f"{k!r}: params[{mod + '.' + k!r}]"
                         for k, _ in cell.get_submodule(mod).named_parameters())
        fix = (f"call torch.func.functional_call(self.{mod}, {{{keys}}}, (x,)) instead of "
               f"self.{mod}(x) (or use params[{name!r}] directly)")
    where = ""
    if method == "output":
        where = (" (output(state) has no params: a cell whose output uses parameters writes "
                 "emit(params, state, x) instead)")
    return (f"{label}: {type(cell).__name__}.{method} reads parameter {name!r} through self "
            f"instead of through params, so every algorithm would give it a zero gradient "
            f"(they pass the parameters in the params dict): {fix}{where}")


def verify_pure(cell, label: str) -> None:
    """Refuse a ``step`` or ``emit`` that changes its arguments, the module's parameters or
    its buffers in place: the algorithms keep and reuse the states they pass in and replay
    steps under torch.func, so a step must return new tensors. Checked by the tensors'
    version counters over one step on a batch of 2 (nothing is compared by value)."""
    with torch.no_grad():
        state = cell.init_state(2)
        like = state[0]
        x = torch.zeros(2, cell.input_size, dtype=like.dtype, device=like.device)
        params = {n: p.detach().clone() for n, p in cell.named_parameters()}
        fields = getattr(type(state), "_fields", None) or [str(i) for i in range(len(state))]
        watched = [(f"its argument state.{f}", s) for f, s in zip(fields, state)]
        watched += [("its argument x", x)]
        watched += [(f"params[{n!r}]", p) for n, p in params.items()]
        watched += [(f"the module's parameter {n!r}", p) for n, p in cell.named_parameters()]
        watched += [(f"its buffer {n!r}", b) for n, b in cell.named_buffers()]
        before = [t._version for _, t in watched]
        new = cell.step(params, state, x)
        after_step = [t._version for _, t in watched]
        cell.emit(params, new, x)
        after = [t._version for _, t in watched]
    for i, (what, _) in enumerate(watched):
        if after[i] != before[i]:
            method = "step" if after_step[i] != before[i] else _emit_name(cell)
            keep = (" and keep what changes over time in the state NamedTuple step returns"
                    if "buffer" in what or "module" in what else "")
            raise ValueError(
                f"{label}: {type(cell).__name__}.{method} changes {what} in place (+=, .mul_(), "
                ".copy_(), x[i] = ...): the algorithms keep and reuse the tensors they pass in "
                "and replay steps under torch.func, so a step must return new tensors: write it "
                f"out of place (h = h * 0.5, torch.where){keep}")


# ---- a user's declared structure, checked against torch.func once ----------------------

_decl_verified: Any = None


def _rel(a: Tensor | None, b: Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    if a.shape != b.shape:
        return float("inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-30) if a.numel() else 0.0


def _declared(cell) -> list[str]:
    """What a cell declares by hand of the structure ``verify_declarations`` can check."""
    out = [f for f in ("local", "immediate", "jacobian", "input_jacobian") if declares(cell, f)]
    if cell.hand_derived_bptt or _overrides(cell, "forward_sequence"):
        out.append("sequence")
    out += [m for m in ("emit_vjp", "emit_jacobians") if _overrides(cell, m)]
    return out


def verify_declarations(cell, who: str) -> None:
    """Check, once per cell, what a user's cell declares by hand (``linearize`` or the single
    Jacobian methods, ``forward_sequence``/``backward_sequence``, ``emit_vjp``,
    ``emit_jacobians``) against the torch.func derivation of its ``step`` and ``emit``, on
    a random batch (B = 2, T = 3) at the cell's own parameters. ``eligibility`` is not
    checked (e-prop's may differ from the Jacobian by design; Bellec et al. 2020). A part
    torch.func cannot derive (a step it cannot transform) is left unchecked. Raises a
    clear error naming the declaration and its relative error."""
    global _decl_verified
    import weakref

    if _decl_verified is None:
        _decl_verified = weakref.WeakKeyDictionary()
    if _decl_verified.get(cell):
        return
    fields = _declared(cell)
    if fields:
        _check_declared(cell, who, fields)
    _decl_verified[cell] = True


def _check_declared(cell, who: str, fields: list[str]) -> None:
    name_c = type(cell).__name__
    named = {n: p.detach() for n, p in cell.named_parameters()}
    like = next(iter(named.values()))
    tol = 1e-6 if like.dtype == torch.float64 else 2e-3
    g = torch.Generator().manual_seed(6)

    def rand(shape, scale=0.5) -> Tensor:
        return torch.randn(shape, generator=g, dtype=like.dtype).to(like.device) * scale

    with torch.no_grad():
        s0 = cell.init_state(2)
    state = type(s0)(*(s + rand(s.shape) for s in s0))
    x = rand((2, cell.input_size), 1.0)

    def fail(what: str, err: float) -> None:
        raise ValueError(
            f"{who}: {name_c}'s own {what} disagrees with the torch.func derivation from its "
            f"step on a random batch (relative error {err:.2g}, tolerance {tol:g}): "
            "the gradients of the algorithms that use it would be wrong. Fix the declaration or "
            "remove it (torch.func then derives it); `rnngrad check --cell module:Class` "
            "compares every exact algorithm with autograd. Network(..., verify=False) skips "
            "this check")

    lin_fields = [f for f in fields if f in ("local", "immediate", "jacobian", "input_jacobian")]
    # each field asked alone: a declaration that raises is left to the algorithm that asks
    # for it (it raises there the same way); only what the cell returns is compared
    lins = {}
    for f in lin_fields:
        try:
            lin = cell.linearize(named, state, x, need=(f,))
        except Exception:
            continue
        if getattr(lin, f) is not None:
            lins[f] = lin
    if lins:
        ref_state = cell.step(named, state, x)
        names = getattr(type(ref_state), "_fields", None) or range(len(ref_state))
        for f, a, b in zip(names, next(iter(lins.values())).state, ref_state):
            err = _rel(a, b)
            if err > tol:
                fail(f"linearize (its new state.{f} is not step's)", err)
        try:
            J, Jx = vmap(jacrev(cell._single(named, state), argnums=(1, 2)),
                         in_dims=(None, 0, 0))(named, flatten_state(state), x)
        except Exception:  # torch.func cannot derive this step: nothing to compare with
            lins = {}
        for f, lin in lins.items():
            got = getattr(lin, f)
            if f == "jacobian":
                err, what = _rel(got, J), "jacobian (d s_t / d s_t-1)"
            elif f == "input_jacobian":
                err, what = _rel(got, Jx), "input_jacobian (d s_t / d x_t)"
            else:
                try:
                    C, U = check_units(cell, state)
                except ValueError:  # no per-unit structure: the rules that need it say so
                    continue
                if f == "local":
                    err, what = _rel(got, unit_blocks(J, C, U)), "local_jacobian"
                else:
                    err, what = _immediate_error(cell, got, named, state, x, rand)
            if err > tol:
                fail(what, err)
    if "sequence" in fields:
        _check_sequence(cell, named, rand, fail, tol)
    if "emit_vjp" in fields or "emit_jacobians" in fields:
        new = cell.step(named, state, x)
        if "emit_vjp" in fields:
            gh = rand((2, cell.hidden_size), 1.0)
            try:
                got = cell.emit_vjp(named, new, x, gh)
                ref = emit_vjp(cell, named, new, x, gh)
            except Exception:  # left to the algorithm that asks for it
                ref = None
            if ref is not None:
                err = max(_rel(got[1], ref[1]), _rel(got[2], ref[2]),
                          max((_rel(got[0].get(k, torch.zeros_like(v)), v)
                               for k, v in ref[0].items()), default=0.0))
                if err > tol:
                    fail("emit_vjp", err)
        if "emit_jacobians" in fields:
            try:
                got = cell.emit_jacobians(named, new, x)
                ref = emit_jacobians(cell, named, new, x)
            except Exception:  # left to the algorithm that asks for it
                ref = None
            if ref is not None:
                err = max(_rel(a, b) for a, b in zip(got, ref))
                if err > tol:
                    fail("emit_jacobians", err)


def _immediate_error(cell, got: dict, params, state, x, rand) -> tuple[float, str]:
    """The declared immediate term against a jvp of ``step`` along a random tangent of each
    owned parameter: ``sum_{g, j} D[b, c, g, i, j] V[g, i, j]`` must be the whole
    ``d state_t`` (so a row that moves another unit shows too). One jvp per parameter,
    not the (B, S, |p|) Jacobian, so it costs little at any size."""
    C, U = check_units(cell, state)
    B = flatten_state(state).shape[0]
    worst, where = 0.0, "immediate"
    for name, G in cell.param_blocks().items():
        if G is None:
            continue
        imm = got.get(name)
        if imm is None:
            return float("inf"), f"immediate without parameter {name!r}"
        p = params[name]
        V = rand(p.shape, 1.0)
        try:
            ref = _step_jvp(cell, params, state, x, name, V.unsqueeze(0))[0].view(B, C, U)
        except Exception:  # torch.func cannot derive this step: nothing to compare with
            continue
        P = p.numel() // (G * U)
        mine = torch.einsum("bcgup,gup->bcu", imm.dense(), V.reshape(G, U, P))
        err = _rel(mine, ref)
        if err > worst:
            worst, where = err, f"immediate for parameter {name!r}"
    return worst, where


def _check_sequence(cell, named, rand, fail, tol) -> None:
    """The cell's own forward_sequence / backward_sequence against a vjp per step."""
    T, B = 3, 2
    with torch.no_grad():
        s0 = cell.init_state(B)
    s0 = type(s0)(*(s + rand(s.shape) for s in s0))
    inputs = rand((T, B, cell.input_size), 1.0)
    d_out = rand((T, B, cell.hidden_size), 1.0)
    d_state = type(s0)(*(rand(s.shape, 1.0) for s in s0))
    try:
        out, sT, cache = cell.forward_sequence(named, inputs, s0, cache=True)
        grads, d_in, ds0 = cell.backward_sequence(named, inputs, s0, cache, d_out, d_state,
                                                  input_grad=True)
    except Exception:  # left to bptt, which raises the same way
        return
    try:
        r_out, r_sT, r_cache = forward_sequence(cell, named, inputs, s0, True)
        r_grads, r_in, r_ds0 = backward_sequence(cell, named, inputs, s0, r_cache, d_out,
                                                 d_state, True)
    except Exception:  # torch.func cannot derive this step: nothing to compare with
        return
    checks = [("forward_sequence (its outputs)", _rel(out, r_out)),
              ("forward_sequence (its final state)",
               _rel(flatten_state(sT), flatten_state(r_sT))),
              ("backward_sequence (dL/d inputs)", _rel(d_in, r_in)),
              ("backward_sequence (dL/d state_0)",
               _rel(flatten_state(ds0), flatten_state(r_ds0)))]
    for k, v in r_grads.items():
        checks.append((f"backward_sequence (the gradient of {k!r})",
                       _rel(grads[k], v) if k in grads else float("inf")))
    for what, err in checks:
        if err > tol:
            fail(what, err)
