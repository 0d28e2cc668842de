# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
RNNGRAD := $(VENV)/bin/rnngrad

.PHONY: setup demo train test lint bench clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

# the main job: every gradient algorithm trained from the same weights on the same data
demo: setup
	$(RNNGRAD) compare --task digits --algorithms bptt,tbptt:4,rtrl,eprop,rflo,snap1,uoro,kf_rtrl --seeds 3 --steps 300 --hidden 32 --out runs/demo

train: setup
	$(RNNGRAD) train --task digits --algorithm bptt --hidden 64 --steps 2000 --lr 1e-2 --seed 0 --out runs/digits

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check rnngrad tests benchmarks

bench: setup
	$(PY) benchmarks/bptt.py

clean:
	rm -rf runs .pytest_cache
