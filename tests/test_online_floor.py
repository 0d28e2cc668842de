"""The fast paths of the online rules on ``rnngrad.RNN`` (in-place traces, reused buffers):
every emitted gradient equals the plain equations step by step (float64, the same random
signs), what a step returns is never overwritten by a later step, and the state's large
buffers are the same from step to step (nothing of their size is allocated per step)."""

import math
import sys

import pytest
import torch
from online_refs import make_data, make_model

import rnngrad
from rnngrad.algorithms._signs import BLOCK, draw
from rnngrad.algorithms.eprop import random_feedback
from rnngrad.cells import get_activation
from rnngrad.readouts import loss_and_grad

RULES = {
    "eprop": lambda: rnngrad.eprop(),
    "eprop_random": lambda: rnngrad.eprop("random", seed=3),
    "rflo": lambda: rnngrad.rflo(seed=2),
    "snap1": lambda: rnngrad.snap1(),
    "uoro": lambda: rnngrad.uoro(seed=4),
    "kf_rtrl": lambda: rnngrad.kf_rtrl(seed=5),
}
EPS = 1e-7  # the default eps of uoro() and kf_rtrl()


class Ref:
    """The rules' equations, written plainly: new tensors every step, einsum contractions."""

    def __init__(self, name, model, B, h0=None):
        self.name, self.m, self.B = name, model, B
        H, D = model.hidden_size, model.input_size
        P = H + D + 1
        z = torch.zeros(B, H, P, dtype=torch.float64)
        self.h = torch.zeros(B, H, dtype=torch.float64) if h0 is None else h0.clone()
        self.trace, self.th, self.ht = z, z.clone(), torch.zeros(B, H, dtype=torch.float64)
        self.u, self.A = torch.zeros(B, P, dtype=torch.float64), torch.zeros(H, B, H,
                                                                               dtype=torch.float64)
        self.c = None if h0 is None else torch.ones(B, H, dtype=torch.float64)
        self.fb = model.W_out.detach()
        if name in ("eprop_random", "rflo"):
            self.fb = random_feedback(model, 3 if name == "eprop_random" else 2)
        seed = {"uoro": 4, "kf_rtrl": 5}.get(name)
        self.gen = None if seed is None else torch.Generator().manual_seed(seed)
        self.block, self.pos = None, 0

    def signs(self, shape):
        # the rules draw a block of BLOCK steps' signs in one call and take a row a step
        if self.block is None or self.pos == BLOCK:
            self.block, self.pos = draw(self.gen, BLOCK, shape, torch.zeros((), dtype=torch.float64)), 0
        self.pos += 1
        return self.block[self.pos - 1]

    @torch.no_grad()
    def step(self, x, y, mask, dh):
        m, B, alpha = self.m, self.B, self.m.alpha
        W_rec, W_out = m.W_rec.detach(), m.W_out.detach()
        H = W_rec.shape[0]
        act = get_activation(m.activation)
        a = x @ m.W_in.detach().T + self.h @ W_rec.T + m.b_rec.detach()
        h = (1 - alpha) * self.h + alpha * act.fn(a)
        d = alpha * act.deriv(a, act.fn(a))
        pre = torch.cat([self.h, x, torch.ones(B, 1, dtype=torch.float64)], 1)
        zt = h @ W_out.T + m.b_out.detach()
        dz = None
        if y is not None:
            w = (torch.ones(B, dtype=torch.float64) if mask is None else mask) / B
            _, dz = loss_and_grad(zt, y, w, loss="mse", readout_name=m.readout)
        fb = W_out if self.name in ("snap1", "uoro", "kf_rtrl") else self.fb
        q = None if dz is None else dz @ fb
        if dh is not None:
            q = dh if q is None else q + dh
        G, h0 = None, None
        if self.name in ("eprop", "eprop_random", "rflo"):
            self.trace = (1 - alpha) * self.trace + d[:, :, None] * pre[:, None, :]
            if q is not None:
                G = torch.einsum("bi,bij->ij", q, self.trace)
            if self.c is not None:
                self.c = self.c * (1 - alpha)
                h0 = None if q is None else q * self.c
        elif self.name == "snap1":
            Jd = d * W_rec.diagonal() + (1 - alpha)
            self.trace = Jd[:, :, None] * self.trace + d[:, :, None] * pre[:, None, :]
            if q is not None:
                G = torch.einsum("bi,bij->ij", q, self.trace)
            if self.c is not None:
                self.c = self.c * Jd
                h0 = None if q is None else q * self.c
        elif self.name == "uoro":
            nu = self.signs((B, H))
            Jh = (1 - alpha) * self.ht + d * (self.ht @ W_rec.T)
            rho0 = torch.sqrt((self.th.flatten(1).norm(dim=1) + EPS) / (Jh.norm(dim=1) + EPS))
            rho1 = torch.sqrt((d.norm(dim=1) * pre.norm(dim=1) + EPS) / (math.sqrt(H) + EPS))
            self.ht = rho0[:, None] * Jh + rho1[:, None] * nu
            self.th = (self.th / rho0[:, None, None]
                       + (nu * d / rho1[:, None])[:, :, None] * pre[:, None, :])
            if q is not None:
                G = torch.einsum("b,bij->ij", (q * self.ht).sum(1), self.th)
        else:  # kf_rtrl
            c = self.signs((2, B))
            WA = torch.einsum("kl,lbi->kbi", W_rec, self.A)
            JA = (1 - alpha) * self.A + d.T[:, :, None] * WA
            p1 = torch.sqrt((JA.square().sum((0, 2)).sqrt() + EPS) / (self.u.norm(dim=1) + EPS))
            p2 = torch.sqrt((d.norm(dim=1) + EPS) / (pre.norm(dim=1) + EPS))
            self.u = (c[0] * p1)[:, None] * self.u + (c[1] * p2)[:, None] * pre
            self.A = (c[0] / p1)[None, :, None] * JA + torch.einsum(
                "bk,ki->kbi", d * (c[1] / p2)[:, None], torch.eye(H, dtype=torch.float64))
            if q is not None:
                G = torch.einsum("bk,kbi->bi", q, self.A).T @ self.u
        self.h = h
        if G is None and dz is None:
            return None
        D = m.input_size
        G = torch.zeros(H, H + D + 1, dtype=torch.float64) if G is None else G
        out = {"W_rec": G[:, :H], "W_in": G[:, H:H + D], "b_rec": G[:, H + D],
               "W_out": torch.zeros_like(W_out) if dz is None else dz.T @ h,
               "b_out": torch.zeros(W_out.shape[0], dtype=torch.float64) if dz is None
               else dz.sum(0)}
        if self.c is not None:
            out["h0"] = torch.zeros_like(h) if h0 is None else h0
        return out


