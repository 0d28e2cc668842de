"""A user's cell cannot be silently wrong: what ``rnngrad.Network`` checks of it.

When the network is built: ``step`` and ``output``/``emit`` read every parameter through
``params`` (a parameter read through ``self`` would get a zero gradient from every
algorithm), read every parameter at all, and change nothing in place. When the network is
first used: what the cell declares by hand (``linearize``, ``backward_sequence``, ...)
agrees with the torch.func derivation of its step. A step torch.func cannot transform
gets a one-line explanation naming the algorithms that need a functional step.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

import rnngrad
from rnngrad.cells import GRU, Cell, Elman, Immediate, Linearization
from rnngrad.check import reference_gradient, relative_error
from tests.cell_zoo import MGU, BrokenElman

DT = torch.float64
D, H, K, T, B = 3, 4, 2, 5, 3


class HState(NamedTuple):
    h: torch.Tensor


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, B, D, generator=g, dtype=DT),
            torch.randn(T, B, K, generator=g, dtype=DT))


class Plain(Cell):
    """h' = tanh(W x + U h + b), read through params (the right way)."""

    def __init__(self, input_size=D, hidden_size=H):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        g = torch.Generator().manual_seed(1)
        self.W = nn.Parameter(0.5 * torch.randn(hidden_size, input_size, generator=g, dtype=DT))
        self.U = nn.Parameter(0.5 * torch.randn(hidden_size, hidden_size, generator=g, dtype=DT))
        self.b = nn.Parameter(0.1 * torch.randn(hidden_size, generator=g, dtype=DT))

    def init_state(self, batch_size):
        return HState(self.W.new_zeros(batch_size, self.hidden_size))

    def step(self, params, state, x):
        return HState(torch.tanh(x @ params["W"].T + state.h @ params["U"].T + params["b"]))

    def output(self, state):
        return state.h


# ---- parameters read through self --------------------------------------------------------


class SelfInStep(Plain):
    def step(self, params, state, x):
        return HState(torch.tanh(x @ params["W"].T + state.h @ self.U.T + params["b"]))


class SelfDetached(Plain):  # no autograd edge to self.U: found by its value
    def step(self, params, state, x):
        return HState(torch.tanh(x @ params["W"].T + state.h @ self.U.detach().T + params["b"]))


class SelfInOutput(Plain):
    def output(self, state):
        return state.h * self.b


class SelfInEmit(Plain):
    def emit(self, params, state, x):
        return state.h + x.sum(-1, keepdim=True) * self.b


class Submodule(Cell):
    """A cell holding an nn.Linear and calling it: the usual way to read through self."""

    def __init__(self):
        super().__init__()
        self.input_size, self.hidden_size = D, H
        self.lin = nn.Linear(D + H, H, dtype=DT)

    def init_state(self, batch_size):
        return HState(torch.zeros(batch_size, H, dtype=DT))

    def step(self, params, state, x):
        return HState(torch.tanh(self.lin(torch.cat((x, state.h), -1))))

    def output(self, state):
        return state.h


class LearnedH0(Plain):  # read by init_state only: no algorithm differentiates that
    def __init__(self):
        super().__init__()
        self.h0 = nn.Parameter(torch.zeros(H, dtype=DT))

    def init_state(self, batch_size):
        return HState(self.h0.detach().expand(batch_size, H).clone())


@pytest.mark.parametrize("cell, method, name", [
    (SelfInStep, "step", "U"), (SelfDetached, "step", "U"), (SelfInOutput, "output", "b"),
    (SelfInEmit, "emit", "b")])
def test_a_parameter_read_through_self_is_refused(cell, method, name):
    with pytest.raises(ValueError, match=rf"cells\[0\] \({cell.__name__}\): {cell.__name__}"
                                         rf"\.{method} reads parameter '{name}' through self .* "
                                         rf"zero gradient .* write params\['{name}'\] instead "
                                         rf"of self\.{name}"):
        rnngrad.Network(cell(), K)


