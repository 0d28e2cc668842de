"""``rnngrad train | sweep | compare | check | bench``: the command line, and the only place
that prints.

Exit codes (``rnngrad --help`` lists them too): 0 done; 1 training diverged (a
non-finite loss or gradient; the last checkpoint is kept), a check failed, or a sweep
trial failed with an error; 2 a bad command line or input (a resume that does not match
its checkpoint, an output directory holding an earlier run, an unusable device
included), or a missing optional dependency; 3 the output directory
cannot be used (held by another run, a file, read-only, full, or its checkpoint is
unreadable); 130 interrupted (Ctrl-C). Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import shlex
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "build_parser", "EXIT_CODES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}

EXIT_CODES = {
    0: "done",
    1: "training diverged (non-finite loss or gradient; the last checkpoint is kept), a "
       "check failed, or a sweep trial failed with an error",
    2: "bad command line or input (a --resume that does not match its checkpoint, an "
       "output directory holding an earlier run, an unusable device included), or a "
       "missing optional dependency",
    3: "the output directory cannot be used: held by another run, a file, read-only, "
       "full, or its checkpoint is unreadable",
    130: "interrupted (Ctrl-C)",
}


# torch threads: measured on this 2-core machine with the other core busy (docs/threads.md),
# `train --task digits` ran 4 to 5x slower on two threads than on one
DEFAULT_THREADS = 1


def _check_device(name: str) -> str:
    from .runs import check_device

    try:
        check_device(name)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    return name


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations (``--hid`` is not ``--hidden``), whose unknown flags
    get the nearest known one suggested, under the usage of the subcommand they were
    given to."""

    def __init__(self, *args, **kw) -> None:
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def suggest(self, flag: str) -> str:
        known = [o for a in self._actions if not isinstance(a, _Deprecated)
                 for o in a.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(flag.split("=", 1)[0], known, n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""


class _Deprecated(argparse.Action):
    """An old spelling of a flag: stores into the new one's dest and records the rename,
    which ``main`` announces on stderr."""

    def __init__(self, option_strings, dest, *, new: str, **kw) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        renamed = getattr(namespace, "_deprecated", None) or []
        namespace._deprecated = [*renamed, (option_string, self.new)]


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _arg(check):
    """An argparse type from a checker that raises ValueError with a one-line message."""

    def parse(text: str):
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = check.__name__
    return parse


def _slug(task: str) -> str:
    """A task spec as a directory name: neurogym:ID -> neurogym-ID, file:a/b.npz -> file-b."""
    prefix, _, rest = task.partition(":")
    return f"{prefix}-{Path(rest).stem if prefix == 'file' else rest}" if rest else task


def _tol(text: str) -> float:
    """An argparse type: ``rnngrad check --tol``, a finite number >= 0."""
    from .check import check_tol

    try:
        return check_tol(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (the largest relative "
                                         f"error that passes, e.g. 1e-10), got {text!r}") from None


def _list(kind):
    """An argparse type: a comma-separated list of ``kind``."""

    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values

    return parse


def _space(kind):
    """An argparse type: a sweep axis, a grid (comma-separated) or a distribution."""

    def parse(text: str):
        from .sweep import parse_axis

        try:
            return parse_axis(text, kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _add_model_flags(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    from .registry import CELLS
    from .runs import DEFAULTS

    hidden = DEFAULTS["hidden"]
    g = p.add_argument_group("model")
    cells = ", ".join(CELLS)
    if not sweep:
        g.add_argument("--cell", default="elman", metavar="CELL",
                       help=f"the recurrent cell: {cells}, or module:Class for your own "
                            "rnngrad.cells.Cell subclass (imported from the working directory, "
                            "built as Class(input_size, hidden_size)); one elman layer is "
                            "rnngrad.RNN, the fast paths (default: elman)")
    else:
        g.add_argument("--cell", type=_list(str), default=["elman"], metavar="C[,C...]",
                       help=f"comma-separated cells from: {cells}, or module:Class "
                            "(default: elman)")
        g.add_argument("--cells", type=_list(str), dest="cell", action=_Deprecated,
                       new="--cell", default=argparse.SUPPRESS, metavar="C[,C...]", help="deprecated spelling of --cell")
    g.add_argument("--layers", type=int, default=1, metavar="N",
                   help="stack N layers of the cell, each of H units (default: 1)")
    if sweep:
        g.add_argument("--hidden", type=_space(int), default={"grid": [hidden]},
                       metavar="H[,H...]|DIST",
                       help=f"numbers of hidden units H, comma-separated (a grid), or drawn "
                            f"--samples times: loguniform:A:B or uniform:A:B (integers in "
                            f"[A, B]), choice:A,B,... (default: {hidden})")
    else:
        g.add_argument("--hidden", type=int, default=hidden, metavar="H",
                       help=f"number of hidden units H per layer (default: {hidden})")
    g.add_argument("--activation", default="tanh",
                   help="elman: hidden nonlinearity phi: tanh, sigmoid, relu, identity, "
                        "softplus (default: tanh)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="elman: leak alpha in (0, 1]; 1 is the vanilla cell (default: 1.0)")
    g.add_argument("--init", default="uniform",
                   help="elman: W_rec initialisation: uniform, orthogonal, normal, identity "
                        "(default: uniform)")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="parameter dtype (default: float32)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def _add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive, default=DEFAULT_THREADS, metavar="N",
                   help="torch threads (torch.set_num_threads; default: "
                        f"{DEFAULT_THREADS}: on a machine whose cores are shared, two threads "
                        "ran 4 to 5x slower than one, docs/threads.md)")


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    from .tasks import TASKS, check_task_name

    g = p.add_argument_group("task")
    g.add_argument("--task", default="digits", type=_arg(check_task_name),
                   help=f"a built-in task ({', '.join(sorted(TASKS))}), neurogym:ID (one of "
                        "neurogym's tasks, pip install 'rnngrad[neuro]') or file:PATH.npz "
                        "(your own arrays x, y, mask; docs/neurogym.md) (default: digits)")
    g.add_argument("--task-kwargs", nargs="+", default=None, metavar="KWARGS",
                   help="the task's arguments: a JSON object or key=value items, e.g. "
                        "'dt=20 sigma=0.5' (neurogym env_kwargs) or 'layout=NTD "
                        "test_fraction=0.2' (file:)")
    g.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="sequence length for tasks that take one (adding, sine, stream_add; "
                        "default: the task's own, 50)")
    g.add_argument("--stream", action="store_true",
                   help="stream_add only: consecutive batches continue one stream, and the "
                        "hidden and algorithm state carry over from batch to batch")


def _add_training_flags(p: argparse.ArgumentParser, *, mode: str = "train"
                        ) -> argparse._ArgumentGroup:
    from .readouts import LOSSES
    from .runs import DEFAULTS

    steps, batch_size = DEFAULTS["steps"], DEFAULTS["batch_size"]
    g = p.add_argument_group("training")
    per_run = " per run" if mode != "train" else ""
    g.add_argument("--steps", type=int, default=steps,
                   help=f"training batches{per_run} (default: {steps})")
    g.add_argument("--loss", default=None, choices=LOSSES,
                   help="the loss (default: the one that follows the task's readout: "
                        "softmax: cross_entropy, sigmoid: bce, identity: mse)")
    if mode == "sweep":
        g.add_argument("--lr", type=_space(float), default={"grid": [1e-2]},
                       metavar="LR[,LR...]|DIST",
                       help="learning rates, comma-separated (a grid), or drawn --samples "
                            "times: loguniform:A:B, uniform:A:B, choice:A,B,... (default: 1e-2)")
    else:
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
    if mode == "train":
        g.add_argument("--compile", action="store_true",
                       help="with --update-every: run the algorithm's online step compiled by "
                            "torch.compile (rnngrad.compile; the same numbers; the compile "
                            "time is reported once; default: eager, see docs/compiled.md)")
        g.add_argument("--seed", type=int, default=0,
                       help="seed for the initial weights and the data stream (default: 0)")
    g.add_argument("--log-every", type=int, default=None, metavar="N",
                   help="evaluate on the test set and log every N steps (default: about 20 "
                        "times a run, steps // 20)")
    return g


def _version() -> str:
    from . import __version__

    return f"rnngrad {__version__} (torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    from .registry import ALGORITHMS

    algos = ", ".join(f"{n}:K" if a[1] else n for n, a in ALGORITHMS.items())
    codes = "; ".join(f"{c} {what}" for c, what in EXIT_CODES.items())
    parser = _Parser(
        prog="rnngrad",
        description="Gradients of recurrent networks by every method, behind one PyTorch API.",
        epilog=f"exit codes: {codes}.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train a network on a built-in task",
                       description="Train a network (rnngrad.RNN, or --cell and --layers) on a "
                                   "built-in task with any gradient "
                                   "algorithm; writes metrics.csv, curve.png, model.pt and "
                                   "config.json to DIR, which one run holds at a time.",
                       epilog=f"exit codes: {codes}.")
    _add_task_flags(p)
    p.add_argument("--algorithm", default=None,
                   help=f"gradient algorithm: {algos} (default: bptt); with --model steady: "
                        f"{', '.join(STEADY_ALGORITHMS)} (default: rbp)")
    p.add_argument("--model", default="rnn", choices=["rnn", "steady"],
                   help="rnn: the recurrent network rnngrad.RNN run over the sequence; steady: "
                        "a network x = f(Wx + U image + c) trained at its steady state by "
                        "recurrent backprop (digits only; default: rnn)")
    _add_model_flags(p)
    _add_training_flags(p)
    _add_threads_flag(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="directory for metrics.csv (written as training goes), curve.png, "
                        "model.pt, config.json (default: runs/TASK-ALGORITHM); a directory "
                        "holding an earlier run is refused unless --resume or --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in DIR (its files are deleted first)")
    g.add_argument("--tensorboard", default=None, metavar="TBDIR",
                   help="also log the metrics for TensorBoard in TBDIR, as training goes "
                        "(torch.utils.tensorboard; needs: pip install tensorboard)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write DIR/checkpoint.pt (atomically) every N steps and at the end; "
                        "it holds the configuration, weights, optimizer and every random "
                        "generator, so --resume continues bit-identically")
    g.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint.pt (refused if it is from different "
                        "settings); metrics.csv continues from the checkpoint's step")
    g.add_argument("--track-alignment", type=_positive, default=None, metavar="N",
                   help="every N steps (a row of metrics.csv each time, whatever "
                        "--log-every), log the cosine, sign agreement and norm ratio of the "
                        "recurrent part (all but W_out, b_out) of the gradient used against "
                        "exact BPTT on the same batch (default: off)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress display (when stderr is not a terminal, a plain line "
                        "at most every 30 s stands in for the bar)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="a search over training runs on Ray Tune, in one table",
                       description="Train one run per trial, each exactly as `rnngrad train` "
                                   "would, as trials of a Ray Tune Tuner: a grid of algorithms "
                                   "x cells x hidden sizes x learning rates x seeds, where "
                                   "--lr and --hidden may also be drawn (loguniform:A:B, "
                                   "uniform:A:B, choice:A,B) --samples times per grid point; "
                                   "--scheduler asha stops the trials trailing by --metric. "
                                   "On an embedded local Ray with --workers CPUs, or on a "
                                   "running cluster with --address. Writes DIR/sweep.csv (one "
                                   "row per trial: its values, steps trained, last test "
                                   "metrics, wall time, status ok/stopped/diverged/error, "
                                   "error), learning_curves.png, and each trial's run in "
                                   "DIR/<trial>/; DIR is Tune's experiment directory. A "
                                   "failed trial is a row with its error; --resume continues "
                                   "an interrupted sweep; a DIR holding anything is never "
                                   "overwritten. Needs Ray Tune: pip install 'rnngrad[ray]'.",
                       epilog=f"exit codes: {codes}.")
    _add_task_flags(p)
    p.add_argument("--algorithms", type=_list(str), default=["bptt"], metavar="A[,A...]",
                   help=f"comma-separated algorithms from: {algos} (default: bptt)")
    p.add_argument("--seeds", type=int, default=1, metavar="S",
                   help="number of seeds, 0..S-1; each fixes initial weights and data "
                        "(default: 1, where compare's is 3: the grid multiplies it)")
    _add_model_flags(p, sweep=True)
    g = _add_training_flags(p, mode="sweep")
    _add_threads_flag(p)
    g.add_argument("--track-alignment", type=_positive, default=None, metavar="N",
                   help="every N steps, each trial logs its alignment with exact BPTT "
                        "(then alignment.png)")
    from .sweep import METRIC_MODES

    g = p.add_argument_group("search (Ray Tune)")
    g.add_argument("--samples", type=int, default=1, metavar="N",
                   help="values drawn of the random axes (--lr, --hidden given as "
                        "loguniform:, uniform:, choice:) for each point of the grid "
                        "(default: 1)")
    g.add_argument("--search-seed", type=int, default=0, metavar="N",
                   help="seed of those draws: the same seed draws the same values (default: 0)")
    g.add_argument("--scheduler", default="fifo", choices=["fifo", "asha"],
                   help="fifo: every trial runs all its steps; asha: Tune's ASHAScheduler "
                        "(Li et al. 2020) stops, at rungs of --grace-period x "
                        "--reduction-factor^k training steps, the trials whose --metric "
                        "trails (default: fifo)")
    g.add_argument("--metric", default="test_loss_per_step", choices=list(METRIC_MODES),
                   help="what a trial is judged by (ASHA, and the best trial printed): "
                        "test_loss_per_step, test_loss, train_loss (mode min), test_acc "
                        "(classification, max), test_mse (regression, min); every trial "
                        "reports it at each logged step (default: test_loss_per_step, min)")
    g.add_argument("--mode", default=None, choices=["min", "max"],
                   help="whether a smaller or a larger --metric is better (default: max for "
                        "test_acc, min for the others)")
    g.add_argument("--grace-period", type=int, default=None, metavar="STEPS",
                   help="asha: training steps before the first rung (default: --log-every)")
    g.add_argument("--reduction-factor", type=int, default=3, metavar="R",
                   help="asha: 1 in R trials goes on at each rung (default: 3)")
    g = p.add_argument_group("Ray")
    g.add_argument("--workers", type=int, default=2, metavar="N",
                   help="CPUs of the embedded local Ray: N trials at a time (default: 2)")
    g.add_argument("--address", default=None,
                   help="join a running Ray cluster instead (auto, HOST:6379, or "
                        "ray://HOST:10001); rnngrad must be installed on its nodes, and DIR "
                        "should be on a shared filesystem to collect each trial's files")
    g.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for --address to answer before giving up "
                        "(default: 30)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="the sweep's directory, new or empty (default: runs/sweep-TASK)")
    g.add_argument("--resume", action="store_true",
                   help="continue the sweep in DIR (the same command): finished trials are "
                        "kept, unfinished ones run, failed ones run again (with no sweep in "
                        "DIR, start one)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="each trial checkpoints every N steps, so that a trial cut off "
                        "resumes where it was")
    g.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="train several algorithms side by side",
                       description="Train each algorithm from the same initial weights on the "
                                   "same data stream, for several seeds; write compare.csv "
                                   "(final test loss with spread over seeds, time per step, "
                                   "memory, alignment with the exact gradient), curves.csv, "
                                   "alignment.csv and PNG plots to DIR, and print the table.",
                       epilog=f"exit codes: {codes}.")
    _add_task_flags(p)
    p.add_argument("--algorithms", default="bptt,tbptt:10,rtrl,eprop,rflo,snap1,uoro,kf_rtrl",
                   help=f"comma-separated algorithms from: {algos} "
                        "(default: bptt,tbptt:10,rtrl,eprop,rflo,snap1,uoro,kf_rtrl)")
    p.add_argument("--seeds", type=int, default=3, metavar="S",
                   help="number of seeds, 0..S-1; each fixes initial weights and data (default: 3)")
    _add_model_flags(p)
    g = _add_training_flags(p, mode="compare")
    _add_threads_flag(p)
    g.add_argument("--track-alignment", type=int, default=20, metavar="N",
                   help="measure alignment with exact BPTT every N steps; 0 disables "
                        "(default: 20, where train's is off: comparing the gradients is "
                        "what compare is for)")
    g.add_argument("--track-every", type=int, dest="track_alignment", action=_Deprecated,
                   new="--track-alignment", default=argparse.SUPPRESS, metavar="N", help="deprecated spelling of --track-alignment")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: runs/compare-TASK); one holding an "
                        "earlier comparison is refused unless --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the earlier comparison in DIR (its files are deleted first)")
    g.add_argument("--tensorboard", default=None, metavar="TBDIR",
                   help="also log each run's test loss (ALGORITHM/seedS/test_loss) for "
                        "TensorBoard in TBDIR, as it goes (needs: pip install tensorboard)")
    g.add_argument("--no-progress", action="store_true", help="no progress display")
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
    _add_threads_flag(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("check", help="check every exact algorithm against autograd",
                       description="Compare every exact algorithm (BPTT, checkpointed BPTT, "
                                   "TBPTT with k >= T, RTRL, generic torch.func RTRL), through "
                                   "its whole-sequence path and its step path, with "
                                   "torch.autograd through the network's own step loop, on "
                                   "random networks in float64: rnngrad.RNN, every built-in "
                                   "cell, mixed 2- and 3-layer stacks, or your own cell "
                                   "(--cell module:Class). Prints a table of relative errors; "
                                   "exits 1 on any disagreement.")
    p.add_argument("--cell", default=None, metavar="CELL",
                   help="check only this cell, alone and as two layers of it: a built-in name "
                        "or module:Class for your own rnngrad.cells.Cell subclass, imported "
                        "from the working directory and built as Class(input_size, "
                        "hidden_size) (default: every network)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random networks (default: 0)")
    p.add_argument("--tol", type=_tol, default=1e-10,
                   help="largest relative error that passes, a finite number >= 0 "
                        "(default: 1e-10)")
    p.add_argument("--verbose", action="store_true",
                   help="one row per algorithm and network (default: worst case per algorithm)")
    _add_threads_flag(p)
    p.set_defaults(func=cmd_check)
    return parser


PLAIN_PROGRESS_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


class _Lines:
    """Progress where stderr is not a terminal (a log file, CI): one plain line at most
    every ``every`` seconds instead of a bar redrawn many times a second."""

    def __init__(self, total: int, initial: int = 0, every: float | None = None) -> None:
        self.total, self.n = total, initial
        self.every = PLAIN_PROGRESS_EVERY if every is None else every
        self.postfix = ""
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(f"{self.n}/{self.total} {self.postfix}".rstrip(), file=sys.stderr, flush=True)

    def set_postfix(self, ordered_dict: dict | None = None, **kw) -> None:  # as tqdm's
        self.postfix = " ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kw}.items())

    def close(self) -> None:
        pass


def _progress(total: int, disable: bool, initial: int = 0, unit: str = "step"):
    """A tqdm bar on a terminal; throttled plain lines otherwise; nothing when disabled."""
    if not disable and not sys.stderr.isatty():
        return _Lines(total, initial)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=disable, unit=unit, dynamic_ncols=True,
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


def _note(command: str, text: str) -> None:
    print(f"rnngrad {command}: {text}", file=sys.stderr, flush=True)


STEADY_ALGORITHMS = {"rbp": "direct", "rbp_iterate": "iterate", "rbp_gmres": "gmres"}


def cmd_train_steady(args) -> int:
    """A steady-state network on the digits, trained by recurrent backprop (Almeida 1987;
    Pineda 1987)."""
    from .outdir import TRAIN_OUTPUTS, OutputDir, claim
    from .runs import log_every_for
    from .steady import SteadyClassifier

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
        ("--seq-len", args.seq_len, None), ("--loss", args.loss, None),
        ("--tensorboard", args.tensorboard, None)) if value != default]
    if unused:
        raise ValueError(f"--model steady (Adam, CPU, no sequence) does not take "
                         f"{', '.join(unused)}")
    log_every = log_every_for(args.steps, args.log_every)
    if log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {args.log_every}")
    init_scale, max_spectral_norm = 0.4, 0.9  # the library's defaults, recorded in config.json
    model = SteadyClassifier(args.hidden, activation=args.activation, seed=args.seed,
                             backward_method=STEADY_ALGORITHMS[algorithm], init_scale=init_scale,
                             dtype=DTYPES[args.dtype])
    out = Path(args.out) if args.out else Path("runs") / f"digits-steady-{algorithm}"
    how = claim(out, outputs=TRAIN_OUTPUTS, overwrite=args.overwrite, checkpoint=None,
                resumable=False)
    with OutputDir(out, replace=TRAIN_OUTPUTS if how == "overwrite" else ()):
        return _train_steady_into(out, args, model, algorithm, log_every, init_scale,
                                  max_spectral_norm)


