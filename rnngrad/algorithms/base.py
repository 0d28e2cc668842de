"""The one interface every gradient algorithm has.

An algorithm is built by a small factory (``bptt()``, ``rtrl()``, ``tbptt(k)``, ...)
whose arguments are its hyperparameters, and is a ``NamedTuple`` of pure functions
over an explicit state, in the manner of optax::

    algo = rnngrad.rtrl()
    state = algo.init(model, batch_size)                  # h0 optional: init(model, B, h0=h0)
    for x_t, y_t in stream:
        state, out, grads = algo.step(model, state, x_t, y_t, loss="mse")
        # out: StepOutput(h (B, H), z (B, K), loss ()); grads: dict or None between emissions
    state, grads = algo.flush(model, state)               # whatever is pending at the end

``step`` advances the hidden state and the algorithm's own state (RTRL's influence,
e-prop's traces, BPTT's stored trajectory) and emits a gradient when it has one:
RTRL every step, TBPTT every k steps, BPTT only at ``flush``. Emitted gradients are
of the loss ``(1/B) sum_b mask_t[b] l_t[b]`` summed over the steps they cover, so the
sum of everything a sequence emits is the gradient of the pinned loss
``L = (1/B) sum_{t,b} mask[t,b] l(t,b)``. ``rnngrad.gradient`` is that sum.

Step arguments:
    x_t:      (B, D) input.
    target_t: (B, K) float, (B,) int64 class indices, or None (no loss at this step).
    mask_t:   (B,) weights of this step (None: all ones).
    loss:     "mse" | "cross_entropy" | "bce" (see ``rnngrad.readouts``); None (default):
              the readout's own, softmax -> "cross_entropy", sigmoid -> "bce", identity -> "mse".
    dh_t:     (B, H) an extra immediate term added to dl/dh_t, e.g. ``-dR/dh_t`` of a
              reward; None when there is none.

The state is a ``NamedTuple`` whose first field is ``h`` (B, H), the current hidden
state. States are values: a step returns a new state (it may reuse buffers of the
one it was given, which the caller should then not use again: a state already consumed
is refused, and so is a state another algorithm made).

An algorithm may also carry ``sequence``, a whole-sequence fast path that
``rnngrad.gradient`` uses instead of the step loop when present (BPTT batches the
input projection of all steps into one GEMM); a test checks that the two agree.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..readouts import loss_and_grad

__all__ = ["Algorithm", "StepOutput", "Grads", "readout_step", "immediate_signal",
           "rng_state", "set_rng_state",
           "output_grads", "add_grads",
           "PARAM_NAMES"]

Grads = dict[str, Tensor]
PARAM_NAMES = ("W_in", "W_rec", "b_rec", "W_out", "b_out")


class StepOutput(NamedTuple):
    """What an online step computed: the hidden state, the readout and the step's loss."""

    h: Tensor  # (B, H) h_t
    z: Tensor  # (B, K) readout pre-activation z_t
    loss: Tensor  # () (1/B) sum_b mask_t[b] l_t[b]; zero when the step has no target


class _AlgorithmFields(NamedTuple):
    """A gradient algorithm: its name, its pure functions and what it promises.

    name:     how it prints, e.g. "tbptt(k=10)".
    init:     ``init(model, batch_size, *, h0=None) -> state``; with h0 given, the
              algorithm also emits ``grads["h0"]`` (the gradient w.r.t. the initial state).
    step:     ``step(model, state, x_t, target_t=None, *, mask_t=None, loss=None,
              dh_t=None) -> (state, StepOutput, grads | None)``.
    flush:    ``flush(model, state) -> (state, grads | None)``: emit what is pending.
    exact:    True if the gradient equals the true gradient of the loss (to round-off).
    online:   True if it emits during the sequence with memory constant in T.
    cost:     time and memory per step, in words.
    sequence: optional whole-sequence fast path, ``sequence(model, inputs, targets,
              mask, h0, loss, reward) -> (loss, grads)`` with validated (T, B) mask, or
              None where it has no sequence form for this model (the step loop then runs).
    rng:      the algorithm's random generators, a dict device name -> torch.Generator
              (filled on first use, seeded once per factory call and continued across
              ``init`` calls); None for a deterministic algorithm. ``rng_state`` and
              ``set_rng_state`` save and restore them (training checkpoints do).
    compiled: None for an eager algorithm; for what ``rnngrad.compile`` returned, the
              ``CompileInfo`` of its step (compile time, graphs, why not compiled whole).
    """

    name: str
    init: Callable[..., Any]
    step: Callable[..., tuple[Any, StepOutput, Grads | None]]
    flush: Callable[..., tuple[Any, Grads | None]]
    exact: bool
    online: bool
    cost: str
    sequence: Callable[..., tuple[Tensor, Grads]] | None = None
    rng: dict | None = None
    compiled: Any = None


