PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: test test-systemd test-servers demo lint soak bench bench-courier-idle venv system-deps clean

## test: create the virtual environment, install everything (Dovecot too), run all checks and tests
## (but the systemd container: make test-systemd; Cyrus, Courier and Exim: make test-servers)
test: venv system-deps
	$(BIN)/ruff check forwarder tests
	$(BIN)/mypy forwarder
	$(BIN)/python -m pytest -m "not soak and not container and not servers"

## test-systemd: the unit under a real systemd in a container, installed as deploy/README.md says
## (about a minute; the first run also builds the container's root file system, about 35 s)
test-systemd: venv system-deps
	bash .ci/system-deps container
	$(BIN)/python -m pytest -m container

## test-servers: the forwarder against Cyrus IMAP, Courier-IMAP and Exim, run from their
## unpacked packages (they conflict with Dovecot's and Postfix's); docs/deployments.md's recipes
test-servers: venv system-deps
	bash .ci/system-deps servers
	$(BIN)/python -m pytest -m servers

## demo: the real forwarder against a throwaway local Dovecot and SMTP sink (ARGS=--ops: dry run, baseline, retry, history)
demo: venv system-deps
	$(BIN)/python -m tests.demo $(ARGS)

## soak: the long-running variants
soak: venv system-deps
	$(BIN)/python -m pytest -m soak

## bench: throughput, latency, memory and scale figures against real servers (ARGS=--quick for a smoke run)
bench: venv system-deps
	bash .ci/system-deps postfix fetchmail
	$(BIN)/python -m bench.run $(ARGS)

## bench-courier-idle: how soon Courier-IMAP reports new mail to IDLE, with and without
## IMAP_ENHANCEDIDLE=1 (about 2 minutes: without it each sample waits up to 60 s)
bench-courier-idle: venv system-deps
	bash .ci/system-deps servers
	$(BIN)/python -m bench.courier_idle $(ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

system-deps:
	bash .ci/system-deps systemd

lint: venv
	$(BIN)/ruff check forwarder tests
	$(BIN)/mypy forwarder

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