def _train_steady_into(out: Path, args, model, algorithm: str, log_every: int,
                       init_scale: float, max_spectral_norm: float) -> int:
    import csv
    import json

    from .plots import plot_series
    from .steady import train_steady

    # everything that defines the run: the flags, and the settings they leave at their
    # defaults (the forward solver, the spectral-norm projection, the optimizer)
    config = {"task": "digits", "model": "steady", "algorithm": algorithm,
              "hidden": args.hidden, "activation": args.activation, "dtype": args.dtype,
              "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
              "seed": args.seed, "log_every": log_every, "optimizer": "adam",
              "max_spectral_norm": max_spectral_norm, "init_scale": init_scale,
              "n_inputs": model.U.shape[1], "n_classes": model.V.shape[0], **model.options}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    bar = _progress(args.steps, args.no_progress)
    rows: list[dict] = []
    fields = ["step", "loss", "test_loss", "test_acc", "residual", "iterations"]
    with open(out / "metrics.csv", "w", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writeheader()

    def on_step(step: int, info: dict) -> None:
        bar.update(1)
        if "test_accuracy" in info:  # a logged step: train_steady evaluated the test split
            rows.append({"step": step, "loss": info["loss"], "test_loss": info["test_loss"],
                         "test_acc": info["test_accuracy"], "residual": info["residual"],
                         "iterations": info["iterations"]})
            with open(out / "metrics.csv", "a", newline="") as f:  # the log grows as it goes
                csv.DictWriter(f, fieldnames=fields).writerow(rows[-1])
            bar.set_postfix(loss=f"{info['loss']:.4f}", test_acc=f"{info['test_accuracy']:.3f}",
                            iterations=info["iterations"])

    t0 = time.perf_counter()
    metrics = train_steady(model, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           seed=args.seed, max_spectral_norm=max_spectral_norm,
                           callback=on_step, eval_every=log_every)
    bar.close()
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


def _model_config(args) -> dict:
    """The model part of a run's configuration (see ``rnngrad.runs.DEFAULTS``)."""
    return {"cell": getattr(args, "cell", "elman"), "layers": args.layers,
            "activation": args.activation, "alpha": args.alpha,
            "init": args.init, "dtype": args.dtype, "device": args.device}


def _task_kwargs(args) -> dict | None:
    """--task-kwargs as a dict (one JSON object, or key=value items), None when absent."""
    from .tasks import parse_task_kwargs

    return parse_task_kwargs(args.task_kwargs) or None if args.task_kwargs else None


def _training_config(args) -> dict:
    return {"task": args.task, "task_kwargs": _task_kwargs(args),
            "seq_len": args.seq_len, "stream": args.stream,
            "steps": args.steps, "optimizer": args.optimizer, "batch_size": args.batch_size,
            "clip": args.clip or None, "update_every": args.update_every,
            "log_every": args.log_every, "track_alignment": args.track_alignment,
            "loss": args.loss, **({"compile": True} if getattr(args, "compile", False) else {})}


def _final_columns(final: dict) -> dict:
    """The test metrics, labelled with what they are per: a sequence's counted steps
    summed (the pinned loss) or one counted step."""
    out = {"test_loss (sum/seq)": final["test_loss"]}
    per_step = final.get("test_loss_per_step")
    if per_step is not None and abs(per_step - final["test_loss"]) > 1e-9 * abs(per_step):
        out["test_loss (per step)"] = per_step
    if "test_acc" in final:
        out["test_acc"] = final["test_acc"]
    if "test_perf" in final:
        out["test_perf"] = final["test_perf"]
    if "test_mse" in final:
        out["test_mse (per step)"] = final["test_mse"]
    return out


def _resume_command(args, out: Path) -> str:
    """The command line that continues this run: the one given, with --resume and --out."""
    tokens = list(getattr(args, "_argv", None) or [args.command])
    if "--resume" not in tokens:
        tokens.append("--resume")
    if not any(t == "--out" or t.startswith("--out=") for t in tokens):
        tokens += ["--out", str(out)]
    return "rnngrad " + shlex.join(tokens)


def cmd_train(args) -> int:
    if args.model == "steady":
        return cmd_train_steady(args)
    from .runs import run

    _check_device(args.device)
    config = {**_training_config(args), **_model_config(args), "hidden": args.hidden,
              "algorithm": args.algorithm or "bptt", "lr": args.lr, "seed": args.seed}
    out = Path(args.out) if args.out else Path("runs") / f"{_slug(args.task)}-{args.algorithm or 'bptt'}"
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in "
                         f"{out}, or replace it")
    summary_writer = _tensorboard(args.tensorboard)
    state: dict = {"bar": None, "checkpoint": None, "logged": 0, "tb": None}

    def on_event(kind: str, info: dict) -> None:
        if kind == "start":
            if summary_writer is not None:  # only now: a refused run writes nothing
                state["tb"] = summary_writer(args.tensorboard)
            if info["resumed"]:
                _note("train", f"resuming {info['checkpoint']} from step {info['step']}")
                state["checkpoint"] = info["step"]
            elif args.resume:
                _note("train", f"no checkpoint in {out}: starting fresh")
            state["logged"] = info["step"]
            state["bar"] = _progress(args.steps, args.no_progress, initial=info["step"])
        elif kind == "checkpoint":
            state["checkpoint"] = info["step"]
        elif kind == "compiled":
            how = (f"compiled in {info['seconds']:.1f} s ({info['graphs']} graph(s))"
                   if info["mode"] != "eager" else f"runs eagerly: {info['reason']}")
            bar = state["bar"]
            if bar is not None and hasattr(bar, "write"):  # a tqdm bar: the line above it
                bar.write(f"rnngrad train: the online step {how}", file=sys.stderr)
            else:
                _note("train", f"the online step {how}")

    def on_log(step: int, row: dict) -> None:
        bar = state["bar"]
        metric = {"test_acc": f"{row['test_acc']:.4f}"} if "test_acc" in row else {
            "test_mse/step": f"{row['test_mse']:.4g}"}
        bar.set_postfix({"loss/seq": f"{row['train_loss']:.4f}", **metric,
                         "steps/s": f"{row['steps_per_s']:.1f}"})
        bar.update(step - state["logged"])  # after the postfix: a plain line shows it
        state["logged"] = step
        if state["tb"] is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    state["tb"].add_scalar(key, value, global_step=step)
            state["tb"].flush()

    t0 = time.perf_counter()
    try:
        result = run(config, out=out, checkpoint_every=args.checkpoint_every,
                     resume=args.resume, overwrite=args.overwrite, callback=on_log,
                     on_event=on_event)
    except KeyboardInterrupt:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None
        if state["checkpoint"] is None:
            _note("train", "interrupted; no checkpoint was written, so the run cannot be "
                           "continued (--checkpoint-every N writes one every N steps)")
        else:
            _note("train", f"interrupted; the checkpoint of step {state['checkpoint']} is "
                           f"{out / 'checkpoint.pt'}; continue with: "
                           f"{_resume_command(args, out)}")
        return 130
    finally:
        if state["bar"] is not None:
            state["bar"].close()
        if state["tb"] is not None:
            state["tb"].close()
    wall = time.perf_counter() - t0
    net = args.cell if args.layers == 1 else f"{args.layers}x{args.cell}"
    row = {"task": args.task, "cell": net, "algorithm": config["algorithm"],
           "hidden": args.hidden, "steps": args.steps, **_final_columns(result.final),
           "wall_s": wall}
    print(_table([row], list(row)))
    print(f"wrote {out / 'metrics.csv'}, {out / 'curve.png'}, {out / 'model.pt'}"
          + (f"; TensorBoard logs in {args.tensorboard}" if args.tensorboard else ""))
    return 0


