"""``rnngrad.Network``: cells and a readout, the one model every algorithm takes.

A network is a stack of cells (layer l's output is layer l + 1's input at the same
step) followed by the linear readout of DESIGN.md::

    state^l_t = cell_l.step(params_l, state^l_{t-1}, h^{l-1}_t),   h^0_t = x_t
    h^l_t     = cell_l.emit(params_l, state^l_t, h^{l-1}_t)   (default: output(state^l_t))
    z_t = W_out h^L_t + b_out,   y_t = g(z_t)

Parameters are named as ``named_parameters()`` names them: ``cells.{l}.{name}`` for
layer l's cell and ``W_out``, ``b_out`` for the readout. The network's state is the
tuple of its layers' states. ``forward`` is a plain loop over ``step``: what
``torch.autograd`` differentiates there is the oracle every algorithm is checked against.

``rnngrad.RNN`` is the one-Elman-layer case, with its own flat parameter names
(``W_in``, ``W_rec``, ``b_rec``, ``W_out``, ``b_out``); the algorithms treat it as any
other network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .cells.base import Cell, is_builtin
from .readouts import check_readout, readout

__all__ = ["Network", "H0Spec"]


class H0Spec(NamedTuple):
    """How a caller gave h0, so that ``grads["h0"]`` comes back in the same form."""

    wrapped: bool  # a sequence of per-layer states (False: one layer's state alone)
    layers: tuple  # per layer: ("tensor" | "tuple", per-component shared-over-batch flags)


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


class Network(nn.Module):
    """Recurrent cells and a linear readout.

    Args:
        cells: one ``rnngrad.cells.Cell`` or a list of them (a stack: layer l's output
            feeds layer l + 1; sizes must chain).
        output_size: K, the width of z_t.
        readout: g, one of identity, softmax, sigmoid.
        readout_decay: kappa in [0, 1), a leaky (non-spiking) readout with its own time
            constant, as in Bellec et al. 2020's tasks: ``z_t = kappa z_{t-1} + W_out h^L_t
            + b_out`` from ``z_0 = 0`` (kappa = exp(-dt / tau_out)); 0 (the default) is the
            plain readout. Every algorithm on a Network takes it (``rnngrad.RNN`` does not).
        verify: check a user's cell (``Cell`` subclasses outside rnngrad): when built, that
            ``step`` and ``emit``/``output`` read every parameter through ``params`` (not
            ``self``) and change nothing in place; once, the first time the network is used
            (``layers()``, which every algorithm and ``forward`` call), what it declares by
            hand (``linearize``, the Jacobian methods, ``forward_sequence``/
            ``backward_sequence``, ``emit_vjp``) against the torch.func derivation of its
            step on a random batch. False skips both (for benchmarks of a cell already
            checked with ``rnngrad check --cell``, or a test of what happens past them).
            rnngrad's own cells are never re-checked here.

    Checked for every cell when built: one object per layer, no parameter shared between
    layers, at least one parameter, the protocol's types and shapes.

    Parameters: each cell's as ``cells.{l}.{name}``, and ``W_out (K, H)``, ``b_out (K,)``
    with H the last cell's ``hidden_size``, drawn U(-1/sqrt(H), 1/sqrt(H)).
    """

    readout_decay: float = 0.0  # kappa (rnngrad.RNN keeps 0)

    _pending_verify: bool = False  # a user's declarations still to check (see ``verify``)

    def __init__(self, cells: Cell | Sequence[Cell], output_size: int, *,
                 readout: str = "identity", readout_decay: float = 0.0,
                 verify: bool = True) -> None:
        super().__init__()
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be a bool, got {verify!r}")
        cells = _as_cells(cells, verify)
        self._pending_verify = verify and any(not is_builtin(type(c)) for c in cells)
        if not isinstance(output_size, int) or isinstance(output_size, bool) or output_size < 1:
            raise ValueError(f"output_size must be a positive int, got {output_size!r}")
        if (not isinstance(readout_decay, (int, float)) or isinstance(readout_decay, bool)
                or not 0.0 <= readout_decay < 1.0):
            raise ValueError(f"readout_decay must be a number kappa in [0, 1) (z_t = kappa "
                             f"z_{{t-1}} + W_out h_t + b_out), got {readout_decay!r}")
        self.readout_decay = float(readout_decay)
        self.cells = nn.ModuleList(cells)
        self.readout = check_readout(readout)
        like = cells[-1]._like()
        kw = {"dtype": like.dtype, "device": like.device}
        H = cells[-1].hidden_size
        self.W_out = nn.Parameter(torch.empty(output_size, H, **kw))
        self.b_out = nn.Parameter(torch.empty(output_size, **kw))
        self.reset_readout()

    def reset_readout(self) -> None:
        bound = 1.0 / math.sqrt(self.W_out.shape[1])
        with torch.no_grad():
            self.W_out.uniform_(-bound, bound)
            self.b_out.uniform_(-bound, bound)

    # ---- structure --------------------------------------------------------------------

    def layers(self) -> list[tuple[str, Cell]]:
        """``(prefix, cell)`` per layer; the cell's parameter ``n`` is ``prefix + n`` here.

        The first call checks what a user's cell declares (see ``verify``)."""
        if self._pending_verify:
            self._verify_declarations()
        return [(f"cells.{i}.", c) for i, c in enumerate(self.cells)]

    def _verify_declarations(self) -> None:
        from .cells._derive import verify_declarations

        for i, c in enumerate(self.cells):
            if not is_builtin(type(c)):
                verify_declarations(c, f"cells[{i}] ({type(c).__name__})")
        self._pending_verify = False

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def input_size(self) -> int:
        return self.layers()[0][1].input_size

    @property
    def hidden_size(self) -> int:
        """H: the width of the last layer's output, what the readout reads."""
        return self.W_out.shape[1]

    @property
    def output_size(self) -> int:
        return self.W_out.shape[0]

    def layer_params(self, params: dict[str, Tensor] | None = None) -> list[dict[str, Tensor]]:
        """Per layer, its cell's parameters under the cell's own names.

        ``params``: a dict keyed like ``named_parameters()`` (default: the network's own).
        """
        params = dict(self.named_parameters()) if params is None else params
        out = []
        for prefix, cell in self.layers():
            out.append({n: params[prefix + n] for n, _ in cell.named_parameters()})
        return out

    def recurrent_names(self) -> list[str]:
        """The names of every parameter but the readout's, in ``named_parameters`` order."""
        return [n for n, _ in self.named_parameters() if n not in ("W_out", "b_out")]

    # ---- state ------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> tuple:
        """Zeros: one state per layer, each component (batch_size, n_c)."""
        from ._checks import check_batch_size

        batch_size = check_batch_size(batch_size)
        return tuple(_real_state(cell.init_state(batch_size), i, cell)
                     for i, (_, cell) in enumerate(self.layers()))

    def step(self, params: list[dict[str, Tensor]], state: tuple, x: Tensor) -> tuple[tuple, Tensor]:
        """One step of the stack: ``(state_t, h^L_t)``; params as ``layer_params`` gives them."""
        new = []
        for (_, cell), p, s in zip(self.layers(), params, state):
            s = cell.step(p, s, x)
            x = cell.emit(p, s, x)
            new.append(s)
        return tuple(new), x

    def coerce_state(self, h0: Any, batch_size: int, *, name: str = "h0") -> tuple[tuple, H0Spec]:
        """Validate an initial state and bring it to one (B, n_c) state per layer.

        Accepted: None (zeros); for one layer, its state (a NamedTuple of (B, n) or (n,)
        tensors) or, when that state has one component, a tensor (B, n) or (n,); for any
        number of layers, a list or tuple of such per-layer states. A (n,) component is
        shared by the whole batch (its gradient is then summed over the batch).
        """
        if h0 is None:
            init = self.init_state(batch_size)
            return init, H0Spec(True, tuple(("tuple", (False,) * len(s)) for s in init))
        layers = self.layers()
        is_state = isinstance(h0, Tensor) or (isinstance(h0, tuple) and hasattr(h0, "_fields"))
        if is_state and len(layers) == 1:
            items, wrapped = [h0], False
        elif isinstance(h0, (list, tuple)) and not hasattr(h0, "_fields"):
            items, wrapped = list(h0), True
        else:
            raise TypeError(f"{name} must be a state of the network (one state per layer, as "
                            f"net.init_state(B) gives), got {type(h0).__name__}")
        if len(items) != len(layers):
            raise ValueError(f"{name} holds {len(items)} layer state(s) but the network has "
                             f"{len(layers)} layer(s)")
        out, spec = [], []
        for i, ((_, cell), item) in enumerate(zip(layers, items)):
            ref = _real_state(cell.init_state(batch_size), i, cell)
            label = f"{name}[{i}]" if wrapped else name
            fields = ref._fields if hasattr(ref, "_fields") else tuple(map(str, range(len(ref))))
            if isinstance(item, Tensor):
                if len(ref) != 1:
                    raise TypeError(f"{label} is a tensor but {type(cell).__name__}'s state has "
                                    f"{len(ref)} components {fields}: give a "
                                    f"{type(ref).__name__}")
                comps, kind = [item], "tensor"
            elif isinstance(item, (tuple, list)):
                comps, kind = list(item), "tuple"
                if len(comps) != len(ref):
                    raise ValueError(f"{label} has {len(comps)} components but "
                                     f"{type(cell).__name__}'s state has {len(ref)} {fields}")
            else:
                raise TypeError(f"{label} must be a tensor or a {type(ref).__name__} of tensors, "
                                f"got {type(item).__name__}")
            shared, vals = [], []
            for f, c, r in zip(fields, comps, ref):
                lab = f"{label}.{f}" if kind == "tuple" else label
                if not isinstance(c, Tensor):
                    raise TypeError(f"{lab} must be a torch.Tensor, got {type(c).__name__}")
                if c.dtype != r.dtype:
                    raise TypeError(f"{lab} has dtype {c.dtype} but the network's parameters "
                                    f"are {r.dtype}")
                if c.device != r.device:
                    raise ValueError(f"{lab} is on device {c.device} but the network is on "
                                     f"{r.device}")
                n = r.shape[1]
                if c.dim() == 1 and c.shape[0] == n:
                    shared.append(True)
                    c = c.expand(batch_size, n)
                elif tuple(c.shape) == (batch_size, n):
                    shared.append(False)
                else:
                    raise ValueError(f"{lab} has shape {_shape(c)} but expected ({batch_size}, {n}) "
                                     f"or ({n},)")
                if not bool(torch.isfinite(c).all()):
                    raise ValueError(f"{lab} contains NaN or Inf entries")
                vals.append(c)
            st = type(ref)(*vals)
            cell.check_state(st, batch_size, name=label)  # a cell's own checks of its values
            out.append(st)
            spec.append((kind, tuple(shared)))
        return tuple(out), H0Spec(wrapped, tuple(spec))

    @staticmethod
    def pack_state_grad(d_state: tuple, spec: H0Spec) -> Any:
        """``dL/d state_0`` (one (B, n_c) state per layer) in the form h0 was given."""
        layers = []
        for ds, (kind, shared) in zip(d_state, spec.layers):
            comps = [c.sum(0) if s else c for c, s in zip(ds, shared)]
            layers.append(comps[0] if kind == "tensor" else type(ds)(*comps))
        return tuple(layers) if spec.wrapped else layers[0]

    # ---- the forward pass (autograd's oracle) -----------------------------------------

    def forward(self, inputs: Tensor, h0: Any = None) -> tuple[Tensor, Tensor]:
        """Run the network over a sequence.

        Args:
            inputs: (T, B, D).
            h0: initial state (see ``coerce_state``); zeros when None.

        Returns:
            ``(y, h)``: outputs y_t = g(z_t) (T, B, K) and the last layer's outputs
            h^L_1..h^L_T (T, B, H). A plain loop over the cells' ``step``, so
            ``torch.autograd`` differentiates it: that is the reference.
        """
        from ._checks import check_inputs

        T, B = check_inputs(self, inputs)
        state, _ = self.coerce_state(h0, B)
        params = self.layer_params()
        hs = []
        for t in range(T):
            state, h = self.step(params, state, inputs[t])
            hs.append(h)
        h = torch.stack(hs)
        return readout(self.readout_z(h), self.readout), h

    def readout_z(self, h: Tensor) -> Tensor:
        """z_1..z_T (T, B, K) from the last layer's outputs h (T, B, H): ``W_out h_t + b_out``,
        low-pass filtered ``z_t = kappa z_{t-1} + ...`` (z_0 = 0) with ``readout_decay``."""
        z = h @ self.W_out.T + self.b_out
        kappa = self.readout_decay
        if kappa == 0.0:
            return z
        zs, prev = [], None
        for u in z.unbind(0):
            prev = u if prev is None else kappa * prev + u
            zs.append(prev)
        return torch.stack(zs)

    def extra_repr(self) -> str:
        leak = f", readout_decay={self.readout_decay:g}" if self.readout_decay else ""
        return f"output_size={self.output_size}, readout={self.readout!r}{leak}"

    # ---- from torch.nn ----------------------------------------------------------------

    @classmethod
    def from_torch(cls, rnn: nn.Module, linear: nn.Linear, *, readout: str = "identity",
                   share: bool = False) -> Network:
        """The same function as ``linear(rnn(x)[0])`` (then g), from a ``torch.nn.RNN``,
        ``GRU`` or ``LSTM`` of any ``num_layers`` and an ``nn.Linear``.

        Weights are copied (gate order and bias layout are PyTorch's); the result has
        the module's dtype and device. Dropout between layers is not carried over: the
        network equals the module in eval mode. ``bias=False`` gives zero biases (which
        are then trainable here).

        ``share=True``: the network's parameters are the module's own ``nn.Parameter``
        objects, so ``rnngrad.gradient(net, ..., set_grad=True)`` by any algorithm writes
        the module's ``.grad`` and ``torch.optim`` over ``rnn.parameters()`` and
        ``linear.parameters()`` trains both. For ``torch.nn.RNN`` (one bias ``b_rec`` here,
        two there) ``bias_hh`` is folded into ``bias_ih`` in place and frozen at zero: the
        same function. A bias the module lacks is a zero here with ``requires_grad=False``.
        """
        from .cells.interop import from_torch

        return from_torch(cls, rnn, linear, readout, share)

    def to_torch(self) -> tuple[nn.Module, nn.Linear]:
        """Back to PyTorch: ``(torch.nn.RNN | GRU | LSTM, nn.Linear)`` with copies of the
        weights, ``num_layers`` the number of layers, such that ``linear(rnn(x)[0])`` is z_t
        (to float64 round-off; apply the readout g on top). For networks of Elman (tanh or
        relu, ``alpha = 1``), GRU or LSTM layers of one type and one width with the plain
        readout, every network ``from_torch`` makes; anything else raises, naming why.
        ``rnngrad.cells.interop.state_to_torch`` converts an initial state."""
        from .cells.interop import to_torch

        return to_torch(self)


