"""The cell protocol: one step of a recurrence, a pure function of named parameters.

A cell is an ``nn.Module`` that holds its parameters and defines three pure functions,
in the manner of equinox's cells and ``torch.func``::

    state_0 = cell.init_state(batch_size)          # a NamedTuple of (B, n_c) tensors
    state_t = cell.step(params, state_{t-1}, x_t)  # params: dict name -> tensor, x_t (B, D)
    h_t     = cell.output(state_t)                 # (B, H): what the readout or next layer sees

A cell whose output also depends on its parameters or on the step's input (the LRU's
``Re(C h_t) + D x_t``, the eLSTM's output gate) writes ``emit`` instead; the algorithms
call ``emit`` everywhere, and its default is ``output``::

    h_t     = cell.emit(params, state_t, x_t)      # (B, H); default: cell.output(state_t)

A parameter that only ``emit`` uses is owned by no unit (``param_blocks`` None): like
``W_out``, it takes its gradient from the same step alone.

``params`` is ``dict(cell.named_parameters())`` or any dict with the same keys, so
``torch.func.functional_call``, ``jvp``, ``vjp``, ``jacrev`` and ``vmap`` work on any
cell. ``step`` must be written for a batch, without in-place updates of its arguments,
``.item()`` or control flow that depends on values (so that ``vmap`` can run it on one
example at a time).

Structure a cell may declare (each optional; the defaults here derive it with
``torch.func``, more slowly, never wrongly):

- **units** (``n_units``, ``param_blocks``): every state component is (B, U) and
  column i of each belongs to unit i (LSTM: h_i and c_i); a parameter of shape
  (G U, ...) is owned row by row, row ``g U + i`` by unit i (PyTorch's gate-major
  layout). Needed by the rules that keep per-unit traces (SnAp-1, e-prop).
- **local_jacobian** (B, U, C, C): ``d state_t[c, i] / d state_{t-1}[c', i]``, the
  per-unit blocks of the state Jacobian, coupling between units cut (SnAp-1 keeps it).
- **eligibility_jacobian** (B, U, C, C): what e-prop carries its traces through
  (Bellec et al. 2020: the unit's recurrent output held fixed, so only its internal
  state dynamics remain). Default: ``local_jacobian``.
- **immediate**: ``d state_t / d params`` for the rows each unit owns (the
  sensitivity lemma, generalised), factored where it can be (``Immediate``).
- **jacobian** (B, S, S) and **input_jacobian** (B, S, D): the dense Jacobians of the
  flattened state ``s = [state_0 | state_1 | ...]`` (S = sum of the widths) RTRL needs.
- **forward_sequence** / **backward_sequence**: a hand-derived whole-sequence BPTT.
  The default runs ``step`` and keeps one ``torch.func.vjp`` per step.
- **diagonal** (a class attribute, default False): units do not couple. True promises
  that ``d state_t[., i] / d state_{t-1}[., j] = 0`` for i != j, that a parameter row
  owned by unit i moves only unit i within ``step``, and that parameters owned by no
  unit enter only ``emit``. RTRL then needs only per-unit traces, O(|params|) per
  example (Zucchet et al. 2023; Irie et al. 2023). The algorithms that rely on it
  check it once per cell (``_derive.verify_diagonal``) and refuse a cell whose
  units couple.
- **emit_vjp** / **emit_jacobians**: the derivatives of ``emit`` (torch.func by default).

Algorithms call ``linearize``, which returns the next state together with whatever
they ask for; built-in cells override it to get everything from one pass.

What a user's cell declares is trusted by the algorithms: ``rnngrad check --cell
module:Class`` compares every exact algorithm with autograd through it, and a
``Network`` compares the declarations with the torch.func derivation of ``step`` once,
when first used (``Network(..., verify=False)`` skips that). A ``Network`` also refuses a
user's ``step``/``output``/``emit`` that reads a parameter through ``self`` instead of
``params`` (its gradient would be zero) or changes anything in place (docs/cells.md).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Cell", "Immediate", "Linearization", "flatten_state", "unflatten_state",
           "state_widths", "LINEARIZE_FIELDS", "check_factory", "check_number", "is_builtin"]

Params = Mapping[str, Tensor]


class Immediate(NamedTuple):
    """``d state_t[c, i] / d p[g, i, j]`` for one parameter p viewed as (G, U, P).

    Factored (``inp`` given): the entry is ``D[b, c, g, i] * inp[b, i or 0, j]``, with
    D (B, C, G, U) and inp (B, U, P) or (B, 1, P) (the vector row ``(g, i)`` of p
    multiplies; ones for a bias). Dense (``inp`` None): D is (B, C, G, U, P) itself.
    ``mask`` (U, P), optional with a factored term: structural zeros shared by every
    example, multiplying ``inp`` (LIF's missing self-connections), so that ``inp`` can stay
    one row (B, 1, P) shared by the units: the sequence forms then take one GEMM for it.
    ``weigh``, optional, only from ``linearize_sequence`` asked for ``"weigh"``: a function
    lam (B, C, U) -> ``sum_c lam[:, c] D[:, c]`` (B, G, U), from factors the cell kept (D
    then None: never built); the parameters that share D share the function, which may
    write over the cell's buffers and so is called once.
    """

    D: Tensor | None
    inp: Tensor | None = None
    mask: Tensor | None = None
    weigh: Any = None

    def rows(self) -> Tensor | None:
        """``inp`` with the mask applied: (B, U or 1, P); None for a dense term."""
        if self.inp is None or self.mask is None:
            return self.inp
        return self.inp * self.mask

    def dense(self) -> Tensor:
        """(B, C, G, U, P)."""
        if self.inp is None:
            return self.D
        return self.D.unsqueeze(-1) * self.rows().unsqueeze(1).unsqueeze(1)


class Linearization(NamedTuple):
    """One step and its derivatives; a field is None unless it was asked for."""

    state: Any  # the new state, a NamedTuple of (B, n_c)
    local: Tensor | None = None  # (B, U, C, C) local_jacobian
    eligibility: Tensor | None = None  # (B, U, C, C) eligibility_jacobian
    immediate: dict[str, Immediate] | None = None  # name -> Immediate
    jacobian: Tensor | None = None  # (B, S, S) d s_t / d s_{t-1}
    input_jacobian: Tensor | None = None  # (B, S, D) d s_t / d x_t


LINEARIZE_FIELDS = ("local", "eligibility", "immediate", "jacobian", "input_jacobian")


def state_widths(state) -> list[int]:
    return [int(s.shape[-1]) for s in state]


def flatten_state(state) -> Tensor:
    """A NamedTuple of (B, n_c) tensors -> (B, S)."""
    return torch.cat(tuple(state), dim=-1) if len(state) > 1 else state[0]


def unflatten_state(s: Tensor, like) -> Any:
    """(B, S) -> a state of the same type and widths as ``like``."""
    parts = torch.split(s, state_widths(like), dim=-1)
    return type(like)(*parts)


def _empty_like_state(state) -> Any:
    return type(state)(*(torch.zeros_like(s) for s in state))


class Cell(nn.Module):
    """Abstract base of every recurrent cell: subclass it and write ``init_state``,
    ``step`` and ``output``; every algorithm that applies then works with it.

    Subclasses set ``input_size`` (D) and ``hidden_size`` (H, the width of
    ``output(state)``) and create their parameters in ``__init__``.
    """

    input_size: int
    hidden_size: int
    diagonal: bool = False  # units do not couple (see the module docstring); verified

    def __init_subclass__(cls, **kwargs) -> None:
        # A user's step / emit / output run under torch.func transforms in most algorithms:
        # their errors there (a branch on a tensor's value under vmap, an in-place update of
        # a captured tensor) are translated into one line saying what to change. Built-in
        # cells are written for torch.func and keep their methods unwrapped (no extra call).
        super().__init_subclass__(**kwargs)
        if is_builtin(cls):
            return
        for method in ("step", "emit", "output"):
            fn = cls.__dict__.get(method)
            if inspect.isfunction(fn) and not getattr(fn, "_rnngrad_explains", False):
                setattr(cls, method, _explaining(fn, method))

    # ---- the protocol -----------------------------------------------------------------

    def init_state(self, batch_size: int):
        """The initial state: a NamedTuple of (B, n_c) tensors, zeros by default."""
        raise NotImplementedError(f"{type(self).__name__} must define init_state(batch_size)")

    def step(self, params: Params, state, x: Tensor):
        """One step: the state after input x (B, D), a NamedTuple like ``state``."""
        raise NotImplementedError(f"{type(self).__name__} must define step(params, state, x)")

    def output(self, state) -> Tensor:
        """(B, H): what the readout or the next layer sees."""
        raise NotImplementedError(f"{type(self).__name__} must define output(state)")

    def emit(self, params: Params, state, x: Tensor) -> Tensor:
        """(B, H): the output of step t from the new state, the parameters and the step's
        input x (B, D). Default: ``output(state)``; override it (and leave ``output``
        undefined) when the output depends on parameters or on x."""
        return self.output(state)

    def emit_vjp(self, params: Params, state, x: Tensor, g: Tensor):
        """The adjoint of ``emit`` for a cotangent g (B, H): ``(d_params, d_state, d_x)``,
        d_params a dict name -> tensor summed over the batch (the parameters ``emit``
        uses; others may be absent), d_state (B, S) flattened, d_x (B, D). Default:
        ``torch.func.vjp``."""
        from . import _derive

        return _derive.emit_vjp(self, params, state, x, g)

    def emit_jacobians(self, params: Params, state, x: Tensor):
        """``(G_s (B, H, S), G_x (B, H, D), G_p (B, H, N))``: ``emit``'s Jacobians per
        example, G_p's columns the parameters flattened in ``params`` order (what exact
        RTRL on a stack needs of a lower layer). Default: ``vmap(jacrev)``."""
        from . import _derive

        return _derive.emit_jacobians(self, params, state, x)

    # ---- conveniences -----------------------------------------------------------------

    def params(self) -> dict[str, Tensor]:
        """``dict(self.named_parameters())``: the ``params`` argument of ``step``."""
        return dict(self.named_parameters())

    def forward(self, x: Tensor, state=None):
        """One step with the cell's own parameters: ``cell(x, state) -> state``."""
        if state is None:
            state = self.init_state(x.shape[0])
        return self.step(self.params(), state, x)

    def _like(self) -> Tensor:
        for p in self.parameters():
            return p
        return torch.zeros(())

    # ---- units ------------------------------------------------------------------------

    @property
    def n_units(self) -> int:
        """U: every state component is (B, U); column i is unit i's. Default: H."""
        return self.hidden_size

    def param_blocks(self) -> dict[str, int | None]:
        """For each parameter, G when it is owned row by row (shape (G U, ...), row
        ``g U + i`` owned by unit i), or None when no unit owns it. Default: every
        parameter whose first dimension is a multiple of U is owned."""
        U = self.n_units
        out: dict[str, int | None] = {}
        for name, p in self.named_parameters():
            out[name] = p.shape[0] // U if p.dim() >= 1 and p.shape[0] % U == 0 else None
        return out

    # ---- derivatives (torch.func defaults) --------------------------------------------

    def _single(self, params: Params, like):
        """``F(params, s (S,), x (D,)) -> s' (S,)`` for one example (for vmap)."""

        def f(p, s, x):
            state = unflatten_state(s.unsqueeze(0), like)
            return flatten_state(self.step(p, state, x.unsqueeze(0))).squeeze(0)

        return f

    def jacobian(self, params: Params, state, x: Tensor) -> Tensor:
        """(B, S, S): ``d s_t / d s_{t-1}`` per example, by ``vmap(jacrev)``."""
        return self.linearize(params, state, x, need=("jacobian",)).jacobian

    def input_jacobian(self, params: Params, state, x: Tensor) -> Tensor:
        """(B, S, D): ``d s_t / d x_t`` per example."""
        return self.linearize(params, state, x, need=("input_jacobian",)).input_jacobian

    def local_jacobian(self, params: Params, state, x: Tensor) -> Tensor:
        """(B, U, C, C): the per-unit diagonal blocks of ``jacobian``."""
        return self.linearize(params, state, x, need=("local",)).local

    def eligibility_jacobian(self, params: Params, state, x: Tensor) -> Tensor:
        """(B, U, C, C): what e-prop's traces go through. Default: ``local_jacobian``."""
        return self.linearize(params, state, x, need=("eligibility",)).eligibility

    def immediate(self, params: Params, state, x: Tensor) -> dict[str, Immediate]:
        """Per owned parameter, ``d state_t / d p`` on the rows each unit owns."""
        return self.linearize(params, state, x, need=("immediate",)).immediate

    def linearize(self, params: Params, state, x: Tensor, *, need=()) -> Linearization:
        """The next state and the derivatives named in ``need`` (a subset of
        ``LINEARIZE_FIELDS``). Cells that declare structure override this (or the
        single methods); this default derives everything with ``torch.func``."""
        from . import _derive

        return _derive.linearize(self, params, state, x, tuple(need))

    # ---- whole-sequence BPTT (default: a torch.func.vjp per step) --------------------

    def forward_sequence(self, params: Params, inputs: Tensor, state0, *, cache: bool = False):
        """Run over ``inputs`` (T, B, D) from ``state0``.

        Returns ``(outputs (T, B, H), state_T, cache)``; ``cache`` (when asked for) is
        what ``backward_sequence`` needs, None otherwise.
        """
        from . import _derive

        return _derive.forward_sequence(self, params, inputs, state0, cache)

    def backward_sequence(self, params: Params, inputs: Tensor, state0, cache, d_outputs: Tensor,
                          d_state: Any = None, *, input_grad: bool = True):
        """The adjoint pass over one sequence.

        Args:
            cache: from ``forward_sequence(..., cache=True)`` on the same arguments.
            d_outputs: (T, B, H) ``dL/d output(state_t)`` arriving from outside the cell
                at each step (readout, next layer, reward).
            d_state: ``dL/d state_T`` from later steps (a state), or None for zero.
            input_grad: also return ``dL/d inputs``.

        Returns:
            ``(grads, d_inputs, d_state0)``: a dict keyed like ``params`` (summed over the
            batch), (T, B, D) or None, and ``dL/d state_0`` (a state).
        """
        from . import _derive

        return _derive.backward_sequence(self, params, inputs, state0, cache, d_outputs, d_state,
                                         input_grad)

    @property
    def emits(self) -> bool:
        """True when the cell overrides ``emit``: its output depends on parameters or x."""
        return type(self).emit is not Cell.emit

    @property
    def hand_derived_bptt(self) -> bool:
        """True when the cell overrides ``backward_sequence`` with its own derivation."""
        return type(self).backward_sequence is not Cell.backward_sequence

    # ---- checks -----------------------------------------------------------------------

    def check_state(self, state, batch_size: int, *, name: str = "state") -> None:
        """Raise unless ``state`` has this cell's fields and (B, n_c) shapes."""
        ref = self.init_state(batch_size)
        _check_state_like(state, ref, name, type(self).__name__)


