# Two commands set up a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv when it is missing and (re)install the package when pyproject.toml changes.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medscalpel-installed
OUT    ?= runs/demo
PROFILE ?= quick
PYTEST_WORKERS ?= 2

.PHONY: demo test venv benchmark clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,deploy,dicom]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medscalpel demo --out $(OUT) --profile $(PROFILE) --overwrite

test: $(STAMP)
	MEDSCALPEL_INSTALL_BROWSER=$${MEDSCALPEL_INSTALL_BROWSER:-1} $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