def _real_state(state, i: int, cell: Cell):
    """The state unchanged; a clear error for a component that is not a real float tensor
    (a complex state: rnngrad's algorithms take real tensors only)."""
    fields = getattr(type(state), "_fields", None) or [str(k) for k in range(len(state))]
    for f, c in zip(fields, state):
        if isinstance(c, Tensor) and (c.is_complex() or not c.dtype.is_floating_point):
            raise TypeError(f"cells[{i}] ({type(cell).__name__}) has a state component {f!r} of "
                            f"dtype {c.dtype}, but rnngrad's algorithms take real states only "
                            "(float32 or float64): keep a complex state as its real and "
                            "imaginary parts, as rnngrad.cells.LRU does (LRUState(re, im))")
    return state


def _as_cells(cells, verify: bool = True) -> list[Cell]:
    if isinstance(cells, Cell):
        cells = [cells]
    elif isinstance(cells, nn.Module) and not isinstance(cells, nn.ModuleList):
        raise TypeError(f"cells must be an rnngrad.cells.Cell or a list of them, got "
                        f"{type(cells).__name__} (torch.nn modules: use Network.from_torch)")
    try:
        cells = list(cells)
    except TypeError:
        raise TypeError(f"cells must be an rnngrad.cells.Cell or a list of them, got "
                        f"{type(cells).__name__}") from None
    if not cells:
        raise ValueError("cells is empty: give at least one cell")
    owner: dict[int, tuple[int, str]] = {}
    for i, c in enumerate(cells):
        if not isinstance(c, Cell):
            raise TypeError(f"cells[{i}] must be an rnngrad.cells.Cell, got {type(c).__name__}")
        for j in range(i):
            if cells[j] is c:
                raise ValueError(f"cells[{i}] is the same {type(c).__name__} object as "
                                 f"cells[{j}]: each layer needs its own cell (its own "
                                 "parameters and state); build another, e.g. "
                                 "copy.deepcopy(cell), or one cell per layer")
        named = list(c.named_parameters())
        if not named:
            raise ValueError(f"cells[{i}] ({type(c).__name__}) has no parameters: rnngrad's "
                             "algorithms compute the gradients of each cell's parameters and "
                             "need at least one nn.Parameter per cell; put a fixed "
                             "transformation inside a neighbouring cell's step")
        for n, p in named:
            j, m = owner.setdefault(id(p), (i, n))
            if j != i:
                raise ValueError(f"cells[{i}] ({type(c).__name__}) shares its parameter {n!r} "
                                 f"with cells[{j}] ({m!r}): parameters tied across layers are "
                                 "not supported (each gradient is keyed by one layer's name); "
                                 "give each layer its own tensor")
        for attr in ("input_size", "hidden_size"):
            v = getattr(c, attr, None)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TypeError(f"cells[{i}] ({type(c).__name__}) must set {attr} to a positive "
                                f"int, got {v!r}")
    for i in range(1, len(cells)):
        if cells[i].input_size != cells[i - 1].hidden_size:
            raise ValueError(f"cells[{i}] ({type(cells[i]).__name__}) has input_size "
                             f"{cells[i].input_size} but cells[{i - 1}] outputs "
                             f"{cells[i - 1].hidden_size}")
    like = [(c._like().dtype, c._like().device) for c in cells]
    for i in range(1, len(cells)):
        if like[i][0] != like[0][0]:
            raise TypeError(f"cells[{i}] has dtype {like[i][0]} but cells[0] has {like[0][0]}: "
                            "every layer must share one dtype")
        if like[i][1] != like[0][1]:
            raise ValueError(f"cells[{i}] is on device {like[i][1]} but cells[0] is on "
                             f"{like[0][1]}: every layer must be on one device")
    for i, c in enumerate(cells):
        dt = c._like().dtype
        if not dt.is_floating_point or dt.is_complex:
            raise TypeError(f"cells[{i}] has parameters of dtype {dt}; rnngrad needs a real "
                            "floating dtype (float32 or float64)")
        for n, p in c.named_parameters():
            if p.is_complex() or not p.dtype.is_floating_point:
                raise TypeError(f"cells[{i}] ({type(c).__name__}) has parameter {n!r} of dtype "
                                f"{p.dtype}; rnngrad needs real parameters (float32 or float64): "
                                "write a complex parameter as its real and imaginary parts, as "
                                "rnngrad.cells.LRU does (B_re, B_im)")
        check_contract(c, f"cells[{i}] ({type(c).__name__})")
        if verify and not is_builtin(type(c)) and c._like().device.type != "meta":
            from .cells._derive import verify_pure, verify_reads

            verify_pure(c, f"cells[{i}] ({type(c).__name__})")
            verify_reads(c, f"cells[{i}] ({type(c).__name__})")
    return cells


