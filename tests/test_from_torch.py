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


# ---- back to PyTorch: Network.to_torch ------------------------------------------------------

NATIVE = {
    "rnn-tanh": lambda d: Elman(d, H, dtype=DT),
    "rnn-relu": lambda d: Elman(d, H, activation="relu", dtype=DT),
    "gru": lambda d: GRU(d, H, dtype=DT),
    "lstm": lambda d: LSTM(d, H, dtype=DT),
}


def net_state(kind: str, L: int, g: torch.Generator):
    mk = LSTMState if kind == "lstm" else GRUState if kind == "gru" else ElmanState
    n = 2 if kind == "lstm" else 1
    return tuple(mk(*(torch.randn(B, H, generator=g, dtype=DT) for _ in range(n)))
                 for _ in range(L))


@pytest.mark.parametrize("kind", list(NATIVE))
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("readout", ["identity", "softmax"])
def test_to_torch_is_the_same_function(kind, L, readout):
    """A network built in rnngrad, its random weights, with h0: linear(rnn(x, hx)[0])
    equals its z_t (and g of it its y_t) to 1e-12 in float64."""
    from rnngrad.cells.interop import state_to_torch

    g = torch.Generator().manual_seed(L)
    torch.manual_seed(L)
    net = Network([NATIVE[kind](D if i == 0 else H) for i in range(L)], K, readout=readout)
    with torch.no_grad():  # away from PyTorch's init, biases included
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.6)
    rnn, lin = net.to_torch()
    assert type(rnn) is {"gru": nn.GRU, "lstm": nn.LSTM}.get(kind, nn.RNN)
    assert rnn.num_layers == L and rnn.weight_ih_l0.dtype == DT
    if kind == "rnn-relu":
        assert rnn.nonlinearity == "relu"
    x = torch.randn(T, B, D, generator=g, dtype=DT)
    h0 = net_state(kind, L, g)
    with torch.no_grad():
        ref = readout_fn(readout)(lin(rnn(x, state_to_torch(h0))[0]))
        y, _ = net(x, h0=h0)
    assert float((y - ref).abs().max()) <= 1e-12
    # and it shares nothing with the network
    assert all(p.data_ptr() != q.data_ptr() for p in rnn.parameters() for q in net.parameters())


@pytest.mark.parametrize("kind", list(MODULES))
def test_from_torch_then_to_torch_gives_the_modules_weights(kind):
    rnn, lin = MODULES[kind](num_layers=2), nn.Linear(H, K, dtype=DT)
    back, lin2 = Network.from_torch(rnn, lin).to_torch()
    x = torch.randn(T, B, D, dtype=DT)
    with torch.no_grad():
        assert float((lin2(back(x)[0]) - lin(rnn(x)[0])).abs().max()) <= 1e-12
    if not kind.startswith("rnn"):  # nn.RNN: b_rec goes to bias_ih, bias_hh = 0
        for (n, p), (m, q) in zip(rnn.named_parameters(), back.named_parameters()):
            assert n == m and torch.equal(p, q)


def test_rnngrad_rnn_to_torch():
    model = rnngrad.RNN(D, H, K, activation="relu", dtype=DT)
    rnn, lin = model.to_torch()
    assert type(rnn) is nn.RNN and rnn.nonlinearity == "relu" and rnn.num_layers == 1
    x, h0 = torch.randn(T, B, D, dtype=DT), torch.randn(B, H, dtype=DT)
    with torch.no_grad():
        assert float((model(x, h0)[0] - lin(rnn(x, h0[None])[0])).abs().max()) <= 1e-12
    with pytest.raises(ValueError, match=r"to_torch: cells\[0\] is a leaky Elman cell \(alpha="
                                         r"0\.5\); torch\.nn\.RNN has no leak"):
        rnngrad.RNN(D, H, K, alpha=0.5).to_torch()


