"""RTRL speed: rnngrad.rtrl() against an RTRL built on torch.func and the GEMM floor.

    python benchmarks/rtrl.py            # writes rtrl.csv and rtrl.png beside this file

Three timings of the same gradient (B = 8, T = 20, D = 8, K = 2, float32, tanh),
for H in {16, 32, 64, 128}, all measured in this run on this machine:

- ``rtrl()``: the structured influence (B, H, H, P), P = D + H + 1, one batched GEMM
  per step with phi' folded into the left factor and Mbar a diagonal add.
- ``rtrl(generic=True)``: J_t and Mbar_t from ``vmap(jacrev(cell))``, the influence
  flat (B, H, N), ``M = J M + Mbar`` by ``baddbmm``.
- the GEMM floor: the multiply-adds RTRL cannot avoid, ``W_rec @ M`` every step:
  (H, H) times the H x (H P) influence of each example, ``2 B H^3 P`` flops per step
  (``T B 2 H^3 P`` per gradient; the issue's ``T B 2 H^2 P`` omits the factor H of
  the influence's columns), at the best square float32 GEMM rate measured in this
  run (``matmul_gflops``). ``bmm_shape_gflops`` is the rate of RTRL's own GEMM shape
  alone, which small H cannot reach the square rate with.

Timings use ``RTRL_THREADS`` (default 1) CPU threads. Each is the best of ``REPEATS`` runs of ``rnngrad.gradient`` over the
sequence (gradients checked equal between the two RTRLs before timing).
"""

from __future__ import annotations

import csv
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import rnngrad  # noqa: E402

HS = (16, 32, 64, 128)
B, T, D, K = 8, 20, 8, 2
REPEATS = 7
# One thread by default: on a shared 2-core machine, 2 OpenMP threads that spin at
# barriers make timings swing 10x with other load; RTRL_THREADS=2 to use both.
THREADS = int(os.environ.get("RTRL_THREADS", "1"))


def best_time(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate() -> float:
    """The machine's float32 GEMM rate in flop/s: the best over square products of
    n = 512, 1024, 2048 (best of 10 runs each)."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = best_time(lambda a=a, b=b: torch.mm(a, b), repeats=10)
        best = max(best, 2.0 * n ** 3 / t)
    return best


def shape_rate(H: int, P: int) -> float:
    """The rate of RTRL's own GEMM shape, (B, H, H) x (B, H, H P), in flop/s."""
    a, m = torch.randn(B, H, H), torch.randn(B, H, H * P)
    out = torch.empty_like(m)
    t = best_time(lambda: torch.bmm(a, m, out=out), repeats=10)
    return 2.0 * B * H * H * H * P / t


def run() -> list[dict]:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    rate = matmul_rate()
    rows = []
    for H in HS:
        model = rnngrad.RNN(D, H, K)
        x = torch.randn(T, B, D)
        y = torch.randn(T, B, K)
        fast, generic = rnngrad.rtrl(), rnngrad.rtrl(generic=True)
        _, g1 = rnngrad.gradient(model, x, y, algorithm=fast)
        _, g2 = rnngrad.gradient(model, x, y, algorithm=generic)
        err = max(float((g1[n] - g2[n]).abs().max() / g2[n].abs().max()) for n in g2)
        t_fast = best_time(lambda m=model, x=x, y=y, a=fast: rnngrad.gradient(m, x, y, algorithm=a))
        t_gen = best_time(lambda m=model, x=x, y=y, a=generic: rnngrad.gradient(m, x, y, algorithm=a))
        P = D + H + 1
        flops = T * B * 2.0 * H ** 3 * P
        t_floor = flops / rate
        rows.append({
            "H": H, "B": B, "T": T, "D": D, "P": P,
            "rtrl_s": t_fast, "generic_s": t_gen, "floor_s": t_floor,
            "speedup_vs_generic": t_gen / t_fast, "times_floor": t_fast / t_floor,
            "rtrl_gflops": flops / t_fast / 1e9, "matmul_gflops": rate / 1e9,
            "bmm_shape_gflops": shape_rate(H, P) / 1e9,
            "rel_diff_vs_generic": err, "threads": torch.get_num_threads(),
        })
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    Hs = [r["H"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(Hs, [r["generic_s"] for r in rows], "o-", label="rtrl(generic=True): vmap(jacrev)")
    ax.loglog(Hs, [r["rtrl_s"] for r in rows], "s-", label="rtrl(): structured, batched GEMM")
    ax.loglog(Hs, [r["floor_s"] for r in rows], "k--", label="GEMM floor 2BH^3P flops/step")
    ax.set_xticks(Hs, [str(int(h)) for h in Hs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("hidden units H")
    ax.set_ylabel(f"seconds per gradient (T={T}, B={B}, D={D})")
    ax.set_title(f"RTRL, float32, {int(rows[0]['threads'])} CPU thread(s)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if "--plot-only" in sys.argv:  # redraw rtrl.png from rtrl.csv
        with open(HERE / "rtrl.csv") as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        plot(rows, HERE / "rtrl.png")
        return
    rows = run()
    with open(HERE / "rtrl.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, HERE / "rtrl.png")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, matmul {rows[0]['matmul_gflops']:.1f} GFLOP/s")
    for r in rows:
        print(f"H={r['H']:4d}  rtrl {r['rtrl_s'] * 1e3:9.2f} ms  generic {r['generic_s'] * 1e3:9.2f} ms"
              f"  floor {r['floor_s'] * 1e3:8.2f} ms  speedup {r['speedup_vs_generic']:5.1f}x"
              f"  x floor {r['times_floor']:4.2f}")


if __name__ == "__main__":
    main()