def check_contract(cell: Cell, label: str) -> None:
    """Run the cell once on a batch of 2 from its initial state, and check what the
    protocol promises: a NamedTuple state of (B, n) tensors of the parameters' dtype, a
    step returning the same type and shapes, an output of (B, hidden_size)."""
    like = cell._like()
    with torch.no_grad():
        try:
            state = cell.init_state(2)
        except Exception as e:
            raise TypeError(f"{label}: init_state(2) raised {type(e).__name__}: {e}") from e
        if not (isinstance(state, tuple) and hasattr(state, "_fields")):
            raise TypeError(f"{label}: init_state must return a NamedTuple of (B, n) tensors, "
                            f"got {type(state).__name__}")
        for f, v in zip(state._fields, state):
            if not isinstance(v, Tensor) or v.dim() != 2 or v.shape[0] != 2:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise TypeError(f"{label}: init_state(2).{f} must be a (2, n) tensor, got {got}")
            if v.dtype != like.dtype or v.device != like.device:
                raise TypeError(f"{label}: init_state(2).{f} is {v.dtype} on {v.device} but the "
                                f"cell's parameters are {like.dtype} on {like.device}")
        x = torch.zeros(2, cell.input_size, dtype=like.dtype, device=like.device)
        params = cell.params()
        try:
            new = cell.step(params, state, x)
        except Exception as e:
            raise TypeError(f"{label}: step(params, state, x) raised on a (2, {cell.input_size}) "
                            f"input: {type(e).__name__}: {e}") from e
        if type(new) is not type(state):
            raise TypeError(f"{label}: step must return a {type(state).__name__} (the type "
                            f"init_state returns), got {type(new).__name__}")
        for f, a, b in zip(state._fields, new, state):
            if not isinstance(a, Tensor) or a.shape != b.shape or a.dtype != b.dtype:
                got = (f"{tuple(a.shape)} {a.dtype}" if isinstance(a, Tensor)
                       else type(a).__name__)
                raise TypeError(f"{label}: step returned state.{f} of {got} but the state has "
                                f"{tuple(b.shape)} {b.dtype}")
        emit = getattr(cell, "emit", None)
        out = emit(params, new, x) if emit is not None else cell.output(new)
        if not isinstance(out, Tensor) or out.shape != (2, cell.hidden_size):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"{label}: its output must be (B, hidden_size) = "
                            f"(2, {cell.hidden_size}), got {got}")
