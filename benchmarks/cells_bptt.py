"""GRU and LSTM BPTT: one forward plus backward, float32, same weights and data, one run.

    hand-derived     cell.forward_sequence + readout + cell.backward_sequence (rnngrad's
                     own GRU / LSTM derivation)
    torch.func       the same cell through the base class's generic path
                     (Cell.forward_sequence / backward_sequence: a torch.func.vjp per step),
                     what a user's own cell costs
    nn.GRU / nn.LSTM + nn.Linear + autograd   what users would otherwise write (the anchor)

Each computes the loss L = (1/2B) sum_{t,b} |W_out h_t + b_out - y_t|^2 and every weight
gradient (recurrent and readout); the script first checks that all candidates give the
same loss and gradients. H in {64, 256, 1024}, T = 200, B = 64, D = 32, K = 10, CPU,
torch.set_num_threads(2). Candidates are timed round-robin (load from other processes
falls on all alike), each figure the median over --repeats; the whole measurement is
repeated --runs times and the table gives the median ratio to the anchor with its
lowest and highest value over the runs.

Each (cell, H) runs in a fresh process, twice: with glibc's malloc as a user runs it
("default"), and with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ raised ("heap").
The reason, measured: glibc serves a large buffer by a fresh mmap (and page faults on
first touch) until a free of a large block raises its dynamic threshold, so a process's
history changes what every fresh (T, B, 4H) buffer costs. With both thresholds at 4 GiB
every buffer comes from the heap and is reused without page faults. nn.LSTM (oneDNN's
fused LSTM on this CPU, which allocates its workspaces per call) takes 182 ms at H = 256
in a fresh process and 119 ms so; rnngrad's LSTM, which allocates fewer buffers, 156 and
139 ms (one measurement of each). The two columns bound what a user sees.

Writes cells_bptt.csv and cells_bptt.md beside this file (cells_bptt_cpu_1t.* for
``--clock cpu --threads 1``: CPU time of this process, which load from other processes on
a shared machine barely moves).

    python benchmarks/cells_bptt.py [--runs 5] [--repeats 7] [--hidden 64,256,1024]
                                    [--cells gru,lstm] [--no-generic] [--clock cpu --threads 1]
                                    [--allocator both|default|heap]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from rnngrad.cells import GRU, LSTM
from rnngrad.cells.base import Cell

ANCHOR = {"gru": "nn.GRU + autograd", "lstm": "nn.LSTM + autograd"}


def make(kind: str, H: int, T: int, B: int, D: int, K: int):
    torch.manual_seed(0)
    cell = (GRU if kind == "gru" else LSTM)(D, H)
    mod = (nn.GRU if kind == "gru" else nn.LSTM)(D, H)
    lin = nn.Linear(H, K)
    with torch.no_grad():
        mod.weight_ih_l0.copy_(cell.W_ih)
        mod.weight_hh_l0.copy_(cell.W_hh)
        mod.bias_ih_l0.copy_(cell.b_ih)
        mod.bias_hh_l0.copy_(cell.b_hh)
    x = torch.randn(T, B, D)
    y = torch.randn(T, B, K)
    return cell, mod, lin, x, y


def run_cell(cell, lin, x, y, *, generic: bool):
    """Loss and gradients (dict, PyTorch's names) by the cell's sequence functions."""
    fwd = Cell.forward_sequence if generic else type(cell).forward_sequence
    bwd = Cell.backward_sequence if generic else type(cell).backward_sequence
    T, B, _ = x.shape
    with torch.no_grad():
        params = {k: v.detach() for k, v in cell.named_parameters()}
        s0 = cell.init_state(B)
        hs, _, cache = fwd(cell, params, x, s0, cache=True)
        W_out, b_out = lin.weight.detach(), lin.bias.detach()
        H = hs.shape[-1]
        h2 = hs.reshape(T * B, H)
        dz = torch.addmm(b_out, h2, W_out.T).sub_(y.reshape(T * B, -1))
        loss = 0.5 * dz.pow(2).sum() / B
        dz.div_(B)
        d_out = (dz @ W_out).view(T, B, H)
        grads, _, _ = bwd(cell, params, x, s0, cache, d_out, input_grad=False)
        grads = {**grads, "W_out": dz.T @ h2, "b_out": dz.sum(0)}
    return loss, grads


def run_torch(mod, lin, x, y):
    mod.zero_grad(set_to_none=True)
    lin.zero_grad(set_to_none=True)
    h, _ = mod(x)
    loss = 0.5 * ((lin(h) - y) ** 2).sum() / x.shape[1]
    loss.backward()
    return loss.detach(), {"W_ih": mod.weight_ih_l0.grad, "W_hh": mod.weight_hh_l0.grad,
                           "b_ih": mod.bias_ih_l0.grad, "b_hh": mod.bias_hh_l0.grad,
                           "W_out": lin.weight.grad, "b_out": lin.bias.grad}


def bench(kind: str, H: int, *, T: int = 200, B: int = 64, D: int = 32, K: int = 10,
          repeats: int = 7, generic: bool = True, clock=time.perf_counter) -> list[dict]:
    cell, mod, lin, x, y = make(kind, H, T, B, D, K)
    anchor = ANCHOR[kind]
    cands = {"hand-derived": lambda: run_cell(cell, lin, x, y, generic=False),
             anchor: lambda: run_torch(mod, lin, x, y)}
    if generic:
        cands["torch.func (generic Cell)"] = lambda: run_cell(cell, lin, x, y, generic=True)
    # every candidate computes the same loss and gradients (float32 round-off)
    ref_loss, ref_g = cands[anchor]()
    for name, f in cands.items():
        loss, g = f()
        if abs(float(loss - ref_loss)) > 1e-4 * abs(float(ref_loss)):
            raise RuntimeError(f"{name}: loss {float(loss)} but {anchor} gives {float(ref_loss)}")
        for k, v in ref_g.items():
            err = float((g[k] - v).norm() / v.norm())
            if err > 1e-3:
                raise RuntimeError(f"{name}: gradient {k} has relative error {err:.2e} "
                                   f"against {anchor}")
    times: dict[str, list[float]] = {n: [] for n in cands}
    for f in cands.values():  # warm-up
        f()
    for _ in range(repeats):
        for name, f in cands.items():
            t0 = clock()
            f()
            times[name].append(clock() - t0)
    ref = statistics.median(times[anchor])
    return [{"cell": kind, "H": H, "T": T, "B": B, "D": D, "K": K, "method": name,
             "median_ms": statistics.median(ts) * 1e3,
             "ratio": statistics.median(ts) / ref} for name, ts in times.items()]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def _child(args, kind: str, H: int, allocator: str) -> list:
    """One (cell, H) measurement in a fresh process, so that no configuration inherits
    the allocator's state from another (glibc's mmap threshold moves as buffers are freed)."""
    env = {**os.environ, **(HEAP_ENV if allocator == "heap" else {})}
    cmd = [sys.executable, __file__, "--child", "--cells", kind, "--hidden", str(H),
           "--runs", str(args.runs), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--clock", args.clock,
           "--generic-max-hidden", str(args.generic_max_hidden)]
    if args.no_generic:
        cmd.append("--no-generic")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", default="64,256,1024")
    ap.add_argument("--cells", default="gru,lstm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-generic", action="store_true", help="skip the torch.func path")
    ap.add_argument("--generic-max-hidden", type=int, default=256,
                    help="time the torch.func path only up to this H (it is slow)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter; cpu: this process's CPU time "
                         "(time.process_time), which other processes' load barely moves; "
                         "meaningful with --threads 1")
    ap.add_argument("--out", default=None, help="CSV path (default: beside this file)")
    ap.add_argument("--allocator", choices=("both", "default", "heap"), default="both",
                    help="default: glibc malloc as a user runs it; heap: " + " ".join(
                        f"{k}={v}" for k, v in HEAP_ENV.items()) + ", so that no candidate "
                    "pays page faults for fresh large buffers (see the docstring)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        kind, H = args.cells, int(args.hidden)
        gen = not args.no_generic and H <= args.generic_max_hidden
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        runs = [bench(kind, H, repeats=args.repeats, generic=gen, clock=clock)
                for _ in range(args.runs)]
        print(json.dumps(runs))
        return
    rows = []
    load_start = os.getloadavg()[0]
    allocators = ("default", "heap") if args.allocator == "both" else (args.allocator,)
    for kind in args.cells.split(","):
        for H in (int(h) for h in args.hidden.split(",")):
            for alloc in allocators:
                runs = _child(args, kind, H, alloc)
                for i, first in enumerate(runs[0]):
                    ms = [run[i]["median_ms"] for run in runs]
                    ratios = [run[i]["ratio"] for run in runs]
                    rows.append({**{k: first[k] for k in ("cell", "H", "T", "B", "D", "K",
                                                          "method")},
                                 "allocator": alloc,
                                 "median_ms": round(statistics.median(ms), 2),
                                 "ratio_vs_torch": round(statistics.median(ratios), 3),
                                 "ratio_min": round(min(ratios), 3),
                                 "ratio_max": round(max(ratios), 3), "runs": args.runs,
                                 "clock": args.clock, "threads": args.threads})
                    r = rows[-1]
                    print(f"{r['cell']} H={r['H']:5d} {alloc:7s} {r['method']:28s} "
                          f"{r['median_ms']:9.2f} ms  x{r['ratio_vs_torch']:.3f} "
                          f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]", flush=True)
    dev_name = (f"CPU {cpu_model()}, {torch.get_num_threads()} threads, {args.clock} clock")
    stem = ("cells_bptt" if (args.clock, args.threads) == ("wall", 2)
            else f"cells_bptt_{args.clock}_{args.threads}t")
    out = Path(args.out) if args.out else Path(__file__).with_name(stem + ".csv")
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=[*rows[0], "device_name", "torch"])
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, "device_name": dev_name, "torch": torch.__version__})
    r0 = rows[0]
    lines = [f"GRU and LSTM BPTT, one forward + backward with every weight gradient, float32, "
             f"T={r0['T']} B={r0['B']} D={r0['D']} K={r0['K']}, {dev_name}, torch "
             f"{torch.__version__}; {args.runs} runs x median of {args.repeats} repeats. "
             "Ratio: time / time of nn.GRU or nn.LSTM + nn.Linear + autograd in the same run "
             "(median over runs, [lowest, highest]). Machine load (1-minute load average, "
             f"{os.cpu_count()} CPUs): {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} "
             "at the end.", "",
             "| cell | H | allocator | method | median ms | ratio vs torch | range |",
             "|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['H']} | {r['allocator']} | {r['method']} | "
                     f"{r['median_ms']} | "
                     f"{r['ratio_vs_torch']:.2f} | {r['ratio_min']:.2f} - {r['ratio_max']:.2f} |")
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
