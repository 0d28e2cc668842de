"""rnngrad.Network.from_torch: torch.nn.RNN / GRU / LSTM + nn.Linear -> rnngrad cells,
the same function to float64 round-off (1e-12), and clear errors for what does not map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnngrad
from rnngrad.cells import GRU, LSTM, Elman, ElmanState, GRUState, LSTMState
from rnngrad.cells.interop import cells_from_torch, state_from_torch
from rnngrad.network import Network

DT = torch.float64
D, H, K, T, B = 3, 5, 2, 6, 4

MODULES = {
    "rnn-tanh": lambda **kw: nn.RNN(D, H, dtype=DT, **kw),
    "rnn-relu": lambda **kw: nn.RNN(D, H, nonlinearity="relu", dtype=DT, **kw),
    "gru": lambda **kw: nn.GRU(D, H, dtype=DT, **kw),
    "lstm": lambda **kw: nn.LSTM(D, H, dtype=DT, **kw),
}
G = {"rnn-tanh": None, "rnn-relu": None, "gru": GRU, "lstm": LSTM}


def torch_hx(kind: str, L: int, batch: int = B):
    h0 = torch.randn(L, batch, H, dtype=DT)
    return (h0, torch.randn(L, batch, H, dtype=DT)) if kind == "lstm" else h0


def readout_fn(name: str):
    return {"identity": lambda z: z, "softmax": lambda z: torch.softmax(z, -1),
            "sigmoid": torch.sigmoid}[name]


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("with_h0", [False, True])
def test_same_function_as_the_module(kind, L, with_h0):
    rnn, lin = MODULES[kind](num_layers=L), nn.Linear(H, K, dtype=DT)
    net = Network.from_torch(rnn, lin)
    x = torch.randn(T, B, D, dtype=DT)
    hx = torch_hx(kind, L) if with_h0 else None
    with torch.no_grad():
        ref = lin(rnn(x, hx)[0])
        y, h = net(x, h0=None if hx is None else state_from_torch(rnn, hx))
    assert y.shape == ref.shape
    assert float((y - ref).abs().max()) <= 1e-12
    assert len(net.cells) == L
    want = Elman if kind.startswith("rnn") else G[kind]
    assert all(type(c) is want for c in net.cells)
    if kind == "rnn-relu":
        assert all(c.activation == "relu" for c in net.cells)


@pytest.mark.parametrize("readout", ["softmax", "sigmoid"])
def test_readout_applied(readout):
    rnn, lin = nn.GRU(D, H, num_layers=2, dtype=DT), nn.Linear(H, K, dtype=DT)
    net = rnngrad.network.Network.from_torch(rnn, lin, readout=readout)
    x = torch.randn(T, B, D, dtype=DT)
    with torch.no_grad():
        assert float((net(x)[0] - readout_fn(readout)(lin(rnn(x)[0]))).abs().max()) <= 1e-12


@pytest.mark.parametrize("kind", list(MODULES))
def test_gradients_equal_the_modules(kind):
    """Autograd through the network equals autograd through the module: every copied
    weight is the one the module uses (the Elman bias gets both of PyTorch's)."""
    rnn, lin = MODULES[kind](num_layers=2), nn.Linear(H, K, dtype=DT)
    net = Network.from_torch(rnn, lin)
    x = torch.randn(T, B, D, dtype=DT)
    hx = torch_hx(kind, 2)
    (net(x, h0=state_from_torch(rnn, hx))[0] ** 2).sum().backward()
    (lin(rnn(x, hx)[0]) ** 2).sum().backward()
    for layer in range(2):
        mine = net.cells[layer]
        if kind.startswith("rnn"):
            pairs = [(mine.W_in, rnn.weight_ih_l0 if layer == 0 else rnn.weight_ih_l1),
                     (mine.W_rec, getattr(rnn, f"weight_hh_l{layer}")),
                     (mine.b_rec, getattr(rnn, f"bias_ih_l{layer}")),
                     (mine.b_rec, getattr(rnn, f"bias_hh_l{layer}"))]
        else:
            pairs = [(getattr(mine, a), getattr(rnn, f"{b}_l{layer}")) for a, b in
                     (("W_ih", "weight_ih"), ("W_hh", "weight_hh"), ("b_ih", "bias_ih"),
                      ("b_hh", "bias_hh"))]
        for a, b in pairs:
            assert torch.allclose(a.grad, b.grad, rtol=1e-11, atol=1e-13)
    assert torch.allclose(net.W_out.grad, lin.weight.grad, rtol=1e-11, atol=1e-13)
    assert torch.allclose(net.b_out.grad, lin.bias.grad, rtol=1e-11, atol=1e-13)


def test_copies_share_no_memory_and_keep_dtype():
    rnn, lin = nn.LSTM(D, H, num_layers=2), nn.Linear(H, K)
    net = Network.from_torch(rnn, lin)
    assert all(p.dtype == torch.float32 and p.device == rnn.weight_ih_l0.device
               for p in net.parameters())
    with torch.no_grad():
        net.cells[0].W_hh.add_(1.0)
    assert not torch.equal(net.cells[0].W_hh, rnn.weight_hh_l0)
    x = torch.randn(T, B, D)
    with torch.no_grad():
        net2 = Network.from_torch(rnn, lin)
        assert torch.allclose(net2(x)[0], lin(rnn(x)[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(MODULES))
def test_bias_false_gives_zero_biases(kind):
    rnn, lin = MODULES[kind](num_layers=2, bias=False), nn.Linear(H, K, bias=False, dtype=DT)
    net = Network.from_torch(rnn, lin)
    for name, p in net.named_parameters():
        if name.split(".")[-1].startswith("b_"):
            assert torch.equal(p.detach(), torch.zeros_like(p)), name
    x = torch.randn(T, B, D, dtype=DT)
    with torch.no_grad():
        assert float((net(x)[0] - lin(rnn(x)[0])).abs().max()) <= 1e-12


def test_dropout_not_carried_equal_in_eval_mode():
    rnn, lin = nn.LSTM(D, H, num_layers=3, dropout=0.5, dtype=DT), nn.Linear(H, K, dtype=DT)
    net = Network.from_torch(rnn, lin)
    rnn.eval()
    x = torch.randn(T, B, D, dtype=DT)
    with torch.no_grad():
        assert float((net(x)[0] - lin(rnn(x)[0])).abs().max()) <= 1e-12


def test_state_from_torch():
    rnn = nn.LSTM(D, H, num_layers=2, dtype=DT)
    h0, c0 = torch_hx("lstm", 2)
    st = state_from_torch(rnn, (h0, c0))
    assert len(st) == 2 and all(isinstance(s, LSTMState) for s in st)
    assert torch.equal(st[1].h, h0[1]) and torch.equal(st[1].c, c0[1])
    g = state_from_torch(nn.GRU(D, H, num_layers=3, dtype=DT), torch.zeros(3, B, H, dtype=DT))
    assert len(g) == 3 and all(isinstance(s, GRUState) for s in g)
    e = state_from_torch(nn.RNN(D, H, dtype=DT), torch.zeros(1, B, H, dtype=DT))
    assert isinstance(e[0], ElmanState)


def test_unbatched_state_is_shared_over_the_batch():
    rnn, lin = nn.GRU(D, H, num_layers=2, dtype=DT), nn.Linear(H, K, dtype=DT)
    net = Network.from_torch(rnn, lin)
    h0 = torch.randn(2, H, dtype=DT)
    x = torch.randn(T, B, D, dtype=DT)
    with torch.no_grad():
        ref = lin(rnn(x, h0.unsqueeze(1).expand(2, B, H).contiguous())[0])
        assert float((net(x, h0=state_from_torch(rnn, h0))[0] - ref).abs().max()) <= 1e-12


def test_cells_from_torch():
    cells = cells_from_torch(nn.GRU(D, H, num_layers=2, dtype=DT))
    assert [(c.input_size, c.hidden_size) for c in cells] == [(D, H), (H, H)]


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"bidirectional": True}, "bidirectional GRU.*expected bidirectional=False"),
    ({"batch_first": True}, "batch_first=True.*expected batch_first=False"),
])
def test_refused_module_options(kw, match):
    with pytest.raises(ValueError, match=match):
        Network.from_torch(nn.GRU(D, H, **kw), nn.Linear(H, K))


