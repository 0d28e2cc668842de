"""Check every exact algorithm against ``torch.autograd`` on every kind of network.

For ``rnngrad.RNN`` the reference is written independently of the algorithms (and of
``rnngrad.readouts`` and ``rnngrad.cells``): a Python loop over time of

    a_t = W_in x_t + W_rec h_{t-1} + b_rec,   h_t = (1 - alpha) h_{t-1} + alpha phi(a_t)
    z_t = W_out h_t + b_out,   L = (1/B) sum_{t,b} mask[t,b] l(t,b)  (- R(h_1..h_T))

For any other ``rnngrad.Network`` (each built-in cell, mixed stacks, a user's cell given
as ``module:Class``) it is the network's own definition, a loop over the cells' ``step``,
with the same loss written out here; the algorithms never differentiate that loop.
Each gradient is compared with autograd's by the max relative error
``max_name max|g - g_ref| / max|g_ref|`` over the parameters (and h0 when given); it
passes below ``tol`` (1e-10 in float64).

``run_checks`` returns rows and prints nothing; ``rnngrad check`` prints them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CheckConfig", "CheckRow", "DEFAULT_CONFIGS", "exact_algorithms", "make_problem",
           "reference_gradient", "relative_error", "run_checks"]

_PHI: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "identity": lambda a: a,
    "softplus": F.softplus,
}


class CheckConfig(NamedTuple):
    """One random problem: sizes, network, readout and loss, and what is switched on.

    ``cell`` is "rnn" (``rnngrad.RNN`` with ``activation`` and ``alpha``) or a network: a
    cell name of ``rnngrad.registry.CELLS`` or a user's ``module:Class``, layers joined
    by "+" (``"gru+elman"``: a GRU layer under an Elman layer), each of H units.
    """

    T: int = 5
    B: int = 3
    D: int = 2
    H: int = 4
    K: int = 3
    activation: str = "tanh"
    alpha: float = 1.0
    readout: str = "identity"
    loss: str = "mse"
    mask: str = "none"  # "none" | "random" (random 0/1/fractional weights) | "last" (many-to-one)
    h0: bool = False
    reward: bool = False
    cell: str = "rnn"

    def label(self) -> str:
        parts = [f"T={self.T} B={self.B} D={self.D} H={self.H} K={self.K}"]
        parts += [self.activation] if self.cell == "rnn" else [self.cell]
        parts.append(f"{self.readout}+{self.loss}")
        if self.alpha != 1.0:
            parts.append(f"alpha={self.alpha}")
        if self.mask != "none":
            parts.append(f"mask={self.mask}")
        if self.h0:
            parts.append("h0")
        if self.reward:
            parts.append("reward")
        return " ".join(parts)


class CheckRow(NamedTuple):
    algorithm: str  # e.g. "rtrl()"
    config: str  # CheckConfig.label()
    error: float  # max relative error against autograd
    passed: bool  # error <= tol


DEFAULT_CONFIGS: tuple[CheckConfig, ...] = (
    CheckConfig(),
    CheckConfig(T=7, activation="sigmoid", readout="softmax", loss="cross_entropy", mask="random"),
    CheckConfig(T=6, activation="relu", readout="sigmoid", loss="bce", h0=True),
    CheckConfig(T=5, activation="softplus", alpha=0.3, readout="softmax", loss="mse", h0=True,
                mask="random"),
    CheckConfig(T=6, activation="identity", alpha=0.7, readout="identity", loss="cross_entropy",
                mask="last"),
    CheckConfig(T=4, activation="tanh", alpha=0.5, readout="sigmoid", loss="mse", reward=True,
                h0=True),
    CheckConfig(T=1, B=1, D=1, H=1, K=1, activation="tanh", h0=True),
)


def cell_configs(cell: str) -> tuple[CheckConfig, ...]:
    """The problems for one network spec: plain; cross-entropy with a random mask, h0
    and a reward; and T = B = 1."""
    return (
        CheckConfig(T=5, B=3, D=2, H=4, K=3, cell=cell),
        CheckConfig(T=6, B=2, D=3, H=3, K=3, readout="softmax", loss="cross_entropy",
                    mask="random", h0=True, reward=True, cell=cell),
        CheckConfig(T=1, B=1, D=2, H=2, K=1, h0=True, cell=cell),
    )


def network_specs() -> list[str]:
    """Every registered cell alone, and mixed two- and three-layer stacks of them."""
    from .registry import CELLS

    names = list(CELLS)
    specs = names[:]
    builtin = [n for n in ("gru", "elman", "lstm") if n in names]
    if len(builtin) == 3:
        specs += ["gru+elman", "lstm+gru+elman"]
    return specs


def build(spec: str, D: int, H: int, K: int, readout: str, dtype: torch.dtype):
    """The network of a CheckConfig's ``cell`` spec (not "rnn")."""
    from .network import Network
    from .registry import get_cell

    layers = spec.split("+")
    cells = []
    for i, name in enumerate(layers):
        cell = get_cell(name)(D if i == 0 else H, H)
        cells.append(cell.to(dtype=dtype))
    # verify=False: a wrong declaration shows in the table, against autograd, rather than
    # as the first-use check's error
    return Network(cells, K, readout=readout, verify=False).to(dtype=dtype)


