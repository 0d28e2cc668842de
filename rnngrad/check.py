"""Check every exact algorithm against ``torch.autograd`` through a plain loop.

The reference is written independently of the algorithms (and of
``rnngrad.readouts`` and ``rnngrad.cells``): a Python loop over time of

    a_t = W_in x_t + W_rec h_{t-1} + b_rec,   h_t = (1 - alpha) h_{t-1} + alpha phi(a_t)
    z_t = W_out h_t + b_out,   L = (1/B) sum_{t,b} mask[t,b] l(t,b)  (- R(h_1..h_T))

differentiated by ``torch.autograd.grad``. Each algorithm's gradient is compared
with it by the max relative error ``max_name max|g - g_ref| / max|g_ref|`` over the
parameters (and h0 when given); it passes below ``tol`` (1e-10 in float64).

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
    """One random problem: sizes, cell, readout and loss, and what is switched on."""

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

    def label(self) -> str:
        parts = [f"T={self.T} B={self.B} D={self.D} H={self.H} K={self.K}", self.activation,
                 f"{self.readout}+{self.loss}"]
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
    model = RNN(c.D, c.H, c.K, activation=c.activation, alpha=c.alpha, readout=c.readout,
                dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) / max(p.shape[-1], 1) ** 0.5)
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
    h0 = torch.randn(c.B, c.H, generator=g, dtype=dtype) * 0.5 if c.h0 else None
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


def relative_error(grads: Mapping[str, Tensor], ref: Mapping[str, Tensor]) -> float:
    """``max over keys of max|g - g_ref| / max|g_ref|`` (absolute where g_ref is 0).

    A key of ``ref`` missing from ``grads`` is an infinite error.
    """
    worst = 0.0
    for name, r in ref.items():
        g = grads.get(name)
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


def run_checks(*, seed: int = 0, dtype: torch.dtype = torch.float64,
               configs: Sequence[CheckConfig] | None = None,
               algorithms: Callable[[CheckConfig], Mapping[str, object]] | None = None,
               tol: float = 1e-10, step_path: bool = True) -> list[CheckRow]:
    """Compare every exact algorithm with autograd on random networks.

    Args:
        seed: seed of the random problems (config i uses seed + i).
        dtype: float64 for the 1e-10 tolerance; float32 needs tol ~1e-4.
        configs: the problems; default ``DEFAULT_CONFIGS`` (every activation, readout
            and loss, masks, h0, leaky and vanilla cells, a reward, T = B = H = 1).
        algorithms: ``config -> {name: Algorithm}``; default ``exact_algorithms``.
        tol: the largest relative error that passes.
        step_path: also check each algorithm's init/step/flush path where it has a
            whole-sequence fast path (rows named "<name> [steps]").

    Returns:
        One ``CheckRow(algorithm, config, error, passed)`` per algorithm and config.
    """
    from .algorithms.base import Algorithm
    from .gradient import gradient

    configs = DEFAULT_CONFIGS if configs is None else tuple(configs)
    algorithms = exact_algorithms if algorithms is None else algorithms
    rows: list[CheckRow] = []
    for i, config in enumerate(configs):
        if not isinstance(config, CheckConfig):
            raise TypeError(f"configs must hold rnngrad.check.CheckConfig, got "
                            f"{type(config).__name__}")
        model, inputs, targets, mask, h0, reward = make_problem(config, seed=seed + i, dtype=dtype)
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
