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

.PHONY: install run test lint typecheck pytest bench clean help

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

test: install lint typecheck pytest ## the whole suite: ruff, mypy --strict, pytest

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install ## mypy --strict over every package
	$(VENV)/bin/mypy

pytest: install ## the tests (real NATS and Postgres started by the harness)
	$(VENV)/bin/pytest

clean: ## remove the virtual environments and caches (keeps .spendgate state)
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