def _tensorboard(logdir: str | None):
    """``torch.utils.tensorboard.SummaryWriter`` when ``--tensorboard`` is given (checked
    here, before anything is written); None otherwise."""
    if logdir is None:
        return None
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package, which is not installed: "
                         "pip install tensorboard") from None
    if Path(logdir).exists() and not Path(logdir).is_dir():
        raise ValueError(f"--tensorboard {logdir} is a file, not a directory")
    return SummaryWriter


def cmd_sweep(args) -> int:
    from .sweep import AXES, sweep

    _check_device(args.device)
    for flag, v in (("--seeds", args.seeds), ("--workers", args.workers),
                    ("--samples", args.samples)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    # the searched axes come from ``space``; the base holds one valid value of each
    base = {**_training_config(args), **_model_config(args), "cell": args.cell[0]}
    space = {"algorithm": args.algorithms, "cell": args.cell, "hidden": args.hidden,
             "lr": args.lr, "seed": list(range(args.seeds))}
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{_slug(args.task)}"
    state: dict = {"bar": None}
    mode = args.mode or ("max" if args.metric == "test_acc" else "min")

    def on_start(info: dict) -> None:
        where = f"Ray at {args.address}" if args.address else f"a local Ray, {args.workers} workers"
        kept = f", {info['finished']} finished before (kept)" if info["finished"] else ""
        how = (f"; ASHA stops trials by {args.metric} ({mode}) at rungs of "
               f"{args.grace_period or args.log_every} x {args.reduction_factor}^k steps"
               if args.scheduler == "asha" else "")
        if args.resume and not info["resumed"]:
            _note("sweep", f"no sweep in {out}: starting one")
        _note("sweep", f"{info['trials']} trials: {info['to_run']} to run on {where}{kept}{how}")
        state["bar"] = _progress(info["to_run"], args.no_progress, unit="trial")

    def progress(row: dict) -> None:
        state["bar"].set_postfix(last=row["trial"], status=row["status"])
        state["bar"].update(1)

    t0 = time.perf_counter()
    try:
        df = sweep(base, space, out=out, samples=args.samples, scheduler=args.scheduler,
                   metric=args.metric, mode=args.mode, grace_period=args.grace_period,
                   reduction_factor=args.reduction_factor, search_seed=args.search_seed,
                   workers=args.workers, address=args.address,
                   connect_timeout=args.connect_timeout, resume=args.resume,
                   checkpoint_every=args.checkpoint_every, progress=progress,
                   on_start=on_start)
    except KeyboardInterrupt:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None
        _note("sweep", f"interrupted; Tune saved the sweep's state in {out}; "
                       f"continue with: {_resume_command(args, out)}")
        return 130
    finally:
        if state["bar"] is not None:
            state["bar"].close()
    rows = df.to_dict("records")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "stopped", "diverged",
                                                               "error")}
    print(f"{args.task}: {len(rows)} trials ({counts['ok']} ok, {counts['stopped']} stopped "
          f"early, {counts['diverged']} diverged, {counts['error']} failed), "
          f"{time.perf_counter() - t0:.0f} s")
    metrics = [k for k in ("test_loss_per_step", "test_acc", "test_mse")
               if k in df.columns and df[k].notna().any()]
    table = [{**r, "error": (r["error"][:60] + "...") if len(r["error"]) > 60 else r["error"]}
             for r in rows]
    print(_table(table, [*AXES, "steps_done", *metrics, "wall_s", "status", "error"]))
    judged = [r for r in rows if r["status"] in ("ok", "stopped")
              and r.get(args.metric) == r.get(args.metric) and args.metric in r]
    if judged:
        best = (min if mode == "min" else max)(judged, key=lambda r: r[args.metric])
        print(f"best by {args.metric} ({mode}): {best['trial']} ({best[args.metric]:.4g})")
    print(f"wrote {out / 'sweep.csv'} and plots in {out}")
    return 1 if counts["error"] else 0


