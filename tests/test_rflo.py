"""RFLO (Murray 2019): e-prop's trace with random feedback, and Murray's rule written out."""

import pytest
import torch
from online_refs import make_data, make_model

import rnngrad

NAMES = ("W_in", "W_rec", "b_rec", "W_out", "b_out")


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_rflo_is_eprop_with_random_feedback(alpha):
    model = make_model(alpha=alpha)
    x, y, mask = make_data()
    for a, b in ((rnngrad.rflo(seed=2), rnngrad.eprop("random", seed=2)),
                 (rnngrad.rflo("symmetric"), rnngrad.eprop())):
        _, ga = rnngrad.gradient(model, x, y, algorithm=a, mask=mask)
        _, gb = rnngrad.gradient(model, x, y, algorithm=b, mask=mask)
        for n in NAMES:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-12, atol=0.0)


def test_rflo_defaults_and_leaky_trace_differs_from_snap1():
    algo = rnngrad.rflo()
    assert "random" in algo.name and not algo.exact and algo.online
    model = make_model(alpha=0.5)
    x, y, mask = make_data()
    _, g = rnngrad.gradient(model, x, y, algorithm=rnngrad.rflo("symmetric"), mask=mask)
    _, s = rnngrad.gradient(model, x, y, algorithm=rnngrad.snap1(), mask=mask)
    # SnAp-1 keeps alpha phi' W_rec[i, i] in the self-path, RFLO only the leak
    assert not torch.allclose(g["W_rec"], s["W_rec"])