def test_a_frozen_parameter_read_through_self_is_refused():
    c = SelfInStep()
    c.U.requires_grad_(False)
    with pytest.raises(ValueError, match=r"reads parameter 'U' through self"):
        rnngrad.Network(c, K)


def test_output_read_through_self_says_to_write_emit():
    with pytest.raises(ValueError, match=r"output\(state\) has no params: .* writes "
                                         r"emit\(params, state, x\) instead"):
        rnngrad.Network(SelfInOutput(), K)


def test_a_submodule_called_through_self_shows_functional_call():
    with pytest.raises(ValueError, match=r"reads parameter 'lin\.\w+' through self .* "
                                         r"torch\.func\.functional_call\(self\.lin, \{'weight': "
                                         r"params\['lin\.weight'\], 'bias': params\['lin\.bias'\]\}"):
        rnngrad.Network(Submodule(), K)


def test_parameter_containers_read_through_self():
    class Listed(Plain):
        def __init__(self):
            super().__init__()
            self.extra = nn.ParameterList([nn.Parameter(torch.ones(H, dtype=DT))])
            self.named = nn.ParameterDict({"g": nn.Parameter(torch.ones(H, dtype=DT))})

        def step(self, params, state, x):
            h = super().step(params, state, x).h
            return HState(h * params["named.g"] * self.extra[0])

    with pytest.raises(ValueError, match=r"reads parameter 'extra\.0' through self .* write "
                                         r"params\['extra\.0'\] instead of self\.extra\[0\]"):
        rnngrad.Network(Listed(), K)


def test_a_parameter_no_step_reads_is_refused():
    with pytest.raises(ValueError, match=r"parameter 'h0' of LearnedH0 is not read through "
                                         r"params by step or output.*zero gradient.*h0="):
        rnngrad.Network(LearnedH0(), K)


def test_the_wrong_cells_gave_zero_gradients():
    """Why the checks exist: built past them, the self-read parameter's gradient is zero
    by every algorithm while autograd's is not."""
    from rnngrad.cells import _derive

    c = SelfInStep()
    net = rnngrad.Network(Plain(), K)
    net.cells[0] = c  # bypass the constructor's check
    x, y = data()
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.bptt())
    assert float(g["cells.0.U"].abs().max()) == 0.0
    (ref,) = torch.autograd.grad(net(x)[0].square().sum(), c.U)  # through the module's own U
    assert float(ref.abs().max()) > 1e-3
    with pytest.raises(ValueError, match="reads parameter 'U' through self"):
        _derive.verify_reads(c, "c")


def test_the_check_leaves_the_modules_tensors_alone():
    c = Plain()
    before = {n: (p, p.detach().clone(), p._version) for n, p in c.named_parameters()}
    rnngrad.Network(c, K)
    for n, p in c.named_parameters():
        obj, val, ver = before[n]
        assert p is obj and torch.equal(p, val) and p._version == ver


@pytest.mark.parametrize("cell", [Plain, MGU, BrokenElman])
def test_cells_that_read_params_pass(cell):
    rnngrad.Network(cell(D, H), K, verify=False)


# ---- in place ------------------------------------------------------------------------------


class InPlaceState(Plain):
    def step(self, params, state, x):
        h = state.h
        h.mul_(0.5)
        return HState(torch.tanh(x @ params["W"].T + h @ params["U"].T + params["b"]))


class Counter(Plain):
    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=DT))

    def step(self, params, state, x):
        self.steps += 1
        return super().step(params, state, x)


def test_a_step_that_changes_its_state_in_place_is_refused():
    with pytest.raises(ValueError, match=r"InPlaceState\.step changes its argument state\.h in "
                                         r"place .* write it out of place"):
        rnngrad.Network(InPlaceState(), K)