def cmd_compare(args) -> int:
    from .compare import compare
    from .registry import parse_algorithms
    from .runs import make_task

    _check_device(args.device)
    task = make_task({"task": args.task, "seq_len": args.seq_len, "stream": args.stream,
                      "task_kwargs": _task_kwargs(args)})
    named = parse_algorithms(args.algorithms)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    for flag, v in (("--log-every", args.log_every), ("--track-alignment", args.track_alignment)):
        if v is not None and v < (1 if flag == "--log-every" else 0):
            raise ValueError(f"{flag} must be >= {1 if flag == '--log-every' else 0}, got {v}")
    out = Path(args.out) if args.out else Path("runs") / f"compare-{_slug(args.task)}"
    summary_writer = _tensorboard(args.tensorboard)
    bar = _progress(len(named) * args.seeds * args.steps, args.no_progress)
    seen: dict[tuple, int] = {}
    tb: dict = {}

    def on_progress(info: dict) -> None:
        if summary_writer is not None:  # first called once compare holds its directory
            if "writer" not in tb:
                tb["writer"] = summary_writer(args.tensorboard)
            tb["writer"].add_scalar(f"{info['algorithm']}/seed{info['seed']}/test_loss",
                                    info["test_loss"], global_step=info["step"])
            tb["writer"].flush()
        key = (info["algorithm"], info["seed"])
        bar.set_postfix(algorithm=info["algorithm"], seed=info["seed"],
                        test_loss=f"{info['test_loss']:.4f}")
        bar.update(info["step"] - seen.get(key, 0))
        seen[key] = info["step"]

    t0 = time.perf_counter()
    try:
        rows = compare(task, named, seeds=list(range(args.seeds)), steps=args.steps,
                       hidden=args.hidden, lr=args.lr, optimizer=args.optimizer,
                       batch_size=args.batch_size, update_every=args.update_every,
                       track_every=args.track_alignment or None, eval_every=args.log_every,
                       out_dir=out, progress=on_progress, alpha=args.alpha,
                       activation=args.activation, init=args.init, clip=args.clip or None,
                       dtype=DTYPES[args.dtype], device=args.device, cell=args.cell,
                       layers=args.layers, loss=args.loss, overwrite=args.overwrite)
    finally:
        bar.close()
        if "writer" in tb:
            tb["writer"].close()
    net = args.cell if args.layers == 1 else f"{args.layers} x {args.cell}"
    print(f"{task.name}: {net}, {args.seeds} seed(s) x {args.steps} steps, H={args.hidden}, "
          f"{time.perf_counter() - t0:.0f} s; test_loss is per counted step")
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

    rows = run_checks(seed=args.seed, tol=args.tol, cell=args.cell)
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
    which = f"cell {args.cell} (alone and two layers of it)" if args.cell else "every network"
    print(f"exact algorithms against torch.autograd, float64, tolerance {args.tol:g}, {which}")
    print(_table(table, list(table[0])))
    failed = [r for r in rows if not r.passed]
    if failed:
        print(f"{len(failed)} of {len(rows)} checks FAILED", file=sys.stderr)
        return 1
    print(f"all {len(rows)} checks passed")
    return 0


