# `make test` and `make demo` set themselves up: a virtualenv in .venv with meshc installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint typecheck unit bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	bash scripts/ensure-system-deps.sh
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check compiler runtime tests bench
	$(BIN)/ruff format --check compiler runtime tests bench
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

# Runtime and security tests run once per HTTP data plane (tests/runtime/conftest.py); CI runs both.
MESHC_DATAPLANES ?= fast,aiohttp
export MESHC_DATAPLANES

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

demo: $(STAMP)
	$(BIN)/meshc demo

bench: $(STAMP)
	$(BIN)/python bench/compile.py
	$(BIN)/python bench/sidecar.py
	$(BIN)/python bench/sidecar_fast.py
	$(BIN)/python bench/sidecar_mtls.py
	$(BIN)/python bench/grpc.py
	$(BIN)/python bench/propagation.py
	$(BIN)/python bench/ha.py
	$(BIN)/python bench/listener_flood.py
	$(BIN)/python bench/chaos.py
	$(BIN)/python bench/fuzz.py

docs: $(STAMP)
	$(BIN)/python -m compiler.docgen
	$(BIN)/meshc schemas

clean:
	rm -rf $(VENV) out .mypy_cache .ruff_cache .pytest_cache
