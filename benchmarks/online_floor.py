"""The online rules on ``rnngrad.RNN`` against the floor their state allows.

    python benchmarks/online_floor.py                  # everything: 10 to 60 min on 2 cores
    python benchmarks/online_floor.py --baseline REV   # also time the rules as they were at REV
    python benchmarks/online_floor.py --quick          # H = 64, 256 only, 2 runs, no memory part

Writes ``online_floor.csv``, ``online_floor.png`` and ``online_floor_memory.csv`` beside
this file and rewrites the tables of ``docs/online_floor.md`` between its
``<!-- online_floor:NAME -->`` markers (``--no-doc`` leaves it alone).

What one run measures, for H in ``--hidden`` and B in ``--batch`` (float32, D = 32, K = 10,
tanh, MSE at every step, ``--threads`` CPU threads, 2 by default):

- ``step``: one ``algo.step(model, state, x_t, y_t)`` in steady state (after ``--warmup``
  steps), the state carried from step to step as in online training. If the working tree
  wraps ``step`` in argument checks (``step.__wrapped__``), the unwrapped rule is timed
  too (``rule``); with ``--baseline`` so is the rule at that git revision (``before``),
  loaded from ``git archive`` as a separate package and run on a copy of the same model.
- ``forward``: the anchor, one step of the cell and the readout alone (``cell_step`` and
  ``z = W_out h + b_out`` under ``no_grad``), with the rule's alpha.
- the machine's memory bandwidth, in the same run: ``buf.mul_(-1.0)`` on a float32 buffer
  of the size of the rule's largest state tensor (the trace, the influence, theta~, A;
  for e-prop at alpha = 1, which keeps no trace, the (H, P) gradient it writes), an
  in-place pass like the trace update, counted as read + write = 2 x its bytes / time.
  Sizes that fit a core's L2 measure L2 bandwidth, larger ones L3 or DRAM: the floor is
  taken at the bandwidth of the rule's own size class.
- the machine's float32 GEMM rate, in the same run: ``torch.mm`` of two 1024 x 1024
  matrices, 2 n^3 / time.
- ``op``: one tiny in-place op (``t.add_(1.0)`` on one element), the fixed cost of a
  PyTorch call; ``ops`` counts the ATen calls of one step (TorchDispatchMode), so
  ``ops x op`` is what dispatch alone costs a step.

The floor of a rule is ``max(bytes / bandwidth, flops / GEMM rate)`` per step, with the
bytes its state must move (P = H + D + 1, 4 bytes a number):

    e-prop, alpha = 1     no trace: the (H, P) gradient written once; 2 B H P flops (one GEMM)
    e-prop / RFLO leaky   trace (B, H, P) read + written once (the update) and read once
    SnAp-1                (the contraction), the (H, P) gradient written: 3 B H P + H P
    UORO                  theta~ (B, H, P) the same: 3 B H P + H P (its norm is taken in
                          the read of the contraction by a fused kernel)
    KF-RTRL               A (H, B, H) read by the GEMM, written, read by the contraction:
                          3 B H^2 + H P; 2 B H^3 flops (W_rec A): compute-bound
    RTRL                  M (B, H, H, P): 3 B H^2 P; 2 B H^3 P flops: compute-bound

Each candidate (rules, anchors, probes) is timed round-robin, ``--rounds`` rounds, each a
block of steps sized to ~5 ms after one untimed step, so load from other processes falls
on all alike; a figure is the median over rounds. The whole measurement is repeated
``--runs`` times (each run is all sizes, so the runs are minutes apart); the table gives
the median over runs and the lowest and highest. The load average is recorded.

Memory against T (``online_floor_memory.csv``): for each rule, a fresh process runs
``init`` and T steps (T = 100, 1,000, 10,000; H = 128, B = 16; RTRL H = 32, B = 4),
dropping what each step emits as an online learner does, and reports the bytes of the
tensors its state holds (each storage once) and ``VmHWM - VmRSS`` around init and the
loop (after a warm-up of two steps, glibc's mmap threshold fixed as in
``benchmarks/memory.py``, one thread): the state plus every temporary at its peak.

KF-RTRL runs at every size (one step at H = 1024, B = 16 is 34 GFLOP); RTRL, whose
influence is B H^2 P numbers and its step 2 B H^3 P flops, at (H, B) = (64, 1), (64, 16)
and (256, 1) only (at H = 256, B = 16 the influence alone is 2.4 GB, twice).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import rnngrad  # noqa: E402
from rnngrad.cells.elman import cell_step  # noqa: E402

D, K = 32, 10
ALPHA_LEAKY = 0.5
TARGET_S = 5e-3  # each timed block of steps lasts about this long
# name -> (factory, alpha, kind); kind selects the byte and flop count
RULES = {
    "eprop": (lambda: rnngrad.eprop(), 1.0, "gemm1"),
    "eprop leaky": (lambda: rnngrad.eprop(), ALPHA_LEAKY, "trace"),
    "rflo leaky": (lambda: rnngrad.rflo(), ALPHA_LEAKY, "trace"),
    "snap1": (lambda: rnngrad.snap1(), 1.0, "trace"),
    "snap1 leaky": (lambda: rnngrad.snap1(), ALPHA_LEAKY, "trace"),
    "uoro": (lambda: rnngrad.uoro(seed=0), 1.0, "trace"),
    "kf_rtrl": (lambda: rnngrad.kf_rtrl(seed=0), 1.0, "kf"),
    "rtrl": (lambda: rnngrad.rtrl(), 1.0, "rtrl"),
}
RTRL_SIZES = {(64, 1), (64, 16), (256, 1)}
MEM_TS = (100, 1000, 10000)
MEM_SIZE = {"rtrl": (32, 4)}  # (H, B); the others (128, 16)
MEM_DEFAULT = (128, 16)


def runs_at(rule: str, H: int, B: int) -> bool:
    return rule != "rtrl" or (H, B) in RTRL_SIZES


def traffic(kind: str, H: int, B: int, itemsize: int = 4) -> tuple[int, int, int]:
    """(bytes, flops, probe numel) of one step of a rule's state work (see the docstring)."""
    P = H + D + 1
    if kind == "gemm1":
        return (H * P + B * P + B * H) * itemsize, 2 * B * H * P, H * P
    if kind == "trace":
        N = B * H * P
        return (3 * N + H * P) * itemsize, 0, N
    if kind == "kf":
        N = B * H * H
        return (3 * N + H * P + 2 * B * P) * itemsize, 2 * B * H**3 + 2 * B * H * H + 2 * B * H * P, N
    N = B * H * H * P  # rtrl
    return 3 * N * itemsize, 2 * B * H**3 * P + 2 * B * H * H * P, N


