"""A "before vs after" section for a re-run benchmark table: the committed CSV against the new.

    python benchmarks/before_after.py cells_bptt OLD.csv NEW.csv --md benchmarks/cells_bptt_cpu_1t.md \
        --note "before: commit X ...; after: commit Y ..."
    python benchmarks/before_after.py rtrl_cells OLD.csv NEW.csv --md benchmarks/rtrl_cells.md

Appends (or replaces) a "## Before vs after" section in the md: per row the ratio the
table reports (``cells_bptt``: time / the nn.GRU or nn.LSTM anchor; ``rtrl_cells``: rtrl()
/ rtrl(generic=True), and rtrl() / bptt() from the medians) before and after, with each
run's [lowest, highest] over its runs where the CSV has them, and a verdict: "within
noise" where the two ranges overlap or the ratio moved by less than 10%, "faster" /
"slower" otherwise, "REGRESSION" where the after ratio is more than 20% above the
before one and its range lies wholly above the before range ("anchor faster" instead where
the row's own median time did not grow by 20%: the anchor, not rnngrad, moved). For
``cells_bptt`` the row's and the anchor's median milliseconds are shown too.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

SPECS = {  # kind -> (key fields, ratio field, min field, max field)
    "cells_bptt": (("cell", "H", "allocator", "method"), "ratio_vs_torch", "ratio_min",
                   "ratio_max"),
    "rtrl_cells": (("cell", "H"), "ratio_rtrl_over_generic", "ratio_min", "ratio_max"),
}
HEADER = "## Before vs after"
ANCHOR = {"gru": "nn.GRU + autograd", "lstm": "nn.LSTM + autograd"}


def verdict(o: float, n: float, orng, nrng) -> str:
    overlap = orng and nrng and not (nrng[0] > orng[1] or nrng[1] < orng[0])
    if n > 1.2 * o and orng and nrng and nrng[0] > orng[1]:
        return "REGRESSION"
    if overlap or abs(n / o - 1) < 0.10:
        return "within noise"
    return "faster" if n < o else "slower"


def rows_of(path: str, kind: str) -> dict:
    key, *_ = SPECS[kind]
    with open(path) as f:
        return {tuple(r[k] for k in key): r for r in csv.DictReader(f)}


def section(kind: str, old: dict, new: dict, note: str) -> str:
    key, rf, lo, hi = SPECS[kind]
    extra = kind == "rtrl_cells"
    anchored = kind == "cells_bptt"
    head = "| " + " | ".join(key) + " | before [range] | after [range] | after / before | verdict |"
    if extra:
        head += " rtrl() / bptt() before | after |"
    if anchored:
        head += " ms before -> after | anchor ms before -> after |"
    out = [HEADER, "", note, "", head, "|" + "---|" * (head.count("|") - 1)]
    worst = []
    for k, r in new.items():
        if k not in old or not r.get(rf) or float(old[k][rf]) == 1.0 and float(r[rf]) == 1.0:
            continue  # an anchor row (ratio 1 by definition) or a row the old table lacks
        o, n = float(old[k][rf]), float(r[rf])
        orng = (float(old[k][lo]), float(old[k][hi])) if old[k].get(lo) else None
        nrng = (float(r[lo]), float(r[hi])) if r.get(lo) else None
        v = verdict(o, n, orng, nrng)
        if anchored:
            ak = k[:3] + (ANCHOR[k[0]],)
            oms, nms = float(old[k]["median_ms"]), float(r["median_ms"])
            oa, na = float(old[ak]["median_ms"]), float(new[ak]["median_ms"])
            if v == "REGRESSION" and nms < 1.2 * oms:
                v = "anchor faster (own time not up)"
        worst.append((n / o, k, v))
        rng = lambda x: f" [{x[0]:.2f}, {x[1]:.2f}]" if x else ""  # noqa: E731
        line = ("| " + " | ".join(k) + f" | {o:.2f}{rng(orng)} | {n:.2f}{rng(nrng)} "
                f"| {n / o:.2f} | {v} |")
        if anchored:
            line += f" {oms:.1f} -> {nms:.1f} | {oa:.1f} -> {na:.1f} |"
        if extra:
            ob = float(old[k]["rtrl_ms"]) / float(old[k]["bptt_ms"])
            nb = float(r["rtrl_ms"]) / float(r["bptt_ms"])
            line += f" {ob:.1f} | {nb:.1f} |"
        out.append(line)
    if worst:
        m = max(worst)
        out += ["", f"Largest after / before: {m[0]:.2f} ({', '.join(m[1])}: {m[2]}); "
                f"regressions flagged: {sum(v == 'REGRESSION' for *_, v in worst)} of "
                f"{len(worst)} rows; rows where only the anchor moved: "
                f"{sum(v.startswith('anchor') for *_, v in worst)}."]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=list(SPECS))
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--md", type=Path, required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    text = section(args.kind, rows_of(args.old, args.kind), rows_of(args.new, args.kind),
                   args.note)
    md = args.md.read_text() if args.md.exists() else ""
    if HEADER in md:
        md = md[:md.index(HEADER)].rstrip() + "\n"
    args.md.write_text(md.rstrip() + "\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
