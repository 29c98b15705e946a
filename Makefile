# smartlev: every target sets up what it needs (venv, generated code, Kafka jars, Redis).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
STAMP_VENV := .venv/.installed
STAMP_PROTO := gen/.generated
PROTOS := $(shell find proto -name '*.proto' 2>/dev/null)

.PHONY: help setup up down ps logs demo test lint typecheck unit integration bench chaos clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# Each stamp holds a digest of what it was made from, and is made again when that
# differs: file times alone missed a lock file or a .proto delivered with an older time
# (rsync -a, tar), and a deleted .proto (its names are in the digest too).
VENV_INPUTS := requirements.lock pyproject.toml scripts/setup_venv.sh
PROTO_INPUTS := $(sort $(PROTOS)) scripts/gen_proto.sh
VENV_DIGEST := $(shell cat $(VENV_INPUTS) 2>/dev/null | sha256sum | cut -c1-32)
PROTO_DIGEST := $(shell (echo $(PROTO_INPUTS); cat $(PROTO_INPUTS)) 2>/dev/null | sha256sum | cut -c1-32)
ifneq ($(VENV_DIGEST),$(shell cat $(STAMP_VENV) 2>/dev/null))
$(STAMP_VENV): FORCE
endif
ifneq ($(PROTO_DIGEST),$(shell cat $(STAMP_PROTO) 2>/dev/null))
$(STAMP_PROTO): FORCE
endif
.PHONY: FORCE
FORCE:

$(STAMP_VENV): requirements.lock pyproject.toml scripts/setup_venv.sh
	@bash scripts/setup_venv.sh
	@echo $(VENV_DIGEST) > $@

$(STAMP_PROTO): $(STAMP_VENV) $(PROTOS) scripts/gen_proto.sh
	@bash scripts/gen_proto.sh
	@echo $(PROTO_DIGEST) > $@

setup: $(STAMP_VENV) $(STAMP_PROTO) ## venv with pinned packages and generated protobuf code

up: setup ## start Kafka, Redis and every service in the background (idempotent)
	@bash scripts/stack.sh up

down: ## stop everything `make up` started
	@bash scripts/stack.sh down

ps: ## show what is running
	@bash scripts/stack.sh ps

logs: ## tail the logs under .run/
	@bash scripts/stack.sh logs

lint: setup
	.venv/bin/ruff check shared services tests
	.venv/bin/ruff format --check shared services tests

typecheck: setup
	.venv/bin/mypy

unit: setup ## pure tests, no stack needed
	.venv/bin/pytest -q -m "not integration" tests

integration: up
	.venv/bin/pytest -q -m integration tests

test: setup ## lint, type-check and every test against the real stack
	@bash scripts/test.sh

demo: setup ## start the stack and run the main job end to end
	@bash scripts/demo.sh

bench: setup ## benchmarks with their baselines, printed as a table
	@bash scripts/bench.sh

chaos: setup ## fault injection: bad input, gRPC fuzz, 20+ kill -9/restart cycles (CHAOS_SEED=N)
	@bash scripts/chaos.sh

clean: down ## stop the stack; delete .venv, gen, out and .run (Kafka and Redis data: every position)
	rm -rf .venv gen .run out
