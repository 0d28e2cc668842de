"""The IndRNN worked example of docs/cells.md, run from the docs' own code block: the plain
cell (init_state / step / output) and the declared one (``diagonal = True``, ``linearize``
with ``local``, ``eligibility``, ``immediate``). Float64, relative error <= 1e-10:

- SnAp-1, e-prop and RTRL through ``rnngrad.gradient`` (the sequence form where the rule
  takes it) equal the sum of what their online init / step / flush emit;
- on this cell units do not couple, so SnAp-1 and RTRL are exact RTRL (Menick et al.
  2021) and e-prop with the declared eligibility (the whole per-unit block) is too: all
  three equal autograd through the network's forward;
- the declared cell takes the sequence form for RTRL, the plain one does not (it has no
  ``diagonal``: RTRL keeps its dense influence);
- ``rnngrad check --cell``'s comparison of every exact algorithm (BPTT, checkpointed,
  TBPTT, RTRL) with autograd passes on both.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from net_reference import max_rel_err, net_grads

import rnngrad
from rnngrad.check import run_checks

DOC = Path(__file__).resolve().parent.parent / "docs" / "cells.md"
TOL = 1e-10
D, H, K, T, B = 3, 5, 2, 8, 4


def doc_code() -> str:
    sec = DOC.read_text().split("### Worked example: an IndRNN cell", 1)[1]
    return re.search(r"```python\n(.*?)```", sec, re.S).group(1)


@pytest.fixture(scope="module")
def cells():
    ns: dict = {"__name__": "indrnn_doc"}
    exec(compile(doc_code(), str(DOC), "exec"), ns)
    return ns


def rel(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))
    return max(rel(x, y) for x, y in zip(a, b))


def problem(cells, version):
    torch.manual_seed(0)
    net = rnngrad.Network(cells[version](D, H, dtype=torch.float64), K)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=g, dtype=torch.float64)
    y = torch.randn(T, B, K, generator=g, dtype=torch.float64)
    mask = torch.randint(0, 3, (T, B), generator=g).double() * 0.5
    h0 = (type(net.init_state(B)[0])(0.5 * torch.rand(B, H, generator=g, dtype=torch.float64)),)
    return net, x, y, mask, h0


RULES = {"snap1": rnngrad.snap1, "eprop": rnngrad.eprop, "rtrl": rnngrad.rtrl}


@pytest.mark.parametrize("version", ["IndRNN", "FastIndRNN"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_rules_equal_their_online_steps_and_autograd(cells, version, rule):
    net, x, y, mask, h0 = problem(cells, version)
    algo = RULES[rule]()
    kw = {"mask": mask, "h0": h0}
    v1, g1 = rnngrad.gradient(net, x, y, algorithm=algo, **kw)
    v2, g2 = rnngrad.gradient(net, x, y, algorithm=algo._replace(sequence=None), **kw)
    assert abs(float(v1 - v2)) <= TOL * max(1.0, abs(float(v2)))
    assert set(g1) == set(g2)
    for n in g2:
        assert rel(g1[n], g2[n]) <= TOL, (n, rel(g1[n], g2[n]))
    _, ref = net_grads(net, x, y, mask=mask, state0=h0)
    assert max_rel_err(g1, ref) <= TOL
    assert all(float(g1[n].abs().max()) > 0 for n in g1 if n.split(".")[-1] in "Wub")


def test_only_the_declared_cell_takes_rtrl_in_sequence_form(cells):
    for version, fast in (("IndRNN", False), ("FastIndRNN", True)):
        net, x, y, mask, h0 = problem(cells, version)
        out = rnngrad.rtrl().sequence(net, x, y, mask, h0, "mse", None)
        assert (out is not None) == fast, version


def test_the_declarations_are_what_torch_func_derives(cells):
    """The declared fields equal the plain cell's torch.func derivation, on one step."""
    torch.manual_seed(0)
    fast = cells["FastIndRNN"](D, H, dtype=torch.float64)
    plain = cells["IndRNN"](D, H, dtype=torch.float64)
    plain.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    s = type(fast.init_state(B))(torch.randn(B, H, generator=g, dtype=torch.float64))
    need = ("local", "eligibility", "immediate", "jacobian", "input_jacobian")
    with torch.no_grad():  # as the algorithms call it
        a = fast.linearize(fast.params(), s, x, need=need)
        b = plain.linearize(plain.params(), s, x, need=need)
    assert torch.equal(a.state.h, b.state.h)
    for f in ("local", "eligibility", "jacobian", "input_jacobian"):
        assert rel(getattr(a, f), getattr(b, f)) <= TOL, f
    for n in ("W", "u", "b"):
        assert rel(a.immediate[n].dense(), b.immediate[n].dense()) <= TOL, n


@pytest.mark.parametrize("version", ["IndRNN", "FastIndRNN"])
def test_rnngrad_check_passes(cells, version, tmp_path, monkeypatch):
    """What ``rnngrad check --cell indrnn_doc:<version>`` runs: BPTT (checkpointed, TBPTT)
    and RTRL against autograd, the cell alone and stacked, 1e-10."""
    (tmp_path / "indrnn_doc.py").write_text(doc_code())
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = run_checks(cell=f"indrnn_doc:{version}")
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert any(r.algorithm == "bptt()" for r in rows)