def is_builtin(cls: type) -> bool:
    """True for rnngrad's own cell classes (not a user's subclass of one): they are verified
    by rnngrad's test suite, so the first-use checks of a user's cell skip them."""
    return cls.__module__.startswith("rnngrad.cells.")


_VMAP_ALGORITHMS = ("rtrl(), snap1(), eprop() and uoro() derive the Jacobians of a cell that "
                    "does not declare them with torch.func.vmap, one example at a time")


def functional_error(cell: Any, method: str, e: BaseException) -> str | None:
    """The one-line explanation of a torch.func error raised inside a user's ``method``
    (None when ``e`` is not one of those)."""
    msg = str(e)
    name = f"{type(cell).__name__}.{method}"
    if msg.startswith("vmap: It looks like you're"):
        return (f"{name} uses a tensor's value in Python (an `if` or `while` on a tensor, "
                f".item(), float(t), bool(t)), which torch.func.vmap cannot follow: "
                f"{_VMAP_ALGORITHMS}, so they need a step of tensor operations only. Write the "
                "branch with torch.where(cond, a, b) (or clamp, min, max), or declare linearize "
                "(docs/cells.md); bptt() and tbptt(k) take only a vjp and run such a step as it "
                "is")
    if msg.startswith("vmap: called random operation"):
        return (f"{name} draws random numbers (torch.randn, dropout, ...), which "
                f"torch.func.vmap refuses: {_VMAP_ALGORITHMS}, and each draw would differ "
                "between the example and the derivative. Draw the noise outside and pass it "
                "in through x (or keep it in the state); bptt() and tbptt(k) take only a vjp "
                "and run such a step as it is")
    in_place = "mutate a captured Tensor" in msg or msg.startswith("vmap: inplace arithmetic")
    if not in_place and "doesn't match the broadcast shape" in msg:
        # an in-place update of a tensor made for one example, with a batched one, under vmap
        in_place = torch._C._functorch.maybe_current_level() is not None
    if in_place:
        return (f"{name} updates a tensor in place (+=, .add_(), .copy_(), x[i] = ...) that "
                "torch.func cannot follow: every algorithm runs step under torch.func.vjp or "
                "jvp, and " + _VMAP_ALGORITHMS + ". Write it out of "
                "place (a = a + b, torch.where) and keep what changes over time in the state "
                "NamedTuple that step returns, not in the module")
    return None


