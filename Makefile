# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first, so that the project's torch>=2.3 installs nothing more.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/hesse analyze --demo digits --out hesse-report

# Style, the layers of ARCHITECTURE.md (import-linter) and types (mypy, configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports
	$(BIN)/mypy

# The suite in parallel, one worker per core (pytest-xdist).
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV) hesse-report

# Side-by-side benchmarks against PyHessian, hessian-eigenthings and curvlinops (own venv).
bench:
	$(MAKE) -C benchmarks bench
