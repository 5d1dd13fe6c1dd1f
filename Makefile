# `make run` trains the main job (CPR-MFU under the production failure profile) on the built-in synthetic
# set; `make test` runs the test suite. ARGS="..." adds or overrides `python -m cpr.train` options.
# `make experiments` reruns every experiment of docs/results.md and rewrites it (`make experiments QUICK=1`
# or `make experiments-quick`: the quick variants, minutes each).
# All create .venv with the pinned stack when it is missing and (re)build the extension when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cpr-deps

.PHONY: run test bench install clean experiments experiments-quick

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

# Order matters only for speed: bytes_vs_pls reuses runs of pls_vs_accuracy from the run cache.
EXPERIMENTS := pls_target pls_vs_accuracy failure_injection overhead access_skew bytes_vs_pls real_failures goodput

experiments: install
	set -e; for name in $(EXPERIMENTS); do $(PY) experiments/$$name.py $(if $(QUICK),--quick); done
	$(PY) experiments/write_results.py

experiments-quick:
	$(MAKE) experiments QUICK=1

clean:
	rm -rf build *.egg-info cpr/_C*.so
