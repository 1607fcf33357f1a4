# Two commands do all set-up from a clean clone (see README):
#   make run    create .venv, install qpipe, run the default pipeline
#   make test   create .venv, install qpipe with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.qpipe-installed

.PHONY: run test lint install clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/qpipe run pipeline.yaml

# Two workers (CI has 2 cores), whole test files per worker so module fixtures are built once.
test: $(STAMP) chromium lint
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

# House rules, run by 'make test' (and so by CI): ruff on everything, mypy on the host (qpipe/).
lint: $(STAMP)
	$(VENV)/bin/ruff check qpipe plugins tests examples benchmarks
	$(VENV)/bin/mypy

# The MLflow UI check (tests/test_mlflow_models.py) drives Debian's headless chromium with
# Playwright; installed here when missing and running as root (as in CI), else install it yourself.
chromium:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts build dist *.egg-info
