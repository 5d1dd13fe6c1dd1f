# `make run` trains the main job (CPR-MFU under the production failure profile) on the built-in synthetic
# set; `make test` runs the test suite. ARGS="..." adds or overrides `python -m cpr.train` options.
# Both create .venv with the pinned stack when it is missing and (re)build the extension when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cpr-deps

.PHONY: run test bench install clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	touch $(STAMP)

install: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

run: install
	$(PY) -m cpr.train --policy mfu --out runs/default --overwrite $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

bench: install
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/tracking.py
	$(PY) benchmarks/policies.py

clean:
	rm -rf build *.egg-info cpr/_C*.so