def drive(name, alpha, B, *, with_h0=False, T=7, activation="tanh"):
    """Run the rule and the reference side by side; yield (step, rule grads, ref grads)."""
    model = make_model(alpha=alpha, H=5, D=3, K=2, activation=activation)
    x, y, mask = make_data(T=T, B=B)
    g = torch.Generator().manual_seed(7)
    dh = torch.randn(T, B, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, 5, generator=g, dtype=torch.float64) if with_h0 else None
    algo = RULES[name]()
    state = algo.init(model, B, h0=h0)
    ref = Ref(name, model, B, h0)
    for t in range(T):
        # every kind of step: plain, masked, no target, a reward's dh_t, neither (no emission)
        kind = t % 5
        y_t = None if kind in (2, 4) else y[t]
        m_t = mask[t] if kind == 1 else None
        dh_t = dh[t] if kind in (2, 3) else None
        state, out, grads = algo.step(model, state, x[t], y_t, mask_t=m_t, dh_t=dh_t)
        expect = ref.step(x[t], y_t, m_t, dh_t)
        torch.testing.assert_close(out.h, ref.h, rtol=1e-13, atol=1e-14)
        yield t, grads, expect


@pytest.fixture(params=["one block", "a block per row"])
def blocks(request, monkeypatch):
    """The traces are updated and contracted in row blocks; run with one block (these
    sizes) and with every row a block of its own."""
    if request.param == "a block per row":
        online = sys.modules["rnngrad.algorithms._online"]
        monkeypatch.setattr(online, "BLOCK_BYTES", 1)
        monkeypatch.setattr(online, "BLOCKED_ABOVE", 0)
    return request.param


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
@pytest.mark.parametrize("name", RULES)
def test_emitted_gradients_are_the_equations(name, alpha, B, blocks):
    for t, grads, expect in drive(name, alpha, B):
        if expect is None:
            assert grads is None, t
            continue
        assert set(grads) == set(expect), t
        for k, v in expect.items():
            torch.testing.assert_close(grads[k], v, rtol=1e-11, atol=1e-13, msg=f"{k} at {t}")


@pytest.mark.parametrize("name", ["eprop", "snap1"])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_h0_gradient_and_relu(name, alpha, blocks):
    for act in ("tanh", "relu"):
        for t, grads, expect in drive(name, alpha, 3, with_h0=True, activation=act):
            if expect is not None:
                for k, v in expect.items():
                    torch.testing.assert_close(grads[k], v, rtol=1e-11, atol=1e-13,
                                               msg=f"{k} at {t} ({act})")


ALL = {**RULES, "rtrl": lambda: rnngrad.rtrl()}


def storages(obj) -> set[int]:
    if isinstance(obj, torch.Tensor):
        return {obj.untyped_storage().data_ptr()}
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return set().union(*(storages(v) for v in obj)) if obj else set()
    return set()


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("name", ALL)
def test_returned_tensors_are_not_overwritten_by_later_steps(name, alpha, B):
    model = make_model(alpha=alpha, H=6, D=3, K=2).float()
    x, y, _ = make_data(T=6, B=B)
    x, y = x.float(), y.float()
    algo = ALL[name]()
    state = algo.init(model, B)
    kept = []
    for t in range(6):
        state, out, grads = algo.step(model, state, x[t], y[t])
        # nothing a step returns lives in the state's buffers
        assert not storages(grads) & storages(state), t
        assert not storages([out.z, out.loss]) & storages(state), t
        kept.append((out, grads, {k: v.clone() for k, v in grads.items()}, out.h.clone(),
                     out.z.clone()))
    for t, (out, grads, copy, h, z) in enumerate(kept):
        for k in grads:
            assert torch.equal(grads[k], copy[k]), (t, k)
        assert torch.equal(out.h, h) and torch.equal(out.z, z), t


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("name", ALL)
def test_state_buffers_are_reused(name, alpha):
    """From the second step on, the state's tensors larger than (B, H) live in the same
    storages step after step (two alternating ones for KF-RTRL and RTRL)."""
    B, H = 4, 6
    model = make_model(alpha=alpha, H=H, D=3, K=2)
    x, y, _ = make_data(T=6, B=B)
    algo = ALL[name]()
    state = algo.init(model, B)

    def big(s):
        out = set()
        for v in s:
            if isinstance(v, tuple):
                out |= big(v)
            elif isinstance(v, torch.Tensor) and v.numel() > B * H:
                out.add(v.untyped_storage().data_ptr())
        return out

    first = big(state)
    for t in range(6):
        state, _, _ = algo.step(model, state, x[t], y[t])
        assert big(state) == first, t
