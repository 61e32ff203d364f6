# edge-kit: the two commands a new user needs are `make demo` and `make test`.
# Both work on a fresh machine: they create .venv and install the exact versions in requirements/lock.txt.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-lock
PIP_VERSION := 26.3
KEYS   := .keys
DIST   := dist
EXAMPLE := examples/digits/edgekit.toml

.PHONY: install system-deps demo test test-fast lint bench fleet-demo docs lock clean

$(STAMP): requirements/lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet -r requirements/lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Mosquitto (MQTT integration tests) and Chromium (dashboard browser test), from Debian's packages.
system-deps:
	bash scripts/install-system-deps.sh

$(KEYS)/edgekit.key: | install
	$(VENV)/bin/edge-kit keygen --out $(KEYS)

demo: install $(KEYS)/edgekit.key
	$(VENV)/bin/edge-kit build --config $(EXAMPLE) --out $(DIST) --key $(KEYS)/edgekit.key
	$(VENV)/bin/edge-kit verify $(DIST)/digits-1.0.0.edgebundle --pubkey $(KEYS)/edgekit.pub
	$(VENV)/bin/edge-kit inspect $(DIST)/digits-1.0.0.edgebundle --pubkey $(KEYS)/edgekit.pub

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install system-deps lint
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not integration and not demo"

bench: install system-deps
	$(PY) benchmarks/run_all.py

# The whole loop on this machine (needs Mosquitto: system-deps installs it). Headless:
#   make fleet-demo ARGS="--headless --duration 90"
fleet-demo: install system-deps
	$(PY) -m edge_kit.demo.fleet $(ARGS)

# Pages generated from code: one config reference per program, from the key declarations in
# edge_kit/config.py, edge_kit/fleet/settings.py and device_agent/settings.py (a test fails while a
# checked-in page differs from what this writes).
CONFIG_PAGES = edge_kit.config:docs/config.md edge_kit.fleet.settings:docs/config-fleet.md \
	device_agent.settings:docs/config-agent.md
docs: install
	@set -e; for page in $(CONFIG_PAGES); do \
		module=$${page%%:*}; out=$${page#*:}; \
		$(PY) -m $$module --markdown > $$out.tmp && mv $$out.tmp $$out; echo "wrote $$out"; \
	done

# Re-pin every version after changing dependencies in pyproject.toml.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip==$(PIP_VERSION)
	.venv-lock/bin/pip install --quiet -e '.[server,dev,ray]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^edge-kit' > requirements/lock.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(DIST) .pytest_cache .mypy_cache .ruff_cache
