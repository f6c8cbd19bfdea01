# Developer and CI entry points. Every tool runs from the project's own .venv; nothing
# relies on an activated environment.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
UP_ARGS ?=
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv lock lock-check gen up migrate test lint breaking ci lag lag-orders lag-cpu bench bench-smoke bench-read bench-saga bench-lease rebuild bench-rebuild bench-redis-loss seed loadtest chaos failover compose-smoke clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv and install the project with its dev tools

# Installs exactly what requirements-dev.lock pins, hashes checked, then the project itself
# without resolving anything (its build backend comes from the lock too). Reinstalls whenever
# the lock changes. The compat editable mode puts the repository root on sys.path, so the
# generated `tessera` package (made after install) imports too.
$(STAMP): requirements-dev.lock pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV) with $$(command -v $(PYTHON))"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --config-settings editable_mode=compat -e client
	@touch $@

lock: venv ## re-resolve pyproject.toml into requirements*.lock (hashed); UPGRADE=1 moves every pin to the newest allowed
	scripts/lock.sh $(if $(UPGRADE),--upgrade,)

lock-check: venv ## fail when requirements*.lock no longer match pyproject.toml
	scripts/lock.sh --check

gen: venv ## generate the tessera package from protos/
	$(PY) scripts/gen_protos.py

up: gen ## run the whole stack in the foreground (Ctrl-C stops it); UP_ARGS='--relays 3' passes options
	$(PY) -m devstack up $(UP_ARGS)

migrate: gen ## apply migrations to DATABASE_URL, or to the embedded Postgres in .stack/
	$(PY) -m devstack migrate

test: gen ## run the whole test suite; PYTEST_ARGS='-k relay' passes options
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: client-check
client-check: gen ## build the client wheel, install it in a fresh venv and call a real stack from there
	$(PY) -m pytest tests/client/test_wheel.py $(PYTEST_ARGS)

lint: gen ## ruff, mypy, buf lint and format, and the generated-code check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(PY) -m devstack.gencheck

# Compares protos/ with where this branch left main; on main itself with the previous
# commit (or with HEAD when protos/ has uncommitted changes). Skips when there is nothing
# to compare with: no main branch, a single commit, or no protos/ there yet.
breaking: venv ## buf breaking against main (or the previous commit when on main)
	@base=""; \
	for ref in main origin/main; do \
	  if git rev-parse --verify --quiet "$$ref^{commit}" >/dev/null 2>&1; then base=$$ref; break; fi; \
	done; \
	if [ -z "$$base" ]; then echo "breaking: no main branch to compare with; skipped"; exit 0; fi; \
	against=$$(git merge-base HEAD "$$base"); \
	if [ "$$against" = "$$(git rev-parse HEAD)" ]; then \
	  if [ -n "$$(git status --porcelain -- protos)" ]; then against=$$(git rev-parse HEAD); \
	  elif git rev-parse --verify --quiet "HEAD~1^{commit}" >/dev/null 2>&1; then against=$$(git rev-parse HEAD~1); \
	  else echo "breaking: main has no earlier commit; skipped"; exit 0; fi; \
	fi; \
	if ! git cat-file -e "$$against:protos" 2>/dev/null; then \
	  echo "breaking: $$against has no protos/; skipped"; exit 0; \
	fi; \
	echo "breaking: comparing protos/ with $$against"; \
	$(BIN)/buf breaking protos --against ".git#ref=$$against,subdir=protos"

ci: lock-check lint breaking test chaos bench-smoke ## everything CI checks (the chaos suite and a quick bench included)

LAG_COMMANDS ?= 1000
LAG_RATES ?= 40,80,136
lag: gen ## reply → visible-on-replica latency (median, p99) over LAG_COMMANDS RegisterUser calls on a fresh stack
	$(PY) -m perf lag -n $(LAG_COMMANDS) --json results/lag.json

lag-orders: gen ## PlaceOrder reply → order visible on each replica (median, p99), saga workers running
	$(PY) -m perf lag --command place_order -n $(LAG_COMMANDS) --json results/lag_orders.json

lag-cpu: gen ## reply → visible at fixed AddProduct rates (LAG_RATES), with each process's CPU share meanwhile
	$(PY) -m perf lag --command add_product --rates $(LAG_RATES) --duration 8 --json results/lag_cpu.json

