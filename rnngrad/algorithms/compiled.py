"""Compiled online steps: ``rnngrad.compile(algo)``.

Where the weights change at every step (a stream, B = 1, an update per step), the
forward recursion is the algorithm, and an eager step is tens of PyTorch calls whose
dispatch, not arithmetic, sets the cost (docs/online_floor.md). ``compile`` runs the
rule's own pure step through ``torch.compile`` (inductor: C++ on CPU, Triton on CUDA)::

    algo = rnngrad.compile(rnngrad.eprop())       # same name, init, flush; a compiled step
    state = algo.init(model, 1)
    for x_t, y_t in stream:
        state, out, grads = algo.step(model, state, x_t, y_t)   # the eager step's numbers
    algo.compiled.seconds, algo.compiled.reason                 # compile time; why eager

Generic over any algorithm: the compiled function is the algorithm's undecorated step
(``algo.step.__wrapped__``) plus the finiteness reduction of the validation, fused into
the same kernels; the rest of the validation (types, shapes, the state's owner) stays
outside, in Python, and costs no guard: nothing in it is seen by the compiler. The state
passes through as the NamedTuple the rule keeps, its tensors graph inputs (buffers the
rule updates in place stay in place: inductor writes them back), its other fields
guarded as constants. Each compiled function gets its own code object, so the compiler's
cache (``torch._dynamo.config.recompile_limit`` entries per code object) is not shared
between algorithms.

The per-call cost, not the arithmetic, set a compiled step at B = 1, so: inductor's C++
wrapper is the default (the Python wrapper where it fails to build, said in
``compiled.wrapper_reason``); dynamo's guards on the library's own globals are dropped
(``_guard_filter``); the validation skips what cannot have changed when the state handed in
is the one this step last returned (``CompiledStep.trusts``); and after one such step of a
key through dynamo, the step calls the compiled graph directly, without dynamo's frame,
checking what dynamo's guards would (``_Direct``; ``compiled.direct`` lists the keys).

Compilation is per (batch size, dtype, device, which of target/mask/dh are given, loss):
the first step with a new such key compiles (``dynamic=False``: every shape is
specialised, as a stream keeps its shape); a later key with a new input shape, dtype or
device recompiles once and says so with a ``CompileWarning`` (a step without a target
after steps with one compiles its own graph, silently: it is the same stream). The step is traced whole (``fullgraph=True``); where the rule does something the compiler
cannot trace (a random draw from a ``torch.Generator`` as in UORO and KF-RTRL, a user
cell's value-dependent branch) or the compiler fails (no C++ compiler), the step runs
eagerly, with one ``CompileWarning`` naming the reason (also in ``compiled.reason``), and
the numbers are the eager step's. ``pieces=True`` compiles the pieces between the calls
the compiler cannot trace instead (``fullgraph=False``; ``compiled.mode == "pieces"``).
"""

from __future__ import annotations

import itertools
import time
import types
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import Algorithm, _stamp

__all__ = ["compile", "CompileInfo", "CompileWarning", "is_compiled"]


class CompileWarning(UserWarning):
    """A compiled step recompiled for a new input, or fell back to the eager step."""


@dataclass
class CompileInfo:
    """What ``compile`` did, filled as the step runs.

    backend:  the ``torch.compile`` backend ("inductor" by default).
    mode:     "pending" (no step yet), "whole" (one graph per key), "pieces" (graphs
              between calls the compiler cannot trace), "eager" (compilation failed).
    reason:   why not "whole" (one line), or None.
    seconds:  wall time of the steps that compiled (first step of each key), in total.
    graphs:   graphs the backend compiled so far (the recompilation count is graphs minus
              the graphs of the first key).
    keys:     the input keys compiled for, in order.
    wrapper:  how inductor calls its kernels: "cpp" (the C++ wrapper, the default: a
              graph call costs less Python), "python" (asked for, or where the C++
              wrapper failed to build), None (no inductor graph yet, or another backend).
    wrapper_reason: why the C++ wrapper was not used where it was the default (one line).
    direct:   the keys whose graph the step calls directly, without dynamo's per-call frame
              (after one step of the key through dynamo; see ``CompiledStep._learn``).
    """

    backend: str
    mode: str = "pending"
    reason: str | None = None
    seconds: float = 0.0
    graphs: int = 0
    keys: list = field(default_factory=list)
    wrapper: str | None = None
    wrapper_reason: str | None = None
    direct: list = field(default_factory=list)