def _refused():
    from rnngrad.cells import ALIF, LIF, LRU

    class MyGRU(GRU):
        pass

    return [
        (lambda: Network(Elman(D, H, alpha=0.3), K), ValueError,
         r"cells\[0\] is a leaky Elman cell \(alpha=0\.3\)"),
        (lambda: Network(Elman(D, H, activation="sigmoid"), K), ValueError,
         r"cells\[0\] is an Elman cell with activation 'sigmoid'; torch\.nn\.RNN has tanh "
         r"and relu only"),
        (lambda: Network([Elman(D, H), Elman(H, H, activation="relu")], K), ValueError,
         r"cells\[1\] has activation 'relu' but cells\[0\] has 'tanh'"),
        (lambda: Network([GRU(D, H), LSTM(H, H)], K), TypeError,
         r"the network mixes cell types \(GRU, LSTM\)"),
        (lambda: Network([LSTM(D, H), LSTM(H, H + 1)], K), ValueError,
         r"cells\[1\] has hidden_size 6 but cells\[0\] has 5"),
        (lambda: Network(LIF(D, H), K), TypeError, r"cells\[0\] is a LIF, which torch\.nn has no "
                                                   r"module for"),
        (lambda: Network([GRU(D, H), ALIF(H, H)], K), TypeError, r"cells\[1\] is a ALIF"),
        (lambda: Network(LRU(D, H), K), TypeError, r"cells\[0\] is a LRU"),
        (lambda: Network(MyGRU(D, H), K), TypeError, r"cells\[0\] is a MyGRU"),
        (lambda: Network(GRU(D, H), K, readout_decay=0.5), ValueError,
         r"the network has a leaky readout \(readout_decay=0\.5\)"),
    ]


@pytest.mark.parametrize("i", range(10))
def test_to_torch_refuses_what_torch_cannot_express(i):
    make, err, match = _refused()[i]
    with pytest.raises(err, match="to_torch: " + match if not match.startswith("to_torch")
                       else match):
        make().to_torch()


def test_state_to_torch_errors():
    from rnngrad.cells.interop import state_to_torch

    with pytest.raises(TypeError, match="state must be a network state"):
        state_to_torch(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="got ElmanState, LSTMState"):
        state_to_torch((ElmanState(torch.zeros(2, 3)), LSTMState(torch.zeros(2, 3),
                                                                 torch.zeros(2, 3))))


# ---- share=True: the module's own tensors, trained by any algorithm --------------------------

def torch_loss(rnn, lin, x, y):
    """rnngrad's pinned mse, L = (1/B) sum_{t,b} 0.5 ||z - y||^2, through the module."""
    return 0.5 * ((lin(rnn(x)[0]) - y) ** 2).sum() / x.shape[1]


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("algo", ["bptt", "rtrl", "tbptt"])
def test_shared_gradients_land_in_the_modules_grad(kind, algo):
    """gradient(..., set_grad=True) on a shared network writes the module's .grad, equal
    to autograd through the module itself (exact algorithms, float64, 1e-10)."""
    torch.manual_seed(0)
    rnn, lin = MODULES[kind](num_layers=2), nn.Linear(H, K, dtype=DT)
    x, y = torch.randn(T, B, D, dtype=DT), torch.randn(T, B, K, dtype=DT)
    with torch.no_grad():
        before = lin(rnn(x)[0])
    net = Network.from_torch(rnn, lin, share=True)
    with torch.no_grad():
        assert float((net(x)[0] - before).abs().max()) <= 1e-12  # the fold keeps the function
    a = {"bptt": rnngrad.bptt(), "rtrl": rnngrad.rtrl(), "tbptt": rnngrad.tbptt(T)}[algo]
    loss, grads = rnngrad.gradient(net, x, y, algorithm=a, set_grad=True)
    mine = {n: p.grad for n, p in [*rnn.named_parameters(), *lin.named_parameters()]}
    for p in [*rnn.parameters(), *lin.parameters()]:
        p.grad = None
    ref_loss = torch_loss(rnn, lin, x, y)
    ref_loss.backward()
    assert float(abs(loss - ref_loss.detach())) <= 1e-12
    for n, p in [*rnn.named_parameters(), *lin.named_parameters()]:
        if not p.requires_grad:  # nn.RNN's bias_hh, folded into bias_ih
            assert n.startswith("bias_hh") and mine[n] is None and not p.any()
            continue
        assert mine[n] is not None, n
        scale = float(p.grad.abs().max())
        assert float((mine[n] - p.grad).abs().max()) <= 1e-10 * max(scale, 1.0), n