# Load testing against a running stack (`make up`); see README "Load testing".
WRITE_ADDR ?= 127.0.0.1:50051
READ_ADDRS ?= 127.0.0.1:50052,127.0.0.1:50053
SEED_USERS ?= 1000
SEED_PRODUCTS ?= 200
SEED_ORDERS ?= 500
SEED_FILE ?= results/seed.json
SEED_ARGS ?=
seed: gen ## users, products and orders through the write API into SEED_FILE (SEED_USERS, SEED_PRODUCTS, SEED_ORDERS)
	$(PY) -m perf loadtest seed --write $(WRITE_ADDR) --users $(SEED_USERS) --products $(SEED_PRODUCTS) \
	  --orders $(SEED_ORDERS) --out $(SEED_FILE) $(SEED_ARGS)

LOADTEST_MODE ?= read
LOADTEST_DURATION ?= 10
LOADTEST_ARGS ?=
loadtest: gen ## LOADTEST_MODE=read|write|lag against READ_ADDRS/WRITE_ADDR; results/loadtest-MODE.{json,png}
	@case "$(LOADTEST_MODE)" in \
	  read) target="--target $(READ_ADDRS) --seed $(SEED_FILE)";; \
	  write) target="--write $(WRITE_ADDR)";; \
	  lag) target="--write $(WRITE_ADDR) --read $(READ_ADDRS)";; \
	  *) echo "LOADTEST_MODE must be read, write or lag, not '$(LOADTEST_MODE)'" >&2; exit 2;; \
	esac; \
	set -x; $(PY) -m perf loadtest $(LOADTEST_MODE) $$target --duration $(LOADTEST_DURATION) $(LOADTEST_ARGS) \
	  --json results/loadtest-$(LOADTEST_MODE).json --plot results/loadtest-$(LOADTEST_MODE).png

BENCH_ARGS ?=
bench: gen ## every figure beside its ceiling; rewrites BENCHMARKS.md; ~40 min on 2 cores, most of it the search rows at 1,000,000 users and orders (BENCH_ARGS='--search-sizes 100000': ~15 min)
	$(PY) -m perf bench $(BENCH_ARGS)

bench-smoke: gen ## the benchmarks at small sizes; fails only when a figure cannot be measured (6-9 min on 2 busy cores)
	$(PY) -m perf bench-smoke --json results/bench-quick.json

bench-read: gen ## GetUser calls/s of one replica with 1 and with 2 worker processes, in one run; figures in results/read_rps.json
	$(PY) -m perf read --workers 1,2 --processes 4 --connections 4 --concurrency 256 \
	  --json results/read_rps.json $(BENCH_ARGS)

SAGA_ORDERS ?= 1000
bench-saga: gen ## orders/s confirmed through the whole stack (provider at 0 latency); figures in results/saga.json
	$(PY) -m perf saga -n $(SAGA_ORDERS) --json results/saga.json $(BENCH_ARGS)

bench-lease: gen ## applying-lease takeover time after kill -9 of the holder (median of 5); results/lease.json
	$(PY) -m perf lease --rounds 5 --json results/lease.json

REBUILD_ARGS ?= --all
rebuild: gen ## blue/green rebuild of the read views from the event log (REBUILD_ARGS: --projection NAME or --all)
	$(PY) -m read_service.admin rebuild $(REBUILD_ARGS)

REBUILD_EVENTS ?= 100000
bench-rebuild: gen ## rebuild throughput (events/s) over REBUILD_EVENTS user events; figures in results/rebuild.json
	$(PY) -m perf rebuild -n $(REBUILD_EVENTS) --json results/rebuild.json

LOSS_USERS ?= 10000
bench-redis-loss: gen ## time from a Redis restart (views lost) to SERVING for LOSS_USERS users; results/redis_loss.json
	$(PY) -m perf redis-loss -n $(LOSS_USERS) --json results/redis_loss.json

chaos: gen ## fault injection under load (kills, pauses, restarts, network faults; ~3 min); figures in results/chaos.json
	TESSERA_CHAOS=1 GRPC_ENABLE_FORK_SUPPORT=false $(PY) -m pytest tests/chaos $(PYTEST_ARGS)

failover: gen ## a Postgres primary killed and its streaming standby promoted (sync and async) under load; figures in results/failover.json
	TESSERA_CHAOS=1 GRPC_ENABLE_FORK_SUPPORT=false CHAOS_RESULTS=results/failover.json $(PY) -m pytest tests/chaos/test_postgres_failover.py $(PYTEST_ARGS)

compose-smoke: venv ## docker-compose.yml for real: one image build, compose up, grpcurl checks, a relay killed (needs root)
	$(PY) scripts/compose_smoke.py

clean: ## remove generated code, caches and the dev stack's data (.stack/)
	rm -rf tessera .stack .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## clean, and remove .venv too
	rm -rf $(VENV)