_counter = itertools.count()



def _fresh_pure(raw_step):
    """The step plus a finiteness flag, as a function with a code object of its own."""

    def pure(model, state, x_t, target_t, mask_t, dh_t, loss):
        new, out, grads = raw_step(model, state, x_t, target_t, mask_t=mask_t, loss=loss,
                                   dh_t=dh_t)
        # one scalar that is finite iff every float input and output is (NaN and Inf
        # propagate through sums; an overflowing sum only sends the caller to the exact check)
        parts = [out.h.sum(), out.loss.reshape(())]
        for t in (x_t, target_t, mask_t, dh_t):
            if t is not None and t.is_floating_point():
                parts.append(t.sum().to(out.loss.dtype))
        if grads:
            parts.extend(g.sum() for g in grads.values() if isinstance(g, Tensor))
        return new, out, grads, torch.stack(parts).sum()

    code = pure.__code__.replace(co_name=f"rnngrad_step_{next(_counter)}")
    return types.FunctionType(code, pure.__globals__, code.co_name, pure.__defaults__,
                              pure.__closure__)


def _sig(t):
    return None if t is None else (t.shape, t.dtype)


def _key(x_t: Tensor, target_t, mask_t, dh_t, loss: str) -> tuple:
    """What a compilation is specialised to: x_t's shape, dtype and device, the shapes and
    dtypes of target/mask/dh (None where not given), and the loss."""
    return (x_t.shape, x_t.dtype, x_t.device, _sig(target_t), _sig(mask_t), _sig(dh_t), loss)


def _describe(key: tuple) -> str:
    shape, dtype, dev, tgt, mask, dh, loss = key
    extra = ", ".join(n for n, v in (("target", tgt), ("mask", mask), ("dh", dh)) if v is not None)
    return (f"x_t {tuple(shape)} {str(dtype).replace('torch.', '')} on {dev}, loss {loss!r}"
            + (f", with {extra}" if extra else ", no target"))


# Guards that dynamo keeps on the library's own globals (its functions, classes, modules and
# the NamedTuple classes' internals): they change only if the library itself is patched at
# run time, and checking them at every call cost more than the rest of the guards
# (benchmarks/compiled_step.md). Kept: the guards on the tensors (shapes, strides, dtypes,
# devices), on the arguments (the model's type and constant attributes, the state's
# structure, loss, which of target/mask/dh are given), on scalar globals, and the global
# state (grad mode, default device, ...).
_DROPPED_GLOBAL_GUARDS = frozenset({"CLOSURE_MATCH", "MODULE_MATCH", "CLASS_MATCH",
                                    "BUILTIN_MATCH", "ID_MATCH", "TYPE_MATCH",
                                    "SEQUENCE_LENGTH", "DUPLICATE_INPUT", "DICT_KEYS_MATCH",
                                    "DICT_VERSION", "FUNCTION_MATCH"})


# later compilations of keys already compiled before a compiled step gives up and runs eagerly
# (TBPTT compiles its emission step once, late; UORO's position in its buffer of random signs
# is a Python number, a new graph at every step)
_LATE_LIMIT = 3

_MODEL_GUARDS = frozenset({"CONSTANT_MATCH", "EQUALS_MATCH", "ID_MATCH"})


def _guard_filter(entries) -> list[bool]:
    return [not ((e.is_global and e.guard_type in _DROPPED_GLOBAL_GUARDS)
                 or e.name.startswith("dict(type(")) for e in entries]


def _first_line(e: BaseException) -> str:
    inner = getattr(e, "inner_exception", None)  # BackendCompilerFailed wraps the real one
    if isinstance(inner, BaseException):
        e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


