"""Tasks on real and standard data, each yielding seeded ``(inputs, targets, mask)`` batches.

A task has ``name``, ``loss``, ``readout``, ``classification``, ``input_size``,
``output_size``, ``seq_len``, ``batch(batch_size, *, generator)`` and ``test_batch()``.
``get_task("adding", seq_len=50)`` builds one by name; ``get_task("neurogym:ID", **env_kwargs)``
one of neurogym's tasks (``rnngrad[neuro]``), ``get_task("file:PATH.npz", layout="NTD")`` a
task from your own arrays. ``parse_task_kwargs`` reads the CLI's ``--task-kwargs``.
"""

from __future__ import annotations

from .adding import Adding
from .base import Batch, make_generator
from .copy import Copy, CopyPad
from .digits import Digits, load_digits
from .evidence import EvidenceAccumulation
from .sine import Sine
from .stream_add import StreamAdd

__all__ = ["Batch", "make_generator", "Digits", "load_digits", "Adding", "Copy", "Sine",
           "TASKS", "get_task"]

__all__ += ["StreamAdd"]
__all__ += ["EvidenceAccumulation"]
__all__ += ["check_task_name", "parse_task_kwargs"]

TASKS = {
    "adding": Adding,
    "copy": Copy,
    "zucchet_copy": CopyPad,
    "digits": Digits,
    "evidence": EvidenceAccumulation,
    "sine": Sine,
    "stream_add": StreamAdd,
}


PREFIXES = ("neurogym:", "file:")


def check_task_name(name: str) -> str:
    """``name`` if it names a task ``get_task`` can build (a name of ``TASKS``,
    ``neurogym:ID`` or ``file:PATH``); a one-line ValueError otherwise."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task must be a non-empty string, got {name!r}")
    if name in TASKS or (name.startswith(PREFIXES) and name.partition(":")[2]):
        return name
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}, "
                     "neurogym:ID (a neurogym task id) or file:PATH.npz (your own arrays)")


def get_task(name: str, **kwargs):
    """Build a task by name; keyword arguments go to its constructor (for ``neurogym:ID``,
    the environment's ``env_kwargs``)."""
    check_task_name(name)
    prefix, _, rest = name.partition(":")
    if prefix == "neurogym" and rest:
        from .neurogym import Neurogym

        return Neurogym(rest, **kwargs)
    if prefix == "file" and rest:
        from .file import FileTask

        return FileTask(rest, **kwargs)
    return TASKS[name](**kwargs)


def parse_task_kwargs(spec) -> dict:
    """Task keyword arguments from the CLI: a JSON object (``'{"dt": 20}'``), or
    ``key=value`` items (a string split on whitespace, or a list of strings), each value
    read as JSON where it parses (``dt=20``, ``timing={"delay": 500}``) and as a string
    otherwise (``layout=NTD``). None or "" is no arguments."""
    import json

    if spec is None:
        return {}
    if isinstance(spec, dict):
        items = dict(spec)
    else:
        if isinstance(spec, str):
            text = spec.strip()
            if text.startswith("{"):
                try:
                    items = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"task kwargs {spec!r} is not a valid JSON object: "
                                     f"{e}") from None
                if not isinstance(items, dict):
                    raise ValueError(f"task kwargs {spec!r}: expected a JSON object")
                return _check_keys(items, spec)
            parts = text.split()
        elif isinstance(spec, (list, tuple)):
            parts = list(spec)
            if len(parts) == 1 and str(parts[0]).strip().startswith("{"):
                return parse_task_kwargs(parts[0])
        else:
            raise ValueError(f"task kwargs must be a JSON object or key=value items, got "
                             f"{spec!r}")
        items = {}
        for part in parts:
            key, eq, value = str(part).partition("=")
            if not eq or not key:
                raise ValueError(f"task kwargs: {part!r} is not key=value (or give one JSON "
                                 "object)")
            if key in items:
                raise ValueError(f"task kwargs: {key!r} given twice")
            try:
                items[key] = json.loads(value)
            except json.JSONDecodeError:
                items[key] = value
    return _check_keys(items, spec)


def _check_keys(items: dict, spec) -> dict:
    bad = [k for k in items if not (isinstance(k, str) and k.isidentifier())]
    if bad:
        raise ValueError(f"task kwargs {spec!r}: {bad[0]!r} is not a valid argument name")
    return items