def test_verify_false_skips_the_construction_checks_too():
    net = rnngrad.Network(Counter(), K, verify=False)
    assert not net._pending_verify
    rnngrad.Network(SelfInStep(), K, verify=False)


def test_a_step_that_changes_a_buffer_is_refused():
    with pytest.raises(ValueError, match=r"Counter\.step changes its buffer 'steps' in place "
                                         r".* keep what changes over time in the state"):
        rnngrad.Network(Counter(), K)


# ---- steps torch.func cannot transform -----------------------------------------------------


class Branch(Plain):
    def step(self, params, state, x):
        a = x @ params["W"].T + state.h @ params["U"].T + params["b"]
        if a.sum() > 0:
            return HState(torch.tanh(a))
        return HState(torch.sigmoid(a))


class LocalInPlace(Plain):
    def step(self, params, state, x):
        a = torch.zeros(x.shape[0], H, dtype=x.dtype)
        a += x @ params["W"].T + state.h @ params["U"].T + params["b"]
        return HState(torch.tanh(a))


def test_value_dependent_control_flow_names_the_algorithms_and_the_fix():
    net = rnngrad.Network(Branch(), K)
    x, y = data()
    _, ref = reference_gradient(net, x, y)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.bptt())  # a vjp follows the branch
    assert relative_error(g, ref) < 1e-10
    for algo in (rnngrad.rtrl(), rnngrad.snap1(), rnngrad.eprop(), rnngrad.uoro()):
        with pytest.raises(TypeError, match=r"Branch\.step uses a tensor's value in Python .* "
                                            r"rtrl\(\), snap1\(\), eprop\(\) and uoro\(\) .* "
                                            r"torch\.where\(cond, a, b\) .* bptt\(\) and "
                                            r"tbptt\(k\) take only a vjp"):
            rnngrad.gradient(net, x, y, algorithm=algo)


def test_an_in_place_update_under_vmap_is_explained():
    net = rnngrad.Network(LocalInPlace(), K)
    x, y = data()
    _, ref = reference_gradient(net, x, y)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.bptt())
    assert relative_error(g, ref) < 1e-10
    with pytest.raises(TypeError, match=r"LocalInPlace\.step updates a tensor in place .* "
                                        r"Write it out of place"):
        rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl())


def test_random_numbers_in_step_are_explained():
    class Noisy(Plain):
        def step(self, params, state, x):
            h = super().step(params, state, x).h
            return HState(h + 0.01 * torch.randn(h.shape, dtype=h.dtype))

    net = rnngrad.Network(Noisy(), K)
    x, y = data()
    rnngrad.gradient(net, x, y, algorithm=rnngrad.bptt())
    with pytest.raises(TypeError, match=r"Noisy\.step draws random numbers .* Draw the noise "
                                        r"outside and pass it in through x"):
        rnngrad.gradient(net, x, y, algorithm=rnngrad.snap1())


def test_other_errors_of_a_users_step_pass_through():
    class Raises(Plain):
        armed = False

        def step(self, params, state, x):
            if Raises.armed:  # past the constructor's probes
                raise RuntimeError("my own error")
            return super().step(params, state, x)

    net = rnngrad.Network(Raises(), K)
    Raises.armed = True
    x, y = data()
    with pytest.raises(RuntimeError, match="my own error"):
        rnngrad.gradient(net, x, y)


# ---- declared structure, checked at first use ----------------------------------------------


