# rayplane: `make demo` runs the main job on the local platform, `make test` runs the tests.
# Both set everything up on a fresh machine: uv (in .tools/), the locked environment (.venv/,
# torch's CPU build from the folder PIP_FIND_LINKS names) and the system services tests need.

SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
VENV := .venv
PYTEST_ARGS ?=
# CI's time budget made visible: every `make test*` prints its 25 slowest tests.
PYTEST := $(VENV)/bin/pytest --durations=25

.PHONY: env system-deps demo test test-fast test-unit test-integration down status lint clean

# Services the platform runs beside Ray and the tests use for real: Debian's PostgreSQL 15 (the
# agents' checkpoints), prometheus (with promtool) and redis-server (the head's GCS fault
# tolerance, `rayplane up --ha`).

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet "uv==$(UV_VERSION)"

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --locked --extra cpu --extra dev --extra tensorflow --find-links "$(FIND_LINKS)" --compile-bytecode
	touch $@

# engine: triton on the local platform: nvidia-pytriton's bundled tritonserver and its Python
# backend, in a folder of their own with the numpy < 2 its stub is built for (the package pins
# it; this environment has numpy 2). Only the binaries are used, never pytriton's Python API
# (serve/engines/triton_server.py).
TRITON_DIR := .triton
$(TRITON_DIR)/.installed: $(UV)
	rm -rf $(TRITON_DIR)
	$(UV) pip install --quiet --no-deps --target $(TRITON_DIR) "nvidia-pytriton==0.7.0" "numpy==1.26.4"
	touch $@

env: $(VENV)/.synced $(TRITON_DIR)/.installed

# PostgreSQL's server binaries are off PATH on Debian (/usr/lib/postgresql/<version>/bin):
# found the way the platform finds them (raycluster/local/postgres.py).
system-deps:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	ldconfig -p | grep -q 'libpython3.11.so.1.0 ' || missing="$$missing libpython3.11"; \
	{ [ -x "$$(pg_config --bindir 2>/dev/null)/initdb" ] || ls /usr/lib/postgresql/*/bin/initdb \
	  >/dev/null 2>&1 || command -v initdb >/dev/null; } || missing="$$missing postgresql-15"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: env
	$(VENV)/bin/rayplane demo

down: env
	$(VENV)/bin/rayplane down

status: env
	$(VENV)/bin/rayplane status

# Lint first, so that CI (which runs `make test`) enforces the import contracts too. pytest's
# exit status is make's: a failure, or no test collected (5), fails the target.
test: lint system-deps
	$(PYTEST) $(PYTEST_ARGS)

# Everything but the tests marked slow (each over about a minute: training runs, the demo,
# Serve fault tolerance, the Terraform apply cycle).
test-fast: lint system-deps
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

test-unit: env
	$(PYTEST) tests/unit $(PYTEST_ARGS)

test-integration: env system-deps
	$(PYTEST) tests/integration $(PYTEST_ARGS)

# ruff, then the import contracts of pyproject.toml ([tool.importlinter]: the layers of
# docs/architecture.md, no CLI in libraries, no import cycles).
lint: env
	$(VENV)/bin/ruff check raycluster features train serve agents bench tests
	$(VENV)/bin/lint-imports --no-cache --no-logo

clean:
	rm -rf .tools $(VENV) $(TRITON_DIR) .pytest_cache
