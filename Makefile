# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
RNNGRAD := $(VENV)/bin/rnngrad

.PHONY: setup demo train sweep test docs lint bench clean

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

# docs/sweep.md: a random search (4 learning rates per algorithm) with ASHA early stopping,
# 12 trials on an embedded 2-worker Ray (again: --resume only rebuilds the table)
sweep: setup
	$(RNNGRAD) sweep --task digits --algorithms bptt,eprop,uoro --hidden 16 --lr loguniform:3e-3:1e-1 --samples 4 --scheduler asha --metric test_loss_per_step --steps 200 --log-every 20 --track-alignment 20 --workers 2 --out runs/sweep-docs --resume

test: setup
	$(PY) -m pytest -q

# the API reference and the pages of docs/ as a site in site/ (open site/index.html);
# --strict: a warning (a reference to a missing name, a broken link) fails the build
$(VENV)/.docs-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict

lint: setup
	$(VENV)/bin/ruff check rnngrad tests benchmarks

bench: setup
	$(PY) benchmarks/bptt.py

clean:
	rm -rf runs .pytest_cache site
