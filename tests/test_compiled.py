"""``rnngrad.compile``: the compiled step emits what the eager step emits (float64 1e-10,
float32 1e-6 relative), compiles once per input key over a stream, recompiles saying so,
falls back to the eager step with a reason; and the online API's silent cases (issue 16):
integer masks in the model's dtype, consumed states, states of another algorithm, the loss
that follows the readout.

The whole (rule, cell) matrix through inductor (the compiler the library uses) takes
tens of minutes of C++ builds, so it runs only with ``RNNGRAD_COMPILE_MATRIX=1`` in the
environment; ``make test`` runs a representative subset through ``aot_eager`` (the same
tracing and functionalisation, no C++ build) and one case through inductor in each dtype."""

from __future__ import annotations

import os
import warnings

from typing import NamedTuple

import pytest
import torch
from cell_zoo import MGU

import rnngrad
from rnngrad import CompileWarning
from rnngrad.cells import ALIF, GRU, LRU, LSTM, Elman

pytestmark = pytest.mark.usefixtures("one_thread")

D, K = 3, 2

RULES = {
    "eprop": lambda: rnngrad.eprop(),
    "eprop_random": lambda: rnngrad.eprop("random", seed=3),
    "rflo": lambda: rnngrad.rflo(),
    "snap1": lambda: rnngrad.snap1(),
    "uoro": lambda: rnngrad.uoro(seed=1),
    "kf_rtrl": lambda: rnngrad.kf_rtrl(seed=1),
    "rtrl": lambda: rnngrad.rtrl(),
    "tbptt": lambda: rnngrad.tbptt(3),
    "spatial": lambda: rnngrad.rtrl(layers="spatial"),
}


def make(kind: str, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    kw = {"dtype": dtype}
    if kind == "rnn":
        return rnngrad.RNN(D, 5, K, alpha=0.5, **kw)
    if kind == "rnn1":
        return rnngrad.RNN(D, 5, K, **kw)
    cells = {
        "elman": lambda: [Elman(D, 5, alpha=0.6, **kw)],
        "gru": lambda: [GRU(D, 4, **kw)],
        "lstm": lambda: [LSTM(D, 4, **kw)],
        "alif": lambda: [ALIF(D, 4, v_th=0.3, beta=0.2, **kw)],
        "lru": lambda: [LRU(D, 4, **kw)],
        "stack": lambda: [LRU(D, 4, **kw), ALIF(4, 3, v_th=0.3, **kw)],
        "stack_gru": lambda: [GRU(D, 4, **kw), Elman(4, 3, **kw)],
        "mgu": lambda: [MGU(D, 4, dtype=dtype)],
    }[kind]()
    return rnngrad.Network(cells, K)


KINDS = ["rnn", "rnn1", "elman", "gru", "lstm", "alif", "lru", "stack", "stack_gru", "mgu"]


def supported(rule: str, kind: str) -> bool:
    try:
        RULES[rule]().init(make(kind), 2)
    except ValueError:  # the eager rule does not take this cell: nothing to compile
        return False
    return True


MATRIX = [(r, k) for r in RULES for k in KINDS if supported(r, k)]
SUBSET = [("eprop", "rnn"), ("snap1", "gru"), ("uoro", "rnn"), ("rtrl", "lstm"),
          ("tbptt", "mgu"), ("spatial", "stack"), ("eprop", "alif")]


def data(T, B, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=dtype)
    y = torch.randn(T, B, K, generator=g, dtype=dtype)
    mask = (torch.arange(T * B).view(T, B) % 3 != 0).to(dtype)
    return x, y, mask


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def grads_err(g, ref) -> float:
    assert (g is None) == (ref is None)
    if ref is None:
        return 0.0
    assert set(g) == set(ref)
    return max(rel(g[n], ref[n]) for n in ref if isinstance(ref[n], torch.Tensor))


PIECES: set = set()  # UORO and KF-RTRL draw outside the graph (_signs.compile_io): whole


def compare(rule, kind, dtype, backend, *, T=6, B=2):
    """Eager and compiled side by side (two factory calls: the same random draws); the
    largest relative difference of everything the steps and the flush emit."""
    net = make(kind, dtype)
    eager = RULES[rule]()
    comp = rnngrad.compile(RULES[rule](), backend=backend, pieces=rule in PIECES)
    x, y, mask = data(T, B, dtype)
    se, sc = eager.init(net, B), comp.init(net, B)
    worst = 0.0
    for t in range(T):
        tgt = None if t == 1 else y[t]  # a step without a loss too
        se, oe, ge = eager.step(net, se, x[t], tgt, mask_t=mask[t])
        sc, oc, gc = comp.step(net, sc, x[t], tgt, mask_t=mask[t])
        worst = max(worst, rel(oc.h, oe.h), rel(oc.z, oe.z), rel(oc.loss, oe.loss),
                    grads_err(gc, ge))
    (_, fe), (_, fc) = eager.flush(net, se), comp.flush(net, sc)
    return max(worst, grads_err(fc, fe)), comp.compiled


TOL = {torch.float64: 1e-10, torch.float32: 1e-6}


@pytest.mark.parametrize("rule,kind", SUBSET)
def test_compiled_equals_eager_subset(rule, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        err, info = compare(rule, kind, torch.float64, "aot_eager")
    assert info.mode == "whole", info
    assert err <= TOL[torch.float64], (rule, kind, err)
    # the later steps called the graph directly, but where the state holds lists (TBPTT's
    # pending steps) or the step runs in pieces
    assert bool(info.direct) == (info.mode == "whole" and rule != "tbptt"), info


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_inductor_equals_eager(dtype):
    err, info = compare("eprop", "rnn", dtype, "inductor", T=4)
    assert info.mode == "whole" and info.seconds > 0, info
    assert err <= TOL[dtype], err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RNNGRAD_COMPILE_MATRIX") != "1",
                    reason="the inductor matrix (tens of minutes): RNNGRAD_COMPILE_MATRIX=1")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rule,kind", MATRIX)
def test_compiled_equals_eager_every_rule_and_cell(rule, kind, dtype):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileWarning)
        err, info = compare(rule, kind, dtype, "inductor", T=4)
    assert err <= TOL[dtype], (rule, kind, err)
    if info.mode == "eager":  # same numbers, but not compiled: say why
        assert any("runs eagerly" in str(w.message) for w in caught)
        pytest.xfail(f"runs eagerly: {info.reason}")