class Stepper:
    """Calls ``step`` on a carried state over a short cycle of inputs, discarding grads."""

    def __init__(self, step, model, state, xs, ys):
        self.step, self.model, self.state, self.xs, self.ys = step, model, state, xs, ys
        self.t = 0

    def __call__(self):
        i = self.t % len(self.xs)
        self.t += 1
        self.state, _, _ = self.step(self.model, self.state, self.xs[i], self.ys[i])


def forward_anchor(model, xs):
    """One step of the cell and the readout alone: what every rule's step contains."""
    act, alpha = model.activation, model.alpha
    box = {"h": torch.zeros(xs[0].shape[0], model.hidden_size), "t": 0}

    def run():
        with torch.no_grad():
            x = xs[box["t"] % len(xs)]
            box["t"] += 1
            h, _, _ = cell_step(model.W_in, model.W_rec, model.b_rec, box["h"], x,
                                activation=act, alpha=alpha)
            torch.addmm(model.b_out, h, model.W_out.T)
            box["h"] = h

    return run


def count_ops(fn) -> int:
    """ATen calls made by fn() (views and in-place ops included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def load_baseline(rev: str):
    """The rnngrad package at git revision ``rev``, imported as ``rnngrad_base``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "rnngrad"], check=True,
                          capture_output=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="online_floor_"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "rnngrad").rename(tmp / "rnngrad_base")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("rnngrad_base")


