# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
RNNGRAD := $(VENV)/bin/rnngrad

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(RNNGRAD) train --task digits --algorithm bptt --hidden 64 --steps 2000 --lr 1e-2 --seed 0 --out runs/digits

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check rnngrad tests benchmarks

bench: setup
	$(PY) benchmarks/bptt.py

clean:
	rm -rf runs .pytest_cache
