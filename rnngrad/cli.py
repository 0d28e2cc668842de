"""``rnngrad train | compare | check | bench``: the command line, and the only place that prints."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _check_device(name: str) -> str:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but torch {torch.__version__} sees no "
                         "CUDA device here")
    return name


def _task_kwargs(args) -> dict:
    kw = {}
    if getattr(args, "seq_len", None) is not None:
        kw["seq_len"] = args.seq_len
    if getattr(args, "stream", False):
        if args.task != "stream_add":
            raise ValueError(f"--stream needs a streaming task (stream_add), got {args.task!r}")
        kw["streaming"] = True
    return kw


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=64, metavar="H",
                   help="number of hidden units H (default: 64)")
    g.add_argument("--activation", default="tanh",
                   help="hidden nonlinearity phi: tanh, sigmoid, relu, identity, softplus "
                        "(default: tanh)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="leak alpha in (0, 1]; 1 is the vanilla cell (default: 1.0)")
    g.add_argument("--init", default="uniform",
                   help="W_rec initialisation: uniform, orthogonal, normal, identity "
                        "(default: uniform)")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="parameter dtype (default: float32)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    from .tasks import TASKS

    g = p.add_argument_group("task")
    g.add_argument("--task", default="digits", choices=sorted(TASKS),
                   help="built-in task (default: digits)")
    g.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="sequence length for tasks that take one (adding, sine, stream_add; "
                        "default: the task's own, 50)")
    g.add_argument("--stream", action="store_true",
                   help="stream_add only: consecutive batches continue one stream, and the "
                        "hidden and algorithm state carry over from batch to batch")


def _add_training_flags(p: argparse.ArgumentParser, *, steps: int, batch_size: int,
                        compare: bool = False) -> argparse._ArgumentGroup:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps,
                   help=f"training batches{' per run' if compare else ''} (default: {steps})")
    g.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: 1e-2)")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"],
                   help="optimizer (default: adam)")
    g.add_argument("--batch-size", type=int, default=batch_size, metavar="B",
                   help=f"sequences per batch (default: {batch_size})")
    g.add_argument("--clip", type=float, default=1.0,
                   help="clip the gradient norm to this value; 0 disables (default: 1.0)")
    g.add_argument("--update-every", type=int, default=None, metavar="N",
                   help="online learning: apply the optimizer every N time steps during the "
                        "sequence with what the algorithm emitted; BPTT is cut there "
                        "(default: once per sequence)")
    if not compare:
        g.add_argument("--seed", type=int, default=0,
                       help="seed for the initial weights and the data stream (default: 0)")
        g.add_argument("--log-every", type=int, default=50,
                       help="evaluate and log every this many steps (default: 50)")
    return g


def build_parser() -> argparse.ArgumentParser:
    from .registry import ALGORITHMS

    algos = ", ".join(f"{n}:K" if a[1] else n for n, a in ALGORITHMS.items())
    parser = argparse.ArgumentParser(
        prog="rnngrad",
        description="Gradients of recurrent networks by every method, behind one PyTorch API.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a network on a built-in task",
                       description="Train an rnngrad.RNN on a built-in task with any gradient "
                                   "algorithm; writes metrics.csv, curve.png, model.pt.")
    _add_task_flags(p)
    p.add_argument("--algorithm", default=None,
                   help=f"gradient algorithm: {algos} (default: bptt); with --model steady: "
                        f"{', '.join(STEADY_ALGORITHMS)} (default: rbp)")
    p.add_argument("--model", default="rnn", choices=["rnn", "steady"],
                   help="rnn: the recurrent network rnngrad.RNN run over the sequence; steady: "
                        "a network x = f(Wx + U image + c) trained at its steady state by "
                        "recurrent backprop (digits only; default: rnn)")
    _add_model_flags(p)
    _add_training_flags(p, steps=2000, batch_size=32)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="directory for metrics.csv, curve.png, model.pt, config.json "
                        "(default: runs/TASK-ALGORITHM)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write DIR/checkpoint.pt atomically every N steps")
    g.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint.pt if it exists")
    g.add_argument("--track-alignment", type=int, default=None, metavar="N",
                   help="every N steps, log the cosine, sign agreement and norm ratio of the "
                        "recurrent part (W_in, W_rec, b_rec) of the gradient used against "
                        "exact BPTT on the same batch")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several algorithms side by side",
                       description="Train each algorithm from the same initial weights on the "
                                   "same data stream, for several seeds; write compare.csv "
                                   "(final test loss with spread over seeds, time per step, "
                                   "memory, alignment with the exact gradient), curves.csv, "
                                   "alignment.csv and PNG plots to DIR, and print the table.")
    _add_task_flags(p)
    p.add_argument("--algorithms", default="bptt,tbptt:10,rtrl,eprop,rflo,snap1,uoro,kf_rtrl",
                   help=f"comma-separated algorithms from: {algos} "
                        "(default: bptt,tbptt:10,rtrl,eprop,rflo,snap1,uoro,kf_rtrl)")
    p.add_argument("--seeds", type=int, default=3, metavar="S",
                   help="number of seeds, 0..S-1; each fixes initial weights and data (default: 3)")
    _add_model_flags(p)
    p.set_defaults(hidden=32)
    g = _add_training_flags(p, steps=300, batch_size=16, compare=True)
    g.add_argument("--track-every", type=int, default=20, metavar="N",
                   help="measure alignment with exact BPTT every N steps; 0 disables "
                        "(default: 20)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: runs/compare-TASK)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="time rnngrad's BPTT against torch.nn.RNN + autograd",
                       description="Time one forward plus backward (float32, T=200, B=64, "
                                   "D=32) of rnngrad's BPTT, torch.nn.RNN + autograd and an "
                                   "nn.RNNCell loop, on the same weights and data; prints "
                                   "times and ratios to nn.RNN. The full benchmarks "
                                   "(RTRL, memory, steady states, online rules) are the "
                                   "scripts in benchmarks/.")
    p.add_argument("--hidden", default="64,256", help="comma-separated H (default: 64,256)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default: 5)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the rows to FILE")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("check", help="check every exact algorithm against autograd",
                       description="Compare every exact algorithm (BPTT, checkpointed BPTT, "
                                   "TBPTT with k >= T, RTRL, generic torch.func RTRL), through "
                                   "its whole-sequence path and its step path, with "
                                   "torch.autograd through a plain loop on random networks in "
                                   "float64. Prints a table of relative errors; exits 1 on "
                                   "any disagreement.")
    p.add_argument("--seed", type=int, default=0, help="seed of the random networks (default: 0)")
    p.add_argument("--tol", type=float, default=1e-10,
                   help="largest relative error that passes (default: 1e-10)")
    p.add_argument("--verbose", action="store_true",
                   help="one row per algorithm and network (default: worst case per algorithm)")
    p.set_defaults(func=cmd_check)
    return parser


def _progress(total: int, disable: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True,
                file=sys.stderr)


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


STEADY_ALGORITHMS = {"rbp": "direct", "rbp_iterate": "iterate", "rbp_gmres": "gmres"}


def cmd_train_steady(args) -> int:
    """Seed 000's steady-state network on the digits, trained by recurrent backprop."""
    import csv
    import json

    from .plots import plot_series
    from .steady import SteadyClassifier, train_steady

    algorithm = args.algorithm or "rbp"
    if args.task != "digits":
        raise ValueError(f"--model steady trains on --task digits only, got {args.task!r}")
    if algorithm not in STEADY_ALGORITHMS:
        raise ValueError(f"--model steady takes --algorithm {', '.join(STEADY_ALGORITHMS)}, "
                         f"got {algorithm!r}")
    unused = [flag for flag, value, default in (
        ("--alpha", args.alpha, 1.0), ("--init", args.init, "uniform"),
        ("--device", args.device, "cpu"), ("--update-every", args.update_every, None),
        ("--clip", args.clip, 1.0), ("--optimizer", args.optimizer, "adam"),
        ("--checkpoint-every", args.checkpoint_every, None), ("--resume", args.resume, False),
        ("--track-alignment", args.track_alignment, None), ("--stream", args.stream, False),
        ("--seq-len", args.seq_len, None)) if value != default]
    if unused:
        raise ValueError(f"--model steady (Adam, CPU, no sequence) does not take "
                         f"{', '.join(unused)}")
    if args.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {args.log_every}")
    init_scale, max_spectral_norm = 0.4, 0.9  # the library's defaults, recorded in config.json
    model = SteadyClassifier(args.hidden, activation=args.activation, seed=args.seed,
                             backward_method=STEADY_ALGORITHMS[algorithm], init_scale=init_scale,
                             dtype=DTYPES[args.dtype])
    out = Path(args.out) if args.out else Path("runs") / f"digits-steady-{algorithm}"
    out.mkdir(parents=True, exist_ok=True)
    # everything that defines the run: the flags, and the settings they leave at their
    # defaults (the forward solver, the spectral-norm projection, the optimizer)
    config = {"task": "digits", "model": "steady", "algorithm": algorithm,
              "hidden": args.hidden, "activation": args.activation, "dtype": args.dtype,
              "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
              "seed": args.seed, "log_every": args.log_every, "optimizer": "adam",
              "max_spectral_norm": max_spectral_norm, "init_scale": init_scale,
              "n_inputs": model.U.shape[1], "n_classes": model.V.shape[0], **model.options}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    bar = _progress(args.steps, args.no_progress)
    rows: list[dict] = []

    def on_step(step: int, info: dict) -> None:
        bar.update(1)
        if "test_accuracy" in info:  # a logged step: train_steady evaluated the test split
            rows.append({"step": step, "loss": info["loss"], "test_loss": info["test_loss"],
                         "test_acc": info["test_accuracy"], "residual": info["residual"],
                         "iterations": info["iterations"]})
            bar.set_postfix(loss=f"{info['loss']:.4f}", test_acc=f"{info['test_accuracy']:.3f}",
                            iterations=info["iterations"])

    t0 = time.perf_counter()
    metrics = train_steady(model, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           seed=args.seed, max_spectral_norm=max_spectral_norm,
                           callback=on_step, eval_every=args.log_every)
    bar.close()
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "test_loss", "test_acc", "residual",
                                          "iterations"])
        w.writeheader()
        w.writerows(rows)
    if rows:
        plot_series(rows, out / "curve.png", x="step", ys=["loss", "test_loss", "iterations"],
                    title=f"digits, steady-state network, {algorithm}")
    torch.save(model.state_dict(), out / "model.pt")
    row = {"task": "digits", "model": "steady", "algorithm": algorithm, "hidden": args.hidden,
           "steps": args.steps, "test_acc": metrics["test_accuracy"],
           "test_loss": metrics["test_loss"], "max_iterations": metrics["max_iterations"],
           "wall_s": time.perf_counter() - t0}
    print(_table([row], list(row)))
    written = ["metrics.csv", "config.json", "model.pt"] + (["curve.png"] if rows else [])
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


