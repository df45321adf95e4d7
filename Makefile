# agentgate: `make run` starts the gateway with embedded defaults; `make test` runs the suite.
# Dependencies are installed only from requirements.lock (every package pinned and hash-checked).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test install tools lock bench clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/agentgate run

# The suite validates docker/compose.yaml with Compose (no Docker engine is needed for that).
tools:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; \
	  else echo "make test needs Compose: apt-get install docker-compose" >&2; exit 1; fi; }

test: $(STAMP) tools
	$(PY) -m pytest -q

# Regenerate the lock after changing dependencies in pyproject.toml (needs pip-tools).
lock:
	$(PY) -m pip install --quiet pip-tools
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra test \
		-o requirements.lock pyproject.toml requirements-build.in

clean:
	rm -rf $(VENV) .agentgate
