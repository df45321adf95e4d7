# agentgate: `make run` starts the gateway with embedded defaults; `make test` runs the suite.
# Dependencies are installed only from lock files (every package pinned and hash-checked):
# requirements.lock is what the gateway runs on (the Docker image), requirements-test.lock adds the
# test extras with the same pins (this venv: make run, make test, make bench).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The MCP SDK's own venv, for the MCP tests only: mcp needs h11>=0.16, mitmproxy 11 pins h11<=0.14.
MCP_STAMP := .venv-mcp/.installed

.PHONY: run test install tools lock lock-mcp bench clean

# The gateway runs with -O (PYTHONOPTIMIZE=1), so the install compiles .opt-1.pyc files too: without
# them every start compiles the dependencies from source where bytecode is not written.
$(STAMP): requirements-test.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements-test.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -O -m compileall -q -j 0 $(VENV)/lib >/dev/null || echo "note: some files did not compile for -O; they compile when imported"
	touch $(STAMP)

install: $(STAMP)

$(MCP_STAMP): requirements-mcp.lock tests/mcp_harness/env.py
	$(PYTHON) tests/mcp_harness/env.py

run: $(STAMP)
	PYTHONOPTIMIZE=1 $(VENV)/bin/agentgate run

# The suite validates docker/compose.yaml with Compose (no Docker engine is needed for that).
tools:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; \
	  else echo "make test needs Compose: apt-get install docker-compose" >&2; exit 1; fi; }

test: $(STAMP) $(MCP_STAMP) tools
	$(PY) -m pytest -q

# Benchmarks on 127.0.0.1 (bench/results/latest.{json,md}); e.g. make bench BENCH_ARGS="--duration 5 --only route,forward"
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; } || true
	$(PY) -m bench $(BENCH_ARGS)

# Regenerate the locks after changing dependencies in pyproject.toml (needs pip-tools). Each keeps
# the pins it already has where they still fit.
lock:
	$(PY) -m pip install --quiet pip-tools
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		-o requirements.lock pyproject.toml requirements-build.in
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra test \
		-o requirements-test.lock pyproject.toml requirements-build.in

lock-mcp:
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links -o requirements-mcp.lock tests/mcp_harness/requirements-mcp.in

clean:
	rm -rf $(VENV) .venv-mcp .agentgate
