# Two commands do everything on a fresh machine:
#   make demo   - create .venv if missing, install, generate a synthetic utility, run the job, print results
#   make test   - create .venv if missing, install with test extras, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/phaseid demo --out demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf demo results .pytest_cache
