"""Bad input raises a clear error naming what was given and what was expected."""

import pytest
import torch

import rnngrad

DT = torch.float64


@pytest.fixture
def model():
    return rnngrad.RNN(3, 4, 2, dtype=DT)


def data(T=5, B=2, D=3, K=2):
    return torch.randn(T, B, D, dtype=DT), torch.randn(T, B, K, dtype=DT)


def test_inputs_wrong_shape(model):
    x, y = data(D=4)
    with pytest.raises(ValueError, match=r"inputs has shape \(5, 2, 4\) but the model expects \(T, B, 3\)"):
        rnngrad.gradient(model, x, y)
    with pytest.raises(ValueError, match=r"inputs has shape \(5, 3\)"):
        rnngrad.gradient(model, torch.randn(5, 3, dtype=DT), y)


def test_inputs_wrong_dtype(model):
    x, y = data()
    with pytest.raises(TypeError, match="inputs has dtype torch.float32 but the model's parameters are torch.float64"):
        rnngrad.gradient(model, x.float(), y)


def test_inputs_not_tensor(model):
    _, y = data()
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor, got list"):
        rnngrad.gradient(model, [[1.0]], y)


@pytest.mark.cuda
def test_wrong_device(model):
    x, y = data()
    with pytest.raises(ValueError, match="device"):
        rnngrad.gradient(model, x.cuda(), y)


def test_targets_wrong_shape(model):
    x, _ = data()
    with pytest.raises(ValueError, match=r"targets has shape \(5, 2, 3\) but loss 'mse' expects \(5, 2, 2\)"):
        rnngrad.gradient(model, x, torch.randn(5, 2, 3, dtype=DT))


def test_class_targets():
    m = rnngrad.RNN(3, 4, 2, readout="softmax", dtype=DT)
    x, _ = data()
    with pytest.raises(TypeError, match="class indices"):
        rnngrad.gradient(m, x, torch.zeros(5, 2, dtype=DT), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"expects class indices of shape \(5, 2\)"):
        rnngrad.gradient(m, x, torch.zeros(5, 2, 2, dtype=torch.long), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"model has 2 classes"):
        rnngrad.gradient(m, x, torch.full((5, 2), 2, dtype=torch.long), loss="cross_entropy")


def test_mask_and_h0_wrong_shape(model):
    x, y = data()
    with pytest.raises(ValueError, match=r"mask has shape \(5, 3\) but expected \(5, 2\) or \(5,\)"):
        rnngrad.gradient(model, x, y, mask=torch.ones(5, 3, dtype=DT))
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 5\) but expected \(2, 4\) or \(4,\)"):
        rnngrad.gradient(model, x, y, h0=torch.zeros(2, 5, dtype=DT))
    with pytest.raises(TypeError, match="h0 has dtype torch.float32"):
        rnngrad.gradient(model, x, y, h0=torch.zeros(2, 4))


def test_nan_and_inf(model):
    x, y = data()
    x[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"inputs contains 1 NaN or Inf entries \(first at index \(2, 1, 0\)\)"):
        rnngrad.gradient(model, x, y)
    x, y = data()
    with torch.no_grad():
        model.W_rec[0, 1] = float("inf")
    with pytest.raises(ValueError, match="parameter W_rec contains 1 NaN or Inf"):
        rnngrad.gradient(model, x, y)


def test_unknown_names_list_the_known():
    with pytest.raises(ValueError, match="unknown activation 'gelu'; known activations: identity, relu, sigmoid, softplus, tanh"):
        rnngrad.RNN(2, 3, 1, activation="gelu")
    with pytest.raises(ValueError, match="unknown readout 'tanh'; known readouts: identity, softmax, sigmoid"):
        rnngrad.RNN(2, 3, 1, readout="tanh")
    m = rnngrad.RNN(3, 4, 2, dtype=DT)
    x, y = data()
    with pytest.raises(ValueError, match="unknown loss 'l1'; known losses: mse, cross_entropy, bce"):
        rnngrad.gradient(m, x, y, loss="l1")


def test_mismatched_loss_and_readout():
    m = rnngrad.RNN(3, 4, 2, readout="sigmoid", dtype=DT)
    x, _ = data()
    with pytest.raises(ValueError, match="pairs with readout 'identity' or 'softmax'"):
        rnngrad.gradient(m, x, torch.zeros(5, 2, dtype=torch.long), loss="cross_entropy")


def test_nothing_to_differentiate(model):
    x, _ = data()
    with pytest.raises(ValueError, match="give targets, a reward, or both"):
        rnngrad.gradient(model, x)


