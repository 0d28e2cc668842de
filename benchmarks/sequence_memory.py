"""Peak memory of the truncated rules in sequence form against BPTT of the same network.

    python benchmarks/sequence_memory.py                 # writes sequence_memory.csv and .md
    python benchmarks/sequence_memory.py --cells Elman --ts 100,200
    python benchmarks/sequence_memory.py --tables-only   # the .md from the .csv

``rnngrad.gradient`` with e-prop, SnAp-1, RFLO (Elman only: the rule is defined for the
Elman form), exact RTRL on the LRU (a diagonal cell: per-unit traces) and UORO, each
against ``rnngrad.bptt()`` on the same network, ``Network(cell(D, H), K)`` with Elman, GRU,
LSTM, ALIF and LRU cells; T = 100, 200, 400, B = 64, D = 32, H = 256, K = 10, float32,
MSE at every step, one thread. "sequence": one ``rnngrad.gradient`` call, which runs the
rule's sequence form (``rnngrad/algorithms/_sequence.py``, ``_uoro_sequence.py``); the
CSV's ``sequence_form`` column says whether it did (wrappers on ``algo.sequence`` and on
``rnngrad.gradient``'s step loop record whether the slot returned a result without
falling back to the steps: UORO's slot runs the steps itself where its form does not
apply). "stream": the online
API, ``algo.init`` then ``algo.step`` T times (the state and every temporary of a step).

Method (that of ``benchmarks/memory.py`` and ``online_floor.py``): a fresh Python process
per configuration builds the model and the data, runs the same call once on 5 steps (the
one-off allocations: thread pool, kernels, the cell checks), resets the high-water mark
(``/proc/self/clear_refs`` 5), reads its resident set size (``VmRSS``), runs the call
once and reads the high-water mark (``VmHWM``); the figure is ``VmHWM - VmRSS``: every
byte the gradient touched at its peak (tensors, allocator slack, temporaries), the model
and the data excluded. torch's CPU tensors live in malloc'd memory, so RSS sees them
(``tracemalloc`` does not); the child runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so
freed large blocks go back to the OS instead of fragmenting the heap. Resolution about
1 MiB. "state" (stream mode): the bytes of the algorithm's state after the last step
(distinct tensor storages).

What the trace of a step-by-step rule would be, kept for every step: ``B x U x C x P_u``
numbers per step (``P_u``: the parameters a unit owns, C its state components); the
``trace/step`` column gives it for one step, in MiB, from the network's sizes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
B, D, H, K = 64, 32, 256, 10
TS = (100, 200, 400)
CELLS = ("Elman", "GRU", "LSTM", "ALIF", "LRU")


def rules(cell: str) -> list[str]:
    out = ["eprop", "snap1"]
    if cell == "Elman":
        out.append("rflo")
    if cell == "LRU":
        out.append("rtrl")
    return out + ["uoro"]


# ---- the child: one configuration in a fresh process --------------------------------------

def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _state_bytes(s, seen) -> int:
    import torch

    if isinstance(s, torch.Tensor):
        st = s.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()
    if isinstance(s, (list, tuple)):
        return sum(_state_bytes(v, seen) for v in s)
    if isinstance(s, dict):
        return sum(_state_bytes(v, seen) for v in s.values())
    return 0


def child(cell: str, rule: str, mode: str, T: int) -> dict:
    import gc

    import torch

    import rnngrad
    from rnngrad.cells import ALIF, GRU, LRU, LSTM, Elman

    torch.set_num_threads(1)
    torch.manual_seed(0)
    make = {"Elman": Elman, "GRU": GRU, "LSTM": LSTM, "ALIF": ALIF, "LRU": LRU}[cell]
    net = rnngrad.Network(make(D, H), K)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=g)
    y = torch.randn(T, B, K, generator=g)
    algo = {"bptt": rnngrad.bptt, "eprop": rnngrad.eprop, "snap1": rnngrad.snap1,
            "rflo": rnngrad.rflo, "rtrl": rnngrad.rtrl, "uoro": rnngrad.uoro}[rule]()
    used, stepped = [], []
    gmod = sys.modules["rnngrad.gradient"]  # the step loop a sequence slot may fall back to
    step_loop = gmod._step_loop

    def recorded_loop(*a, **kw):
        stepped.append(True)
        return step_loop(*a, **kw)

    gmod._step_loop = recorded_loop
    if algo.sequence is not None:
        inner = algo.sequence

        def recorded(*a, **kw):
            r = inner(*a, **kw)
            used.append(r is not None)
            return r

        algo = algo._replace(sequence=recorded)

    def run(n: int):
        if mode == "sequence":
            return rnngrad.gradient(net, x[:n], y[:n], algorithm=algo), None
        state = algo.init(net, B)
        for t in range(n):
            state, _, _ = algo.step(net, state, x[t], y[t])
        return None, state

    run(5)  # warm-up: one-off allocations go into the baseline
    used.clear()
    stepped.clear()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _rss("VmRSS")
    t0 = time.thread_time()
    _, state = run(T)
    sec = time.thread_time() - t0
    peak = _rss("VmHWM") - base
    return {"peak_bytes": peak, "seconds": sec,
            "state_bytes": _state_bytes(state, set()) if state is not None else "",
            "sequence_form": (bool(used) and all(used) and not stepped)
            if mode == "sequence" else ""}


def trace_step_mib(cell: str) -> float:
    """B x (numbers of a per-unit trace over every recurrent-layer parameter) for one step:
    B U C P_u = B C |theta_cell|, in MiB (float32)."""
    import torch

    from rnngrad.cells import ALIF, GRU, LRU, LSTM, Elman

    torch.manual_seed(0)
    make = {"Elman": Elman, "GRU": GRU, "LSTM": LSTM, "ALIF": ALIF, "LRU": LRU}[cell]
    c = make(D, H)
    emit_only = {"LRU": ("C_re", "C_im", "D")}.get(cell, ())  # enter the output, not step
    n_cell = sum(p.numel() for n, p in c.named_parameters() if n not in emit_only)
    C = {"Elman": 1, "GRU": 1, "LSTM": 2, "ALIF": 2, "LRU": 2}[cell]
    return B * C * n_cell * 4 / 2**20


# ---- the parent ---------------------------------------------------------------------------

def measure(cell: str, rule: str, mode: str, T: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--child", cell, rule, mode, str(T)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{cell} {rule} {mode} T={T}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


FIELDS = ("cell", "rule", "mode", "T", "B", "H", "D", "peak_mib", "ratio_to_bptt",
          "state_mib", "sequence_form", "trace_step_mib", "cpu_seconds", "load1")


def table(rows: list[dict], ts, load) -> str:
    mib = lambda v: f"{float(v):.1f}"  # noqa: E731
    by = {(r["cell"], r["rule"], r["mode"], int(r["T"])): r for r in rows}
    cells = [c for c in CELLS if any(r["cell"] == c for r in rows)]
    st = sorted({int(r["T"]) for r in rows if r["mode"] == "stream"})
    head = ("| cell | rule | " + " | ".join(f"T = {t}: MiB (x BPTT)" for t in ts)
            + " | per 100 steps, MiB | trace of one step, MiB | stream: peak MiB at T = "
            + ", ".join(map(str, st)) + " | stream: state MiB |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        for rule in ["bptt", *rules(c)]:
            r_seq = [by.get((c, rule, "sequence", t)) for t in ts]
            if not any(r_seq):
                continue
            cols = []
            for r in r_seq:
                if r is None:
                    cols.append("-")
                else:
                    mark = "" if rule == "bptt" or r["sequence_form"] in ("True", True) else " (steps)"
                    ratio = "" if rule == "bptt" else f" ({float(r['ratio_to_bptt']):.2f}x)"
                    cols.append(f"{mib(r['peak_mib'])}{ratio}{mark}")
            done = [r for r in r_seq if r]
            slope = ""
            if len(done) >= 2:
                slope = (f"{(float(done[-1]['peak_mib']) - float(done[0]['peak_mib'])) * 100 / (int(done[-1]['T']) - int(done[0]['T'])):.1f}")
            tr = mib(done[0]["trace_step_mib"]) if rule != "bptt" else ""
            sm = [by.get((c, rule, "stream", t)) for t in st]
            speak = ", ".join(mib(r["peak_mib"]) if r else "-" for r in sm) if rule != "bptt" else ""
            sstate = ", ".join(f"{float(r['state_mib']):.2f}" if r else "-" for r in sm) if rule != "bptt" else ""
            out.append(f"| {c} | {rule} | " + " | ".join(cols) + f" | {slope} | {tr} | {speak} | {sstate} |")
    return "\n".join(out)


def reading(rows: list[dict], ts) -> str:
    """What the table shows, computed from it: per cell, the range of the sequence forms'
    ratio to BPTT over T, their growth per step against BPTT's and against the trace of
    one step, and whether the streaming state stayed the same bytes at every T."""
    out = ["Reading, per cell (from the table): the sequence forms' peak over BPTT's at every "
           "T; what they add per step, against BPTT's per step and against the size of one "
           "step's trace (what a sequence form that kept a trace per step would add); the "
           "streaming state's bytes at every T.", ""]
    for c in CELLS:
        seq = [r for r in rows if r["cell"] == c and r["mode"] == "sequence"]
        if not seq:
            continue
        grow = {}
        for rule in {r["rule"] for r in seq}:
            rr = sorted((r for r in seq if r["rule"] == rule), key=lambda r: int(r["T"]))
            if len(rr) >= 2:
                grow[rule] = ((float(rr[-1]["peak_mib"]) - float(rr[0]["peak_mib"]))
                              / (int(rr[-1]["T"]) - int(rr[0]["T"])))
        ratios = [float(r["ratio_to_bptt"]) for r in seq if r["rule"] != "bptt"]
        tr = float(next(r["trace_step_mib"] for r in seq))
        rules_ = sorted(k for k in grow if k != "bptt")
        if "bptt" not in grow or not rules_:
            continue
        g = [grow[k] for k in rules_]
        st = [r for r in rows if r["cell"] == c and r["mode"] == "stream"]
        const = all(len({r["state_mib"] for r in st if r["rule"] == k}) == 1
                    for k in {r["rule"] for r in st})
        out.append(
            f"- {c}: {min(ratios):.2f}x to {max(ratios):.2f}x BPTT's peak over T = "
            f"{min(ts)} to {max(ts)} ({', '.join(rules_)}); they add {min(g):.2f} to "
            f"{max(g):.2f} MiB a step, {min(g) / grow['bptt']:.1f} to "
            f"{max(g) / grow['bptt']:.1f} times BPTT's {grow['bptt']:.2f} MiB and "
            f"{100 * min(g) / tr:.1f} to {100 * max(g) / tr:.1f}% of one step's trace "
            f"({tr:.1f} MiB); streaming state "
            + ("the same bytes at every T." if const and st else "not constant in T." if st
               else "not measured."))
    return "\n".join(out)


def write_md(rows, ts, load0, load1, commit) -> None:
    md = [
        "# Peak memory of the sequence forms / BPTT",
        "",
        f"`python benchmarks/sequence_memory.py` (method in its docstring: a fresh process per "
        f"cell, each row's figure `VmHWM - VmRSS` around one call, the model and data "
        f"excluded; resolution about 1 MiB). Network(cell({D}, {H}), {K}), B = {B}, float32, "
        f"MSE at every step, one thread. Measured at commit {commit}. Load average at start "
        f"{load0}, at end {load1} (2 shared cores; memory does not depend on it).",
        "",
        "sequence: one `rnngrad.gradient` call (the rule's sequence form; \"(steps)\" where "
        "it declined and the step loop ran). x BPTT: the peak over BPTT's at the same T. "
        "per 100 steps: the growth of the sequence peak from the smallest to the largest T, "
        "per 100 steps. trace of one step: the per-unit trace of every recurrent "
        "parameter, B C |theta_cell| numbers, the size a step-by-step rule's trace has at "
        "every step (kept for all T steps it would be T times that). stream: `algo.init` "
        "then T `algo.step` calls, peak and the state's bytes after the last step.",
        "",
        table(rows, ts, load0),
        "",
        reading(rows, ts),
        "",
    ]
    (HERE / "sequence_memory.md").write_text("\n".join(md))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        cell, rule, mode, T = sys.argv[2:6]
        print(json.dumps(child(cell, rule, mode, int(T))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--ts", default=",".join(map(str, TS)))
    ap.add_argument("--stream-ts", default="50,100,200",
                    help="T of the streaming runs (their memory is constant in T; the step "
                         "loop costs 6-140x BPTT per step at this size)")
    ap.add_argument("--csv", type=Path, default=HERE / "sequence_memory.csv")
    ap.add_argument("--tables-only", action="store_true")
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    ts = [int(t) for t in args.ts.split(",")]
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True).stdout.strip()
    if args.tables_only:
        with open(args.csv) as f:
            rows = list(csv.DictReader(f))
        write_md(rows, sorted({int(r["T"]) for r in rows if r["mode"] == "sequence"}),
                 "see the CSV", "see the CSV", commit)
        return 0
    load0 = tuple(round(v, 2) for v in os.getloadavg())
    rows = []
    sts = [int(t) for t in args.stream_ts.split(",")] if args.stream_ts else []
    for cell in args.cells.split(","):
        tr = trace_step_mib(cell)
        for T in ts:
            base = None
            for rule in ["bptt", *rules(cell)]:
                m = measure(cell, rule, "sequence", T)
                peak = m["peak_bytes"] / 2**20
                if rule == "bptt":
                    base = peak
                rows.append({"cell": cell, "rule": rule, "mode": "sequence", "T": T, "B": B,
                             "H": H, "D": D, "peak_mib": round(peak, 2),
                             "ratio_to_bptt": round(peak / base, 3), "state_mib": "",
                             "sequence_form": m["sequence_form"], "trace_step_mib": round(tr, 2),
                             "cpu_seconds": round(m["seconds"], 3),
                             "load1": round(os.getloadavg()[0], 2)})
                print(f"{cell:6s} {rule:6s} sequence T={T:4d}: {peak:8.1f} MiB "
                      f"({peak / base:.2f}x BPTT) form={m['sequence_form']} "
                      f"{m['seconds']:.1f} s", flush=True)
        for T in sts:
            for rule in rules(cell):
                m = measure(cell, rule, "stream", T)
                peak = m["peak_bytes"] / 2**20
                rows.append({"cell": cell, "rule": rule, "mode": "stream", "T": T, "B": B,
                             "H": H, "D": D, "peak_mib": round(peak, 2), "ratio_to_bptt": "",
                             "state_mib": round(m["state_bytes"] / 2**20, 3),
                             "sequence_form": "", "trace_step_mib": round(tr, 2),
                             "cpu_seconds": round(m["seconds"], 3),
                             "load1": round(os.getloadavg()[0], 2)})
                print(f"{cell:6s} {rule:6s} stream   T={T:4d}: {peak:8.1f} MiB, state "
                      f"{m['state_bytes'] / 2**20:.2f} MiB, {m['seconds']:.1f} s", flush=True)
        with open(args.csv, "w", newline="") as f:  # after every cell: a partial run is kept
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
    load1 = tuple(round(v, 2) for v in os.getloadavg())
    write_md(rows, ts, load0, load1, commit)
    print((HERE / "sequence_memory.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
