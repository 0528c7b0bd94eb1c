# tdapp — two commands set everything up on a fresh Debian machine:
#   make demo   installs into .venv and runs the seed's walkthrough end to end
#   make test   installs what the tests need (system packages too) and runs the whole suite

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
SYSTEM_PKGS := bubblewrap fuse3 postgresql curl redis-server
BENCH_PKGS  := gocryptfs age fuse3

.PHONY: all install sysdeps bench-deps demo volume-demo test test-fast test-slow lint bench bench-shield clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests or benchmarks use; installed only when missing.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

sysdeps:
	$(call apt_install,$(SYSTEM_PKGS))

bench-deps:
	$(call apt_install,$(BENCH_PKGS))

demo: install sysdeps
	@bash scripts/demo.sh

volume-demo: install
	@bash scripts/volume-demo.sh

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy --strict src
	$(BIN)/lint-imports

# Two workers, each taking whole test files (their module fixtures stay on one worker).
PYTEST_WORKERS ?= 2

test: install sysdeps lint
	$(BIN)/python -m pytest -q -m "not large" -n $(PYTEST_WORKERS) --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not large"

test-slow: install sysdeps
	$(BIN)/python -m pytest -q -m "slow or large"

bench: install bench-deps
	$(BIN)/python benchmarks/volume_throughput.py

bench-shield: install bench-deps
	$(BIN)/python benchmarks/shield_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis demo-work