def test_matrix_covers_every_rule():
    assert {r for r, _ in MATRIX} == set(RULES)
    assert {k for _, k in MATRIX} == set(KINDS)


# ---- compilations over a stream ------------------------------------------------------------

def test_one_compilation_per_key_over_100_steps():
    net = make("gru", torch.float32)
    algo = rnngrad.compile(rnngrad.snap1(), backend="aot_eager")
    x, y, _ = data(100, 1, torch.float32)
    s = algo.init(net, 1)
    s, _, _ = algo.step(net, s, x[0], y[0])
    first = algo.compiled.graphs
    assert first >= 1 and algo.compiled.mode == "whole"
    for t in range(1, 100):
        s, _, _ = algo.step(net, s, x[t], y[t])
    assert algo.compiled.graphs == first, algo.compiled  # no recompilation step to step
    assert len(algo.compiled.keys) == 1
    # another batch size: one recompilation, said once
    s = algo.init(net, 3)
    x3 = torch.randn(3, D)
    with pytest.warns(CompileWarning, match=r"recompiles for x_t \(3, 3\)"):
        s, _, _ = algo.step(net, s, x3, None)
    n = algo.compiled.graphs
    assert n == first + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            s, _, _ = algo.step(net, s, x3, None)
    assert algo.compiled.graphs == n


def test_another_dtype_recompiles_saying_so_and_stays_right():
    algo = rnngrad.compile(rnngrad.eprop(), backend="aot_eager")
    m32, m64 = make("rnn", torch.float32), make("rnn", torch.float64)
    x, y, _ = data(3, 2, torch.float64)
    s = algo.init(m32, 2)
    algo.step(m32, s, x[0].float(), y[0].float())
    s = algo.init(m64, 2)
    with pytest.warns(CompileWarning, match="float64"):
        s, out, g = algo.step(m64, s, x[0], y[0])
    se = rnngrad.eprop().init(m64, 2)
    _, oute, ge = rnngrad.eprop().step(m64, se, x[0], y[0])
    assert grads_err(g, ge) <= 1e-12 and out.h.dtype == torch.float64
    # a float32 input on the float64 model: the validation's clear error, before compiling
    with pytest.raises(TypeError, match="float32"):
        algo.step(m64, s, x[1].float(), y[1])