class DeclaredElman(Cell):
    """A user's cell that declares everything by delegating to rnngrad's Elman, with
    ``scale`` applied to one declared quantity (1.0: correct)."""

    def __init__(self, what=None, scale=1.0, input_size=D, hidden_size=H):
        super().__init__()
        torch.manual_seed(3)
        self.inner = Elman(input_size, hidden_size, dtype=DT)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.what, self.scale = what, scale

    def _own(self, params):
        return {k.removeprefix("inner."): v for k, v in params.items()}

    def param_blocks(self):
        return {"inner." + k: v for k, v in self.inner.param_blocks().items()}

    def init_state(self, batch_size):
        return self.inner.init_state(batch_size)

    def step(self, params, state, x):
        return self.inner.step(self._own(params), state, x)

    def output(self, state):
        return state.h

    def _s(self, what, v):
        return v * self.scale if self.what == what else v

    def linearize(self, params, state, x, *, need=()):
        lin = self.inner.linearize(self._own(params), state, x, need=need)
        imm = None
        if lin.immediate is not None:
            imm = {"inner." + k: Immediate(self._s("immediate", v.D), v.inp)
                   for k, v in lin.immediate.items()}
        return Linearization(
            lin.state,
            local=None if lin.local is None else self._s("local", lin.local),
            eligibility=lin.eligibility, immediate=imm,
            jacobian=None if lin.jacobian is None else self._s("jacobian", lin.jacobian),
            input_jacobian=None if lin.input_jacobian is None
            else self._s("input_jacobian", lin.input_jacobian))

    def forward_sequence(self, params, inputs, state0, *, cache=False):
        return self.inner.forward_sequence(self._own(params), inputs, state0, cache=cache)

    def backward_sequence(self, params, inputs, state0, cache, d_outputs, d_state=None, *,
                          input_grad=True):
        g, dx, d0 = self.inner.backward_sequence(self._own(params), inputs, state0, cache,
                                                 d_outputs, d_state, input_grad=input_grad)
        return {"inner." + k: self._s("bptt", v) for k, v in g.items()}, dx, d0


def test_correct_declarations_pass_and_are_checked_once(monkeypatch):
    from rnngrad.cells import _derive

    calls = []
    real = _derive._check_declared
    monkeypatch.setattr(_derive, "_check_declared", lambda *a: calls.append(a) or real(*a))
    net = rnngrad.Network(DeclaredElman(), K)
    x, y = data()
    _, ref = reference_gradient(net, x, y)
    for algo in (rnngrad.bptt(), rnngrad.rtrl(), rnngrad.snap1()):
        _, g = rnngrad.gradient(net, x, y, algorithm=algo)
    assert relative_error(rnngrad.gradient(net, x, y)[1], ref) < 1e-10
    assert len(calls) == 1
    assert sorted(calls[0][2]) == ["immediate", "input_jacobian", "jacobian", "local",
                                   "sequence"]


@pytest.mark.parametrize("what, declared", [
    ("bptt", r"backward_sequence \(the gradient of 'inner\.\w+'\)"),
    ("local", r"local_jacobian"), ("jacobian", r"jacobian \(d s_t / d s_t-1\)"),
    ("input_jacobian", r"input_jacobian \(d s_t / d x_t\)"), ("immediate", r"immediate for parameter 'inner\.\w+'")])
def test_a_wrong_declaration_is_refused_at_first_use(what, declared):
    net = rnngrad.Network(DeclaredElman(what, 0.8), K)  # building checks no declaration
    x, y = data()
    with pytest.raises(ValueError, match=rf"cells\[0\] \(DeclaredElman\): DeclaredElman's own "
                                         rf"{declared} disagrees with the torch\.func derivation "
                                         rf".*relative error 0\.2.*rnngrad check --cell.*"
                                         rf"verify=False"):
        rnngrad.gradient(net, x, y, algorithm=rnngrad.rtrl())


def test_the_switch_turns_the_check_off_and_the_gradient_is_then_wrong():
    """What the check prevents: bptt through the wrong backward_sequence, 20% off."""
    net = rnngrad.Network(DeclaredElman("bptt", 0.8), K, verify=False)
    x, y = data()
    _, ref = reference_gradient(net, x, y)
    _, g = rnngrad.gradient(net, x, y, algorithm=rnngrad.bptt())
    assert relative_error(g, ref) == pytest.approx(0.2, abs=1e-9)
    with pytest.raises(TypeError, match="verify must be a bool"):
        rnngrad.Network(Plain(), K, verify="no")