def _reward(h: Tensor) -> Tensor:
    """A smooth reward of the (T, B, H) trajectory (fixed, so the check is reproducible)."""
    T = h.shape[0]
    w = torch.linspace(0.5, 1.5, T, dtype=h.dtype, device=h.device).view(T, 1, 1)
    return (w * torch.sin(h)).sum() - 0.25 * (h * h).mean()


def make_problem(config: CheckConfig, *, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A random model and data for ``config``: ``(model, inputs, targets, mask, h0, reward)``.

    inputs (T, B, D); targets (T, B, K) float or (T, B) int64; mask (T, B) or None;
    h0 (B, H) or None; reward a callable of the (T, B, H) trajectory or None.
    """
    from .model import RNN

    c = config
    g = torch.Generator().manual_seed(seed)
    if c.cell == "rnn":
        model = RNN(c.D, c.H, c.K, activation=c.activation, alpha=c.alpha, readout=c.readout,
                    dtype=dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype)
                        / max(p.shape[-1], 1) ** 0.5)
    else:
        with torch.random.fork_rng(devices=[]):  # the cells' own init, seeded, not global
            torch.manual_seed(seed)
            model = build(c.cell, c.D, c.H, c.K, c.readout, dtype)
    inputs = torch.randn(c.T, c.B, c.D, generator=g, dtype=dtype)
    if c.loss == "cross_entropy":
        targets = torch.randint(c.K, (c.T, c.B), generator=g)
    elif c.loss == "bce":
        targets = torch.rand(c.T, c.B, c.K, generator=g, dtype=dtype)
    else:
        targets = torch.randn(c.T, c.B, c.K, generator=g, dtype=dtype)
        if c.readout != "identity":
            targets = torch.rand(c.T, c.B, c.K, generator=g, dtype=dtype)
    mask = None
    if c.mask == "random":
        mask = torch.randint(0, 3, (c.T, c.B), generator=g).to(dtype) * 0.5
    elif c.mask == "last":
        mask = torch.zeros(c.T, c.B, dtype=dtype)
        mask[-1] = 1.0
    h0 = None
    if c.h0 and c.cell == "rnn":
        h0 = torch.randn(c.B, c.H, generator=g, dtype=dtype) * 0.5
    elif c.h0:
        h0 = tuple(type(s)(*(0.5 * torch.randn(x.shape, generator=g, dtype=dtype) for x in s))
                   for s in model.init_state(c.B))
    reward = _reward if c.reward else None
    return model, inputs, targets, mask, h0, reward


def _step_loss(z: Tensor, target: Tensor, readout: str, loss: str) -> Tensor:
    """Per-example loss (B,) written directly with torch ops."""
    if loss == "mse":
        y = {"identity": z, "softmax": torch.softmax(z, -1), "sigmoid": torch.sigmoid(z)}[readout]
        return 0.5 * ((y - target) ** 2).sum(-1)
    if loss == "cross_entropy":
        return F.cross_entropy(z, target, reduction="none")
    return F.binary_cross_entropy_with_logits(z, target, reduction="none").sum(-1)


def reference_gradient(model, inputs: Tensor, targets: Tensor | None, *, loss: str = "mse",
                       mask: Tensor | None = None, h0: Tensor | None = None,
                       reward: Callable[[Tensor], Tensor] | None = None,
                       detach_every: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss and its gradient by autograd through a plain loop over time.

    Args:
        inputs: (T, B, D); targets: (T, B, K) float or (T, B) class indices, or None;
        mask: (T, B) or None; h0: (B, H) or None (then zeros, and no "h0" key);
        reward: R of the (T, B, H) trajectory (the loss is then L - R), or None.
        detach_every: cut the hidden state from the graph after every this many steps
            (the gradient truncated BPTT(k) computes); None: never.

    Returns:
        ``(loss (), grads)`` keyed like ``model.named_parameters()`` plus "h0" when given.
    """
    from .model import RNN

    if not isinstance(model, RNN):
        return _network_reference(model, inputs, targets, loss=loss, mask=mask, h0=h0,
                                  reward=reward, detach_every=detach_every)
    T, B, _ = inputs.shape
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    phi = _PHI[model.activation]
    alpha = model.alpha
    with torch.enable_grad():
        if h0 is None:
            h = torch.zeros(B, model.hidden_size, dtype=inputs.dtype)
            leaves = list(params.values())
        else:
            h = h0.detach().clone().requires_grad_(True)
            leaves = list(params.values()) + [h]
        L = inputs.new_zeros(())
        hs = []
        for t in range(T):
            if detach_every is not None and t > 0 and t % detach_every == 0:
                h = h.detach()
            a = inputs[t] @ params["W_in"].T + h @ params["W_rec"].T + params["b_rec"]
            h = (1.0 - alpha) * h + alpha * phi(a)
            hs.append(h)
            if targets is not None:
                z = h @ params["W_out"].T + params["b_out"]
                l = _step_loss(z, targets[t], model.readout, loss)
                w = torch.ones(B, dtype=inputs.dtype) if mask is None else mask[t]
                L = L + (w * l).sum() / B
        if reward is not None:
            L = L - reward(torch.stack(hs))
        g = torch.autograd.grad(L, leaves, allow_unused=True)
    grads = {n: (gi if gi is not None else torch.zeros_like(p))
             for (n, p), gi in zip(params.items(), g, strict=False)}
    if h0 is not None:
        grads["h0"] = g[-1] if g[-1] is not None else torch.zeros_like(h0)
    return L.detach(), grads


def _network_reference(net, inputs, targets, *, loss, mask, h0, reward, detach_every):
    """Autograd through the network's definition: a loop over the cells' ``step``."""
    T, B, _ = inputs.shape
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    leaves = list(params.values())
    with torch.enable_grad():
        if h0 is None:
            state = net.init_state(B)
        else:
            state = tuple(type(s)(*(c.detach().clone().requires_grad_(True) for c in s))
                          for s in h0)
            leaves += [c for s in state for c in s]
        s0 = state
        layer_params = net.layer_params(params)
        L = inputs.new_zeros(())
        hs = []
        for t in range(T):
            if detach_every is not None and t > 0 and t % detach_every == 0:
                state = tuple(type(s)(*(c.detach() for c in s)) for s in state)
            state, h = net.step(layer_params, state, inputs[t])
            hs.append(h)
            if targets is not None:
                z = h @ params["W_out"].T + params["b_out"]
                l = _step_loss(z, targets[t], net.readout, loss)
                w = torch.ones(B, dtype=inputs.dtype) if mask is None else mask[t]
                L = L + (w * l).sum() / B
        if reward is not None:
            L = L - reward(torch.stack(hs))
        g = torch.autograd.grad(L, leaves, allow_unused=True)
    g = [torch.zeros_like(v) if gi is None else gi for v, gi in zip(leaves, g)]
    grads = dict(zip(params, g[:len(params)]))
    if h0 is not None:
        it = iter(g[len(params):])
        grads["h0"] = tuple(type(s)(*(next(it) for _ in s)) for s in s0)
    return L.detach(), grads


def _flat(v) -> Tensor:
    return v.reshape(-1) if isinstance(v, Tensor) else torch.cat([_flat(x) for x in v])


def relative_error(grads: Mapping[str, Tensor], ref: Mapping[str, Tensor]) -> float:
    """``max over keys of max|g - g_ref| / max|g_ref|`` (absolute where g_ref is 0).

    A key of ``ref`` missing from ``grads`` is an infinite error.
    """
    worst = 0.0
    for name, r in ref.items():
        g = grads.get(name)
        if g is not None and not isinstance(r, Tensor):  # a network's h0: nested states
            g, r = _flat(g), _flat(r)
        if g is None or g.shape != r.shape:
            return float("inf")
        scale = r.abs().max()
        diff = (g - r).abs().max()
        err = diff / scale if scale > 0 else diff
        worst = max(worst, float(err))
    return worst


def exact_algorithms(config: CheckConfig) -> dict[str, object]:
    """The exact algorithms to check on ``config``: name -> Algorithm."""
    from .algorithms.bptt import bptt
    from .algorithms.rtrl import rtrl
    from .algorithms.tbptt import tbptt

    T = config.T
    c = max(1, T // 2 + 1)  # divides T only for small T; with T=5, c=3 does not
    return {
        "bptt()": bptt(),
        "bptt(checkpoint=1)": bptt(checkpoint=1),
        f"bptt(checkpoint={c})": bptt(checkpoint=c),
        f"tbptt({T})": tbptt(T),
        f"tbptt({T + 3})": tbptt(T + 3),
        "rtrl()": rtrl(),
        "rtrl(generic=True)": rtrl(generic=True),
    }


def check_tol(tol: object) -> float:
    """The tolerance of ``run_checks``: a finite number >= 0."""
    import math
    import numbers

    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a finite number >= 0 (the largest relative error that "
                        f"passes, e.g. 1e-10), got {tol!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0 (the largest relative error that "
                         f"passes, e.g. 1e-10), got {tol!r}")
    return float(tol)


def run_checks(*, seed: int = 0, dtype: torch.dtype = torch.float64,
               configs: Sequence[CheckConfig] | None = None, cell: str | None = None,
               algorithms: Callable[[CheckConfig], Mapping[str, object]] | None = None,
               tol: float = 1e-10, step_path: bool = True) -> list[CheckRow]:
    """Compare every exact algorithm with autograd on random networks.

    Args:
        seed: seed of the random problems (config i uses seed + i).
        dtype: float64 for the 1e-10 tolerance; float32 needs tol ~1e-4.
        configs: the problems; default ``DEFAULT_CONFIGS`` (for ``rnngrad.RNN``: every
            activation, readout and loss, masks, h0, leaky and vanilla cells, a reward,
            T = B = H = 1) and ``cell_configs`` of every ``network_specs()`` entry (each
            registered cell, mixed 2- and 3-layer stacks).
        cell: check only this network spec (e.g. ``"lstm"``, ``"mymodule:MyCell"``): the
            cell alone and two layers of it.
        algorithms: ``config -> {name: Algorithm}``; default ``exact_algorithms``.
        tol: the largest relative error that passes.
        step_path: also check each algorithm's init/step/flush path where it has a
            whole-sequence fast path (rows named "<name> [steps]").

    Returns:
        One ``CheckRow(algorithm, config, error, passed)`` per algorithm and config.
    """
    from .algorithms.base import Algorithm
    from .gradient import gradient

    tol = check_tol(tol)
    if cell is not None:
        if configs is not None:
            raise ValueError("give configs or cell, not both")
        from .registry import get_cell

        get_cell(cell)  # a clear error for an unknown or unimportable cell, up front
        configs = cell_configs(cell) + cell_configs(f"{cell}+{cell}")[:1]
    elif configs is None:
        configs = DEFAULT_CONFIGS + tuple(c for spec in network_specs()
                                          for c in cell_configs(spec))
    configs = tuple(configs)
    algorithms = exact_algorithms if algorithms is None else algorithms
    rows: list[CheckRow] = []
    for i, config in enumerate(configs):
        if not isinstance(config, CheckConfig):
            raise TypeError(f"configs must hold rnngrad.check.CheckConfig, got "
                            f"{type(config).__name__}")
        try:
            model, inputs, targets, mask, h0, reward = make_problem(config, seed=seed + i,
                                                                    dtype=dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"building the network {config.cell!r} for the check failed: "
                             f"{e}") from e
        _, ref = reference_gradient(model, inputs, targets, loss=config.loss, mask=mask, h0=h0,
                                    reward=reward)
        for name, algo in algorithms(config).items():
            variants = [(name, algo)]
            if step_path and isinstance(algo, Algorithm) and algo.sequence is not None:
                variants.append((f"{name} [steps]", algo._replace(sequence=None)))
            for label, a in variants:
                _, grads = gradient(model, inputs, targets, algorithm=a, loss=config.loss,
                                    mask=mask, h0=h0, reward=reward)
                err = relative_error(grads, ref)
                rows.append(CheckRow(label, config.label(), err, err <= tol))
    return rows