def _explaining(fn, method: str):
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except RuntimeError as e:
            msg = functional_error(self, method, e)
            if msg is None:
                raise
            raise TypeError(msg) from e

    wrapper._rnngrad_explains = True
    return wrapper


# ---- what a cell's constructor checks -----------------------------------------------------


def check_factory(dtype: Any, device: Any) -> None:
    """The ``dtype`` and ``device`` a cell's constructor takes: None, a real floating
    ``torch.dtype``; None or a device torch knows and can use here."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                              or dtype.is_complex):
        hint = ("; keep a complex parameter as its real and imaginary parts, as "
                "rnngrad.cells.LRU does" if isinstance(dtype, torch.dtype) and dtype.is_complex
                else "")
        raise TypeError(f"dtype must be a real floating torch.dtype (torch.float32 or "
                        f"torch.float64) or None, got {dtype!r}{hint}")
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got "
                         f"{device!r}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {device!r} asked for CUDA, but torch {torch.__version__} "
                             "sees no CUDA device here")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r}: torch sees {n} CUDA device(s) here "
                             f"(cuda:0..cuda:{n - 1})")


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool or a string) in the given range, as a float."""
    import numbers

    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    want = f"a finite number in {lo}, {hi}" if lo and hi else (
        f"a finite number {'>' if low_open else '>='} {low:g}" if lo else
        f"a finite number {'<' if high_open else '<='} {high:g}" if hi else "a finite number")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    v = float(value)
    ok = math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def _check_state_like(state, ref, name: str, owner: str) -> None:
    fields = getattr(type(ref), "_fields", None)
    if not isinstance(state, tuple) or len(state) != len(ref):
        raise TypeError(f"{name} must be a {type(ref).__name__}{tuple(fields or ())} of "
                        f"{owner}, got {type(state).__name__}")
    for i, (s, r) in enumerate(zip(state, ref)):
        label = f"{name}.{fields[i]}" if fields else f"{name}[{i}]"
        if not isinstance(s, Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(s).__name__}")
        if s.shape != r.shape:
            raise ValueError(f"{label} has shape {tuple(s.shape)} but {owner} expects "
                             f"{tuple(r.shape)}")
        if s.dtype != r.dtype:
            raise TypeError(f"{label} has dtype {s.dtype} but {owner}'s parameters are {r.dtype}")
        if s.device != r.device:
            raise ValueError(f"{label} is on device {s.device} but {owner} is on {r.device}")
