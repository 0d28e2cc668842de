"""Hand-derived BPTT against autograd through an independent loop (float64, rel. err <= 1e-10),
against central finite differences, and the sensitivity lemma."""

import itertools

import pytest
import torch
from reference import max_rel_err, reference_grads, reference_loss, rel_err

import rnngrad

TOL = 1e-10
DT = torch.float64

PAIRS = [  # (readout, loss)
    ("identity", "mse"), ("softmax", "mse"), ("sigmoid", "mse"),
    ("softmax", "cross_entropy"), ("identity", "cross_entropy"),
    ("sigmoid", "bce"), ("identity", "bce"),
]
ACTS = ["tanh", "sigmoid", "relu", "identity", "softplus"]


def make_problem(T, B, D, H, K, *, activation="tanh", alpha=1.0, readout="identity",
                 loss="mse", seed=0):
    g = torch.Generator().manual_seed(seed)
    model = rnngrad.RNN(D, H, K, activation=activation, alpha=alpha, readout=readout, dtype=DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.6)
    x = torch.randn(T, B, D, generator=g, dtype=DT)
    if loss == "cross_entropy":
        y = torch.randint(0, K, (T, B), generator=g)
    elif loss == "bce":
        y = torch.rand(T, B, K, generator=g, dtype=DT)
    else:
        y = torch.randn(T, B, K, generator=g, dtype=DT)
    return model, x, y


def check(model, x, y, *, loss, algorithm=None, **kw):
    L, g = rnngrad.gradient(model, x, y, loss=loss, algorithm=algorithm, **kw)
    Lr, gr = reference_grads(model, x, y, loss=loss, **kw)
    assert abs(float(L - Lr)) <= TOL * max(1.0, abs(float(Lr)))
    assert set(g) >= set(gr)
    err = max_rel_err(g, gr)
    assert err <= TOL, f"max relative error {err:.3e}"
    return g


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_every_activation_leaky_and_not(activation, alpha):
    model, x, y = make_problem(6, 3, 4, 5, 2, activation=activation, alpha=alpha)
    check(model, x, y, loss="mse")


@pytest.mark.parametrize("readout,loss", PAIRS)
def test_every_readout_and_loss(readout, loss):
    model, x, y = make_problem(5, 4, 3, 6, 3, readout=readout, loss=loss, seed=1)
    check(model, x, y, loss=loss)


@pytest.mark.parametrize("T,B,D,H,K", [(1, 1, 1, 1, 1), (1, 3, 2, 4, 2), (7, 1, 3, 1, 2),
                                       (4, 2, 1, 3, 1), (12, 5, 3, 8, 4)])
def test_sizes_including_ones(T, B, D, H, K):
    model, x, y = make_problem(T, B, D, H, K, alpha=0.5, seed=T + H)
    check(model, x, y, loss="mse")


def test_random_configurations():
    """A sweep over random sizes and options, each a fresh network."""
    g = torch.Generator().manual_seed(3)
    for i in range(12):
        T, B, D, H, K = (int(v) for v in torch.randint(1, 7, (5,), generator=g))
        act = ACTS[i % len(ACTS)]
        readout, loss = PAIRS[i % len(PAIRS)]
        alpha = [1.0, 0.3, 0.9][i % 3]
        model, x, y = make_problem(T, B, D, H, K, activation=act, alpha=alpha,
                                   readout=readout, loss=loss, seed=i)
        mask = (torch.rand(T, B, generator=g) > 0.4).to(DT)
        h0 = torch.randn(B, H, generator=g, dtype=DT) if i % 2 else None
        check(model, x, y, loss=loss, mask=mask, h0=h0)


@pytest.mark.parametrize("kind", ["many_to_one", "random", "bool", "per_step"])
def test_masks(kind):
    T, B = 6, 3
    model, x, y = make_problem(T, B, 2, 4, 2, alpha=0.8)
    if kind == "many_to_one":
        mask = torch.zeros(T, B, dtype=DT)
        mask[-1] = 1
    elif kind == "random":
        mask = torch.rand(T, B, dtype=DT)
    elif kind == "bool":
        mask = torch.rand(T, B) > 0.5
    else:
        mask = torch.tensor([0, 1, 0, 0, 1, 1.0], dtype=DT)
    check(model, x, y, loss="mse", mask=mask)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("shape", ["batch", "shared"])
def test_h0_gradient(alpha, shape):
    """The gradient with respect to the initial state."""
    model, x, y = make_problem(5, 3, 2, 4, 2, alpha=alpha)
    h0 = torch.randn(3, 4, dtype=DT) if shape == "batch" else torch.randn(4, dtype=DT)
    g = check(model, x, y, loss="mse", h0=h0)
    assert g["h0"].shape == h0.shape


