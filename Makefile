# Two commands set up everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUF := npx --yes @bufbuild/buf@1.75.0
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')

export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help venv install generate check-generated run migrate test test-unit test-integration test-e2e lint buf-lint buf-breaking bench bench-smoke h2load clean wheels image test-container
.PHONY: node-deps

help:
	@echo "make run        serve on 127.0.0.1:50051 with an embedded SQLite database"
	@echo "make test       create the venv, install, run the whole suite"
	@echo "make test-unit | test-integration | test-e2e   one tier of it"
	@echo "make lint       ruff, mypy --strict, import layering, buf lint, generated-code drift"
	@echo "make generate   rebuild generated/ from proto/"
	@echo "make bench      performance targets as ratios (BENCH_USERS=1000000 for the full run)"
	@echo "make bench-smoke the bench for a second per scenario (CI)"
	@echo "make image      build the container image (usersvc:dev)"
	@echo "make test-container  build the image and test it in a real container"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The API package first: the server depends on it by name, and it is not on any index.
$(STAMP): $(BIN)/python pyproject.toml generated/pyproject.toml
	$(BIN)/python -m pip install --quiet -e './generated[jwt]'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv install: $(STAMP)

generate: $(STAMP)
	$(BIN)/python scripts/generate.py generated

check-generated: $(STAMP)
	$(BIN)/python scripts/generate.py --check generated

run: $(STAMP)
	$(BIN)/usersvc serve --migrate

migrate: $(STAMP)
	$(BIN)/usersvc migrate

test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

# Stores against the fakes and both databases, repositories, migrations, the dispatcher.
test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/contract tests/integration

# Real servers on free ports, real stubs.
test-e2e: $(STAMP)
	$(BIN)/python -m pytest tests/e2e

lint: $(STAMP) check-generated buf-lint
	$(BIN)/ruff check src tests migrations scripts generated/userservice/client
	$(BIN)/ruff format --check src tests migrations scripts generated/userservice/client
	$(BIN)/mypy
	$(BIN)/lint-imports

buf-lint:
	$(BUF) lint

# The Node.js client test's packages (pinned by tests/node/package-lock.json), when npm is here.
NPM := $(shell command -v npm 2>/dev/null)
NODE_DEPS := tests/node/node_modules/.package-lock.json

node-deps: $(if $(NPM),$(NODE_DEPS))

$(NODE_DEPS): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error

test test-e2e: node-deps

# Compares the contract with main's; run before merging a contract change.
buf-breaking:
	$(BUF) breaking --against '.git#branch=main'

# Every performance target as a ratio measured in one run (see tests/bench/run.py; BatchGetUsers
# on SQLite separately); writes bench/results/latest.{md,json}. BENCH_USERS users are seeded for the ListUsers scenario.
BENCH_USERS ?= 100000
bench: $(STAMP) h2load
	$(BIN)/python -m tests.bench.run --users $(BENCH_USERS) --readme README.md
	$(BIN)/python -m tests.bench.batch_get_users --database sqlite

# The same scenarios for a second each (ratios not asserted): keeps the bench from rotting.
bench-smoke: $(STAMP) h2load
	$(BIN)/python -m tests.bench.run --smoke --out $(or $(BENCH_OUT),.bench-smoke)

h2load:
	@command -v h2load >/dev/null || (apt-get install -y -qq nghttp2-client >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nghttp2-client >/dev/null 2>&1)) \
	  || { echo "h2load (nghttp2-client) is needed by the bench"; exit 1; }

# Wheels of usersvc and every dependency, for the image (built here: the image build needs
# no network and no compiler).
wheels: $(STAMP)
	rm -rf dist/wheels
	$(BIN)/python -m pip wheel --quiet --wheel-dir dist/wheels ./generated .

image: wheels
	docker build --tag usersvc:dev .

# Installs Docker and debootstrap if missing, starts the daemon if none runs, builds the base
# image from Debian packages (cached), then builds and runs the image in tests.
test-container: $(STAMP)
	bash tests/container/prepare.sh
	$(BIN)/python -m pytest -m container tests/container

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache dist .bench-smoke
	rm -rf tests/node/node_modules build generated/build generated/*.egg-info
