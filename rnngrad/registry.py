"""One registry from CLI names to algorithm factories.

``get_algorithm("tbptt:10")`` -> ``tbptt(10)``; ``get_algorithm("bptt")`` -> ``bptt()``.
A name may carry one integer argument after a colon. Adding an algorithm means
adding its factory here.
"""

from __future__ import annotations

from collections.abc import Callable

from .algorithms import Algorithm, bptt, eprop, kf_rtrl, rflo, rtrl, snap1, tbptt, uoro

__all__ = ["ALGORITHMS", "get_algorithm", "parse_algorithms"]

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
    "rtrl": (rtrl, False, "exact real-time recurrent learning, structured influence (seed 001)"),
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
