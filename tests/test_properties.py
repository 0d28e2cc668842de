"""Property tests (hypothesis) of every public entry point under hostile input.

Each example builds a valid problem, then spoils one argument with a bad value drawn
from a catalogue (wrong shape, dtype, device, type, NaN/Inf, out-of-range class,
transposed, shared, ...). The call must end in one of two ways:

- a ``ValueError`` or ``TypeError`` (``rnngrad.NonFiniteError`` is a ``ValueError``) whose
  message names the argument that was spoiled; or
- when the "bad" value is in fact valid (a transposed mask, a bool mask, a shared h0),
  a result equal to autograd's (``rnngrad.check.reference_gradient``, float64, 1e-9).

Anything else (an ``IndexError``, ``RuntimeError``, ``AttributeError`` from deep inside
torch, a silent NaN) fails. ``STATS`` counts what was tried and how it ended; the
session prints it with ``-s`` and writes it to ``$RNNGRAD_PROPERTY_STATS`` when set.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnngrad
from rnngrad.cells import GRU, LSTM, Elman
from rnngrad.check import reference_gradient, relative_error
from rnngrad.registry import ALGORITHMS, get_algorithm

STATS: collections.Counter = collections.Counter()
SETTINGS = settings(max_examples=int(os.environ.get("RNNGRAD_PROPERTY_EXAMPLES", "1000")),
                    deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
T, B, D, H, K = 4, 3, 2, 5, 7  # all distinct: a spoiled shape cannot pass by coincidence


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("RNNGRAD_PROPERTY_STATS")
    if path:
        with open(path, "w") as f:
            json.dump(dict(STATS), f, indent=1, sort_keys=True)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- models, data and the catalogue of bad values ------------------------------------------

MODELS = {
    "rnn": lambda: rnngrad.RNN(D, H, K, dtype=torch.float64),
    "rnn_leaky_softmax": lambda: rnngrad.RNN(D, H, K, alpha=0.5, activation="softplus",
                                             readout="softmax", dtype=torch.float64),
    "gru": lambda: rnngrad.Network(GRU(D, H, dtype=torch.float64), K),
    "lstm_elman": lambda: rnngrad.Network([LSTM(D, H, dtype=torch.float64),
                                           Elman(H, H, dtype=torch.float64)], K,
                                          readout="softmax"),
}
ALGOS = ["bptt", "tbptt:2", "bptt_ckpt:2", "rtrl", "rtrl_generic", "eprop", "eprop_rand",
         "rflo", "snap1", "uoro", "kf_rtrl"]
assert set(a.split(":")[0] for a in ALGOS) == set(ALGORITHMS)
EXACT = {"bptt", "bptt_ckpt:2", "rtrl", "rtrl_generic"}


def problem(model_name: str, seed: int, loss: str):
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, K, (T, B), generator=g)
    else:
        y = torch.rand(T, B, K, generator=g, dtype=torch.float64)
    return model, x, y


def loss_for(model) -> str:
    return "cross_entropy" if model.readout == "softmax" else "mse"


def bad_tensor_values(ref: torch.Tensor, *, name: str, shared_ok: bool = False,
                      per_step_ok: bool = False):
    """(label, value, valid) variations of a tensor argument. ``shared_ok``: a (n,) form of
    a (B, n) argument is valid (h0 shared by the batch); ``per_step_ok``: a (T,) form of a
    (T, B) argument is valid (a mask per step)."""
    out = []
    shape = tuple(ref.shape)
    out.append(("drop_dim", ref[0].clone(), shared_ok))
    if per_step_ok:
        out.append(("per_step", ref[:, 0].clone(), True))
    out.append(("extra_dim", ref.unsqueeze(0).clone(), False))
    bigger = list(shape)
    bigger[-1] += 1
    out.append(("last_dim+1", torch.zeros(bigger, dtype=ref.dtype), False))
    if len(shape) > 1:
        swapped = list(shape)
        swapped[0], swapped[1] = swapped[1] + 1, swapped[0]
        out.append(("wrong_leading", torch.zeros(swapped, dtype=ref.dtype), False))
    out.append(("list", ref.tolist(), False))
    out.append(("numpy", ref.numpy(), False))
    out.append(("string", "zeros", False))
    out.append(("int", 3, False))
    if ref.is_floating_point():
        out.append(("int_dtype", ref.long(), False))
        out.append(("complex", ref.to(torch.complex128), False))
        out.append(("float32", ref.float(), False))
        out.append(("meta_device", ref.to("meta"), False))
        for v in (float("nan"), float("inf"), -float("inf")):
            bad = ref.clone()
            bad.view(-1)[bad.numel() // 2] = v
            out.append((f"has_{v}", bad, False))
        if ref.dim() >= 2:
            t = ref.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
            out.append(("non_contiguous", t, True))
    return out


def assert_names(exc: Exception, *names: str):
    msg = str(exc)
    assert any(n in msg for n in names), f"{type(exc).__name__}: {msg!r} names none of {names}"


def outcome(label: str, fn, *, names, check=None):
    """Run ``fn``; a ValueError/TypeError must name the argument; success must pass check."""
    STATS["tried"] += 1
    STATS[f"tried:{label.split(':')[0]}"] += 1
    try:
        result = fn()
    except (ValueError, TypeError) as e:
        STATS[f"error:{type(e).__name__}"] += 1
        assert_names(e, *names)
        return None
    STATS["ok"] += 1
    if check is not None:
        check(result)
    return result


# ---- gradient() -----------------------------------------------------------------------------


@SETTINGS
@given(model_name=st.sampled_from(sorted(MODELS)), algo=st.sampled_from(ALGOS),
       arg=st.sampled_from(["inputs", "targets", "mask", "h0"]), which=st.integers(0, 30),
       seed=st.integers(0, 3))
def test_gradient_with_one_spoiled_tensor(model_name, algo, arg, which, seed):
    model = MODELS[model_name]()
    loss = loss_for(model)
    model, x, y = problem(model_name, seed, loss)
    mask = torch.ones(T, B, dtype=torch.float64)
    h0 = None
    if arg == "h0":
        if model_name.startswith("rnn"):
            h0 = torch.randn(B, H, dtype=torch.float64) * 0.5
        else:
            h0 = net_state(model)
    kwargs = {"inputs": x, "targets": y, "mask": mask, "h0": h0}
    ref_value = kwargs[arg] if arg != "h0" or isinstance(h0, torch.Tensor) else None
    if arg == "h0" and not isinstance(h0, torch.Tensor):
        # a network's state: spoil one component of the first layer
        comp = h0[0][0]
        variations = bad_tensor_values(comp, name="h0", shared_ok=True)
        label, value, valid = variations[which % len(variations)]
        spoiled = (type(h0[0])(value, *h0[0][1:]),) + tuple(h0[1:])
    else:
        variations = bad_tensor_values(ref_value, name=arg, shared_ok=arg == "h0",
                                       per_step_ok=arg == "mask")
        label, value, valid = variations[which % len(variations)]
        spoiled = value
    if arg == "mask" and label in ("int_dtype", "float32"):
        valid = True  # masks are weights of any real dtype, cast to the model's
    kwargs[arg] = spoiled
    a = get_algorithm(algo)
    names = (arg,)
    if arg == "inputs" and label in ("drop_dim", "wrong_leading", "extra_dim"):
        names += ("targets", "mask")  # T or B read off inputs: the first disagreeing argument
    if algo in ("rflo", "kf_rtrl") and not model_name.startswith("rnn"):
        names += ("Elman",)  # the rule refuses the model; either error is clear

    def call():
        return rnngrad.gradient(model, kwargs["inputs"], kwargs["targets"], algorithm=a,
                                loss=loss, mask=kwargs["mask"], h0=kwargs["h0"])

    def check(result):
        _, grads = result
        assert valid, f"{arg}={label} was accepted: {algo} on {model_name}"
        assert all(torch.isfinite(g).all() for k, g in grads.items() if isinstance(g, torch.Tensor))
        if algo in EXACT:
            _, ref = reference_gradient(model, to_plain(kwargs["inputs"]), kwargs["targets"],
                                        loss=loss, mask=to_plain(kwargs["mask"]),
                                        h0=expand_h0(model, kwargs["h0"]))
            if "h0" in grads and isinstance(kwargs["h0"], torch.Tensor) and kwargs["h0"].dim() == 1:
                ref["h0"] = ref["h0"].sum(0)
            elif "h0" in grads and not isinstance(kwargs["h0"], torch.Tensor):
                ref.pop("h0")
                grads = {k: v for k, v in grads.items() if k != "h0"}
            assert relative_error(grads, ref) <= 1e-9
            STATS["checked_against_autograd"] += 1

    outcome(f"gradient:{arg}:{label}", call, names=names, check=check)


def to_plain(t):
    return t.contiguous() if isinstance(t, torch.Tensor) else t


def expand_h0(model, h0):
    if h0 is None:
        return None
    if isinstance(h0, torch.Tensor):
        return h0.expand(B, -1).contiguous() if h0.dim() == 1 else h0
    return model.coerce_state(h0, B)[0]


def net_state(model):
    g = torch.Generator().manual_seed(7)
    return tuple(type(s)(*(0.5 * torch.randn(c.shape, generator=g, dtype=c.dtype) for c in s))
                 for s in model.init_state(B))


@SETTINGS
@given(model_name=st.sampled_from(sorted(MODELS)), algo=st.sampled_from(ALGOS),
       which=st.integers(0, 40))
def test_gradient_with_spoiled_options(model_name, algo, which):
    model = MODELS[model_name]()
    loss = loss_for(model)
    model, x, y = problem(model_name, 0, loss)
    a = get_algorithm(algo)
    options = [
        ("loss_unknown", {"loss": "hinge"}, ("loss",)),
        ("loss_type", {"loss": 3}, ("loss",)),
        ("loss_readout", {"loss": "bce"}, ("loss", "readout")),
        ("algorithm_string", {"algorithm": "bptt"}, ("algorithm",)),
        ("algorithm_none_targets", {"targets": None}, ("targets", "reward")),
        ("reward_not_callable", {"reward": 3.0}, ("reward",)),
        ("reward_vector", {"reward": lambda h: h.sum(0)}, ("reward",)),
        ("reward_int", {"reward": lambda h: torch.tensor(3)}, ("reward",)),
        ("reward_float", {"reward": lambda h: h.detach().sum().item()}, ("reward",)),
        ("reward_detached", {"reward": lambda h: h.detach().sum()}, ("reward",)),
        ("reward_nan", {"reward": lambda h: h.sum() * float("nan")}, ("reward",)),
        ("reward_inf_grad", {"reward": lambda h: (h * float("inf")).sum()}, ("reward",)),
        ("reward_numpy", {"reward": lambda h: np.float64(1.0)}, ("reward",)),
        ("reward_complex", {"reward": lambda h: h.sum().to(torch.complex128)}, ("reward",)),
        ("model_linear", {"model": torch.nn.Linear(2, 2)}, ("model",)),
        ("model_none", {"model": None}, ("model",)),
        ("set_grad_string", {"set_grad": "yes"}, ("set_grad",)),
        ("param_nan", {"param": float("nan")}, ("parameter",)),
        ("param_inf", {"param": float("inf")}, ("parameter",)),
        ("targets_class_high", {"targets_class": K}, ("targets", "class")),
        ("targets_class_neg", {"targets_class": -1}, ("targets", "class")),
        ("targets_float_for_ce", {"targets_float": True}, ("targets",)),
        ("reward_ok", {"reward": lambda h: (h.sin() * 0.3).sum()}, ()),
    ]
    label, opt, names = options[which % len(options)]
    kwargs = {"model": model, "inputs": x, "targets": y, "algorithm": a, "loss": loss}
    # bce reads z as logits: valid with an identity readout (and [0, 1] targets), not softmax
    valid = label == "reward_ok" or (label == "loss_readout" and model.readout == "identity")
    if "param" in opt:
        with torch.no_grad():
            next(iter(model.parameters())).view(-1)[0] = opt["param"]
    elif "targets_class" in opt:
        if loss != "cross_entropy":
            y = torch.zeros(T, B, dtype=torch.long)
            kwargs["loss"] = "cross_entropy"
            if model.readout not in ("identity", "softmax"):
                return
        kwargs["targets"] = y.clone()
        kwargs["targets"][0, 0] = opt["targets_class"]
    elif "targets_float" in opt:
        kwargs["loss"] = "cross_entropy"
        kwargs["targets"] = torch.rand(T, B, dtype=torch.float64)
    else:
        kwargs.update(opt)
    if algo in ("rflo", "kf_rtrl") and not model_name.startswith("rnn"):
        names = names + ("Elman",)
    model_arg = kwargs.pop("model")

    def call():
        return rnngrad.gradient(model_arg, kwargs.pop("inputs"), **kwargs)

    def check(result):
        assert valid, f"{label} was accepted ({algo} on {model_name})"

    outcome(f"gradient_option:{label}", call, names=names or ("",), check=check)


# ---- the online interface -------------------------------------------------------------------


@SETTINGS
@given(model_name=st.sampled_from(sorted(MODELS)), algo=st.sampled_from(ALGOS),
       arg=st.sampled_from(["batch_size", "h0", "x_t", "target_t", "mask_t", "dh_t", "state",
                            "model", "loss"]),
       which=st.integers(0, 30))
def test_online_with_one_spoiled_argument(model_name, algo, arg, which):
    model = MODELS[model_name]()
    loss = loss_for(model)
    model, x, y = problem(model_name, 0, loss)
    a = get_algorithm(algo)
    if algo in ("rflo", "kf_rtrl") and not model_name.startswith("rnn"):
        outcome("online:unsupported", lambda: a.init(model, B), names=("Elman",))
        return
    if arg == "batch_size":
        bad = [-1, 0, 2.5, "3", None, True, np.int64(0), float("nan")][which % 8]
        outcome(f"online:batch_size:{bad!r}", lambda: a.init(model, bad), names=("batch_size",))
        return
    if arg == "h0":
        if algo in ("uoro", "kf_rtrl"):
            ref = torch.zeros(B, H, dtype=torch.float64)
        elif model_name.startswith("rnn"):
            ref = torch.randn(B, H, dtype=torch.float64)
        else:
            ref = net_state(model)[0][0]
        variations = bad_tensor_values(ref, name="h0")
        label, value, _ = variations[which % len(variations)]
        if not model_name.startswith("rnn"):
            st0 = net_state(model)
            value = (type(st0[0])(value, *st0[0][1:]),) + tuple(st0[1:])
        outcome(f"online:h0:{label}", lambda: a.init(model, B, h0=value), names=("h0",))
        return
    state = a.init(model, B)
    ok = {"x_t": x[0], "target_t": y[0], "mask_t": torch.ones(B, dtype=torch.float64),
          "dh_t": torch.zeros(B, H, dtype=torch.float64)}
    if arg in ok:
        variations = bad_tensor_values(ok[arg], name=arg)
        label, value, valid = variations[which % len(variations)]
        if arg == "mask_t" and label in ("int_dtype", "float32"):
            valid = True
        if arg == "target_t" and loss == "cross_entropy" and label in ("int_dtype",):
            valid = True
        kw = dict(ok)
        kw[arg] = value

        def call():
            return a.step(model, state, kw["x_t"], kw["target_t"], mask_t=kw["mask_t"],
                          loss=loss, dh_t=kw["dh_t"])

        def check(result):
            assert valid, f"{arg}={label} was accepted by {algo} on {model_name}"

        outcome(f"online:{arg}:{label}", call, names=(arg,), check=check)
        return
    if arg == "state":
        other = get_algorithm("uoro" if algo != "uoro" else "rtrl").init(model, B)
        smaller = MODELS[model_name]() if False else None
        bads = [("other_algorithm", other), ("none", None), ("tuple", (1, 2)),
                ("string", "state"), ("dict", {"h": 1}),
                ("other_batch", a.init(model, B + 1))]
        if smaller is None:
            m2 = rnngrad.RNN(D, H + 1, K, dtype=torch.float64)
            if algo not in ("rflo", "kf_rtrl") or True:
                bads.append(("other_model", a.init(m2, B)))
        label, value = bads[which % len(bads)]
        is_other_batch = label == "other_batch"

        def call():
            return a.step(model, value, x[0] if not is_other_batch else x[0].repeat(2, 1)[:B + 1],
                          None)

        if is_other_batch:  # a state for B + 1 with inputs for B + 1 is consistent: valid
            outcome("online:state:other_batch", call, names=("state",))
            return
        outcome(f"online:state:{label}", call, names=("state",),
                check=lambda r: pytest.fail(f"state={label} was accepted by {algo}"))
        return
    if arg == "model":
        m2 = [rnngrad.RNN(D + 1, H, K, dtype=torch.float64), torch.nn.Linear(2, 2), None,
              rnngrad.RNN(D, H, K)][which % 4]
        outcome("online:model", lambda: a.step(m2, state, x[0], None),
                names=("model", "state", "x_t", "dtype"),
                check=lambda r: pytest.fail(f"model {m2} was accepted by {algo}"))
        return
    # (loss=None is the readout's own loss, issue 16: valid, not among the bad values)
    bad_loss = ["hinge", 3, b"mse", "bce" if model.readout == "softmax" else "cross_entropy"][
        which % 4]
    outcome("online:loss", lambda: a.step(model, state, x[0], y[0], loss=bad_loss),
            names=("loss",), check=lambda r: pytest.fail(f"loss={bad_loss!r} accepted"))


# ---- constructors and factories -------------------------------------------------------------

BAD_INTS = [0, -1, 2.5, "4", None, True, float("nan"), 10**30 * 1.0]


@SETTINGS
@given(which=st.integers(0, 400))
def test_constructors_and_factories(which):
    cases = []
    for v in BAD_INTS:
        cases += [
            (f"RNN(input_size={v!r})", lambda v=v: rnngrad.RNN(v, 3, 2), ("input_size",)),
            (f"RNN(hidden_size={v!r})", lambda v=v: rnngrad.RNN(2, v, 2), ("hidden_size",)),
            (f"RNN(output_size={v!r})", lambda v=v: rnngrad.RNN(2, 3, v), ("output_size",)),
            (f"GRU(hidden_size={v!r})", lambda v=v: GRU(2, v), ("hidden_size",)),
            (f"LSTM(input_size={v!r})", lambda v=v: LSTM(v, 2), ("input_size",)),
            (f"Network(output_size={v!r})", lambda v=v: rnngrad.Network(GRU(2, 3), v),
             ("output_size",)),
            (f"tbptt({v!r})", lambda v=v: rnngrad.tbptt(v), ("tbptt", "k")),
        ]
        if v is not None:  # checkpoint=None is plain BPTT
            cases.append((f"bptt(checkpoint={v!r})", lambda v=v: rnngrad.bptt(checkpoint=v),
                          ("checkpoint",)))
    for v in (-1, 2**63, 2.5, "4", None, True, float("nan")):
        cases += [
            (f"uoro(seed={v!r})", lambda v=v: rnngrad.uoro(seed=v), ("seed",)),
            (f"kf_rtrl(seed={v!r})", lambda v=v: rnngrad.kf_rtrl(seed=v), ("seed",)),
            (f"eprop(seed={v!r})", lambda v=v: rnngrad.eprop("random", seed=v), ("seed",)),
        ]
    for v in (0.0, -1.0, 1.5, float("nan"), "0.5", None):
        cases.append((f"RNN(alpha={v!r})", lambda v=v: rnngrad.RNN(2, 3, 2, alpha=v), ("alpha",)))
        cases.append((f"Elman(alpha={v!r})", lambda v=v: Elman(2, 3, alpha=v), ("alpha",)))
    for v in (0.0, -1.0, float("inf"), float("nan"), "1e-7"):
        cases.append((f"uoro(eps={v!r})", lambda v=v: rnngrad.uoro(eps=v), ("eps",)))
        cases.append((f"kf_rtrl(eps={v!r})", lambda v=v: rnngrad.kf_rtrl(eps=v), ("eps",)))
    for v in (torch.int64, torch.complex64, torch.float16 if False else torch.bool, "float32"):
        cases.append((f"RNN(dtype={v!r})", lambda v=v: rnngrad.RNN(2, 3, 2, dtype=v), ("dtype",)))
    for v in ("gelu", 3, None):
        cases.append((f"RNN(activation={v!r})", lambda v=v: rnngrad.RNN(2, 3, 2, activation=v),
                      ("activation",)))
    for v in ("tanh", 3, None):
        cases.append((f"RNN(readout={v!r})", lambda v=v: rnngrad.RNN(2, 3, 2, readout=v),
                      ("readout",)))
        cases.append((f"Network(readout={v!r})",
                      lambda v=v: rnngrad.Network(GRU(2, 3), 2, readout=v), ("readout",)))
    for v in ("xavier", 1, None):
        cases.append((f"RNN(init={v!r})", lambda v=v: rnngrad.RNN(2, 3, 2, init=v), ("init",)))
    for v in ("transpose", 1, None):
        cases.append((f"eprop({v!r})", lambda v=v: rnngrad.eprop(v), ("feedback",)))
    for v in ("yes", 1, None):
        cases.append((f"rtrl(generic={v!r})", lambda v=v: rnngrad.rtrl(generic=v), ("generic",)))
    for spec in ("", "tbptt", "tbptt:x", "bptt:3", "nope", 3, "rtrl:2"):
        cases.append((f"get_algorithm({spec!r})", lambda s=spec: get_algorithm(s),
                      ("algorithm",)))
    for name in ("nope", 3, None):
        cases.append((f"get_task({name!r})", lambda n=name: rnngrad.tasks.get_task(n), ("task",)))
    label, fn, names = cases[which % len(cases)]
    outcome(f"constructor:{label}", fn, names=names,
            check=lambda r: pytest.fail(f"{label} was accepted"))