def baseline_rule(base, rule: str):
    return {"eprop": lambda: base.eprop(), "eprop leaky": lambda: base.eprop(),
            "rflo leaky": lambda: base.rflo(), "snap1": lambda: base.snap1(),
            "snap1 leaky": lambda: base.snap1(), "uoro": lambda: base.uoro(seed=0),
            "kf_rtrl": lambda: base.kf_rtrl(seed=0), "rtrl": lambda: base.rtrl()}[rule]()


def calibrate(fn) -> int:
    """How many calls make a block of about TARGET_S seconds."""
    fn()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, min(64, math.ceil(TARGET_S / max(dt, 1e-7))))


def round_robin(cands: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, least) seconds per call of each candidate, timed in turn, round after round."""
    inner = {k: calibrate(f) for k, f in cands.items()}
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, f in cands.items():
            f()  # one untimed call: the block starts in steady state
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                f()
            times[k].append((time.perf_counter() - t0) / inner[k])
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def measure_size(H: int, B: int, rules: list[str], base, rounds: int, warmup: int) -> dict:
    """One round-robin over every candidate at (H, B); times in seconds."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, D, generator=g) for _ in range(8)]
    ys = [torch.randn(B, K, generator=g) for _ in range(8)]
    models, base_models = {}, {}
    for alpha in {RULES[r][1] for r in rules}:
        torch.manual_seed(0)
        models[alpha] = rnngrad.RNN(D, H, K, alpha=alpha)
        if base is not None:
            base_models[alpha] = base.RNN(D, H, K, alpha=alpha)
            base_models[alpha].load_state_dict(models[alpha].state_dict())
    cands: dict = {}
    info: dict = {}
    for alpha, m in models.items():
        cands[f"forward {alpha}"] = forward_anchor(m, xs)
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    c = torch.empty(1024, 1024)
    cands["gemm"] = lambda: torch.mm(a, b, out=c)
    one = torch.zeros(1)
    cands["op"] = lambda: one.add_(1.0)
    for r in rules:
        factory, alpha, kind = RULES[r]
        nbytes, flops, numel = traffic(kind, H, B)
        if f"probe {numel}" not in cands:
            buf = torch.randn(numel)
            cands[f"probe {numel}"] = lambda buf=buf: buf.mul_(-1.0)
        model = models[alpha]
        algo = factory()
        state = algo.init(model, B)
        raw = getattr(algo.step, "__wrapped__", None)
        stepper = Stepper(algo.step, model, state, xs, ys)
        for _ in range(warmup):
            stepper()
        info[r] = {"bytes": nbytes, "flops": flops, "numel": numel, "alpha": alpha,
                   "ops": count_ops(stepper), "wrapped": raw is not None}
        cands[f"step {r}"] = stepper
        if raw is not None:
            # the unwrapped rule on its own state (the checks are what the public step adds)
            rstate = algo.init(model, B)
            rstep = Stepper(raw, model, rstate, xs, ys)
            for _ in range(warmup):
                rstep()
            info[r]["rule_ops"] = count_ops(rstep)
            cands[f"rule {r}"] = rstep
        if base is not None:
            balgo = baseline_rule(base, r)
            bm = base_models[alpha]
            bstep = Stepper(balgo.step, bm, balgo.init(bm, B), xs, ys)
            for _ in range(warmup):
                bstep()
            info[r]["before_ops"] = count_ops(bstep)
            cands[f"before {r}"] = bstep
    times = round_robin(cands, rounds)
    return {"times": times, "info": info}