class CompiledStep:
    """The callable behind a compiled algorithm's ``step`` (before validation).

    Called as ``(model, state, x_t, target_t, mask_t, dh_t, loss) -> (state, out, grads,
    flag)`` where ``flag`` is a 0-dim tensor, finite iff every float input and output is.
    """

    __rnngrad_fused_finite__ = True

    def __init__(self, name: str, raw_step, backend, options: dict | None, pieces: bool):
        self.name = name
        self.pieces = pieces
        self.raw = raw_step
        self.info = CompileInfo(backend if isinstance(backend, str) else
                                getattr(backend, "__name__", type(backend).__name__))
        self._backend = backend
        self._options = options
        self._fn = None
        self._eager = _fresh_pure(raw_step)  # same flag, no compiler
        self._seen: set = set()
        # the C++ wrapper unless the options say otherwise (then as they say, no fallback)
        self._cpp = options is None or "cpp_wrapper" not in options
        # the validation's fast path (see trusts): the last state this step returned, by id
        # and a weak reference to its h (a NamedTuple takes no weak reference; a strong one
        # would keep a dropped state's buffers alive), the version stamp of its other tensors,
        # its model (weakly) and the input keys validated in full for that model
        self._last = (None,) * 5
        self._trusted: set = set()
        # direct calls of the compiled graph (see _learn), per key, for the trusted model
        self._direct: dict = {}
        self._probe = None
        self._model_guards: dict = {}
        self._late = 0  # calls of keys already compiled that compiled again
        self._producer = None  # the direct call that returned the last state, if one did
        self.direct = True

    def _counting_backend(self):
        inner = self._backend
        if isinstance(inner, str):
            inner = torch._dynamo.lookup_backend(inner)
        info = self.info

        def backend(gm, example_inputs, **kw):
            info.graphs += 1
            return self._recorder(compile_graph(gm, example_inputs, **kw))

        def compile_graph(gm, example_inputs, **kw):
            if inner is not torch._dynamo.lookup_backend("inductor"):
                return inner(gm, example_inputs, **kw)
            from torch._inductor.compile_fx import compile_fx

            patches = dict(self._options or {})
            if self._cpp:
                try:
                    fn = compile_fx(gm, example_inputs,
                                    config_patches={**patches, "cpp_wrapper": True})
                    info.wrapper = "cpp"
                    return fn
                except Exception as e:  # noqa: BLE001 -- the python wrapper may still build
                    self._cpp = False
                    info.wrapper_reason = f"the C++ wrapper failed: {_first_line(e)}"
            info.wrapper = "cpp" if patches.get("cpp_wrapper") else "python"
            return compile_fx(gm, example_inputs, config_patches=patches or None)

        return backend

    def _recorder(self, fn):
        # the compiled graph as dynamo calls it (flat tensors in, flat tensors out); while a
        # direct call is being learned (see _learn), each call is noted
        def graph(*args):
            out = fn(*args)
            if self._probe is not None:
                self._probe.append((fn, args, out))
            return out

        return graph

    def _filter(self, entries) -> list[bool]:
        # dynamo's guards on the model's constants and on the identity of its parameters (a
        # network's, which dynamo may hold as attributes of the graph): a direct call checks
        # those of them that hold when it is learned (see _Direct)
        for e in entries:
            if (e.guard_type in _MODEL_GUARDS and e.has_value and not e.is_global
                    and e.name.startswith("model")):
                v = e.value
                if e.guard_type == "ID_MATCH":  # (not kept alive by this record)
                    try:
                        v = weakref.ref(v)
                    except TypeError:
                        continue
                self._model_guards[(e.guard_type, e.name)] = v
        return _guard_filter(entries)

    def _build(self, fullgraph: bool):
        return torch.compile(_fresh_pure(self.raw), backend=self._counting_backend(),
                             fullgraph=fullgraph, dynamic=False,
                             options={"guard_filter_fn": self._filter})

    # ---- the validation's fast path (used by base._checked) ---------------------------------

    def key(self, x_t, target_t, mask_t, dh_t, loss):
        return _key(x_t, target_t, mask_t, dh_t, loss)

    def trusts(self, model, state, key) -> bool:
        """True when ``state`` is, untouched, the state this step last returned for ``model``
        and ``key`` was validated in full with that model: the checks of the model, of the
        state (owner, shapes, dtype, device) and of the inputs' shapes, dtypes and devices
        cannot fail then, and are skipped (the finiteness flag is still read)."""
        sid, href, mref, stamp, param = self._last
        if sid != id(state) or mref() is not model or key not in self._trusted:
            return False
        h = state[0]
        while type(h) is not Tensor:  # a network's state: tuples of per-layer states
            if not (isinstance(h, tuple) and h):
                return False
            h = h[0]
        # not changed in place (a consumed state's buffers moved on), and the model not moved
        # to another dtype or device in place since
        return (href() is h and _stamp(state) == stamp and param.dtype == key[1]
                and param.device == key[2])

    def remember(self, model, state, key, record) -> None:
        """``state`` is what this step returned for ``model`` (``record``: the version stamp
        and the weak reference to its h that ``base._record`` returned), after a full
        validation of ``key`` or on the fast path."""
        if record is None:
            self._last = (None,) * 5
            return
        last = self._last
        mref = last[2]
        if mref is None or mref() is not model:
            self._trusted = set()
            self._direct = {}
            mref = weakref.ref(model)
            last = (None, None, mref, None, model.W_out)
        self._trusted.add(key)
        self._last = (id(state), record[1], mref, record[0], last[4])

    def __call__(self, model, state, x_t, target_t, mask_t, dh_t, loss, key=None,
                 trusted=False):
        io = getattr(self.raw, "__rnngrad_compile_io__", None)
        if io is None:
            return self._call(model, state, x_t, target_t, mask_t, dh_t, loss, key, trusted)
        # a rule that draws random numbers (UORO, KF-RTRL): drawn outside the graph, the
        # step given what it takes of them (see _signs.compile_io)
        before, after = io
        inner, ctx = before(state)
        new, *rest = self._call(model, inner, x_t, target_t, mask_t, dh_t, loss, key, trusted)
        return (after(new, ctx), *rest)

    def _call(self, model, state, x_t, target_t, mask_t, dh_t, loss, key, trusted):
        info = self.info
        args = (model, state, x_t, target_t, mask_t, dh_t, loss)
        if info.mode == "eager":
            return self._eager(*args)
        learn = None
        if key is None:
            key = _key(x_t, target_t, mask_t, dh_t, loss)
        if trusted and info.mode == "whole" and self.direct:
            direct = self._direct.get(key)
            if direct is not None:
                if direct is not False:
                    result = direct(model, state, x_t, target_t, mask_t, dh_t,
                                    self._producer is direct)
                    if result is not None:
                        self._producer = direct
                        return result
            elif key in self._seen:
                learn = (torch.is_grad_enabled(), _layout(state))
        self._producer = None
        first = key not in self._seen
        if first:
            if info.keys and all(k[:3] != key[:3] for k in info.keys):  # new shape/dtype/device
                warnings.warn(f"{self.name}: the compiled step recompiles for {_describe(key)} "
                              f"(it was compiled for {_describe(info.keys[0])})",
                              CompileWarning, stacklevel=3)
            if self._fn is None:
                self._fn, info.mode = self._build(True), "whole"
        graphs, t0 = info.graphs, time.perf_counter()
        if learn is not None:
            self._probe = []
        try:
            result = self._run(first, args)
        except torch._dynamo.exc.TorchDynamoException as e:  # the compiler failed, not the step
            result = self._retry(e, args)
        finally:
            probe, self._probe = self._probe, None
        if learn is not None and info.mode == "whole":
            self._learn(key, args, result, probe, *learn)
        if info.graphs != graphs or first:  # this call compiled (a rule may compile late, e.g.
            info.seconds += time.perf_counter() - t0  # TBPTT's emission step)
            if not first and info.mode != "eager":
                self._late += 1
                if self._late > _LATE_LIMIT:
                    # a Python number in the state that changes from step to step (a position
                    # in a buffer of random draws, say): each value is a new graph, each
                    # compile costs seconds, and past dynamo's recompile limit the frames run
                    # eagerly under dynamo, slower than the eager step; the eager step from now
                    info.mode = "eager"
                    info.reason = (f"the step recompiled at {self._late} later steps of keys "
                                   "already compiled (a Python number in the state that "
                                   "changes from step to step)")
                    warnings.warn(f"{self.name}: the step runs eagerly from now: {info.reason}",
                                  CompileWarning, stacklevel=3)
        if first:
            info.keys.append(key)
            self._seen.add(key)
        return result

    def _learn(self, key, args, result, probe, grad, before) -> None:
        """After a trusted step of a key through dynamo: learn to call its graph directly.
        Where the step ran exactly one graph, every input of which is a parameter or buffer
        of the model, a tensor of the state or one of x_t/target_t/mask_t/dh_t, and whose
        result is made of the graph's outputs, its inputs and constants, later trusted steps
        of this key call the graph without dynamo's frame (its guards are then ours: the
        trusted state and model, the key, dynamo's guards on the model's constants, the
        state's structure, the inputs' layouts and the grad mode; see _Direct)."""
        direct = False
        # a step that changed the state's lists or dicts in place (TBPTT's pending steps):
        # dynamo replays such changes after its graph; a direct call would not
        if len(probe) == 1 and _layout(args[1]) == before:
            try:
                direct = _Direct.make(probe[0], args, result, grad, self._model_guards)
            except _NoDirect:
                direct = False
        self._direct[key] = direct or False
        if direct and key not in self.info.direct:
            self.info.direct.append(key)

    def _run(self, quiet: bool, args):
        if not (quiet or self.info.mode == "pieces"):
            return self._fn(*args)
        with warnings.catch_warnings():
            # what the compiler's tracing warns about (torch.func internals seen through fake
            # tensors) is not the caller's; under an "error" filter it would abort the compile
            warnings.simplefilter("ignore")
            return self._fn(*args)

    def _retry(self, error, args):
        info = self.info
        if info.mode == "pieces":
            # part of the step may have run (the pieces before the failing one): rerunning it
            # eagerly could apply an in-place update twice, so say so instead
            raise RuntimeError(f"{self.name}: the compiled step failed to compile a piece after "
                               f"part of the step ran ({_first_line(error)}); the state may be "
                               "partly updated: start again from init with the eager algorithm"
                               ) from error
        # a whole graph fails before it runs: the state is untouched
        if self.pieces and isinstance(error, torch._dynamo.exc.Unsupported) and not self._seen:
            info.mode, info.reason = "pieces", _first_line(error)
            self._fn = self._build(False)
            try:
                return self._run(True, args)
            except torch._dynamo.exc.TorchDynamoException as e:
                if info.graphs:
                    raise RuntimeError(f"{self.name}: compiling the step in pieces failed after "
                                       f"part of it ran ({_first_line(e)}); start again from init "
                                       "with the eager algorithm") from e
                error = e
        result = self._eager(*args)  # its own error, if any, is the caller's
        info.mode, info.reason = "eager", _first_line(error)
        warnings.warn(f"{self.name}: compilation failed, the step runs eagerly ({info.reason})",
                      CompileWarning, stacklevel=4)
        return result