def _os_error(e: OSError) -> str:
    """One line for a filesystem error."""
    name = e.filename
    if name is None:
        return str(e)
    if e.errno == errno.ENOTDIR:
        return f"{name} is not a directory (it, or a folder above it, is a file)"
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device writing {name}; what was written before it "
                f"(the last checkpoint included) is intact")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {name}: {e.strerror} (a read-only place, or not yours)"
    return f"{e.strerror or type(e).__name__}: {name}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, _Parser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    from .outdir import OutputLocked
    from .sweep import ClusterUnreachable, RayMissing
    from .train import CheckpointError, Diverged

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    if extras:  # under the usage of the subcommand they were given to, with a suggestion
        sub = _subparsers(parser).get(getattr(args, "command", None) or "", parser)
        flag = next((a for a in extras if a.startswith("-")), extras[0])
        sub.error(f"unrecognized argument{'s' if len(extras) > 1 else ''}: "
                  f"{' '.join(extras)}{sub.suggest(flag) if flag.startswith('--') else ''}")
    args._argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    where = f"rnngrad {args.command}"
    for old, new in getattr(args, "_deprecated", None) or []:
        _note(args.command, f"{old} is deprecated; use {new} (same meaning)")
    torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except Diverged as e:
        print(f"{where}: {e}", file=sys.stderr)
        return 1
    except (OutputLocked, CheckpointError) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 3
    except (RayMissing, ClusterUnreachable) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{where}: error: {_os_error(e)}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
