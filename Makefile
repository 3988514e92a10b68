# Two commands matter: `make up` and `make test`. The rest are helpers.
SHELL := /bin/bash
PYTHON ?= python3
CACHE ?= $(HOME)/.cache/openledger
# The virtualenv lives outside the repository, keyed by the dependency list,
# so a fresh clone (CI) reuses it when nothing changed.
DEPS_KEY := $(shell $(PYTHON) scripts/deps_key.py)
VENV ?= $(CACHE)/venv-$(DEPS_KEY)
PY := $(VENV)/bin/python
export PATH := $(VENV)/bin:$(PATH)

.PHONY: up cluster image down status test unit lint bench soak crds system-deps venv install clean

system-deps:
	@bash scripts/system-deps.sh

$(VENV)/.complete:
	@echo "[openledger] creating virtualenv $(VENV) (first run only)"
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@# llama-cpp-python: built from source once (portable flags), its wheel cached in $(CACHE) by version.
	@wheels=$$(OPENLEDGER_CACHE_DIR=$(CACHE) PYTHONPATH=operator $(PY) -m openledger.local.llm wheel) \
	  && $(PY) -m pip install --quiet --find-links "$$wheels" -e '.[serving,dev]'
	@$(PY) -m pip install --quiet --no-deps $$($(PYTHON) scripts/deps_key.py --no-deps)
	@touch $@

venv: $(VENV)/.complete

# The venv may be shared by several clones: point the editable install at this one.
install: system-deps venv
	@$(PY) -c "import openledger,pathlib,sys; sys.exit(0 if pathlib.Path(openledger.__file__).resolve().parent == pathlib.Path('operator').resolve() else 1)" 2>/dev/null \
	  || $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@ln -sfn $(VENV) .venv

up: install
	@$(PY) -m openledger.cli local up

# make up plus a real node (containerd, kubelet, kube-proxy, CoreDNS) and the product installed by Helm; as root.
cluster: install
	@$(PY) -m openledger.local.toolchain >/dev/null
	@$(PY) -m openledger.cli local cluster

# The product image (Containerfile) from Debian-made bases with buildah, as an OCI archive for
# containerd; cached in $(CACHE)/images by the hash of its inputs. Prints IMAGE_* lines.
image: install
	@$(PY) -m openledger.local.image

down:
	@if [ -x $(PY) ]; then $(PY) -m openledger.cli local down; fi

status:
	@$(PY) -m openledger.cli local status

lint: install
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports

crds: install
	@$(PY) -m openledger.cli crds generate

unit: install
	@$(VENV)/bin/pytest -m unit -q

test: install
	@$(PY) -m openledger.local.toolchain >/dev/null
	@# The cluster tests' images (root only, as the node is), built before any test times out on a cold build.
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m openledger.cli local images >/dev/null; fi
	@$(MAKE) --no-print-directory lint
	@$(VENV)/bin/pytest -q -m "not bench"

bench: install
	@$(VENV)/bin/pytest -q -m bench -s bench

# The seeded fault soak: make soak SEED=7 DURATION=600 RATE=20 (a failing seed replays its faults).
SEED ?= $(shell date +%s)
DURATION ?= 600
RATE ?= 20
soak: install
	@$(PY) -m openledger.local.toolchain >/dev/null
	@$(PY) -m tests.soak.harness --seed $(SEED) --duration-s $(DURATION) --rate $(RATE)

clean: down
	@rm -rf .local