def test_compile_fails_falls_back_to_eager_with_a_reason():
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here\nsecond line")

    net = make("rnn")
    algo = rnngrad.compile(rnngrad.eprop(), backend=broken)
    x, y, _ = data(3, 2, torch.float64)
    s, se = algo.init(net, 2), rnngrad.eprop().init(net, 2)
    with pytest.warns(CompileWarning, match="runs eagerly.*no C\\+\\+ compiler here"):
        s, out, g = algo.step(net, s, x[0], y[0])
    assert algo.compiled.mode == "eager" and "second line" not in algo.compiled.reason
    _, oute, ge = rnngrad.eprop().step(net, se, x[0], y[0])
    assert grads_err(g, ge) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        algo.step(net, s, x[1], y[1])


class Branchy(MGU):
    """A user cell with value-dependent control flow: the compiler cannot trace it whole."""

    def step(self, params, state, x):
        new = super().step(params, state, x)
        if bool(new.h.sum() > 100.0):
            return type(new)(new.h * 0.5)
        return new


@pytest.mark.parametrize("pieces", [False])  # (in pieces, dynamo rejects the branch inside
def test_value_dependent_user_cell_runs_eagerly_or_in_pieces_with_the_reason(pieces):  # vjp)
    torch.manual_seed(0)
    net = rnngrad.Network([Branchy(D, 4)], K)  # (the vmapped rules refuse it; TBPTT takes it)
    eager = rnngrad.tbptt(2)
    comp = rnngrad.compile(rnngrad.tbptt(2), backend="aot_eager", pieces=pieces)
    x, y, _ = data(4, 2, torch.float64)
    se, sc = eager.init(net, 2), comp.init(net, 2)
    for t in range(4):
        se, oe, ge = eager.step(net, se, x[t], y[t])
        if t == 0 and not pieces:
            with pytest.warns(CompileWarning, match="runs eagerly"):
                sc, oc, gc = comp.step(net, sc, x[t], y[t])
        else:
            sc, oc, gc = comp.step(net, sc, x[t], y[t])
        assert grads_err(gc, ge) <= 1e-10
    assert comp.compiled.mode == ("pieces" if pieces else "eager") and comp.compiled.reason


def test_states_pass_between_eager_and_compiled():
    net = make("gru")
    eager, comp = rnngrad.snap1(), rnngrad.compile(rnngrad.snap1(), backend="aot_eager")
    ref = rnngrad.snap1()
    x, y, _ = data(6, 2, torch.float64)
    s, sr = eager.init(net, 2), ref.init(net, 2)
    for t in range(6):
        algo = comp if t % 2 else eager  # alternate: eager state in, compiled state out
        s, _, g = algo.step(net, s, x[t], y[t])
        sr, _, gr = ref.step(net, sr, x[t], y[t])
        assert grads_err(g, gr) <= 1e-10


def test_compile_bad_input():
    with pytest.raises(TypeError, match="takes an Algorithm"):
        rnngrad.compile("eprop")
    with pytest.raises(ValueError, match="unknown torch.compile backend 'nope'"):
        rnngrad.compile(rnngrad.eprop(), backend="nope")
    comp = rnngrad.compile(rnngrad.eprop(), backend="aot_eager")
    assert rnngrad.compile(comp) is comp and comp.name == rnngrad.eprop().name


# ---- the online API's silent cases (issue 16, item 4) ---------------------------------------