class _NoDirect(Exception):
    pass


def _layout(v):
    """The containers of a state and what they hold, by identity (to see in-place changes)."""
    if isinstance(v, (tuple, list)):
        return (type(v), id(v), tuple(_layout(x) for x in v))
    if isinstance(v, dict):
        return (dict, id(v), tuple((k, _layout(x)) for k, x in v.items()))
    return id(v)


class _Direct:
    """A compiled graph called without dynamo: ``(model, state, x_t, target_t, mask_t, dh_t)
    -> result`` or None where an input's layout is not the one the graph was compiled for
    (the caller then goes through dynamo). Built from one call seen through dynamo: where
    each graph input came from, and how the result was made of the graph's outputs."""

    __slots__ = ("fn", "inputs", "skeleton", "check", "state_check", "build", "consts",
                 "grad")

    @staticmethod
    def make(call, args, result, grad, model_guards):
        fn, graph_args, outs = call
        model, state, x_t, target_t, mask_t, dh_t, _ = args
        where: dict = {}  # id(tensor) -> expression over the step's arguments
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            # through the modules' own dicts (nn.Module.__getattr__ costs a microsecond)
            expr = "model" + "".join(f"._modules[{n!r}]" for n in name.split(".")[:-1])
            leaf = name.rsplit(".", 1)[-1]
            kind = "_parameters" if isinstance(t, torch.nn.Parameter) else "_buffers"
            where.setdefault(id(t), (f"{expr}.{kind}[{leaf!r}]", "param"))

        consts: list = []

        def const(v):
            consts.append(v)
            return f"c[{len(consts) - 1}]"

        # the state's structure is checked at every direct call (what dynamo guards on: the
        # containers' types and lengths, the constants it holds; its tensors' layouts below),
        # and so are dynamo's guards on the model's constants and parameters that hold now
        skeleton = []
        for (kind, name), value in model_guards.items():
            try:
                now = eval(name, {}, {"model": model})  # noqa: S307 -- dynamo's source names
            except Exception:  # noqa: BLE001 -- a guard of another model's layout
                continue
            if kind == "ID_MATCH":
                value = value()
                if value is not None and now is value:
                    skeleton.append(f"{name} is {const(value)}")
            elif type(now) is type(value) and now == value and (
                    value is None or type(value) in (bool, int, float, str)):
                skeleton.append(f"{name} is None" if value is None else f"{name} == {const(value)}")

        def walk(v, expr):
            if isinstance(v, Tensor):
                where.setdefault(id(v), (expr, "state"))
            elif isinstance(v, (tuple, list)):
                skeleton.append(f"type({expr}) is {const(type(v))} and len({expr}) == {len(v)}")
                for i, x in enumerate(v):
                    walk(x, f"{expr}[{i}]")
            elif type(v) is dict and all(type(k) is str for k in v):
                skeleton.append(f"type({expr}) is dict and list({expr}) == {const(list(v))}")
                for k, x in v.items():
                    walk(x, f"{expr}[{k!r}]")
            elif v is None or type(v) in (bool, int, float, str):
                skeleton.append(f"{expr} is None" if v is None else
                                f"type({expr}) is {const(type(v))} and {expr} == {const(v)}")
            elif isinstance(getattr(type(v), "__slots__", None), tuple) and id(v) not in objs:
                # a rule's plan object (the trace rules' per-group Plan): the very object, and
                # what it holds now, checked at every call; a step that returns it unchanged
                # hands the same object on (``build``)
                objs[id(v)] = v
                skeleton.append(f"{expr} is {const(v)}")
                for slot in type(v).__slots__:
                    if hasattr(v, slot):
                        walk(getattr(v, slot), f"{expr}.{slot}")
            else:
                raise _NoDirect
        objs: dict = {}  # id -> the slotted objects the state holds
        walk(state, "state")
        for name, t in (("x_t", x_t), ("target_t", target_t), ("mask_t", mask_t),
                        ("dh_t", dh_t)):
            if t is not None:
                where.setdefault(id(t), (name, "input"))
        inputs, checks, state_checks = [], [], []
        for i, a in enumerate(graph_args):
            if not isinstance(a, Tensor) or id(a) not in where:
                raise _NoDirect  # a tensor from elsewhere (a global, a module attribute)
            expr, kind = where[id(a)]
            inputs.append(expr)
            # the layout the graph was compiled for: x_t's stride (the key fixes the rest); a
            # parameter's, unless it is the very tensor seen (the trusted model's dtype and
            # device are checked by trusts); the state's, unless this graph made it
            layout = f"a[{i}].stride() == {tuple(a.stride())!r} and a[{i}].shape == {tuple(a.shape)!r}"
            if kind == "param":
                checks.append(f"(a[{i}] is {const(a)} or ({layout} and a[{i}].dtype == "
                              f"{const(a.dtype)} and a[{i}].device == {const(a.device)}))")
            elif kind == "input":
                checks.append(f"a[{i}].stride() == {tuple(a.stride())!r}")
            else:
                state_checks.append(layout)
        out_ids = {id(o): i for i, o in enumerate(outs)}
        in_ids = {id(a): i for i, a in enumerate(graph_args)}

        def build(v):
            if isinstance(v, Tensor):
                if id(v) in out_ids:
                    return f"o[{out_ids[id(v)]}]"
                if id(v) in in_ids:
                    return f"a[{in_ids[id(v)]}]"
                if where.get(id(v), (None, None))[1] == "state":
                    return where[id(v)][0]  # a tensor of the state handed on (a view in place)
                raise _NoDirect  # a tensor made outside the graph
            if v is None or isinstance(v, (bool, int, float, str)):
                return const(v)
            if isinstance(v, tuple):
                items = ", ".join(build(x) for x in v)
                if type(v) is tuple:
                    return f"({items},)"
                if hasattr(v, "_fields"):
                    return f"{const(type(v))}({items})"
            if type(v) is list:
                return "[" + ", ".join(build(x) for x in v) + "]"
            if type(v) is dict:
                return "{" + ", ".join(f"{const(k)}: {build(x)}" for k, x in v.items()) + "}"
            if id(v) in objs:  # the state's plan object, handed on as it was
                return const(v)
            raise _NoDirect

        d = _Direct()
        d.fn, d.consts, d.grad = fn, consts, grad
        d.build = eval(f"lambda o, a, c, state: {build(result)}")  # noqa: S307 -- our own expressions
        d.inputs = eval("lambda model, state, x_t, target_t, mask_t, dh_t: ("  # noqa: S307
                        + "".join(e + ", " for e in inputs) + ")")
        d.skeleton = eval("lambda model, state, c: " + " and ".join(skeleton))  # noqa: S307
        d.check = eval("lambda a, c: " + (" and ".join(checks) or "True"))  # noqa: S307
        d.state_check = eval("lambda a, c: " + (" and ".join(state_checks) or "True"))  # noqa: S307
        return d

    def __call__(self, model, state, x_t, target_t, mask_t, dh_t, own: bool):
        """``own``: the state is what this graph returned last (its layouts are the graph's)."""
        c = self.consts
        try:
            if not self.skeleton(model, state, c):
                return None
            a = self.inputs(model, state, x_t, target_t, mask_t, dh_t)
            if torch.is_grad_enabled() is not self.grad or not self.check(a, c) or not (
                    own or self.state_check(a, c)):
                return None
        except (AttributeError, KeyError, IndexError, TypeError):
            return None  # a module or parameter removed or renamed: through dynamo
        return self.build(self.fn(*a), a, self.consts, state)