def test_bad_reward(model):
    x, y = data()
    with pytest.raises(ValueError, match="reward must return a scalar tensor"):
        rnngrad.gradient(model, x, y, reward=lambda h: h.sum(-1))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="alpha must be a float in \\(0, 1\\], got 0"):
        rnngrad.RNN(2, 3, 1, alpha=0)
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        rnngrad.RNN(2, 0, 1)
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        rnngrad.RNN(2, 3, 1, init="xavier")


def test_bad_algorithm(model):
    x, y = data()
    with pytest.raises(TypeError, match="algorithm must be an rnngrad algorithm"):
        rnngrad.gradient(model, x, y, algorithm="bptt")


# ---- networks, devices, cells' constructors (issue 16, item 5) ---------------------------

def _net(cells, K=2):
    return rnngrad.Network(cells, K)


def test_the_same_cell_twice_in_a_network():
    from rnngrad.cells import GRU

    c = GRU(3, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"cells\[1\] is the same GRU object as cells\[0\]: "
                                         r"each layer needs its own cell .* copy\.deepcopy"):
        _net([c, c])
    d = GRU(3, 3, dtype=DT)
    d.W_hh = c.W_hh  # a parameter tied across layers: the same KeyError later
    with pytest.raises(ValueError, match=r"cells\[1\] \(GRU\) shares its parameter 'W_hh' with "
                                         r"cells\[0\] \('W_hh'\): parameters tied across layers"):
        _net([c, d])


def test_a_cell_with_no_parameters():
    from typing import NamedTuple

    from rnngrad.cells import Cell

    class S(NamedTuple):
        h: torch.Tensor

    class Fixed(Cell):
        def __init__(self):
            super().__init__()
            self.input_size = self.hidden_size = 3

        def init_state(self, batch_size):
            return S(torch.zeros(batch_size, 3))

        def step(self, params, state, x):
            return S(torch.tanh(state.h + x))

        def output(self, state):
            return state.h

    with pytest.raises(ValueError, match=r"cells\[0\] \(Fixed\) has no parameters: .* at least "
                                         r"one nn\.Parameter per cell"):
        _net(Fixed())


@pytest.mark.parametrize("make", ["rnn", "network"])
def test_a_model_on_the_meta_device(make):
    from rnngrad.cells import GRU

    model = (rnngrad.RNN(3, 4, 2) if make == "rnn" else _net(GRU(3, 4))).to("meta")
    msg = r"the model is on the meta device \(shapes without data\).*to_empty\(device='cpu'\)"
    for dev in ("meta", "cpu"):
        x, y = torch.randn(5, 2, 3, device=dev), torch.randn(5, 2, 2, device=dev)
        with pytest.raises(ValueError, match=msg):
            rnngrad.gradient(model, x, y)
        with pytest.raises(ValueError, match=msg):
            model(x)
    algo = rnngrad.rtrl()
    state = algo.init(model, 2)
    with pytest.raises(ValueError, match=msg):
        algo.step(model, state, torch.randn(2, 3, device="meta"), torch.randn(2, 2, device="meta"))


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
@pytest.mark.parametrize("make", ["rnn", "network"])
def test_a_model_moved_to_a_complex_dtype(make):
    from rnngrad.cells import GRU

    model = (rnngrad.RNN(3, 4, 2) if make == "rnn" else _net(GRU(3, 4))).to(torch.complex64)
    x, y = torch.randn(5, 2, 3, dtype=torch.complex64), torch.randn(5, 2, 2)
    with pytest.raises(TypeError, match=r"the model's parameters are torch\.complex64, but "
                                        r"rnngrad takes real floating parameters"):
        rnngrad.gradient(model, x, y)


def test_network_init_state_batch_size():
    from rnngrad.cells import GRU

    net = _net(GRU(3, 4))
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got -1"):
        net.init_state(-1)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        net.init_state(0)
    with pytest.raises(TypeError, match=r"batch_size must be an int >= 1, got 2\.0 \(float\)"):
        net.init_state(2.0)
    assert net.init_state(2)[0].h.shape == (2, 4)


def _builtin_cells():
    from rnngrad.cells import ALIF, ELSTM, GRU, LIF, LRU, LSTM, Elman

    return {"Elman": Elman, "GRU": GRU, "LSTM": LSTM, "LIF": LIF, "ALIF": ALIF, "LRU": LRU,
            "ELSTM": ELSTM}


