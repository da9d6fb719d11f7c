# Spendgate's two commands (see README.md):
#   make run   installs everything and runs Spendgate locally (embedded NATS and Postgres)
#   make test  installs everything and runs the whole test suite (lint, types, tests)
# Nothing is needed beforehand but Python >= 3.11 and make.

PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
# Never let uv download an interpreter: use the one we were given.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install run test lint typecheck deploy-check pytest bench bench-ledger bench-auditor bench-gateway clean help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

$(UV):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Spendgate needs Python >= 3.11"'
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

install: $(UV) ## install the locked dependencies into .venv
	$(UV) sync --locked --python $(PYTHON)

run: install ## run Spendgate locally: embedded NATS + Postgres + all three services
	$(VENV)/bin/spendgate up

test: install lint typecheck deploy-check pytest ## the whole suite: ruff, mypy --strict, deploy checks, pytest

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install ## mypy --strict over every package
	$(VENV)/bin/mypy

# About a second, offline: kustomize build of every overlay, Kubernetes schema validation,
# our manifest rules, hadolint, the Tiltfile in Starlark, the alert rules and the Grafana
# dashboard against docs/operations.md's metrics (see deploy/check.py).
deploy-check: install ## check the Dockerfile, deploy/k8s, the Tiltfile, alert rules and dashboard
	$(VENV)/bin/python -m deploy.check

pytest: install ## the tests (real NATS and Postgres started by the harness)
	$(VENV)/bin/pytest

# Not part of `make test`: it takes a few minutes and measures, it does not check code.
# Options: make bench-ledger BENCH_ARGS="--duration 10 --levels 64,1024" (see --help).
bench-ledger: install ## ledger benchmark: hot-budget pairs/s vs. a one-row UPDATE (bench/results/)
	$(VENV)/bin/python -m bench.ledger $(BENCH_ARGS)

# Not part of `make test` either: about seven minutes of open-loop load through one gateway.
# Options: make bench-gateway BENCH_ARGS="--rates 500 --keys 1 --no-search" (see --help).
bench-gateway: install ## gateway benchmark: latency one gateway adds at fixed rates (bench/results/)
	$(VENV)/bin/python -m bench.gateway $(BENCH_ARGS)

# Not part of `make test` either: 100,000 events, then the auditor timed until caught up.
# Options: make bench-auditor BENCH_ARGS="--events 200000 --fetch-messages-max 1000".
bench-auditor: install ## auditor catch-up benchmark: 100k events, under 30 s (bench/results/)
	$(VENV)/bin/python -m bench.auditor $(BENCH_ARGS)

clean: ## remove the virtual environments and caches (keeps .spendgate state)
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
