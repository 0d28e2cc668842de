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
    loss:     "mse" | "cross_entropy" | "bce" (see ``rnngrad.readouts``).
    dh_t:     (B, H) an extra immediate term added to dl/dh_t, e.g. ``-dR/dh_t`` of a
              reward; None when there is none.

The state is a ``NamedTuple`` whose first field is ``h`` (B, H), the current hidden
state. States are values: a step returns a new state (it may reuse buffers of the
one it was given, which the caller should then not use again).

An algorithm may also carry ``sequence``, a whole-sequence fast path that
``rnngrad.gradient`` uses instead of the step loop when present (BPTT batches the
input projection of all steps into one GEMM); a test checks that the two agree.
"""

from __future__ import annotations

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
    h: Tensor  # (B, H) h_t
    z: Tensor  # (B, K) readout pre-activation z_t
    loss: Tensor  # () (1/B) sum_b mask_t[b] l_t[b]; zero when the step has no target


class Algorithm(NamedTuple):
    """A gradient algorithm: its name, its pure functions and what it promises.

    name:     how it prints, e.g. "tbptt(k=10)".
    init:     ``init(model, batch_size, *, h0=None) -> state``; with h0 given, the
              algorithm also emits ``grads["h0"]`` (the gradient w.r.t. the initial state).
    step:     ``step(model, state, x_t, target_t=None, *, mask_t=None, loss="mse",
              dh_t=None) -> (state, StepOutput, grads | None)``.
    flush:    ``flush(model, state) -> (state, grads | None)``: emit what is pending.
    exact:    True if the gradient equals the true gradient of the loss (to round-off).
    online:   True if it emits during the sequence with memory constant in T.
    cost:     time and memory per step, in words.
    sequence: optional whole-sequence fast path, ``sequence(model, inputs, targets,
              mask, h0, loss, dh) -> (loss, grads)`` with validated (T, B) mask and
              ``dh`` (T, B, H) or None.
    rng:      the algorithm's random generators, a dict device name -> torch.Generator
              (filled on first use, seeded once per factory call and continued across
              ``init`` calls); None for a deterministic algorithm. ``rng_state`` and
              ``set_rng_state`` save and restore them (training checkpoints do).
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
    w = (torch.ones(B, dtype=h.dtype, device=h.device) if mask_t is None else mask_t) / B
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