def summarise(runs: list[dict], H: int, B: int, rules: list[str]) -> list[dict]:
    """Per rule: medians over runs and the range of the ratios."""
    rows = []
    for r in rules:
        per = []
        for run in runs:
            inf = run["info"][r]
            t = {k: v[0] for k, v in run["times"].items()}  # medians over rounds
            bw = 2 * inf["numel"] * 4 / t[f"probe {inf['numel']}"]
            gemm = 2 * 1024**3 / t["gemm"]
            floor = max(inf["bytes"] / bw, inf["flops"] / gemm)
            fwd = t[f"forward {inf['alpha']}"]
            d = {"step": t[f"step {r}"], "forward": fwd, "bw": bw, "gemm": gemm, "floor": floor,
                 "op": t["op"], "bound": "compute" if inf["flops"] / gemm > inf["bytes"] / bw
                 else "memory"}
            d["rule"] = t.get(f"rule {r}", d["step"])
            d["before"] = t.get(f"before {r}")
            best = {k: v[1] for k, v in run["times"].items()}  # least over rounds
            d["best_step"] = best[f"step {r}"]
            d["best_rule"] = best.get(f"rule {r}", d["best_step"])
            d["best_before"] = best.get(f"before {r}")
            d["best_floor"] = max(inf["bytes"] * best[f"probe {inf['numel']}"]
                                  / (2 * inf["numel"] * 4), inf["flops"] * best["gemm"]
                                  / (2 * 1024**3))
            per.append(d)
        inf = runs[0]["info"][r]

        def med(key, per=per):
            return statistics.median(p[key] for p in per)

        def ratio(num, den, per=per):
            v = [p[num] / p[den] for p in per if p[num] is not None]
            return (statistics.median(v), min(v), max(v)) if v else (None, None, None)

        x_floor, x_fmin, x_fmax = ratio("step", "floor")
        x_fwd, x_wmin, x_wmax = ratio("step", "forward")
        rule_floor = ratio("rule", "floor")[0]
        row = {"rule": r, "alpha": inf["alpha"], "H": H, "B": B,
               "step_us": 1e6 * med("step"), "step_us_min": 1e6 * min(p["step"] for p in per),
               "step_us_max": 1e6 * max(p["step"] for p in per),
               "rule_us": 1e6 * med("rule"), "forward_us": 1e6 * med("forward"),
               "bytes": inf["bytes"], "flops": inf["flops"], "bandwidth_GBps": med("bw") / 1e9,
               "gemm_GFLOPs": med("gemm") / 1e9, "floor_us": 1e6 * med("floor"),
               "bound": per[0]["bound"], "x_floor": x_floor, "x_floor_min": x_fmin,
               "x_floor_max": x_fmax, "rule_x_floor": rule_floor, "x_forward": x_fwd,
               "x_forward_min": x_wmin, "x_forward_max": x_wmax, "ops": inf["ops"],
               "rule_ops": inf.get("rule_ops", inf["ops"]), "op_us": 1e6 * med("op"),
               "meets_2x": x_floor <= 2.0,
               # the least time of any round against the floor at the best bandwidth and GEMM
               # rate of any round: what the machine gives without interference
               "best_step_us": 1e6 * min(p["best_step"] for p in per),
               "best_floor_us": 1e6 * min(p["best_floor"] for p in per),
               "x_floor_best": min(p["best_step"] for p in per) / min(p["best_floor"] for p in per)}
        if per[0]["before"] is not None:
            row.update({"before_us": 1e6 * statistics.median(p["before"] for p in per),
                        "before_x_floor": ratio("before", "floor")[0],
                        "before_x_forward": ratio("before", "forward")[0],
                        "before_ops": inf["before_ops"],
                        "best_before_us": 1e6 * min(p["best_before"] for p in per),
                        "best_rule_us": 1e6 * min(p["best_rule"] for p in per)})
        rows.append(row)
    return rows


# ---- the kernels a trace step is made of ----------------------------------------------------

