"""The README's Python example runs as written."""

from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    code = text[start:text.index("```", start)]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert set(scope["g_rtrl"]) == {"W_in", "W_rec", "b_rec", "W_out", "b_out"}
    import torch

    # the online example, flushed, sums to the whole-sequence RTRL gradient
    total, g = scope["total"], scope["g_rtrl"]
    for k in g:
        torch.testing.assert_close(total[k], g[k], rtol=1e-5, atol=1e-6)


def test_readme_cells_example_runs():
    """The "Any cell" example: a GRU, an LSTM stack and a user's 15-line cell, each with
    every algorithm that applies, return gradients keyed like the network's parameters."""
    import torch

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    first = text.index("```python\n")
    start = text.index("```python\n", first + 1) + len("```python\n")
    code = text[start:text.index("```", start)]
    body = code.count("\n", code.index("class MGU"), code.index("x, y = "))
    assert body <= 21  # the cell (with its state) stays short
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), scope)
    net, grads = scope["net"], scope["grads"]
    assert set(grads) == {n for n, _ in net.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_readme_torch_example_runs():
    """The "Your own torch.nn.LSTM" example: e-prop's gradients land in the module's .grad
    and its optimizer moves the module and the network together; to_torch gives nn.GRU."""
    import torch

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.index("### Your own `torch.nn.LSTM`")
    start = text.index("```python\n", section) + len("```python\n")
    code = text[start:text.index("```", start)]
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), scope)
    lstm, linear, net, x = scope["lstm"], scope["linear"], scope["net"], scope["x"]
    assert lstm.weight_ih_l0.grad is not None
    assert {id(p) for p in net.parameters()} == {id(p) for p in [*lstm.parameters(),
                                                                 *linear.parameters()]}
    with torch.no_grad():
        assert torch.allclose(net(x)[0], linear(lstm(x)[0]), rtol=1e-5, atol=1e-6)
    gru, readout = scope["gru"], scope["readout"]
    assert type(gru) is torch.nn.GRU and gru.num_layers == 2 and readout.out_features == 2
