# The README's two commands. Both set up a .venv in the checkout on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast timm-suite bench clean

setup: $(STAMP)

# constraints.txt pins the exact versions the project is tested with; pyproject.toml keeps open ranges.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,deploy,eval]'
	touch $(STAMP)

# The main job: train a detector on the embedded synthetic data, evaluate it with COCO metrics and
# draw its predictions (runs/demo/metrics.json, detections.json, predictions/*.png).
demo: setup
	$(PY) tools/train_det.py --config configs/det/demo.yaml --output runs/demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not study"

# timm's own model test suite over the rb_* names (docs/timm.md).
timm-suite: setup
	$(PY) tools/run_timm_suite.py

bench: setup
	$(PY) tools/bench.py backbone

clean:
	rm -rf $(VENV) .cache runs