@pytest.mark.parametrize("with_targets", [True, False])
def test_reward(with_targets):
    """Trajectory learning: maximise R(h_1..h_T); the loss returned is L - R."""
    model, x, y = make_problem(6, 2, 3, 4, 2, alpha=0.9)
    target = torch.randn(6, 2, 4, dtype=DT)

    def reward(h):
        return -((h - target) ** 2).sum() + h[-1].sin().sum()

    check(model, x, y if with_targets else None, loss="mse", reward=reward)


def test_step_path_equals_sequence_path():
    """gradient() over init/step/flush gives what the whole-sequence fast path gives."""
    model, x, y = make_problem(7, 3, 2, 5, 2, alpha=0.7, readout="softmax",
                               loss="cross_entropy")
    h0 = torch.randn(3, 5, dtype=DT)
    mask = torch.rand(7, 3, dtype=DT)
    L1, g1 = rnngrad.gradient(model, x, y, loss="cross_entropy", mask=mask, h0=h0)
    stepwise = rnngrad.bptt()._replace(sequence=None)
    L2, g2 = rnngrad.gradient(model, x, y, loss="cross_entropy", mask=mask, h0=h0,
                              algorithm=stepwise)
    assert abs(float(L1 - L2)) < 1e-13
    assert max_rel_err(g2, g1) < 1e-13


def test_finite_differences():
    """Central differences on every parameter entry (float64, eps = 1e-6)."""
    model, x, y = make_problem(4, 2, 2, 3, 2, alpha=0.8, readout="softmax", loss="mse")
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=DT)
    _, g = rnngrad.gradient(model, x, y, loss="mse", mask=mask)
    eps = 1e-6
    for name, p in model.named_parameters():
        fd = torch.zeros_like(p)
        for idx in itertools.product(*(range(s) for s in p.shape)):
            with torch.no_grad():
                old = p[idx].item()
                p[idx] = old + eps
                lp = reference_loss(model, x, y, loss="mse", mask=mask)
                p[idx] = old - eps
                lm = reference_loss(model, x, y, loss="mse", mask=mask)
                p[idx] = old
            fd[idx] = (lp - lm) / (2 * eps)
        assert rel_err(g[name], fd) < 1e-7, name


def test_sensitivity_lemma():
    """u_t = dL/db_rec(t) (time-varying bias), and dW_rec = sum_t u_t h_{t-1}^T."""
    T, B, H = 6, 3, 4
    model, x, y = make_problem(T, B, 2, H, 2, alpha=0.7)
    h0 = torch.randn(B, H, dtype=DT)
    _, g = rnngrad.gradient(model, x, y, h0=h0, algorithm=rnngrad.bptt(sensitivities=True))
    u = g["u"]
    assert u.shape == (T, B, H)
    # dW_rec from the sensitivities alone
    _, hs = model(x, h0)
    h_prev = torch.cat([h0[None], hs[:-1].detach()])
    dW_rec = torch.einsum("tbi,tbj->ij", u, h_prev)
    assert rel_err(dW_rec, g["W_rec"]) < TOL
    assert rel_err(torch.einsum("tbi,tbj->ij", u, x), g["W_in"]) < TOL
    assert rel_err(u.sum((0, 1)), g["b_rec"]) < TOL
    # u_t is the gradient with respect to a per-step, per-example bias perturbation
    delta = torch.zeros(T, B, H, dtype=DT, requires_grad=True)
    phi = torch.tanh
    h = h0
    L = 0.0
    for t in range(T):
        a = x[t] @ model.W_in.T + h @ model.W_rec.T + model.b_rec + delta[t]
        h = (1 - model.alpha) * h + model.alpha * phi(a)
        L = L + 0.5 * ((h @ model.W_out.T + model.b_out - y[t]) ** 2).sum() / B
    (du,) = torch.autograd.grad(L, delta)
    assert rel_err(u, du) < TOL


def test_set_grad_and_optimizer():
    model, x, y = make_problem(5, 2, 2, 3, 2)
    _, g = rnngrad.gradient(model, x, y, set_grad=True)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, g[n])
    before = model.W_rec.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.allclose(model.W_rec, before - 0.1 * g["W_rec"])


def test_float32_close_to_float64():
    model, x, y = make_problem(20, 8, 3, 16, 2, alpha=0.9)
    _, g64 = rnngrad.gradient(model, x, y)
    m32 = model.to(torch.float32)
    _, g32 = rnngrad.gradient(m32, x.float(), y.float())
    for n in g64:
        assert rel_err(g32[n].double(), g64[n]) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["bptt", "rtrl", "tbptt:3", "eprop", "snap1"])