@pytest.mark.parametrize("rule", ["eprop", "rtrl", "snap1"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_integer_mask_in_the_models_dtype(rule, mask_dtype):
    net = make("rnn")
    x, y, _ = data(2, 3, torch.float64)
    m = torch.tensor([1, 0, 1]).to(mask_dtype)
    algo = RULES[rule]()
    s = algo.init(net, 3)
    _, out, g = algo.step(net, s, x[0], y[0], mask_t=m)
    algo = RULES[rule]()
    s = algo.init(net, 3)
    _, out_f, g_f = algo.step(net, s, x[0], y[0], mask_t=m.double())
    assert out.loss.dtype == torch.float64
    # 1/3 rounded through float32 would differ by ~1e-8 relative
    assert rel(out.loss, out_f.loss) <= 1e-15 and grads_err(g, g_f) <= 1e-15


def test_consumed_state_is_refused():
    net = make("rnn")  # leaky: e-prop's trace is updated in place
    algo = rnngrad.eprop()
    x, y, _ = data(3, 2, torch.float64)
    s0 = algo.init(net, 2)
    s1, _, _ = algo.step(net, s0, x[0], y[0])
    with pytest.raises(ValueError, match="already consumed"):
        algo.step(net, s0, x[1], y[1])
    s2, _, _ = algo.step(net, s1, x[1], y[1])  # the latest state still steps
    s2.h.zero_()  # resetting h in place between sequences is allowed
    algo.step(net, s2, x[2], y[2])


def test_consumed_state_is_refused_by_the_compiled_step():
    net = make("rnn")
    algo = rnngrad.compile(rnngrad.eprop(), backend="aot_eager")
    x, y, _ = data(2, 2, torch.float64)
    s0 = algo.init(net, 2)
    algo.step(net, s0, x[0], y[0])
    with pytest.raises(ValueError, match="already consumed"):
        algo.step(net, s0, x[1], y[1])


def test_state_of_another_algorithm_is_refused():
    net = make("stack")
    s = rnngrad.snap1().init(net, 2)
    x, y, _ = data(1, 2, torch.float64)
    with pytest.raises(TypeError, match=r"made by snap1\(\)"):
        rnngrad.rtrl(layers="spatial").step(net, s, x[0], y[0])
    s = rnngrad.eprop().init(make("rnn"), 2)
    with pytest.raises(TypeError, match="made by eprop"):
        rnngrad.eprop("random").step(make("rnn"), s, x[0], y[0])


# ---- the loss follows the readout (issue 16, item 6, the API) -------------------------------

@pytest.mark.parametrize("readout,loss", [("softmax", "cross_entropy"), ("sigmoid", "bce"),
                                          ("identity", "mse")])
def test_loss_follows_the_readout(readout, loss):
    torch.manual_seed(0)
    net = rnngrad.RNN(D, 4, 3, readout=readout, dtype=torch.float64)
    x = torch.randn(4, 2, D, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 2)) if loss == "cross_entropy" else torch.rand(4, 2, 3).double()
    v, g = rnngrad.gradient(net, x, y)
    v2, g2 = rnngrad.gradient(net, x, y, loss=loss)
    assert v == v2 and grads_err(g, g2) == 0.0
    algo = rnngrad.rtrl()
    _, out, gs = algo.step(net, algo.init(net, 2), x[0], y[0])
    algo = rnngrad.rtrl()
    _, out2, gs2 = algo.step(net, algo.init(net, 2), x[0], y[0], loss=loss)
    assert out.loss == out2.loss and grads_err(gs, gs2) == 0.0
    algo = rnngrad.eprop()  # a chunk (rnngrad.run) too
    _, out, gs = rnngrad.run(algo, net, algo.init(net, 2), x, y)
    algo = rnngrad.eprop()
    _, out2, gs2 = rnngrad.run(algo, net, algo.init(net, 2), x, y, loss=loss)
    assert out.loss == out2.loss and grads_err(gs, gs2) == 0.0


# ---- the per-call fast path (issue 14): what it skips cannot have changed --------------------

def test_consumed_state_is_refused_after_trusted_steps():
    net = make("rnn")  # leaky: e-prop's trace is updated in place
    algo = rnngrad.compile(rnngrad.eprop(), backend="aot_eager")
    eager = rnngrad.eprop()
    x, y, _ = data(5, 2, torch.float64)
    s0 = algo.init(net, 2)
    s1, _, _ = algo.step(net, s0, x[0], y[0])
    s2, _, _ = algo.step(net, s1, x[1], y[1])  # s1 was the last state: the fast path
    s3, _, _ = algo.step(net, s2, x[2], y[2])
    for old in (s1, s2):
        with pytest.raises(ValueError, match="already consumed"):
            algo.step(net, old, x[3], y[3])
        with pytest.raises(ValueError, match="already consumed"):
            eager.step(net, old, x[3], y[3])
    # the last state stepped by another path (the eager step): refused if that step consumed
    # it (wrote its buffers), else it steps to the eager step's numbers
    _, _, ge = eager.step(net, s3, x[3], y[3])
    try:
        _, _, gc = algo.step(net, s3, x[3], y[3])
    except ValueError as e:
        assert "already consumed" in str(e)
    else:
        assert grads_err(gc, ge) <= 1e-12
    # a state of another algorithm, or made by hand from the last one, is checked in full
    with pytest.raises(TypeError, match="made by"):
        algo.step(net, rnngrad.eprop("random").init(net, 2), x[4], y[4])
    s = algo.init(net, 2)
    s, _, _ = algo.step(net, s, x[0], y[0])
    bad = s._replace(h=torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"does not fit this model|expect \(3, 3\)"):
        algo.step(net, bad, x[1], y[1])


def test_trusted_steps_still_refuse_bad_inputs(monkeypatch):
    from rnngrad.algorithms import base

    checked = []
    real = base._check_state
    monkeypatch.setattr(base, "_check_state", lambda *a: checked.append(1) or real(*a))
    net = make("rnn")
    algo = rnngrad.compile(rnngrad.snap1(), backend="aot_eager")
    x, y, _ = data(4, 2, torch.float64)
    s = algo.init(net, 2)
    for t in range(3):
        s, _, _ = algo.step(net, s, x[t], y[t])
    assert len(checked) == 1  # the first step in full, then the fast path
    with pytest.raises(ValueError, match=r"x_t has shape \(2, 4\)"):
        algo.step(net, s, torch.zeros(2, 4, dtype=torch.float64), y[2])
    with pytest.raises(TypeError, match="float32"):
        algo.step(net, s, x[2].float(), y[2])
    with pytest.raises(ValueError, match="target_t has shape"):
        algo.step(net, s, x[2], y[2, :1])
    bad = x[2].clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="x_t"):
        algo.step(net, s, bad, y[2])
    # the model moved to another dtype in place: the state no longer fits, said clearly
    net32 = make("rnn")
    s = algo.init(net32, 2)
    s, _, _ = algo.step(net32, s, x[0], y[0])
    net32.float()
    with pytest.raises(TypeError, match="float"):
        algo.step(net32, s, x[1], y[1])