def compile(algorithm: Algorithm, *, backend="inductor", options: dict | None = None,
            pieces: bool = False) -> Algorithm:
    """The same algorithm with its step compiled by ``torch.compile``.

    Args:
        algorithm: any online algorithm (``rnngrad.eprop()``, ``rtrl(layers="spatial")``,
            ``tbptt(k)``, ...), on any model its eager step takes.
        backend: a ``torch.compile`` backend, "inductor" (default) or a callable.
        options: inductor config patches; None: inductor's defaults with its C++ wrapper
            (``{"cpp_wrapper": False}`` for the Python one; a ``cpp_wrapper`` given here is
            used as given, without the fallback to the Python wrapper).
        pieces: where the step cannot be traced whole, compile the pieces between what the
            compiler cannot trace (``fullgraph=False``) instead of running the step eagerly.
            Off by default: measured here, a step in pieces was slower than the eager step
            (UORO at B = 1, H = 64: 745 us against 649 us), and a step that keeps compiling
            new graphs for keys it has compiled runs eagerly after a few (docs/compiled.md).

    Returns an ``Algorithm`` with the same name, init, flush and whole-sequence path, whose
    step emits what the eager step emits (to round-off: 1e-6 relative in float32, 1e-10 in
    float64, tested for every rule and cell), and whose ``compiled`` field is the
    ``CompileInfo`` of what happened. States pass between the eager and the compiled
    algorithm both ways. Compiling a compiled algorithm returns it unchanged.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"rnngrad.compile takes an Algorithm (rnngrad.eprop(), rnngrad.rtrl(), "
                        f"...), got {type(algorithm).__name__}")
    if algorithm.compiled is not None:
        return algorithm
    if not (isinstance(backend, str) or callable(backend)):
        raise TypeError(f"backend must be a torch.compile backend name or a callable, got "
                        f"{type(backend).__name__}")
    if isinstance(backend, str):
        try:
            torch._dynamo.lookup_backend(backend)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"unknown torch.compile backend {backend!r} "
                             f"({_first_line(e)})") from None
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of inductor settings, got "
                        f"{type(options).__name__}")
    raw = getattr(algorithm.step, "__wrapped__", algorithm.step)
    if not isinstance(pieces, bool):
        raise TypeError(f"pieces must be a bool, got {pieces!r}")
    step = CompiledStep(algorithm.name, raw, backend, options, pieces)
    init = getattr(algorithm.init, "__wrapped__", algorithm.init)
    flush = getattr(algorithm.flush, "__wrapped__", algorithm.flush)
    return Algorithm(algorithm.name, init, step, flush, algorithm.exact, algorithm.online,
                     algorithm.cost, algorithm.sequence, algorithm.rng, step.info)


def is_compiled(algorithm: Algorithm) -> bool:
    """True for what ``compile`` returned."""
    return isinstance(algorithm, Algorithm) and algorithm.compiled is not None