def test_shared_parameters_are_the_modules_objects():
    lstm, lin = nn.LSTM(D, H, num_layers=2, dtype=DT), nn.Linear(H, K, dtype=DT)
    net = Network.from_torch(lstm, lin, share=True)
    for layer in range(2):
        c = net.cells[layer]
        for mine, theirs in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"), ("b_ih", "bias_ih"),
                             ("b_hh", "bias_hh")):
            assert getattr(c, mine) is getattr(lstm, f"{theirs}_l{layer}")
    assert net.W_out is lin.weight and net.b_out is lin.bias
    ids = {id(p) for p in [*lstm.parameters(), *lin.parameters()]}
    assert {id(p) for p in net.parameters()} == ids


@pytest.mark.parametrize("algo", ["eprop", "snap1", "uoro", "rtrl"])
def test_a_torch_optimizer_step_over_the_module_equals_the_step_by_hand(algo):
    """An ordinary PyTorch loop: rnngrad's gradient into the module's .grad, then the
    module's own optimizer. The result equals p - lr * g computed by hand, and the
    network, sharing the tensors, moved with the module."""
    torch.manual_seed(1)
    lstm, lin = nn.LSTM(D, H, num_layers=2, dtype=DT), nn.Linear(H, K, dtype=DT)
    net = Network.from_torch(lstm, lin, share=True)
    params = [*lstm.parameters(), *lin.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.0)
    x, y = torch.randn(T, B, D, dtype=DT), torch.randn(T, B, K, dtype=DT)
    a = {"eprop": rnngrad.eprop(), "snap1": rnngrad.snap1(), "uoro": rnngrad.uoro(seed=3),
         "rtrl": rnngrad.rtrl()}[algo]
    names = dict(net.named_parameters())
    before = {n: p.detach().clone() for n, p in names.items()}
    opt.zero_grad()
    _, grads = rnngrad.gradient(net, x, y, algorithm=a, set_grad=True)
    opt.step()
    for n, p in names.items():
        assert torch.allclose(p.detach(), before[n] - 0.1 * grads[n], rtol=0, atol=1e-15), n
    with torch.no_grad():
        assert float((net(x)[0] - lin(lstm(x)[0])).abs().max()) <= 1e-12


def test_shared_without_biases_keeps_zeros_frozen():
    rnn, lin = nn.GRU(D, H, bias=False, dtype=DT), nn.Linear(H, K, bias=False, dtype=DT)
    net = Network.from_torch(rnn, lin, share=True)
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == ["b_out", "cells.0.b_hh", "cells.0.b_ih"]
    opt = torch.optim.SGD([*rnn.parameters(), *lin.parameters()], lr=0.5)
    x, y = torch.randn(T, B, D, dtype=DT), torch.randn(T, B, K, dtype=DT)
    rnngrad.gradient(net, x, y, set_grad=True)
    opt.step()
    assert all(not p.any() for n, p in net.named_parameters() if n in frozen)
    with torch.no_grad():
        assert float((net(x)[0] - lin(rnn(x)[0])).abs().max()) <= 1e-12
    with pytest.raises(TypeError, match="share must be a bool, got 1"):
        Network.from_torch(rnn, lin, share=1)


def test_online_steps_on_a_shared_module():
    """The online API in a PyTorch loop: rtrl() emits its gradient at every step,
    rnngrad.write_grads puts it in the module's .grad, the module's optimizer steps; the
    network moves with the module and stays the same function."""
    torch.manual_seed(2)
    gru, lin = nn.GRU(D, H, dtype=DT), nn.Linear(H, K, dtype=DT)
    net = Network.from_torch(gru, lin, share=True)
    opt = torch.optim.SGD([*gru.parameters(), *lin.parameters()], lr=0.05)
    algo = rnngrad.rtrl()
    state = algo.init(net, B)
    x, y = torch.randn(T, B, D, dtype=DT), torch.randn(T, B, K, dtype=DT)
    w0 = gru.weight_hh_l0.detach().clone()
    emitted = 0
    for t in range(T):
        state, _, g = algo.step(net, state, x[t], y[t])
        if g is not None:
            opt.zero_grad()
            rnngrad.write_grads(net, g)
            assert torch.equal(gru.weight_hh_l0.grad, g["cells.0.W_hh"])
            assert torch.equal(lin.weight.grad, g["W_out"])
            opt.step()
            emitted += 1
    assert emitted == T and not torch.equal(gru.weight_hh_l0, w0)
    with torch.no_grad():
        assert float((net(x)[0] - lin(gru(x)[0])).abs().max()) <= 1e-12
