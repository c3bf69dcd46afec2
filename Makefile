# The README's two commands. Both set up a .venv in the checkout on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast timm-suite bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job. Until the detection tools land it prints the model summary and a short benchmark.
demo: setup
	$(PY) tools/bench.py summary
	$(PY) tools/bench.py backbone --models resnet50 --repeats 3 --output runs/demo/bench.json

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# timm's own model test suite over the rb_* names (see README, "A timm citizen").
timm-suite: setup
	$(PY) tools/run_timm_suite.py

bench: setup
	$(PY) tools/bench.py backbone

clean:
	rm -rf $(VENV) .cache runs