def test_a_subclass_of_a_built_in_cell_is_checked():
    """The inherited hand-derived linearize and backward_sequence no longer match a new
    step: caught at first use (built-in cells themselves are not re-checked)."""

    class Tweaked(GRU):
        def step(self, params, state, x):
            return type(state)(0.9 * super().step(params, state, x).h)

    net = rnngrad.Network(Tweaked(D, H, dtype=DT), K)
    x, y = data()
    with pytest.raises(ValueError, match=r"Tweaked's own .* disagrees"):
        rnngrad.gradient(net, x, y)
    assert not rnngrad.Network(GRU(D, H, dtype=DT), K)._pending_verify


def test_a_wrong_declaration_is_caught_by_forward_too():
    net = rnngrad.Network(BrokenElman(D, H), K)
    with pytest.raises(ValueError, match=r"BrokenElman's own backward_sequence \(the gradient "
                                         r"of 'inner\.W_rec'\) .*relative error 0\.001"):
        net(data()[0])
    # the check raised, so it is still pending: the next use checks again
    with pytest.raises(ValueError, match="BrokenElman's own"):
        net(data()[0])


BUILT_IN = {
    "elman": lambda: Elman(D, H, dtype=DT),
    "elman-leaky": lambda: Elman(D, H, alpha=0.4, activation="softplus", dtype=DT),
    "gru": lambda: GRU(D, H, dtype=DT),
    "lstm": lambda: rnngrad.cells.LSTM(D, H, dtype=DT),
    "lif": lambda: rnngrad.cells.LIF(D, H, dtype=DT),
    "alif": lambda: rnngrad.cells.ALIF(D, H, t_ref=2.0, dtype=DT),
    "lru": lambda: rnngrad.cells.LRU(D, H, state_size=3, glu=True, dtype=DT),
    "lru-block": lambda: rnngrad.cells.LRU(H, H, state_size=3, norm=True, glu=True,
                                           residual=True, dtype=DT),
    "elstm": lambda: rnngrad.cells.ELSTM(D, H, dtype=DT)}


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_every_built_in_cell_passes_the_checks_it_skips(name):
    """No false alarm: the checks a user's cell pays, run by hand on rnngrad's own cells
    (whose declarations the test suite verifies against autograd), all pass, and the
    declared structure is compared for real (torch.func derives every built-in step)."""
    from rnngrad.cells import _derive

    torch.manual_seed(0)
    c = BUILT_IN[name]()
    _derive.verify_pure(c, name)
    _derive.verify_reads(c, name)
    fields = _derive._declared(c)
    assert {"local", "immediate", "jacobian", "input_jacobian"} <= set(fields)
    _derive._check_declared(c, name, fields)
    assert not rnngrad.Network(c, K)._pending_verify


def test_a_declaration_that_raises_is_left_to_the_algorithm_that_asks_for_it():
    """A linearize that offers only some fields: the others are not compared (the first-use
    check does not block bptt), and the fields it does return still are."""

    class OnlyLocal(DeclaredElman):
        def linearize(self, params, state, x, *, need=()):
            if set(need) - {"local"}:
                raise NotImplementedError("only local")
            return super().linearize(params, state, x, need=need)

        backward_sequence = Cell.backward_sequence  # the torch.func default
        forward_sequence = Cell.forward_sequence

    x, y = data()
    net = rnngrad.Network(OnlyLocal(), K)
    _, ref = reference_gradient(net, x, y)
    assert relative_error(rnngrad.gradient(net, x, y)[1], ref) < 1e-10
    with pytest.raises(ValueError, match=r"OnlyLocal's own local_jacobian disagrees"):
        rnngrad.gradient(rnngrad.Network(OnlyLocal("local", 0.8), K), x, y)