@pytest.mark.parametrize("kind", ["rnn", "gru", "alif"])
def test_parameters_changed_in_place_or_replaced_are_read(kind):
    net, ref = make(kind), make(kind)
    comp, eager = rnngrad.compile(rnngrad.snap1(), backend="aot_eager"), rnngrad.snap1()
    x, y, _ = data(9, 2, torch.float64)
    sc, se = comp.init(net, 2), eager.init(ref, 2)
    owner = (lambda m: m) if kind == "rnn" else (lambda m: m.cells[0])
    name = "W_hh" if kind == "gru" else "W_rec"
    for t in range(9):
        if t == 4:  # an optimizer's update: in place
            with torch.no_grad():
                for m in (net, ref):
                    getattr(owner(m), name).mul_(0.5)
                    m.W_out.add_(0.1)
        if t == 6:  # a parameter replaced by a new one
            w = torch.randn_like(getattr(owner(net), name))
            setattr(owner(net), name, torch.nn.Parameter(w.clone()))
            setattr(owner(ref), name, torch.nn.Parameter(w.clone()))
        sc, oc, gc = comp.step(net, sc, x[t], y[t])
        se, oe, ge = eager.step(ref, se, x[t], y[t])
        assert rel(oc.h, oe.h) <= 1e-12 and grads_err(gc, ge) <= 1e-12, t
    assert comp.compiled.direct  # (steps 3, 5, 8 at least went direct)


