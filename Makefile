# Two commands do all set-up from a clean clone (see README):
#   make run    create .venv, install qpipe, run the default pipeline
#   make test   create .venv, install qpipe with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.qpipe-installed

.PHONY: run test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/qpipe run pipeline.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts build dist *.egg-info
