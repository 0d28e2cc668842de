"""Gradient quality: how close an approximate gradient is to the exact one.

For an estimate ``g`` of the exact gradient ``g*`` (one parameter, or all of them
concatenated into one vector)::

    cosine         = <g, g*> / (||g|| ||g*||)                       1: same direction
    sign_agreement = #{e : sign(g_e) = sign(g*_e)} / #{e : g*_e != 0}  0.5: chance
    norm_ratio     = ||g|| / ||g*||                                 1: same length

Undefined values (a zero norm, no non-zero exact entry) are NaN. Both gradients must
come from the same trajectory (same weights, same batch, same initial state): use
``compare_gradients`` for that, or ``alignment_metrics`` once per N training steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .algorithms.base import PARAM_NAMES, Algorithm, Grads
from .algorithms.bptt import bptt
from .gradient import gradient

__all__ = ["alignment", "compare_gradients", "alignment_metrics", "METRICS"]

METRICS = ("cosine", "sign_agreement", "norm_ratio")


def _stats(g: Tensor, e: Tensor) -> Tensor:
    """(dot, ||g||^2, ||e||^2, #sign agree on e != 0, #e != 0) as one tensor."""
    g = g.detach().reshape(-1).double()
    e = e.detach().reshape(-1).double()
    nz = e != 0
    agree = (torch.sign(g) == torch.sign(e)) & nz
    return torch.stack([g @ e, g @ g, e @ e, agree.sum().double(), nz.sum().double()])


def _from_stats(s: Sequence[float]) -> dict[str, float]:
    dot, gg, ee, agree, nz = s
    ng, ne = math.sqrt(gg), math.sqrt(ee)
    nan = float("nan")
    return {
        "cosine": dot / (ng * ne) if ng > 0 and ne > 0 else nan,
        "sign_agreement": agree / nz if nz > 0 else nan,
        "norm_ratio": ng / ne if ne > 0 else nan,
    }


def alignment(approx: Mapping[str, Tensor], exact: Mapping[str, Tensor], *,
              params: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """Cosine, sign agreement and norm ratio of ``approx`` against ``exact``.

    Args:
        approx: gradient dict of the algorithm under test (name -> tensor).
        exact: the reference gradient dict on the same trajectory.
        params: the names to compare; default: the model parameters present in
            ``exact`` (W_in, W_rec, b_rec, W_out, b_out), in that order.

    Returns:
        ``{name: {"cosine", "sign_agreement", "norm_ratio"}}`` for each name, plus
        ``"all"``: the same three over all the named gradients concatenated.
    """
    names = [n for n in PARAM_NAMES if n in exact] if params is None else list(params)
    if not names:
        raise ValueError(f"no parameter to compare: exact has keys {sorted(exact)}, "
                         f"expected some of {', '.join(PARAM_NAMES)}")
    for n in names:
        for which, d in (("approx", approx), ("exact", exact)):
            if n not in d:
                raise KeyError(f"{which} has no gradient {n!r}; it has {sorted(d)}")
        if approx[n].shape != exact[n].shape:
            raise ValueError(f"gradient {n!r} has shape {tuple(approx[n].shape)} in approx but "
                             f"{tuple(exact[n].shape)} in exact")
    stats = torch.stack([_stats(approx[n], exact[n]) for n in names])
    rows = stats.tolist()  # one device sync for everything
    total = stats.sum(0).tolist()
    out = {n: _from_stats(r) for n, r in zip(names, rows, strict=True)}
    out["all"] = _from_stats(total)
    return out


def _named(algorithms) -> list[tuple[str, Algorithm]]:
    if isinstance(algorithms, Algorithm):
        return [(algorithms.name, algorithms)]
    if isinstance(algorithms, Mapping):
        items = list(algorithms.items())
    else:
        items = [(a.name, a) if isinstance(a, Algorithm) else tuple(a) for a in algorithms]
    for item in items:
        if len(item) != 2 or not isinstance(item[1], Algorithm):
            raise TypeError("algorithms must be Algorithms, (name, Algorithm) pairs or a dict "
                            f"name -> Algorithm; got an entry {item!r}")
    return items


def compare_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    algorithms,
    *,
    reference: Algorithm | None = None,
    loss: str = "mse",
    mask: Tensor | None = None,
    params: Iterable[str] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """The alignment of each algorithm's gradient with the reference on one batch.

    Args:
        model, inputs, targets, loss, mask: as for ``rnngrad.gradient``.
        algorithms: a list of Algorithms or (name, Algorithm) pairs, or a dict.
        reference: the exact algorithm (default ``bptt()``).
        params: passed to ``alignment``.

    Returns:
        ``{name: alignment(approx_name, exact)}`` for each algorithm.
    """
    reference = bptt() if reference is None else reference
    _, exact = gradient(model, inputs, targets, algorithm=reference, loss=loss, mask=mask)
    out = {}
    for name, algo in _named(algorithms):
        _, g = gradient(model, inputs, targets, algorithm=algo, loss=loss, mask=mask)
        out[name] = alignment(g, exact, params=params)
    return out


def alignment_metrics(
    model: nn.Module,
    batch,
    algorithm: Algorithm,
    *,
    loss: str = "mse",
    approx: Grads | None = None,
    reference: Algorithm | None = None,
    params: Iterable[str] | None = None,
    per_param: bool = False,
) -> dict[str, float]:
    """A flat dict of floats for a training log, e.g. every N steps.

    Args:
        batch: ``(inputs, targets, mask)`` (an ``rnngrad.tasks.Batch`` or a tuple).
        algorithm: the algorithm being trained with.
        approx: its gradient on this batch when already computed (then it is not run
            again: a stochastic algorithm's noise stream is left untouched).
        reference: the exact algorithm (default ``bptt()``).
        params: the parameters compared (default all; ``("W_in", "W_rec", "b_rec")`` for
            the recurrent part, where the approximations differ).
        per_param: also report each parameter (keys like ``"cosine/W_rec"``).

    Returns:
        ``{"cosine": ..., "sign_agreement": ..., "norm_ratio": ...}`` over the parameters
        concatenated (and per parameter when asked).
    """
    inputs, targets, mask = batch[0], batch[1], batch[2]
    reference = bptt() if reference is None else reference
    _, exact = gradient(model, inputs, targets, algorithm=reference, loss=loss, mask=mask)
    if approx is None:
        _, approx = gradient(model, inputs, targets, algorithm=algorithm, loss=loss, mask=mask)
    a = alignment(approx, exact, params=params)
    out = dict(a["all"])
    if per_param:
        for n, d in a.items():
            if n != "all":
                out.update({f"{k}/{n}": v for k, v in d.items()})
    return out