def test_another_model_with_other_constants_recompiles():
    # the guards kept on the model's constants (here alpha) tell the two models apart
    torch.manual_seed(0)
    a = rnngrad.RNN(D, 5, K, alpha=0.5, dtype=torch.float64)
    b = rnngrad.RNN(D, 5, K, alpha=1.0, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    comp = rnngrad.compile(rnngrad.eprop(), backend="aot_eager")
    x, y, _ = data(4, 2, torch.float64)
    states = {m: (comp.init(m, 2), rnngrad.eprop().init(m, 2)) for m in (a, b)}
    for t in range(4):
        for m in (a, b):
            sc, se = states[m]
            sc, oc, gc = comp.step(m, sc, x[t], y[t])
            se, oe, ge = rnngrad.eprop().step(m, se, x[t], y[t])
            states[m] = (sc, se)
            assert rel(oc.h, oe.h) <= 1e-12 and grads_err(gc, ge) <= 1e-12
    assert comp.compiled.graphs == 2


def test_cpp_wrapper_failure_falls_back_to_the_python_wrapper(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own deprecation warnings on import)
        import torch._inductor.compile_fx as cfx

    calls = []

    def fake(gm, example_inputs, config_patches=None, **kw):  # no C++ build: the FX graph
        calls.append(dict(config_patches or {}))
        if (config_patches or {}).get("cpp_wrapper"):
            raise RuntimeError("C++ wrapper build failed\nsecond line")
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake)
    net = make("rnn")
    algo = rnngrad.compile(rnngrad.eprop())  # inductor: the C++ wrapper by default
    x, y, _ = data(3, 2, torch.float64)
    s, se = algo.init(net, 2), rnngrad.eprop().init(net, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)  # silent
        for t in range(3):
            s, out, g = algo.step(net, s, x[t], y[t])
            se, oute, ge = rnngrad.eprop().step(net, se, x[t], y[t])
            assert grads_err(g, ge) <= 1e-12
    info = algo.compiled
    assert info.mode == "whole" and info.wrapper == "python", info
    assert "C++ wrapper build failed" in info.wrapper_reason and "second" not in info.wrapper_reason
    assert [c.get("cpp_wrapper") for c in calls] == [True, None]  # tried once, then not again
    # asked for explicitly: as asked, no fallback
    calls.clear()
    algo = rnngrad.compile(rnngrad.eprop(), options={"cpp_wrapper": False})
    algo.step(net, algo.init(net, 2), x[0], y[0])
    assert calls == [{"cpp_wrapper": False}] and algo.compiled.wrapper == "python"


def test_a_models_constant_changed_in_place_is_seen():
    net, ref = make("rnn"), make("rnn")  # alpha 0.5
    comp, eager = rnngrad.compile(rnngrad.eprop(), backend="aot_eager"), rnngrad.eprop()
    x, y, _ = data(8, 2, torch.float64)
    sc, se = comp.init(net, 2), eager.init(ref, 2)
    for t in range(8):
        if t == 5:  # after steps called directly: dynamo's guard on alpha, checked by them too
            net.alpha = ref.alpha = 0.8
        sc, oc, gc = comp.step(net, sc, x[t], y[t])
        se, oe, ge = eager.step(ref, se, x[t], y[t])
        assert rel(oc.h, oe.h) <= 1e-12 and grads_err(gc, ge) <= 1e-12, t
    assert comp.compiled.direct and comp.compiled.graphs == 2


class _Counting(NamedTuple):
    h: torch.Tensor
    n: int  # a Python number that changes from step to step


def _counting_rule():
    """A rule whose state holds a Python number that changes at every step (as UORO's
    position in its block of signs did before the draws moved outside the graph)."""
    from rnngrad.algorithms.base import Algorithm, StepOutput

    def init(model, batch_size, *, h0=None):
        return _Counting(torch.zeros(batch_size, model.hidden_size, dtype=model.W_out.dtype), 0)

    def step(model, state, x_t, target_t=None, *, mask_t=None, loss="mse", dh_t=None):
        with torch.no_grad():
            h = torch.tanh(x_t @ model.W_in.T + state.h @ model.W_rec.T + model.b_rec) * (
                1.0 + 0.0 * state.n)
            z = h @ model.W_out.T + model.b_out
        return state._replace(h=h, n=state.n + 1), StepOutput(h, z, z.sum() * 0.0), None

    return Algorithm("counting", init, step, lambda m, s: (s, None), False, True, "", None)


