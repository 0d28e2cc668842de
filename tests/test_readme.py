"""The README's Python example runs as written."""

from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    code = text[start:text.index("```", start)]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert set(scope["g_rtrl"]) == {"W_in", "W_rec", "b_rec", "W_out", "b_out"}
