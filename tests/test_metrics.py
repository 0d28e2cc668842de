"""Gradient-quality metrics: cosine, sign agreement, norm ratio."""

import math

import pytest
import torch
from online_refs import make_data, make_model

import rnngrad
from rnngrad.metrics import alignment, alignment_metrics, compare_gradients


def grads_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_rec": torch.randn(4, 4, generator=g, dtype=torch.float64),
            "b_rec": torch.randn(4, generator=g, dtype=torch.float64)}


def test_identity_negation_scaling():
    e = grads_like()
    a = alignment(e, e)
    for n in ("W_rec", "b_rec", "all"):
        assert a[n]["cosine"] == pytest.approx(1.0)
        assert a[n]["sign_agreement"] == 1.0 and a[n]["norm_ratio"] == pytest.approx(1.0)
    neg = alignment({k: -3 * v for k, v in e.items()}, e)["all"]
    assert neg["cosine"] == pytest.approx(-1.0) and neg["sign_agreement"] == 0.0
    assert neg["norm_ratio"] == pytest.approx(3.0)


def test_overall_is_the_concatenation():
    e, g = grads_like(0), grads_like(1)
    ve = torch.cat([e["W_rec"].flatten(), e["b_rec"]])
    vg = torch.cat([g["W_rec"].flatten(), g["b_rec"]])
    a = alignment(g, e)["all"]
    assert a["cosine"] == pytest.approx(float(vg @ ve / (vg.norm() * ve.norm())))
    assert a["sign_agreement"] == pytest.approx(float((vg.sign() == ve.sign()).double().mean()))
    assert a["norm_ratio"] == pytest.approx(float(vg.norm() / ve.norm()))


def test_params_subset_zero_and_errors():
    e, g = grads_like(0), grads_like(1)
    assert set(alignment(g, e, params=["b_rec"])) == {"b_rec", "all"}
    z = alignment({k: torch.zeros_like(v) for k, v in e.items()}, e)["all"]
    assert math.isnan(z["cosine"]) and z["norm_ratio"] == 0.0
    with pytest.raises(KeyError, match="approx has no gradient 'W_in'"):
        alignment(g, e, params=["W_in"])
    with pytest.raises(ValueError, match="shape"):
        alignment({"W_rec": torch.zeros(3, 3)}, e, params=["W_rec"])


def test_compare_gradients_and_training_hook():
    model = make_model(alpha=0.5, H=5)
    x, y, mask = make_data()
    out = compare_gradients(model, x, y, [("eprop", rnngrad.eprop()), rnngrad.snap1(),
                                          ("bptt", rnngrad.bptt())], mask=mask)
    assert set(out) == {"eprop", "snap1()", "bptt"}
    assert out["bptt"]["all"]["cosine"] == pytest.approx(1.0)
    assert 0.0 < out["eprop"]["all"]["cosine"] < 1.0
    assert out["eprop"]["W_out"]["cosine"] == pytest.approx(1.0)  # exact readout gradient
    m = alignment_metrics(model, (x, y, mask), rnngrad.eprop(), per_param=True)
    assert m["cosine"] == pytest.approx(out["eprop"]["all"]["cosine"])
    assert "cosine/W_rec" in m and all(isinstance(v, float) for v in m.values())
    _, g = rnngrad.gradient(model, x, y, algorithm=rnngrad.eprop(), mask=mask)
    assert alignment_metrics(model, (x, y, mask), rnngrad.eprop(), approx=g) == {
        k: v for k, v in m.items() if "/" not in k}