def test_a_step_that_recompiles_at_every_step_runs_eagerly_saying_so():
    # each value of the number is a new graph; after a few, the eager step, with the reason
    torch._dynamo.reset()
    net = make("rnn")
    comp, eager = rnngrad.compile(_counting_rule(), backend="aot_eager"), _counting_rule()
    x, y, _ = data(12, 2, torch.float64)
    sc, se = comp.init(net, 2), eager.init(net, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileWarning)
        for t in range(12):
            sc, oc, _ = comp.step(net, sc, x[t], y[t])
            se, oe, _ = eager.step(net, se, x[t], y[t])
            assert rel(oc.h, oe.h) <= 1e-12
    assert comp.compiled.mode == "eager" and "recompiled" in comp.compiled.reason
    assert sum("runs eagerly from now" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("rule", ["uoro", "kf_rtrl"])
def test_random_draws_outside_the_graph_one_compilation_over_blocks(rule):
    # UORO and KF-RTRL draw their signs a block of 32 steps at a time from a
    # torch.Generator, outside the compiled graph: one graph over 70 steps (three blocks),
    # called directly, the eager step's draws and numbers
    net = make("rnn")
    comp, eager = rnngrad.compile(RULES[rule](), backend="aot_eager"), RULES[rule]()
    x, y, _ = data(70, 2, torch.float64)
    sc, se = comp.init(net, 2), eager.init(net, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        for t in range(70):
            sc, oc, gc = comp.step(net, sc, x[t], y[t])
            se, oe, ge = eager.step(net, se, x[t], y[t])
            assert rel(oc.h, oe.h) <= 1e-12 and grads_err(gc, ge) <= 1e-12, t
    info = comp.compiled
    assert info.mode == "whole" and info.graphs == 1 and info.direct, info
    assert sc.sign_pos == se.sign_pos and torch.equal(sc.signs, se.signs)


@pytest.mark.parametrize("kind", ["rnn", "elman", "mgu"])
def test_tbptt_compiles_two_graphs_whatever_k(kind):
    """Issue 14: TBPTT's pending steps are kept outside the compiled graph (tbptt._compile_io),
    so a long window compiles one graph that stores and one that emits, not one per position."""
    net = make(kind)
    k, T, B = 12, 40, 2
    eager = rnngrad.tbptt(k)
    comp = rnngrad.compile(rnngrad.tbptt(k), backend="aot_eager")
    x, y, mask = data(T, B, torch.float64)
    se, sc = eager.init(net, B), comp.init(net, B)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)  # no fallback, no recompilation warned
        for t in range(T):
            se, oe, ge = eager.step(net, se, x[t], y[t], mask_t=mask[t])
            sc, oc, gc = comp.step(net, sc, x[t], y[t], mask_t=mask[t])
            assert rel(oc.h, oe.h) <= 1e-10 and rel(oc.loss, oe.loss) <= 1e-10
            assert (gc is None) == (t % k != k - 1)
            assert grads_err(gc, ge) <= 1e-10
    assert len(sc.chunk.xs) == len(se.chunk.xs) == T % k
    se, ge = eager.flush(net, se)
    sc, gc = comp.flush(net, sc)
    assert grads_err(gc, ge) <= 1e-10
    info = comp.compiled
    assert info.mode == "whole" and info.graphs <= 2, info


def test_tbptt_compiled_with_h0_and_dh_keeps_the_eager_numbers_in_three_graphs():
    """With h0 given, the first chunk emits grads["h0"]: one more emitting graph, no more."""
    net = make("rnn")
    k, T, B = 5, 23, 2
    eager = rnngrad.tbptt(k)
    comp = rnngrad.compile(rnngrad.tbptt(k), backend="aot_eager")
    x, y, _ = data(T, B, torch.float64)
    dh = torch.randn(T, B, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h0 = torch.randn(B, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    se, sc = eager.init(net, B, h0=h0), comp.init(net, B, h0=h0)
    for t in range(T):
        se, oe, ge = eager.step(net, se, x[t], y[t], dh_t=dh[t])
        sc, oc, gc = comp.step(net, sc, x[t], y[t], dh_t=dh[t])
        assert grads_err(gc, ge) <= 1e-10
        assert (gc is not None and "h0" in gc) == (t == k - 1)
    assert grads_err(comp.flush(net, sc)[1], eager.flush(net, se)[1]) <= 1e-10
    assert comp.compiled.mode == "whole" and comp.compiled.graphs <= 3, comp.compiled


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("rule", ["eprop", "snap1"])
def test_lstm_fused_trace_update_keeps_the_eager_numbers(rule, B, monkeypatch):
    # under compilation the LSTM's two-component trace update is one fused expression
    # (_traces_network._advance_fused; at B > 1 the contraction a bmm): the eager numbers
    from rnngrad.algorithms import _traces_network as tn

    calls = []
    real = tn._advance_fused
    monkeypatch.setattr(tn, "_advance_fused", lambda *a: calls.append(1) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        err, info = compare(rule, "lstm", torch.float64, "aot_eager", B=B)
    assert info.mode == "whole" and err <= TOL[torch.float64], (err, info)
    assert calls, "the fused path was not taken"