def measure_kernels(H: int, B: int, rounds: int) -> list[dict]:
    """The update and the contraction of a (B, H, P) trace, each way they can be written."""
    P = H + D + 1
    g = torch.Generator().manual_seed(2)
    X = torch.randn(B, H, P, generator=g)
    probe = torch.randn(B, H, P, generator=g)
    d3, pre3 = torch.rand(B, H, 1, generator=g), torch.randn(B, 1, P, generator=g)
    L = torch.randn(B, H, generator=g)
    cands = {
        "probe: X.mul_(-1.0)": lambda: probe.mul_(-1.0),
        "update: X.baddbmm_(d, pre, beta) (one pass)":
            lambda: X.baddbmm_(d3, pre3, beta=0.5, alpha=0.5),
        "update: X.mul_(beta).addcmul_(d, pre) (two passes)":
            lambda: X.mul_(0.5).addcmul_(d3, pre3),
        "contract: einsum('bi,bij->ij')": lambda: torch.einsum("bi,bij->ij", L, X),
        "contract: bmm over units (H, 1, B) x (H, B, P)":
            lambda: torch.bmm(L.T.contiguous().unsqueeze(1), X.transpose(0, 1)),
    }
    if B == 1:
        cands["contract: row scaling X[0] * L[0, :, None]"] = lambda: X[0] * L[0].unsqueeze(1)
    times = round_robin(cands, rounds)
    return [{"H": H, "B": B, "kernel": k, "median_us": 1e6 * v[0], "least_us": 1e6 * v[1],
             "MiB": B * H * P * 4 / 2**20} for k, v in times.items()]


def table_kernels(rows: list[dict]) -> str:
    sizes = list(dict.fromkeys((r["H"], r["B"]) for r in rows))
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    t = {(r["H"], r["B"], r["kernel"]): r["median_us"] for r in rows}
    out = ["| kernel | " + " | ".join(f"H = {H}, B = {B}" for H, B in sizes) + " |",
           "|---|" + "---|" * len(sizes)]
    for k in kernels:
        out.append(f"| {k.replace('|', '/')} | " + " | ".join(
            us(t[(H, B, k)]) if (H, B, k) in t else "" for H, B in sizes) + " |")
    r = rows[0]
    return "\n".join(out) + (f"\n\n{r['threads']} thread(s), load average {r['load']:.2f} at "
                              f"the end, medians of {r['rounds']} rounds.")


# ---- memory against T -------------------------------------------------------------------

CHILD = r"""
import gc, json, sys, time
sys.path.insert(0, {root!r})
import torch
import rnngrad
sys.path.insert(0, {here!r})
from online_floor import RULES

def rss(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)

def state_bytes(s, seen):
    if isinstance(s, torch.Tensor):
        st = s.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()
    if isinstance(s, (list, tuple)):
        return sum(state_bytes(v, seen) for v in s)
    return 0

torch.set_num_threads(1)  # memory does not depend on it; 10,000 steps go faster on a busy machine
factory, alpha, _ = RULES[{rule!r}]
T, H, B, D, K = {T}, {H}, {B}, {D}, {K}
torch.manual_seed(0)
model = rnngrad.RNN(D, H, K, alpha=alpha)
g = torch.Generator().manual_seed(1)
xs = [torch.randn(B, D, generator=g) for _ in range(8)]
ys = [torch.randn(B, K, generator=g) for _ in range(8)]
algo = factory()
state = algo.init(model, B)
for t in range(2):  # warm-up: one-off allocations (thread pools, kernels) go in the baseline
    state, _, _ = algo.step(model, state, xs[t], ys[t])
del state
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = rss("VmRSS")
t0 = time.perf_counter()
state = algo.init(model, B)  # the state's own allocation counts
for t in range(T):
    state, out, grads = algo.step(model, state, xs[t % 8], ys[t % 8])
dt = time.perf_counter() - t0
print(json.dumps({{"state_bytes": state_bytes(state, set()), "peak_bytes": rss("VmHWM") - base,
                  "seconds": dt}}))
"""


def measure_memory(rule: str, T: int) -> dict:
    H, B = MEM_SIZE.get(rule, MEM_DEFAULT)
    code = CHILD.format(root=str(ROOT), here=str(HERE), rule=rule, T=T, H=H,
                        B=B, D=D, K=K)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # as benchmarks/memory.py
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rule": rule, "T": T, "H": H, "B": B, "state_mib": res["state_bytes"] / 2**20,
            "peak_rss_mib": res["peak_bytes"] / 2**20, "seconds": res["seconds"]}


