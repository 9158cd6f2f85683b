# nest_ssl developer commands. Every target installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test lint demo bench bench-train clean

install: $(STAMP)

# Re-runs only when setup.py or the pins change, so a second `make install` takes seconds.
$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Kernel tests run on CPU through Triton's interpreter.
test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS) tests

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
