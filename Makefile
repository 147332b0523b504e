# minichat developer entry points. `make help` lists them.
#
#   make test                      venv + local stack + pytest      (PYTEST_ARGS="-k foo -x" to pass options)
#   make demo                      the README's main job: stack, migrate, topics, worker, simulator, summary
#   make run                       venv + local stack + migrate + topics + worker (runs until Ctrl-C)
#   make up / down / status        the local Kafka + PostgreSQL of scripts/stack.sh (make down PURGE=1 deletes data)
#   make check                     ruff check, ruff format --check, mypy
#   make soak                      the long crash tests: >= 50 kill -9 under load (MINICHAT_CRASH_KILLS=N for more)
#   make soak-cluster              three brokers: >= 50 kill -9 of a partition leader (MINICHAT_CLUSTER_KILLS=N for more),
#                                  >= 50 flips of one broker's clock skew, >= 50 policy changes mid-run
#   make soak-zombie               >= 50 zombie owners in a rebalance (MINICHAT_ZOMBIE_EPISODES=N for more)
#   make bench                     venv + local stack + `minichat bench` (BENCH_ARGS, JSON to BENCH_OUT)
#
# Variables: PYTHON (interpreter for the venv, default python3), VENV (.venv), PYTEST_ARGS,
# ALLOW_NO_TESTS=1 (treat pytest's exit 5, "no tests collected", as success; used by .ci/run),
# BENCH_ARGS (e.g. "--turns 5000 --phases drain,replay"), BENCH_OUT (bench.json).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
STACK := scripts/stack.sh
STAMP := $(VENV)/.minichat-installed
PYTEST_ARGS ?=
ALLOW_NO_TESTS ?= 0
PURGE ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv up down status test check run demo

help:
	@sed -n '3,12p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

venv: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt (the locked versions, scripts/lock.py)
# is newer than the stamp (or the venv is missing).
# A bare Debian python3 lacks ensurepip until python3-venv is installed: do that via apt when
# we are root and the interpreter is the system one (pyenv and similar builds ship ensurepip).
$(STAMP): pyproject.toml constraints.txt
	@if [ ! -x "$(VENV)/bin/pip" ]; then \
	  if ! "$(PYTHON)" -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	    py=$$(command -v "$(PYTHON)"); \
	    ver=$$("$(PYTHON)" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [[ "$$(readlink -f "$$py")" == /usr/bin/* ]]; then \
	      echo "make venv: $(PYTHON) has no ensurepip; installing python3-venv python$$ver-venv" >&2; \
	      export DEBIAN_FRONTEND=noninteractive; \
	      apt-get update -q >&2 && apt-get install -y -q --no-install-recommends python3-venv "python$$ver-venv" >&2; \
	    else \
	      echo "make venv: $(PYTHON) ($$py) cannot create a venv with pip (no ensurepip)." >&2; \
	      echo "  On Debian/Ubuntu: apt-get install python3-venv; or run make PYTHON=/path/to/python3.11+" >&2; \
	      exit 1; \
	    fi; \
	  fi; \
	  echo "make venv: creating $(VENV) with $$("$(PYTHON)" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2; \
	  "$(PYTHON)" -m venv "$(VENV)"; \
	fi
	"$(VENV)/bin/python" -m pip install -q --progress-bar off -c constraints.txt -e ".[dev]"
	@touch "$@"

up:
	@$(STACK) up

down:
	@$(STACK) down $(if $(filter-out 0,$(PURGE)),--purge)

status:
	@$(STACK) status

# `exports=$$(...)` (not `eval "$$(...)"`) so a failing `stack.sh up` stops the recipe.
test: venv
	@exports=$$($(STACK) up); eval "$$exports"; \
	echo "make test: MINICHAT_KAFKA_BOOTSTRAP_SERVERS=$$MINICHAT_KAFKA_BOOTSTRAP_SERVERS MINICHAT_DATABASE_URL=$$MINICHAT_DATABASE_URL" >&2; \
	rc=0; "$(VENV)/bin/pytest" $(PYTEST_ARGS) || rc=$$?; \
	if [ "$$rc" -eq 5 ] && [ "$(ALLOW_NO_TESTS)" = 1 ]; then \
	  echo "make test: pytest collected no tests (exit 5); accepted because ALLOW_NO_TESTS=1" >&2; rc=0; \
	fi; \
	exit "$$rc"

check: venv
	@rc=0; \
	"$(VENV)/bin/ruff" check . || rc=1; \
	"$(VENV)/bin/ruff" format --check . || rc=1; \
	"$(VENV)/bin/mypy" minichat || rc=1; \
	exit "$$rc"

run: venv
	@exports=$$($(STACK) up); eval "$$exports"; \
	"$(VENV)/bin/minichat" db migrate; \
	"$(VENV)/bin/minichat" topics create; \
	exec "$(VENV)/bin/minichat" worker

# tests/integration/test_crash.py's soak versions (marker `soak`, skipped unless selected with -m soak).
.PHONY: soak
soak: venv
	@exports=$$($(STACK) up); eval "$$exports"; \
	export MINICHAT_CRASH_KILLS=$${MINICHAT_CRASH_KILLS:-50}; \
	echo "make soak: $$MINICHAT_CRASH_KILLS kills per test against $$MINICHAT_KAFKA_BOOTSTRAP_SERVERS" >&2; \
	"$(VENV)/bin/pytest" -m soak tests/integration/test_crash.py $(PYTEST_ARGS)

# The soak versions of tests/integration/test_cluster.py, test_clock_skew.py and
# test_policy_change.py on a three-broker cluster that tests/cluster.py starts (and stops) next to
# the stack: PostgreSQL is the stack's, Kafka the cluster's.
.PHONY: soak-cluster
soak-cluster: venv
	@exports=$$($(STACK) up); eval "$$exports"; \
	export MINICHAT_CLUSTER_KILLS=$${MINICHAT_CLUSTER_KILLS:-50}; \
	echo "make soak-cluster: $$MINICHAT_CLUSTER_KILLS SIGKILLs of a partition leader on three brokers" >&2; \
	"$(VENV)/bin/pytest" -m soak tests/integration/test_cluster.py tests/integration/test_clock_skew.py \
		tests/integration/test_policy_change.py $(PYTEST_ARGS)

# tests/integration/test_zombie_rebalance.py's soak version: a worker frozen inside its batch (held by
# a PostgreSQL proxy after its position claim, then SIGSTOP) until its sets move, episode after episode.
.PHONY: soak-zombie
soak-zombie: venv
	@exports=$$($(STACK) up); eval "$$exports"; \
	export MINICHAT_ZOMBIE_EPISODES=$${MINICHAT_ZOMBIE_EPISODES:-50}; \
	echo "make soak-zombie: $$MINICHAT_ZOMBIE_EPISODES zombie owners against $$MINICHAT_KAFKA_BOOTSTRAP_SERVERS" >&2; \
	"$(VENV)/bin/pytest" -m soak tests/integration/test_zombie_rebalance.py $(PYTEST_ARGS)

# docs/performance.md: the ceiling, a backlog drain, decision latency and replay, side by side.
BENCH_ARGS ?=
BENCH_OUT ?= bench.json
.PHONY: bench
bench: venv
	@exports=$$($(STACK) up); eval "$$exports"; \
	"$(VENV)/bin/minichat" bench --out "$(BENCH_OUT)" $(BENCH_ARGS)

ARGS ?=
demo: venv
	@scripts/demo.sh $(ARGS)
