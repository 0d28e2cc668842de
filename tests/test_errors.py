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