@pytest.mark.parametrize("name", ["Elman", "GRU", "LSTM", "LIF", "ALIF", "LRU", "ELSTM"])
@pytest.mark.parametrize("dtype, err, match", [
    (torch.int64, TypeError, r"dtype must be a real floating torch\.dtype \(torch\.float32 or "
                             r"torch\.float64\) or None, got torch\.int64"),
    (torch.bool, TypeError, r"got torch\.bool"),
    (torch.complex64, TypeError, r"got torch\.complex64; keep a complex parameter as its real "
                                 r"and imaginary parts"),
    ("float64", TypeError, r"got 'float64'")])
def test_every_built_in_cell_refuses_a_dtype_it_cannot_run(name, dtype, err, match):
    with pytest.raises(err, match=match):
        _builtin_cells()[name](2, 3, dtype=dtype)


@pytest.mark.parametrize("name", ["Elman", "GRU", "LSTM", "LIF", "ALIF", "LRU", "ELSTM"])
def test_every_built_in_cell_refuses_a_device_it_cannot_use(name):
    cls = _builtin_cells()[name]
    with pytest.raises(ValueError, match=r"device must be a torch device such as 'cpu', 'cuda' "
                                         r"or 'cuda:1', got 'gpu0'"):
        cls(2, 3, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' asked for CUDA, but torch .* sees "
                                             r"no CUDA device here"):
            cls(2, 3, device="cuda")
    for size in (0, -1, 2.0, "2", True):
        with pytest.raises(ValueError, match=rf"input_size must be a positive int, got "
                                             rf"{size!r}".replace("(", r"\(")):
            cls(size, 3)


@pytest.mark.parametrize("name, kw, err, match", [
    ("LRU", {"max_phase": float("inf")}, ValueError, r"max_phase must be a finite number > 0, "
                                                     r"got inf"),
    ("LRU", {"max_phase": float("nan")}, ValueError, r"max_phase .* got nan"),
    ("LRU", {"max_phase": "pi"}, TypeError, r"max_phase .* got 'pi' \(str\)"),
    ("LRU", {"r_min": "0.1"}, TypeError, r"r_min must be a finite number in \[0, 1\], got '0\.1'"),
    ("LRU", {"r_max": float("inf")}, ValueError, r"r_max must be a finite number in \[0, 1\], "
                                                 r"got inf"),
    ("LRU", {"r_min": float("nan")}, ValueError, r"r_min .* got nan"),
    ("LRU", {"r_max": -0.5}, ValueError, r"r_max .* got -0\.5"),
    ("LRU", {"glu": "no"}, TypeError, r"glu must be a bool, got 'no'"),
    ("LRU", {"norm": 1}, TypeError, r"norm must be a bool, got 1"),
    ("ELSTM", {"forget_bias": float("nan")}, ValueError, r"forget_bias must be a finite number, "
                                                         r"got nan"),
    ("ELSTM", {"forget_bias": float("inf")}, ValueError, r"forget_bias .* got inf"),
    ("ELSTM", {"forget_bias": "1"}, TypeError, r"forget_bias .* got '1' \(str\)"),
    ("LSTM", {"forget_bias": float("nan")}, ValueError, r"forget_bias must be a finite number"),
    ("Elman", {"alpha": float("nan")}, ValueError, r"alpha must be a float in \(0, 1\]"),
    ("LIF", {"tau_m": float("inf")}, ValueError, r"tau_m \(ms\) must be a positive finite"),
    ("LIF", {"v_th": "0.6"}, ValueError, r"v_th must be a positive finite number"),
    ("ALIF", {"beta": float("nan")}, ValueError, r"beta must be finite and >= 0"),
    ("ALIF", {"tau_a": float("inf")}, ValueError, r"tau_a \(ms\) must be a positive finite")])
def test_constructor_values_that_would_fail_later(name, kw, err, match):
    with pytest.raises(err, match=match):
        _builtin_cells()[name](2, 3, **kw)


@pytest.mark.parametrize("tol", [-1.0, float("nan"), float("inf")])
def test_check_tolerance(tol):
    from rnngrad.check import run_checks

    with pytest.raises(ValueError, match=rf"tol must be a finite number >= 0 .* got {tol!r}"):
        run_checks(tol=tol)
    with pytest.raises(TypeError, match=r"tol must be a finite number >= 0 .* got '1e-10'"):
        run_checks(tol="1e-10")


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "x"])
def test_check_tolerance_on_the_command_line(text, capsys):
    from rnngrad.cli import main

    with pytest.raises(SystemExit) as e:
        main(["check", "--tol", text])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --tol: expected a finite number >= 0" in err and repr(text) in err