class Algorithm(_AlgorithmFields):
    __doc__ = _AlgorithmFields.__doc__
    __slots__ = ()

    def __new__(cls, name, init, step, flush, exact, online, cost, sequence=None, rng=None,
                compiled=None):
        # every factory's init / step / flush is validated here, in one place (_checked)
        init, step, flush = _checked(name, init, step, flush)
        return super().__new__(cls, name, init, step, flush, exact, online, cost, sequence, rng,
                               compiled)

    def __repr__(self) -> str:
        return self.name


def rng_state(algorithm: Algorithm) -> dict[str, Tensor]:
    """The states of the algorithm's random generators (empty for a deterministic one)."""
    return {dev: g.get_state() for dev, g in (algorithm.rng or {}).items()}


def set_rng_state(algorithm: Algorithm, state: dict[str, Tensor]) -> None:
    """Restore what ``rng_state`` returned, creating the generators where needed."""
    if algorithm.rng is None:
        if state:
            raise ValueError(f"{algorithm.name} has no random generator, but the saved state "
                             f"holds {sorted(state)}")
        return
    for dev, s in state.items():
        g = algorithm.rng.get(dev)
        if g is None:
            g = torch.Generator(device=dev)
            algorithm.rng[dev] = g
        g.set_state(s)


def readout_step(model, h: Tensor, target_t: Tensor | None, mask_t: Tensor | None, loss: str
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """z_t, the step's loss and ``dl/dz_t`` (already weighted by mask/B), for h (B, H).

    Returns ``(z (B, K), loss (), dz (B, K) or None)``; dz is None without a target.
    """
    z = torch.addmm(model.b_out, h, model.W_out.T)
    if target_t is None:
        return z, z.new_zeros(()), None
    B = h.shape[0]
    # a bool or integer mask is cast to the model's dtype before the division (not rounded
    # through the default float32)
    w = (torch.ones(B, dtype=h.dtype, device=h.device) if mask_t is None
         else mask_t.to(h.dtype)) / B
    value, dz = loss_and_grad(z, target_t, w, loss=loss, readout_name=model.readout)
    return z, value, dz


def immediate_signal(model, h: Tensor, target_t: Tensor | None, mask_t: Tensor | None,
                     loss: str, dh_t: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Readout, the step's loss, ``dl/dz_t`` (B, K; zeros without a target) and the
    immediate term ``q_t = hbar_t = W_out^T dl/dz_t (+ dh_t)`` (B, H)."""
    z, value, dz = readout_step(model, h, target_t, mask_t, loss)
    if dz is None:
        dz = torch.zeros_like(z)
    q = dz @ model.W_out
    if dh_t is not None:
        q = q + dh_t
    return z, value, dz, q


def output_grads(dz: Tensor, h: Tensor) -> Grads:
    """Exact readout gradients from stacked rows: dz (N, K), h (N, H)."""
    return {"W_out": dz.T @ h, "b_out": dz.sum(0)}


def _rebuild(like, items):
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)


def _clone(v):
    return v.clone() if isinstance(v, Tensor) else _rebuild(v, [_clone(x) for x in v])


def _add(a, b):
    return a + b if isinstance(a, Tensor) else _rebuild(a, [_add(x, y) for x, y in zip(a, b)])


def add_grads(total: Grads | None, g: Grads | None) -> Grads | None:
    """Sum two gradient dicts (None is the empty sum); returns a new dict. Values are
    tensors, or (for a network's "h0") tuples of state NamedTuples of tensors."""
    if g is None:
        return total
    if total is None:
        return {k: _clone(v) for k, v in g.items()}
    out = dict(total)
    for k, v in g.items():
        out[k] = _add(out[k], v) if k in out else _clone(v)
    return out


# ---- validation of the online interface, shared by every algorithm ------------------------

# state type -> the algorithm families (name up to "(") whose init has produced it
_STATE_OWNERS: dict[type, set[str]] = {}
_SHAPES: Any = None  # model -> {(batch size, state type): the shapes of a fresh state}


def _family(name: str) -> str:
    return name.split("(", 1)[0]


def _shape_tree(x):
    if isinstance(x, Tensor):
        return tuple(x.shape)
    if isinstance(x, tuple):
        return tuple(_shape_tree(v) for v in x)
    if isinstance(x, dict):
        return {k: _shape_tree(v) for k, v in x.items()}
    return None  # lists (pending steps), scalars, None: not compared


def _first_mismatch(given, ref, path: str) -> str | None:
    if given is None or ref is None:
        return None
    if isinstance(ref, tuple) and ref and all(isinstance(v, int) for v in ref):
        if given != ref:
            return f"{path} has shape {given} but this model and batch need {ref}"
        return None
    if isinstance(ref, tuple) and isinstance(given, tuple):
        if len(given) != len(ref):
            return f"{path} has {len(given)} entries but this model needs {len(ref)}"
        for i, (g, r) in enumerate(zip(given, ref)):
            bad = _first_mismatch(g, r, f"{path}[{i}]")
            if bad:
                return bad
    if isinstance(ref, dict) and isinstance(given, dict):
        for k in ref:
            if k in given:
                bad = _first_mismatch(given[k], ref[k], f"{path}[{k!r}]")
                if bad:
                    return bad
    return None


def _check_model(model, who: str) -> None:
    from ..network import Network

    if not isinstance(model, Network):
        raise TypeError(f"{who}: model must be an rnngrad.Network or rnngrad.RNN, got "
                        f"{type(model).__name__}")


def _batch_of(state, who: str) -> int:
    if not (isinstance(state, tuple) and hasattr(state, "_fields") and state._fields
            and state._fields[0] == "h"):
        raise TypeError(f"{who}: state must be the state this algorithm's init returned (a "
                        f"NamedTuple whose first field is h), got {type(state).__name__}")
    h = state.h
    while isinstance(h, tuple):
        h = h[0] if h else None
    if not isinstance(h, Tensor) or h.dim() != 2:
        raise TypeError(f"{who}: state.h must hold (B, n) tensors, got {type(h).__name__}")
    return h.shape[0]


def _check_state(name: str, init, model, state, _unused=None) -> int:
    """The state against this algorithm and model: its type and owner, then (unless the
    records say it is what this algorithm returned for this model) its shapes, dtype and
    device. (The fifth argument, once a dict of trusted states, is ignored.)"""
    global _SHAPES
    who = name
    owners = _STATE_OWNERS.get(type(state))
    if owners is None or _family(name) not in owners:
        made_by = (f", which {', '.join(sorted(f + '()' for f in owners))} make(s)" if owners
                   else "")
        raise TypeError(f"{who}: state is a {type(state).__name__}{made_by}; pass the state that "
                        f"{_family(name)}()'s init (or its last step) returned")
    B = _batch_of(state, who)
    if _recorded(name, model, state):  # what this algorithm returned for this model, untouched
        return B
    # the state's tensors against those of a fresh state for this model and batch
    import weakref

    if _SHAPES is None:
        _SHAPES = weakref.WeakKeyDictionary()
    per_model = _SHAPES.setdefault(model, {})
    key = (B, type(state))
    ref = per_model.get(key)
    if ref is None:
        with torch.no_grad():
            fresh = init(model, B)
        if type(fresh) is not type(state):
            raise ValueError(f"{who}: the state is a {type(state).__name__}, but for this model "
                             f"({type(model).__name__}) the algorithm keeps a "
                             f"{type(fresh).__name__}: a state made for another kind of model")
        ref = _shape_tree(fresh)
        per_model[key] = ref
    if ref is not None:
        bad = _first_mismatch(_shape_tree(state), ref, "state")
        if bad:
            raise ValueError(f"{who}: the state does not fit this model: {bad} (a state made "
                             "for another model, or for another batch size?)")
    h = state.h
    leaf = h
    while isinstance(leaf, tuple):
        leaf = leaf[0]
    p = model.W_out
    if leaf.dtype != p.dtype or leaf.device != p.device:
        raise TypeError(f"{who}: the state is {leaf.dtype} on {leaf.device} but the model is "
                        f"{p.dtype} on {p.device}")
    return B


# ---- states carry their algorithm, and a consumed state is refused -------------------------
#
# A NamedTuple takes no attribute, so what a state carries is kept beside it: keyed (weakly) by
# the first tensor of its ``h`` (a new tensor at every step), then by the id of the tuple, the
# record holds the name of the algorithm that returned it, the id of its model and the version
# counters of its other tensors (and the lengths of its lists) at that moment. A step updates
# the buffers it shares with its successor in place, which moves their version counters, so a
# state whose stamp no longer matches has been consumed (or changed in place) and stepping it
# would not give what it gave the first time.

_RECORDS: dict = {}  # id(first tensor of state.h) -> (weakref to it, {id(state): record})


def _h_leaf(state):
    h = state.h
    while isinstance(h, tuple):
        if not h:
            return None
        h = h[0]
    return h if isinstance(h, Tensor) else None


def _versions(v, out: list) -> None:
    # a module-level function, not a closure: a recursive closure is a reference cycle, and
    # one per step keeps the garbage collector busy. A container's leaves are read in its
    # loop (one call per container, not per leaf: a step's state has tens of them)
    if isinstance(v, dict):  # per-layer traces keyed by parameter name
        out.append(-1 - len(v))
        v = v.values()
    elif isinstance(v, list):
        out.append(-1 - len(v))
    for x in v:
        if isinstance(x, Tensor):
            out.append(x._version)
        elif isinstance(x, (tuple, list, dict)):
            _versions(x, out)


def _stamp(state) -> tuple:
    out: list = []
    # not h: a caller may reset it in place between sequences. A state type may name the
    # fields that hold its buffers (``stamped``: the rest never change in place)
    own = getattr(type(state), "stamped", None)
    _versions(state[1:] if own is None else own(state), out)
    return tuple(out)


def _forget(key: int, ref) -> None:
    entry = _RECORDS.get(key)
    if entry is not None and entry[0] is ref:
        del _RECORDS[key]


def _record(name: str, model, state) -> tuple | None:
    """Record ``state`` as returned by ``name`` for ``model``; returns its version stamp and
    the weak reference to its h that keys the record (None where nothing was recorded)."""
    if torch.compiler.is_compiling():  # a rule calling another's checked step (TBPTT: BPTT's)
        return None  # inside a compiled step: the outer, eager validation records
    leaf = _h_leaf(state)
    if leaf is None:
        return None
    key = id(leaf)
    entry = _RECORDS.get(key)
    if entry is None or entry[0]() is not leaf:
        entry = (weakref.ref(leaf, lambda r, k=key: _forget(k, r)), {})
        _RECORDS[key] = entry
    per = entry[1]
    if len(per) >= 8:  # the same h0 handed to many inits: keep the newest
        del per[next(iter(per))]
    stamp = _stamp(state)
    per[id(state)] = (name, id(model), stamp)
    return stamp, entry[0]


def _recorded(name: str, model, state) -> bool:
    """Refuse a state another algorithm returned, or one already consumed; True when the
    state is, untouched, what this algorithm returned for this model (no shape check then)."""
    if torch.compiler.is_compiling():
        return False
    leaf = _h_leaf(state)
    entry = None if leaf is None else _RECORDS.get(id(leaf))
    rec = None if entry is None or entry[0]() is not leaf else entry[1].get(id(state))
    if rec is None:
        return False  # made by hand (``_replace``, a copy): checked in full
    made_by, model_id, stamp = rec
    if made_by != name:
        raise TypeError(f"{name}: the state was made by {made_by}, not by this algorithm; pass "
                        f"the state that {name}'s init (or its last step) returned")
    if _stamp(state) != stamp:
        raise ValueError(f"{name}: this state was already consumed by a step (or changed in "
                         "place since it was returned): its buffers now hold a later step's "
                         "values, so stepping it again would not repeat that step; pass the state "
                         "the last step returned, or init a new one")
    return model_id == id(model)


def _checked(name: str, init, step, flush):
    """Wrap an algorithm's functions with the validation every entry point shares."""
    if getattr(step, "__rnngrad_checked__", False):
        return init, step, flush
    from .._checks import (
        check_batch_size,
        check_h0,
        check_step_finite,
        check_step_inputs,
    )
    from ..readouts import default_loss

    # a compiled step (rnngrad.compile) takes its arguments positionally and returns, with
    # its results, the finiteness flag of check_step_finite computed in its own kernels
    fused = getattr(step, "__rnngrad_fused_finite__", False)

    def c_init(model, batch_size, *, h0=None):
        _check_model(model, name)
        B = check_batch_size(batch_size)
        if h0 is not None:
            if getattr(model, "flat_state", False):  # rnngrad.RNN: h0 is its (B, H) tensor
                if isinstance(h0, tuple):  # the network's state, as rnngrad.gradient gives it
                    h0 = model.coerce_state(h0, B)[0][0].h
                if not isinstance(h0, Tensor):
                    from .._checks import _type_name

                    raise TypeError(f"{name}: h0 must be a torch.Tensor of shape ({B}, "
                                    f"{model.hidden_size}) or ({model.hidden_size},), got "
                                    f"{_type_name(h0)}")
                h0 = check_h0(model, h0, B).contiguous()
            else:
                h0 = model.coerce_state(h0, B)[0]
        state = init(model, B, h0=h0)
        _STATE_OWNERS.setdefault(type(state), set()).add(_family(name))
        _record(name, model, state)
        return state

    def c_step(model, state, x_t, target_t=None, *, mask_t=None, loss=None, dh_t=None):
        if not fused and torch.compiler.is_compiling():
            # a rule calling another's checked step inside a compiled one (TBPTT: BPTT's):
            # the outer step was validated, and a host sync here would break the graph
            if loss is None:
                loss = default_loss(model.readout)
            if mask_t is not None:
                mask_t = mask_t.to(model.W_out.dtype)
            return step(model, state, x_t, target_t, mask_t=mask_t, loss=loss, dh_t=dh_t)
        if fused:
            return fused_step(model, state, x_t, target_t, mask_t, loss, dh_t)
        _check_model(model, name)
        B = _check_state(name, init, model, state)
        if loss is None:
            loss = default_loss(model.readout)
        floats = check_step_inputs(model, B, x_t, target_t, mask_t, loss, dh_t)
        if mask_t is not None and mask_t.dtype != model.W_out.dtype:
            mask_t = mask_t.to(model.W_out.dtype)  # bool / integer: in the model's dtype
        new, out, grads = step(model, state, x_t, target_t, mask_t=mask_t, loss=loss, dh_t=dh_t)
        check_step_finite(name, floats, out, grads)
        _record(name, model, new)
        return new, out, grads

    def fused_step(model, state, x_t, target_t, mask_t, loss, dh_t):
        # a compiled step: where the state is, untouched, the one this step last returned for
        # this model and the inputs' key was validated in full with it (step.trusts), the
        # checks of the model, the state and the inputs' shapes, dtypes and devices are
        # skipped (they cannot fail); the refusals stay: a consumed or hand-made state, a
        # state of another algorithm or of another model is not the last one returned, a new
        # input shape or dtype is a new key, and the finiteness flag is read at every step
        if loss is None:
            readout = getattr(model, "readout", None)
            if isinstance(readout, str):
                loss = default_loss(readout)
        key = None
        if isinstance(loss, str) and isinstance(x_t, Tensor):
            key = step.key(x_t, target_t, mask_t, dh_t, loss)
        floats = None
        trusted = key is not None and step.trusts(model, state, key)
        if not trusted:
            _check_model(model, name)
            B = _check_state(name, init, model, state)
            if loss is None:
                loss = default_loss(model.readout)
            floats = check_step_inputs(model, B, x_t, target_t, mask_t, loss, dh_t)
            if key is None:
                key = step.key(x_t, target_t, mask_t, dh_t, loss)
        elif target_t is not None and loss == "cross_entropy":
            floats = check_step_inputs(model, x_t.shape[0], x_t, target_t, mask_t, loss,
                                       dh_t)  # the class range: a value, not in the key
        if mask_t is not None and mask_t.dtype != x_t.dtype:
            mask_t = mask_t.to(x_t.dtype)  # bool / integer: in the model's dtype (= x_t's)
        new, out, grads, flag = step(model, state, x_t, target_t, mask_t, dh_t, loss, key,
                                     trusted)
        if not math.isfinite(flag.item()):
            if floats is None:
                floats = check_step_inputs(model, x_t.shape[0], x_t, target_t, mask_t, loss,
                                           dh_t)
            check_step_finite(name, floats, out, grads)
        step.remember(model, new, key, _record(name, model, new))
        return new, out, grads

    def c_flush(model, state):
        if torch.compiler.is_compiling():  # inside a compiled step (see c_step)
            return flush(model, state)
        _check_model(model, name)
        _check_state(name, init, model, state)
        new, grads = flush(model, state)
        _record(name, model, new)
        if grads:
            tensors = [g for g in grads.values() if isinstance(g, Tensor)]
            total = torch.stack(torch._foreach_norm(tensors)).sum()
            if not bool(torch.isfinite(total)):
                from .._checks import _raise_non_finite

                for n, g in grads.items():
                    if isinstance(g, Tensor):
                        _raise_non_finite(f"grads[{n!r}]", g, what=f"{name} flush: ",
                                          hint=": the backward pass overflowed (exploding "
                                               "gradients)")
        return new, grads

    raw_step = getattr(step, "raw", step) if fused else step
    for f, raw in ((c_init, init), (c_step, raw_step), (c_flush, flush)):
        f.__rnngrad_checked__ = True
        f.__wrapped__ = raw
        f.__doc__ = raw.__doc__
    return c_init, c_step, c_flush
