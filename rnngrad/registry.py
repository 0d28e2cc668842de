"""One registry from CLI names to algorithm and cell factories.

``get_algorithm("tbptt:10")`` -> ``tbptt(10)``; ``get_algorithm("bptt")`` -> ``bptt()``.
A name may carry one integer argument after a colon. ``get_cell("gru")`` -> the class
``rnngrad.cells.GRU``; ``get_cell("mycells:MGU")`` imports ``MGU`` from ``mycells`` (the
working directory first). ``build_network`` makes the model a CLI run trains. Adding an
algorithm or a cell means adding its factory here.
"""

from __future__ import annotations

from collections.abc import Callable

from .algorithms import Algorithm, bptt, eprop, kf_rtrl, rflo, rtrl, snap1, tbptt, uoro
from .cells.base import Cell

__all__ = ["ALGORITHMS", "get_algorithm", "parse_algorithms", "CELLS", "get_cell",
           "build_network"]

# name -> (factory, takes an integer argument, help text)
ALGORITHMS: dict[str, tuple[Callable[..., Algorithm], bool, str]] = {
    "bptt": (bptt, False, "exact backpropagation through time (hand-derived)"),
}
ALGORITHMS.update({
    "eprop": (eprop, False, "e-prop, symmetric feedback (Bellec et al. 2020)"),
    "eprop_rand": (lambda: eprop("random"), False, "e-prop, random feedback (Bellec et al. 2020)"),
    "rflo": (rflo, False, "random-feedback local online learning (Murray 2019)"),
    "snap1": (snap1, False, "SnAp-1, RTRL on each unit's own parameters (Menick et al. 2021)"),
    "uoro": (uoro, False, "unbiased rank-one RTRL (Tallec & Ollivier 2018)"),
    "kf_rtrl": (kf_rtrl, False, "Kronecker-factored RTRL (Mujika et al. 2018)"),
})

ALGORITHMS.update({
    "rtrl": (rtrl, False, "exact real-time recurrent learning, structured influence (Williams & Zipser 1989)"),
    "rtrl_generic": (lambda: rtrl(generic=True), False,
                     "exact RTRL for any cell, Jacobians by torch.func (slow; an oracle)"),
    "tbptt": (tbptt, True, "truncated BPTT, streaming, one gradient every K steps"),
    "bptt_ckpt": (lambda c: bptt(checkpoint=c), True,
                  "exact BPTT storing h every C steps, recomputed backward (memory ~T/C + C)"),
})


def get_algorithm(spec: str) -> Algorithm:
    """Build an algorithm from a CLI spec such as ``"bptt"`` or ``"tbptt:10"``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"algorithm spec must be a non-empty string, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name not in ALGORITHMS:
        known = ", ".join(f"{n}:K" if ALGORITHMS[n][1] else n for n in ALGORITHMS)
        raise ValueError(f"unknown algorithm {spec!r}; known algorithms: {known}")
    factory, takes_arg, _ = ALGORITHMS[name]
    if takes_arg:
        if not arg:
            raise ValueError(f"algorithm {name!r} needs an integer argument, e.g. {name}:10")
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"algorithm {spec!r}: {arg!r} is not an integer") from None
        return factory(k)
    if arg:
        raise ValueError(f"algorithm {name!r} takes no argument, got {spec!r}")
    return factory()


def parse_algorithms(specs: str) -> list[tuple[str, Algorithm]]:
    """``"bptt,tbptt:10"`` -> [("bptt", bptt()), ("tbptt:10", tbptt(10))]."""
    out = []
    for s in specs.split(","):
        s = s.strip()
        if s:
            out.append((s, get_algorithm(s)))
    if not out:
        raise ValueError(f"no algorithm named in {specs!r}")
    return out


def _builtin_cells() -> dict[str, tuple[Callable[..., Cell], str]]:
    from .cells import ALIF, ELSTM, GRU, LIF, LRU, LSTM, Elman

    return {
        "elman": (Elman, "the (leaky) Elman cell phi(W_in x + W_rec h + b_rec); "
                         "--activation, --alpha, --init apply"),
        "gru": (GRU, "PyTorch's GRU (gates r, z, n)"),
        "lstm": (LSTM, "PyTorch's LSTM (gates i, f, g, o; state h, c)"),
        "lif": (LIF, "leaky integrate-and-fire spiking neurons (Bellec et al. 2020; state v, "
                     "output spikes; triangle pseudo-derivative)"),
        "alif": (ALIF, "adaptive-threshold LIF neurons, Bellec et al. 2020's LSNN units "
                       "(state v, a)"),
        "lru": (LRU, "the Linear Recurrent Unit, complex diagonal (Orvieto et al. 2023; state "
                     "re, im; output Re(C h) + D x): exact RTRL by per-unit traces"),
        "elstm": (ELSTM, "the element-wise LSTM (Irie et al. 2023; state c, output gate on "
                         "c_t): exact RTRL by per-unit traces"),
    }


# name -> (factory called as factory(input_size, hidden_size, **options), help text)
CELLS: dict[str, tuple[Callable[..., Cell], str]] = _builtin_cells()


def get_cell(spec: str) -> Callable[..., Cell]:
    """A cell class (or factory) from a CLI spec: a built-in name, or ``module:Class`` for a
    user's ``rnngrad.cells.Cell`` subclass importable from the working directory, built as
    ``Class(input_size, hidden_size)``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"cell spec must be a non-empty string, got {spec!r}")
    if spec in CELLS:
        return CELLS[spec][0]
    if ":" not in spec:
        raise ValueError(f"unknown cell {spec!r}; known cells: {', '.join(CELLS)}, or "
                         "module:Class for your own rnngrad.cells.Cell subclass")
    import importlib
    import os
    import sys

    module, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cell {spec!r}: cannot import module {module!r} from the working "
                         f"directory or the path ({e})") from None
    cls = getattr(mod, name, None)
    if cls is None:
        raise ValueError(f"cell {spec!r}: module {module!r} has no attribute {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Cell)):
        raise ValueError(f"cell {spec!r}: {name} is not a subclass of rnngrad.cells.Cell "
                         f"(got {cls!r})")
    return cls


def build_network(cell: str, input_size: int, hidden_size: int, output_size: int, *,
                  layers: int = 1, readout: str = "identity", activation: str = "tanh",
                  alpha: float = 1.0, init: str = "uniform", dtype=None, device=None):
    """The model of a CLI run: ``rnngrad.RNN`` for one Elman layer (the fast paths), else an
    ``rnngrad.Network`` of ``layers`` cells of ``hidden_size`` units each."""
    from .model import RNN
    from .network import Network

    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    factory = get_cell(cell)
    if cell == "elman" and layers == 1:
        return RNN(input_size, hidden_size, output_size, activation=activation, alpha=alpha,
                   readout=readout, init=init, dtype=dtype, device=device)
    if cell != "elman":
        odd = [f"{flag} {value}" for flag, value, default in (
            ("--activation", activation, "tanh"), ("--alpha", alpha, 1.0),
            ("--init", init, "uniform")) if value != default]
        if odd:
            raise ValueError(f"{', '.join(odd)} apply to --cell elman only, not {cell!r}")
    cells = []
    for i in range(layers):
        D = input_size if i == 0 else hidden_size
        if cell == "elman":
            c = factory(D, hidden_size, activation=activation, alpha=alpha, init=init,
                        dtype=dtype, device=device)
        else:
            c = factory(D, hidden_size)
            if dtype is not None or device is not None:
                c = c.to(dtype=dtype, device=device)
        cells.append(c)
    return Network(cells, output_size, readout=readout)