def test_refused_projection():
    with pytest.raises(ValueError, match="proj_size=2.*expected proj_size=0"):
        Network.from_torch(nn.LSTM(D, H, proj_size=2), nn.Linear(2, K))


@pytest.mark.parametrize("mod,match", [
    (nn.GRUCell(D, H), "got GRUCell \\(a single-step cell"),
    (nn.Linear(D, H), "got Linear"),
    ("lstm", "got str"),
])
def test_refused_module_types(mod, match):
    with pytest.raises(TypeError, match="rnn must be a torch.nn.RNN, torch.nn.GRU or "
                                        "torch.nn.LSTM, " + match):
        Network.from_torch(mod, nn.Linear(H, K))


def test_refused_readouts():
    rnn = nn.RNN(D, H)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear.*got Sequential"):
        Network.from_torch(rnn, nn.Sequential(nn.Linear(H, K)))
    with pytest.raises(ValueError, match="in_features=4 but the RNN has hidden_size=5"):
        Network.from_torch(rnn, nn.Linear(4, K))
    with pytest.raises(TypeError, match="linear has dtype torch.float64 but the RNN has "
                                        "torch.float32"):
        Network.from_torch(rnn, nn.Linear(H, K, dtype=DT))
    with pytest.raises(ValueError, match="readout"):
        Network.from_torch(rnn, nn.Linear(H, K), readout="tanh")


def test_state_from_torch_errors():
    lstm, gru = nn.LSTM(D, H, num_layers=2), nn.GRU(D, H, num_layers=2)
    with pytest.raises(TypeError, match=r"hx for an LSTM must be a tuple \(h0, c0\), got Tensor"):
        state_from_torch(lstm, torch.zeros(2, B, H))
    with pytest.raises(TypeError, match="hx for a GRU must be a tensor h0"):
        state_from_torch(gru, (torch.zeros(2, B, H),))
    with pytest.raises(ValueError, match=r"h0 has shape \(1, 4, 5\) but the GRU expects "
                                         r"\(2, B, 5\)"):
        state_from_torch(gru, torch.zeros(1, B, H))
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 4, 5\) but c0 has \(2, 3, 5\)"):
        state_from_torch(lstm, (torch.zeros(2, B, H), torch.zeros(2, 3, H)))
