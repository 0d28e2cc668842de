"""Peak memory of one gradient against the sequence length T.

    python benchmarks/memory.py          # writes memory.csv and memory.png beside this file
    python benchmarks/memory.py --quick  # T up to 3,000 only
    python benchmarks/memory.py --plot-only  # redraw memory.png from memory.csv

H = 128, D = 2, K = 1, float32, tanh, MSE at every step. For each algorithm and T,
a fresh Python process builds the model and the data (inputs, targets), reads its
resident set size (``VmRSS`` in /proc/self/status), runs ``rnngrad.gradient`` once and
reads the high-water mark (``VmHWM``); the figure is ``VmHWM - VmRSS``: every byte
the gradient computation itself touched at its peak (tensors, allocator slack,
temporaries), the data and the model excluded. A fresh process per point keeps one
run's freed-but-cached memory out of the next, and the child runs with
``MALLOC_MMAP_THRESHOLD_=131072`` so glibc returns freed large blocks to the OS
instead of keeping them in a fragmented heap (with glibc's default dynamic
threshold the flat curves sit up to ~5 MB higher at T = 10,000: allocator slack,
not stored tensors). Resolution is about 1 MB.

Algorithms: ``bptt()`` (B = 16), ``bptt(checkpoint=round(sqrt(T)))`` (B = 16),
``tbptt(100)`` (B = 16), and ``rtrl()`` at B = 1 (its influence (B, H, H, D+H+1) is
B x 8.6 MB here, and its O(H^4) time per step per example makes B = 16 at T = 10,000
hours of CPU; its memory is the influence, independent of T). The "per example"
column divides by B.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
H, D, K = 128, 2, 1
TS = (100, 300, 1000, 3000, 10000)
ALGOS = {  # name -> (spec for the child, batch size)
    "bptt()": ("bptt", 16),
    "bptt(checkpoint=sqrt(T))": ("ckpt", 16),
    "tbptt(100)": ("tbptt", 16),
    "rtrl()": ("rtrl", 1),
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
import rnngrad

def rss(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)

torch.manual_seed(0)
torch.set_num_threads(1)
spec, T, B = {spec!r}, {T}, {B}
model = rnngrad.RNN({D}, {H}, {K})
x = torch.randn(T, B, {D})
y = torch.randn(T, B, {K})
c = max(1, round(T ** 0.5))
algo = {{"bptt": rnngrad.bptt(), "ckpt": rnngrad.bptt(checkpoint=c), "tbptt": rnngrad.tbptt(100),
        "rtrl": rnngrad.rtrl()}}[spec]
# warm up on a tiny problem so one-off allocations (thread pools, kernels) are in the baseline
rnngrad.gradient(model, x[:2], y[:2], algorithm=algo)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = rss("VmRSS")
t0 = time.perf_counter()
loss, grads = rnngrad.gradient(model, x, y, algorithm=algo)
dt = time.perf_counter() - t0
print(json.dumps({{"peak_bytes": rss("VmHWM") - base, "seconds": dt, "checkpoint": c}}))
"""


def measure(spec: str, T: int, B: int) -> dict:
    code = CHILD.format(root=str(HERE.parent), spec=spec, T=T, B=B, D=D, H=H, K=K)
    # glibc's malloc raises its mmap threshold as large blocks are freed, after which freed
    # segments stay in the heap and fragment it (a few MB of RSS that no tensor holds);
    # a fixed threshold keeps large tensors in mmap, returned to the OS when freed
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in ALGOS:
        r = [row for row in rows if row["algorithm"] == name]
        B = r[0]["B"]
        ax.loglog([row["T"] for row in r], [max(row["peak_mb"], 0.05) for row in r], "o-",
                  label=f"{name}, B={int(B)}")
    Ts = sorted({row["T"] for row in rows})
    ref = [row for row in rows if row["algorithm"] == "bptt()"]
    if ref:
        k = ref[-1]["peak_mb"] / ref[-1]["T"]
        ax.loglog(Ts, [k * t for t in Ts], "k:", lw=0.8, label="~ T")
    ck = [row for row in rows if row["algorithm"].startswith("bptt(checkpoint")]
    if ck:
        k = ck[-1]["peak_mb"] / math.sqrt(ck[-1]["T"])
        ax.loglog(Ts, [k * math.sqrt(t) for t in Ts], "k--", lw=0.8, label="~ sqrt(T)")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("peak memory of the gradient (MB, RSS)")
    ax.set_title(f"Peak memory vs T (H={H}, float32, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if "--plot-only" in sys.argv:
        with open(HERE / "memory.csv") as f:
            rows = [{k: (v if k in ("algorithm", "checkpoint") else float(v)) for k, v in r.items()}
                    for r in csv.DictReader(f)]
        plot(rows, HERE / "memory.png")
        return
    quick = "--quick" in sys.argv
    rows = []
    for name, (spec, B) in ALGOS.items():
        for T in TS:
            if quick and T > 3000:
                continue
            m = measure(spec, T, B)
            rows.append({"algorithm": name, "T": T, "B": B, "H": H,
                         "checkpoint": m["checkpoint"] if spec == "ckpt" else "",
                         "peak_mb": m["peak_bytes"] / 2**20,
                         "peak_mb_per_example": m["peak_bytes"] / 2**20 / B,
                         "seconds": m["seconds"]})
            print(f"{name:28s} T={T:6d} B={B:3d}  peak {rows[-1]['peak_mb']:9.2f} MB"
                  f"  ({m['seconds']:.2f} s)", flush=True)
    with open(HERE / "memory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, HERE / "memory.png")


if __name__ == "__main__":
    main()
