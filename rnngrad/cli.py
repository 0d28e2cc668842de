"""``rnngrad train | compare | check | bench``: the command line, and the only place that prints."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _task_kwargs(args) -> dict:
    kw = {}
    if getattr(args, "seq_len", None) is not None:
        kw["seq_len"] = args.seq_len
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
                   help="sequence length for tasks that take one (adding, sine; default: the "
                        "task's own, 50)")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=2000, help="training batches (default: 2000)")
    g.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: 1e-2)")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"],
                   help="optimizer (default: adam)")
    g.add_argument("--batch-size", type=int, default=32, metavar="B",
                   help="sequences per batch (default: 32)")
    g.add_argument("--clip", type=float, default=1.0,
                   help="clip the gradient norm to this value; 0 disables (default: 1.0)")
    g.add_argument("--update-every", type=int, default=None, metavar="N",
                   help="online learning: apply the optimizer every N time steps during the "
                        "sequence with what the algorithm emitted (default: once per sequence)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for the initial weights and the data stream (default: 0)")
    g.add_argument("--log-every", type=int, default=50,
                   help="evaluate and log every this many steps (default: 50)")


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
    p.add_argument("--algorithm", default="bptt",
                   help=f"gradient algorithm: {algos} (default: bptt)")
    _add_model_flags(p)
    _add_training_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="directory for metrics.csv, curve.png, model.pt, config.json "
                        "(default: runs/TASK-ALGORITHM)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write DIR/checkpoint.pt atomically every N steps")
    g.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint.pt if it exists")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
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


def cmd_train(args) -> int:
    from . import RNN
    from .registry import get_algorithm
    from .tasks import get_task
    from .train import train

    task = get_task(args.task, **_task_kwargs(args))
    algorithm = get_algorithm(args.algorithm)
    torch.manual_seed(args.seed)
    model = RNN(task.input_size, args.hidden, task.output_size, activation=args.activation,
                alpha=args.alpha, readout=task.readout, init=args.init,
                dtype=DTYPES[args.dtype], device=args.device)
    out = Path(args.out) if args.out else Path("runs") / f"{args.task}-{args.algorithm}"
    bar = _progress(args.steps, args.no_progress)
    last = [0]
    metric = "test_acc" if task.classification else "test_mse"

    def on_log(step: int, row: dict) -> None:
        bar.update(step - last[0])
        last[0] = step
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", **{metric: f"{row[metric]:.4f}"},
                        steps_per_s=f"{row['steps_per_s']:.1f}")

    t0 = time.perf_counter()
    result = train(model, task, algorithm=algorithm, steps=args.steps, lr=args.lr,
                   optimizer=args.optimizer, batch_size=args.batch_size, seed=args.seed,
                   update_every=args.update_every, clip=args.clip or None,
                   log_every=args.log_every, out=out, checkpoint_every=args.checkpoint_every,
                   resume=args.resume, callback=on_log)
    bar.close()
    wall = time.perf_counter() - t0
    row = {"task": task.name, "algorithm": algorithm.name, "hidden": args.hidden,
           "steps": args.steps, **result.final, "wall_s": wall}
    print(_table([row], list(row)))
    print(f"wrote {out / 'metrics.csv'}, {out / 'curve.png'}, {out / 'model.pt'}")
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
