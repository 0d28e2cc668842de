"""Every approximate online algorithm on every cell: the interface, finite values and
shapes, and end-to-end learning of the adding problem at T = 5."""

import pytest
import torch
from online_refs import adding_batch, make_data, make_model

import rnngrad
from rnngrad.algorithms.base import PARAM_NAMES

FACTORIES = {
    "eprop": lambda: rnngrad.eprop(),
    "eprop_rand": lambda: rnngrad.eprop("random"),
    "rflo": lambda: rnngrad.rflo(),
    "snap1": lambda: rnngrad.snap1(),
    "uoro": lambda: rnngrad.uoro(seed=0),
    "kf_rtrl": lambda: rnngrad.kf_rtrl(seed=0),
}
CELLS = {"vanilla": 1.0, "leaky": 0.5}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("name", FACTORIES)
def test_interface_shapes_finite(name, cell):
    algo = FACTORIES[name]()
    assert not algo.exact and algo.online and algo.cost and name.split("_")[0] in algo.name
    model = make_model(alpha=CELLS[cell], H=6, D=3, K=2)
    x, y, mask = make_data(T=5, B=3)
    state = algo.init(model, 3)
    assert state._fields[0] == "h" and state.h.shape == (3, 6)
    total = None
    for t in range(5):
        state, out, g = algo.step(model, state, x[t], y[t], mask_t=mask[t])
        assert out.h.shape == (3, 6) and out.z.shape == (3, 2) and out.loss.dim() == 0
        assert torch.equal(out.h, state.h)
        assert g is not None and set(g) == set(PARAM_NAMES)
        total = rnngrad.algorithms.base.add_grads(total, g)
    state, g = algo.flush(model, state)
    assert g is None
    params = dict(model.named_parameters())
    for n in PARAM_NAMES:
        assert total[n].shape == params[n].shape and torch.isfinite(total[n]).all()
    # no target and no reward: nothing to emit
    _, _, g = algo.step(model, state, x[0], None)
    assert g is None
    # float32 works too
    m32 = make_model(alpha=CELLS[cell]).float()
    _, g32 = rnngrad.gradient(m32, x.float(), y.float(), algorithm=FACTORIES[name]())
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in g32.values())


def train_adding(algo, alpha, *, lr=0.02, steps=300, T=5, B=32, H=16, seed=0):
    torch.manual_seed(seed)
    model = rnngrad.RNN(2, H, 1, alpha=alpha)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y, mask = adding_batch(T, B, generator=g)
        rnngrad.gradient(model, x, y, algorithm=algo, mask=mask, set_grad=True)
        opt.step()
    x, y, mask = adding_batch(T, 1000, generator=torch.Generator().manual_seed(999))
    with torch.no_grad():
        out, _ = model(x)
    return ((out[-1, :, 0] - y[-1, :, 0]) ** 2).mean().item()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("name", FACTORIES)
def test_learns_adding_T5(name, cell):
    # UORO's estimate has the highest variance: it needs the smaller step
    mse = train_adding(FACTORIES[name](), CELLS[cell], lr=0.01 if name == "uoro" else 0.02)
    chance = 1.0 / 6.0  # predicting the mean of the sum of two U(0, 1)
    assert mse < 0.75 * chance, mse
