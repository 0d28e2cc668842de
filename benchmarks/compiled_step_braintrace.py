"""braintrace 0.2.8's compiled online step, timed like benchmarks/compiled_step.py.

Runs in its own Python 3.12 virtual environment (braintrace needs Python >= 3.12 and JAX;
never a dependency of rnngrad):

    python3.12 -m venv /tmp/bt && /tmp/bt/bin/pip install braintrace==0.2.8 "jax[cpu]"
    /tmp/bt/bin/python benchmarks/compiled_step_braintrace.py > benchmarks/compiled_step_braintrace.csv

One step = the cell + a linear readout, the eligibility-trace update and the step's
gradient (``etrace_grad`` over a block of T steps, one ``brainstate.transform.jit``
program, divided by T), float32, one CPU thread (XLA flags below), CPU time of the process.
"""

import os

os.environ["XLA_FLAGS"] = ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 "
                           + os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import brainstate  # noqa: E402
import braintrace  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

D, K, T = 32, 10, 32
CELLS = {"elman": lambda H: braintrace.nn.ValinaRNNCell(D, H, activation="tanh"),
         "gru": lambda H: braintrace.nn.GRUCell(D, H),
         "lstm": lambda H: braintrace.nn.LSTMCell(D, H),
         "lru": lambda H: braintrace.nn.LRUCell(D, H)}
ALGOS = {"d_rtrl (eprop)": "d_rtrl", "snap": braintrace.SnAp}


class Net(brainstate.nn.Module):
    def __init__(self, cell, H):
        super().__init__()
        self.cell = CELLS[cell](H)
        self.out = braintrace.nn.Linear(H, K)

    def update(self, x):
        return self.out(self.cell(x))


def measure(cell, algo, B, H):
    brainstate.random.seed(0)
    model = Net(cell, H)
    x0 = brainstate.random.randn(B, D)
    learner = braintrace.compile(model, ALGOS[algo], x0, batch_size=B)
    xs = brainstate.random.randn(T, B, D)
    ys = brainstate.random.randn(T, B, K)

    def step_loss(x, y):
        return 0.5 * jnp.sum((learner(x) - y) ** 2) / B

    @brainstate.transform.jit
    def block(xs, ys):
        return learner.etrace_grad(xs, ys, step_fn=step_loss)

    t0 = time.perf_counter()
    jax.block_until_ready(block(xs, ys))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(7):
        t0 = time.process_time()
        for _ in range(3):
            jax.block_until_ready(block(xs, ys))
        times.append((time.process_time() - t0) / (3 * T))
    return statistics.median(times), compile_s


if __name__ == "__main__":
    print("cell,rule,B,H,braintrace_us,compile_s,error")
    sizes = [(1, 64), (1, 256), (16, 256)]
    for B, H in sizes:
        for cell in CELLS:
            for algo in ALGOS:
                try:
                    t, c = measure(cell, algo, B, H)
                    print(f"{cell},{algo},{B},{H},{t * 1e6:.1f},{c:.1f},", flush=True)
                except Exception as e:  # noqa: BLE001 - recorded in the table
                    msg = str(e).splitlines()[0][:120].replace(",", ";") if str(e) else ""
                    print(f"{cell},{algo},{B},{H},,,{type(e).__name__}: {msg}", flush=True)
    sys.exit(0)