def test_cuda_matches_cpu(name):
    """Every tensor stays on the device, and the gradients equal the CPU's (float64)."""
    from rnngrad.registry import get_algorithm

    model, x, y = make_problem(6, 3, 2, 5, 2, alpha=0.8)
    _, g_cpu = rnngrad.gradient(model, x, y, algorithm=get_algorithm(name))
    model = model.to("cuda")
    _, g = rnngrad.gradient(model, x.cuda(), y.cuda(), algorithm=get_algorithm(name))
    for n in g_cpu:
        assert g[n].device.type == "cuda"
        assert rel_err(g[n].cpu(), g_cpu[n]) < 1e-10, n


def test_reused_algorithm_object_gives_fresh_results():
    """bptt() keeps work buffers between calls; nothing it returns may alias them."""
    algo = rnngrad.bptt(sensitivities=True)
    model, x, y = make_problem(5, 3, 2, 4, 2)
    _, g1 = rnngrad.gradient(model, x, y, algorithm=algo)
    kept = {k: v.clone() for k, v in g1.items()}
    _, g2 = rnngrad.gradient(model, 2 * x, y, algorithm=algo)  # same shapes: same buffers
    for k in kept:
        assert torch.equal(g1[k], kept[k]), k  # the first result was not overwritten
    _, g3 = rnngrad.gradient(model, 2 * x, y, algorithm=rnngrad.bptt(sensitivities=True))
    assert max_rel_err(g2, g3) == 0.0
    _, g4 = rnngrad.gradient(model, x[:3], y[:3], algorithm=algo)  # other shapes
    check(model, x[:3], y[:3], loss="mse", algorithm=algo)
    assert g4["u"].shape == (3, 3, 4)


def test_reused_algorithm_object_on_an_elman_stack():
    """Each Elman layer of a stack keeps its own buffer in the algorithm's workspace: two
    calls with one bptt() object give what a fresh object gives, and the first call's
    gradients (and sensitivities, one per layer) are not overwritten by the second."""
    from net_reference import net_grads

    torch.manual_seed(5)
    net = rnngrad.Network([rnngrad.cells.Elman(2, 4, dtype=DT), rnngrad.cells.Elman(4, 3, dtype=DT)],
                          2)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 3, 2, generator=g, dtype=DT), torch.randn(6, 3, 2, generator=g, dtype=DT)
    algo = rnngrad.bptt(sensitivities=True)
    _, g1 = rnngrad.gradient(net, x, y, algorithm=algo)
    kept = {k: v.clone() if isinstance(v, torch.Tensor) else tuple(u.clone() for u in v)
            for k, v in g1.items()}
    _, g2 = rnngrad.gradient(net, 2 * x, y, algorithm=algo)
    for k, v in kept.items():
        for a, b in zip(v if isinstance(v, tuple) else (v,),
                        g1[k] if isinstance(g1[k], tuple) else (g1[k],)):
            assert torch.equal(a, b), k
    _, g3 = rnngrad.gradient(net, 2 * x, y, algorithm=rnngrad.bptt(sensitivities=True))
    for k in g3:
        for a, b in zip(g2[k] if isinstance(g2[k], tuple) else (g2[k],),
                        g3[k] if isinstance(g3[k], tuple) else (g3[k],)):
            assert torch.equal(a, b), k
    _, ref = net_grads(net, x, y)
    assert max_rel_err({k: g1[k] for k in ref}, ref) <= TOL


@pytest.mark.parametrize("alpha, reruns", [(1.0, 0), (0.5, 1)])
def test_online_bptt_builds_its_cache_from_the_steps(monkeypatch, alpha, reruns):
    """The step path keeps the states it made; at flush a vanilla tanh Elman layer rebuilds
    its backward pass's cache from them (no second forward pass), a leaky one (phi' needs
    a_t) reruns the forward once. Both give the sequence path's gradient."""
    import rnngrad.cells.elman as elman

    calls = []
    real = elman.unroll

    def spy(model, inputs, h0, **kw):
        calls.append(inputs.shape[0])
        return real(model, inputs, h0, **kw)

    model, x, y = make_problem(7, 3, 2, 4, 2, alpha=alpha)
    _, want = rnngrad.gradient(model, x, y)
    monkeypatch.setattr(elman, "unroll", spy)
    algo = rnngrad.bptt()
    state = algo.init(model, 3)
    for t in range(7):
        state, _, g = algo.step(model, state, x[t], y[t])
        assert g is None
    state, got = algo.flush(model, state)
    assert len(calls) == reruns
    assert max_rel_err(got, want) <= TOL