# ---- output -------------------------------------------------------------------------------

def fmt(v, nd=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def us(v):
    return f"{v / 1000:.3g} ms" if v >= 1000 else f"{v:.3g} us"


def table_after(rows: list[dict]) -> str:
    out = ["| rule | H | B | step | forward | floor (bound) | x floor [range] | x floor, best "
           "| x floor, rule | x forward [range] | ops x op | 2x |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['rule']} | {r['H']} | {r['B']} | {us(r['step_us'])} | {us(r['forward_us'])} "
            f"| {us(r['floor_us'])} ({r['bound']}) "
            f"| {r['x_floor']:.2f} [{r['x_floor_min']:.2f}-{r['x_floor_max']:.2f}] "
            f"| {r['x_floor_best']:.2f} | {r['rule_x_floor']:.2f} "
            f"| {r['x_forward']:.1f} [{r['x_forward_min']:.1f}-{r['x_forward_max']:.1f}] "
            f"| {r['ops']} x {r['op_us']:.2g} us | {'yes' if r['meets_2x'] else 'no'} |")
    return "\n".join(out)


def table_before_after(rows: list[dict]) -> str:
    out = ["| rule | H | B | before | after (rule) | speed-up | least before -> after "
           "| speed-up, least | x floor before -> after | x forward before -> after "
           "| ops before -> after |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "before_us" not in r:
            continue
        rule_fwd = r["rule_us"] / r["forward_us"]
        least = "| | |"  # CSVs written before the least times were kept
        if r.get("best_before_us") is not None:
            least = (f"| {us(r['best_before_us'])} -> {us(r['best_rule_us'])} "
                     f"| {r['best_before_us'] / r['best_rule_us']:.1f}x |")
        out.append(
            f"| {r['rule']} | {r['H']} | {r['B']} | {us(r['before_us'])} | {us(r['rule_us'])} "
            f"| {r['before_us'] / r['rule_us']:.1f}x {least}"
            f" {r['before_x_floor']:.2f} -> {r['rule_x_floor']:.2f} "
            f"| {r['before_x_forward']:.1f} -> {rule_fwd:.1f} "
            f"| {r['before_ops']} -> {r['rule_ops']} |")
    return "\n".join(out)


def table_memory(rows: list[dict]) -> str:
    Ts = sorted({r["T"] for r in rows})
    out = ["| rule | H, B | " + " | ".join(f"T = {t:,}: state / peak RSS" for t in Ts) + " |",
           "|---|---|" + "---|" * len(Ts)]
    for rule in dict.fromkeys(r["rule"] for r in rows):
        rs = {r["T"]: r for r in rows if r["rule"] == rule}
        r0 = rs[Ts[0]]
        cells = [f"{rs[t]['state_mib']:.3g} / {rs[t]['peak_rss_mib']:.3g} MiB" for t in Ts]
        out.append(f"| {rule} | {r0['H']}, {r0['B']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_doc(path: Path, blocks: dict[str, str]) -> bool:
    """Replace the text between ``<!-- online_floor:NAME -->`` and ``<!-- /online_floor -->``."""
    if not path.exists():
        return False
    text = path.read_text()
    for name, body in blocks.items():
        start = f"<!-- online_floor:{name} -->"
        end = "<!-- /online_floor -->"
        i = text.find(start)
        if i < 0:
            continue
        j = text.find(end, i)
        if j < 0:
            raise ValueError(f"{path}: {start} has no closing {end}")
        text = text[:i + len(start)] + "\n" + body + "\n" + text[j:]
    path.write_text(text)
    return True


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Bs = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(2, len(Bs), figsize=(6 * len(Bs), 8), squeeze=False)
    styles = ["o-", "s-", "^-", "v-", "D-", "P-", "X-", "*-"]
    for col, B in enumerate(Bs):
        for k, rule in enumerate(RULES):
            rs = sorted((r for r in rows if r["rule"] == rule and r["B"] == B),
                        key=lambda r: r["H"])
            if not rs:
                continue
            Hs = [r["H"] for r in rs]
            line = axes[0][col].loglog(Hs, [r["x_floor"] for r in rs], styles[k], label=rule)[0]
            axes[0][col].fill_between(Hs, [r["x_floor_min"] for r in rs],
                                      [r["x_floor_max"] for r in rs], color=line.get_color(),
                                      alpha=0.15)
            color = line.get_color()
            axes[1][col].loglog(Hs, [r["x_forward"] for r in rs], styles[k], color=color,
                                label=rule)
            if any(r["rule_us"] != r["step_us"] for r in rs):  # the rule without the checks
                axes[0][col].loglog(Hs, [r["rule_x_floor"] for r in rs], "--", color=color, lw=1)
                axes[1][col].loglog(Hs, [r["rule_us"] / r["forward_us"] for r in rs], "--",
                                    color=color, lw=1)
            if "before_x_floor" in rs[0]:
                axes[0][col].loglog(Hs, [r["before_x_floor"] for r in rs], ":", color=color,
                                    lw=1)
                axes[1][col].loglog(Hs, [r["before_x_forward"] for r in rs], ":", color=color,
                                    lw=1)
        axes[0][col].axhline(2.0, color="k", lw=0.8, ls="--")
        axes[0][col].set_title(f"B = {B}: time per step / floor")
        axes[1][col].set_title(f"B = {B}: time per step / forward step")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("hidden units H")
            ax.set_xticks(sorted({r["H"] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("online rules on rnngrad.RNN, float32, D = 32, K = 10. Solid: algo.step "
                 "(shaded: range over runs); dashed: the rule without the\nargument checks "
                 "algo.step wraps it in; dotted: the rule before this work (--baseline)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def timing(args, rules: list[str], sizes: list[tuple[int, int]], out: Path, sfx: str) -> dict:
    """The timed part: CSV, plot, and the doc's tables (returned)."""
    base = load_baseline(args.baseline) if args.baseline else None
    load = [os.getloadavg()[0]]
    runs: dict = {s: [] for s in sizes}
    t_start = time.perf_counter()
    for i in range(args.runs):
        for H, B in sizes:
            here = [r for r in rules if runs_at(r, H, B)]
            runs[(H, B)].append(measure_size(H, B, here, base, args.rounds, args.warmup))
            load.append(os.getloadavg()[0])
            print(f"run {i + 1}/{args.runs} H={H} B={B} done "
                  f"({time.perf_counter() - t_start:.0f} s, load {load[-1]:.2f})", flush=True)
    rows = []
    for H, B in sizes:
        rows += summarise(runs[(H, B)], H, B, [r for r in rules if runs_at(r, H, B)])
    rows.sort(key=lambda r: (list(RULES).index(r["rule"]), r["B"], r["H"]))
    meta = {"device": f"CPU {platform.processor() or platform.machine()}, "
                      f"{args.threads} thread{'s' if args.threads > 1 else ''} of {os.cpu_count()} cores",
            "torch": torch.__version__, "load_min": min(load), "load_max": max(load),
            "baseline": args.baseline or "", "runs": args.runs, "rounds": args.rounds}
    with open(out / f"online_floor{sfx}.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=keys + list(meta))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: fmt(v, 4) for k, v in r.items()}, **meta})
    return tables_from_csv(out, sfx)


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV this script wrote, numbers as numbers."""
    def value(v):
        if v in ("True", "False"):
            return v == "True"
        try:
            f = float(v)
        except ValueError:
            return v if v != "" else None
        return int(f) if f.is_integer() and "." not in v and "e" not in v else f

    with open(path) as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def tables_from_csv(out: Path, sfx: str) -> dict:
    """The plot and the doc's tables from ``online_floor{sfx}.csv`` (and the memory CSV)."""
    rows = read_csv(out / f"online_floor{sfx}.csv")
    for r in rows:
        r["rule"] = str(r["rule"])
        if r.get("before_us") is None:
            for k in [k for k in r if k.startswith("before")] + ["speedup"]:
                r.pop(k, None)
    plot(rows, out / f"online_floor{sfx}.png")
    print(table_after(rows))
    m = rows[0]
    blocks = {"after": table_after(rows),
              "meta": (f"Run: {m['device']}, torch {m['torch']}, {m['runs']} runs x "
                       f"{m['rounds']} rounds, load average {m['load_min']:.2f} to "
                       f"{m['load_max']:.2f} during the run"
                       + (f", before = git revision {m['baseline']}" if m["baseline"] else "")
                       + ".")}
    if "before_us" in m:
        print(table_before_after(rows))
        blocks["before_after"] = table_before_after(rows)
    kernels_path = out / f"online_floor_kernels{sfx}.csv"
    if kernels_path.exists():
        blocks["kernels"] = table_kernels(read_csv(kernels_path))
    mem_path = out / f"online_floor_memory{sfx}.csv"
    if mem_path.exists():
        blocks["memory"] = table_memory(read_csv(mem_path))
    return blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="64,256,1024")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--baseline", default=None, help="git revision to time the rules of too")
    ap.add_argument("--quick", action="store_true", help="H = 64, 256; 2 runs; no memory part")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the memory-against-T part")
    ap.add_argument("--kernels", action="store_true",
                    help="only the kernels of a trace step, each way it can be written")
    ap.add_argument("--tables-only", action="store_true",
                    help="redraw the plot and the doc's tables from the CSV files, timing nothing")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--out", default=str(HERE), help="folder for the CSV and PNG files")
    ap.add_argument("--tag", default="", help="suffix for the file names and doc markers")
    ap.add_argument("--no-blocks", action="store_true",
                    help="keep every trace whole (no row blocks), to measure what blocking buys")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.runs, args.no_memory = "64,256", 2, True
    torch.set_num_threads(args.threads)
    if args.no_blocks:
        sys.modules["rnngrad.algorithms._online"].BLOCKED_ABOVE = float("inf")
    rules = [r for r in args.rules.split(",") if r]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise SystemExit(f"unknown rules {unknown}; known: {', '.join(RULES)}")
    sizes = [(int(h), int(b)) for h in args.hidden.split(",") for b in args.batch.split(",")]
    out = Path(args.out)
    sfx = f"_{args.tag}" if args.tag else ""
    if args.kernels:
        rows = [r for H, B in sizes for r in measure_kernels(H, B, args.rounds)]
        load = os.getloadavg()[0]
        for r in rows:
            r.update(threads=args.threads, load=load, rounds=args.rounds)
        with open(out / f"online_floor_kernels{sfx}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: fmt(v, 4) for k, v in r.items()} for r in rows)
        print(table_kernels(rows))
        blocks = {"kernels": table_kernels(rows)}
        if not args.no_doc and write_doc(ROOT / "docs" / "online_floor.md",
                                         {k + sfx: v for k, v in blocks.items()}):
            print("table written into docs/online_floor.md")
        return
    if args.tables_only:
        blocks = tables_from_csv(out, sfx)
    else:
        blocks = {} if args.memory_only else timing(args, rules, sizes, out, sfx)
    if not args.no_memory and not args.tables_only:
        mem = []
        for rule in rules:
            for T in MEM_TS:
                mem.append(measure_memory(rule, T))
                m = mem[-1]
                print(f"memory {rule:12s} T={T:6d}: state {m['state_mib']:.3f} MiB, peak RSS "
                      f"{m['peak_rss_mib']:.2f} MiB ({m['seconds']:.1f} s)", flush=True)
        with open(out / f"online_floor_memory{sfx}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(mem[0]))
            w.writeheader()
            w.writerows({k: fmt(v, 4) for k, v in m.items()} for m in mem)
        print(table_memory(mem))
        blocks["memory"] = table_memory(mem)
    blocks = {name + sfx: body for name, body in blocks.items()}
    if not args.no_doc and write_doc(ROOT / "docs" / "online_floor.md", blocks):
        print("tables written into docs/online_floor.md")


if __name__ == "__main__":
    main()
