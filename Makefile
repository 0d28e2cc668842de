# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
RNNGRAD := $(VENV)/bin/rnngrad

.PHONY: setup demo train sweep test lint bench clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

# the main job: every gradient algorithm trained from the same weights on the same data.
# demo and train replace their own earlier run (--overwrite): seeded, they give the same
# result again, so nothing is lost; rnngrad itself never overwrites a run unasked
demo: setup
	$(RNNGRAD) compare --task digits --algorithms bptt,tbptt:4,rtrl,eprop,rflo,snap1,uoro,kf_rtrl --seeds 3 --steps 300 --hidden 32 --out runs/demo --overwrite

train: setup
	$(RNNGRAD) train --task digits --algorithm bptt --hidden 64 --batch-size 32 --steps 2000 --lr 1e-2 --seed 0 --out runs/digits --overwrite

# docs/sweep.md: 16 trials on an embedded 2-worker Ray (again: finished trials are skipped)
sweep: setup
	$(RNNGRAD) sweep --task digits --algorithms bptt,rtrl,eprop,uoro --hidden 16 --lr 1e-2,3e-2 --seeds 2 --steps 200 --log-every 20 --track-alignment 20 --workers 2 --out runs/sweep-docs --resume

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check rnngrad tests benchmarks

bench: setup
	$(PY) benchmarks/bptt.py

clean:
	rm -rf runs .pytest_cache
