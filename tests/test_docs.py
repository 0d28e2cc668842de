"""Every public name of rnngrad has a docstring (the API reference, `make docs`, is built
from them; a name without one would be missing from it)."""

import inspect
import types

import pytest

import rnngrad
import rnngrad.algorithms
import rnngrad.cells
import rnngrad.steady
import rnngrad.sweep
import rnngrad.tasks

PUBLIC = [(m, name) for m in (rnngrad, rnngrad.algorithms, rnngrad.cells, rnngrad.steady,
                              rnngrad.tasks, rnngrad.sweep) for name in m.__all__]


def _own_doc(obj) -> str:
    """The docstring written for ``obj`` (not one inherited, nor the one namedtuple and
    dataclass generate: ``Name(field, ...)``)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    doc = (doc or "").strip()
    if isinstance(obj, type) and doc.startswith(f"{obj.__name__}("):
        return ""
    return doc


@pytest.mark.parametrize("module, name", PUBLIC, ids=[f"{m.__name__}.{n}" for m, n in PUBLIC])
def test_every_public_name_has_a_docstring(module, name):
    obj = getattr(module, name)
    if not (isinstance(obj, (type, types.ModuleType)) or callable(obj)):
        pytest.skip(f"{name} is a constant ({type(obj).__name__}); constants have no docstring")
    assert _own_doc(obj), f"{module.__name__}.{name} has no docstring"


@pytest.mark.parametrize("module, name", [(m, n) for m, n in PUBLIC
                                          if isinstance(getattr(m, n), type)],
                         ids=[f"{m.__name__}.{n}" for m, n in PUBLIC
                              if isinstance(getattr(m, n), type)])
def test_the_public_methods_of_public_classes_have_docstrings(module, name):
    cls = getattr(module, name)
    missing = [k for k, v in vars(cls).items()
               if not k.startswith("_") and inspect.isfunction(v) and not (v.__doc__ or "").strip()
               and not any((getattr(getattr(b, k, None), "__doc__", None) or "").strip()
                           for b in cls.__mro__[1:])]
    assert not missing, f"{module.__name__}.{name}: no docstring on {', '.join(missing)}"