def cmd_train(args) -> int:
    if args.model == "steady":
        return cmd_train_steady(args)
    from . import RNN
    from .registry import get_algorithm
    from .tasks import get_task
    from .train import train

    _check_device(args.device)
    task = get_task(args.task, **_task_kwargs(args))
    algorithm = get_algorithm(args.algorithm or "bptt")
    torch.manual_seed(args.seed)
    model = RNN(task.input_size, args.hidden, task.output_size, activation=args.activation,
                alpha=args.alpha, readout=task.readout, init=args.init,
                dtype=DTYPES[args.dtype], device=args.device)
    out = Path(args.out) if args.out else Path("runs") / f"{args.task}-{args.algorithm or 'bptt'}"
    bar = _progress(args.steps, args.no_progress)
    last = [0]
    metric = "test_acc" if task.classification else "test_mse"

    def on_log(step: int, row: dict) -> None:
        bar.update(step - last[0])
        last[0] = step
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", **{metric: f"{row[metric]:.4f}"},
                        steps_per_s=f"{row['steps_per_s']:.1f}")

    step_callback = None
    if args.track_alignment:
        from .metrics import alignment_metrics

        every = args.track_alignment

        def step_callback(step: int, info: dict):
            if step % every or not info["grads"]:
                return None
            with torch.no_grad():
                # the recurrent part: every algorithm has the exact readout gradient
                return alignment_metrics(model, info["batch"], algorithm, loss=task.loss,
                                         approx=info["grads"],
                                         params=("W_in", "W_rec", "b_rec"))

    t0 = time.perf_counter()
    result = train(model, task, algorithm=algorithm, steps=args.steps, lr=args.lr,
                   optimizer=args.optimizer, batch_size=args.batch_size, seed=args.seed,
                   update_every=args.update_every, clip=args.clip or None,
                   log_every=args.log_every, out=out, checkpoint_every=args.checkpoint_every,
                   resume=args.resume, callback=on_log, step_callback=step_callback)
    bar.close()
    wall = time.perf_counter() - t0
    row = {"task": task.name, "algorithm": algorithm.name, "hidden": args.hidden,
           "steps": args.steps, **result.final, "wall_s": wall}
    print(_table([row], list(row)))
    print(f"wrote {out / 'metrics.csv'}, {out / 'curve.png'}, {out / 'model.pt'}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare
    from .registry import parse_algorithms
    from .tasks import get_task

    _check_device(args.device)
    task = get_task(args.task, **_task_kwargs(args))
    named = parse_algorithms(args.algorithms)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    out = Path(args.out) if args.out else Path("runs") / f"compare-{args.task}"
    bar = _progress(len(named) * args.seeds * args.steps, args.no_progress)
    seen: dict[tuple, int] = {}

    def on_progress(info: dict) -> None:
        key = (info["algorithm"], info["seed"])
        bar.update(info["step"] - seen.get(key, 0))
        seen[key] = info["step"]
        bar.set_postfix(algorithm=info["algorithm"], seed=info["seed"],
                        test_loss=f"{info['test_loss']:.4f}")

    t0 = time.perf_counter()
    rows = compare(task, named, seeds=list(range(args.seeds)), steps=args.steps,
                   hidden=args.hidden, lr=args.lr, optimizer=args.optimizer,
                   batch_size=args.batch_size, update_every=args.update_every,
                   track_every=args.track_every or None, out_dir=out, progress=on_progress,
                   alpha=args.alpha, activation=args.activation, init=args.init,
                   clip=args.clip or None, dtype=DTYPES[args.dtype], device=args.device)
    bar.close()
    print(f"{task.name}: {args.seeds} seed(s) x {args.steps} steps, H={args.hidden}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(_table(rows, list(rows[0])))
    print(f"wrote {out}/compare.csv and plots in {out}")
    return 0


def cmd_bench(args) -> int:
    import csv

    from .bench import bench_bptt

    _check_device(args.device)
    rows = []
    for H in (int(h) for h in args.hidden.split(",")):
        rows += bench_bptt(H, device=args.device, repeats=args.repeats)
    print(f"BPTT forward + backward, float32, T=200 B=64 D=32, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(_table(rows, ["H", "method", "median_ms", "ratio_vs_nn_rnn"]))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


def cmd_check(args) -> int:
    from .check import run_checks

    rows = run_checks(seed=args.seed, tol=args.tol)
    if args.verbose:
        table = [{"algorithm": r.algorithm, "network": r.config, "rel_error": f"{r.error:.1e}",
                  "ok": "yes" if r.passed else "NO"} for r in rows]
    else:
        import re

        def family(name: str) -> str:  # group e.g. tbptt(5), tbptt(8) as one algorithm
            name = re.sub(r"tbptt\(\d+\)", "tbptt(k >= T)", name)
            return re.sub(r"checkpoint=\d+", "checkpoint=c", name)

        worst: dict[str, list] = {}
        for r in rows:
            w = worst.setdefault(family(r.algorithm), [0.0, "", 0, True])
            if r.error >= w[0]:
                w[0], w[1] = r.error, r.config
            w[2] += 1
            w[3] = w[3] and r.passed
        table = [{"algorithm": a, "networks": n, "max_rel_error": f"{e:.1e}",
                  "worst_on": c, "ok": "yes" if ok else "NO"}
                 for a, (e, c, n, ok) in worst.items()]
    print(f"exact algorithms against torch.autograd, float64, tolerance {args.tol:g}")
    print(_table(table, list(table[0])))
    failed = [r for r in rows if not r.passed]
    if failed:
        print(f"{len(failed)} of {len(rows)} checks FAILED", file=sys.stderr)
        return 1
    print(f"all {len(rows)} checks passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"rnngrad {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
