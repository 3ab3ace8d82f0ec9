# The two commands a user needs are `make demo` and `make test`; the rest are their parts.
# `make help` lists every target with the one-line `## ` comment above it.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV = $$(hack/venv.sh)
PY = $(VENV)/bin/python
STACK_DIR ?= $(CURDIR)/.stack
export INSTRUCTUNE_CACHE ?= $(HOME)/.cache/instructune
# This clone's code first, whichever clone the shared venv's editable install points at.
THIS_CLONE = PYTHONPATH=$(CURDIR)/operator:$(CURDIR)/jobs:$(CURDIR)/cli
.DEFAULT_GOAL := help

.PHONY: help demo test test-unit test-reconcile test-integration test-e2e lint fmt crds api-docs values-schema golden images \
	stack-build stack-up \
	stack-down venv bench lock

## List the targets with what each does (`make demo` and `make test` first).
help:
	@echo "Usage: make <target>"
	@awk '/^## /{d=substr($$0,4); next} \
	  /^[A-Za-z0-9_.-]+:/ && d!="" {t=$$1; sub(/:.*/,"",t); n++; name[n]=t; desc[t]=d} {d=""} \
	  END {split("demo test", first, " "); for(k=1;k<=2;k++) if(first[k] in desc) printf "  %-17s %s\n", first[k], desc[first[k]]; \
	       for(i=1;i<=n;i++) if(name[i]!="demo"&&name[i]!="test") printf "  %-17s %s\n", name[i], desc[name[i]]}' \
	  $(firstword $(MAKEFILE_LIST))

## Build the local stack, install the operator with helm and run the quickstart tune in pods end to end.
demo: stack-build venv
	@$(PY) hack/demo.py --dir $(STACK_DIR)

# Everything from a fresh machine: Go programs and Python wheels are cached outside the clone.
## Lint, then run every test (unit, reconcile, integration, e2e) against the real local stack, as CI does.
test: stack-build venv
	@$(MAKE) --no-print-directory lint
	@# This clone's code first, whichever clone the shared venv's editable install points at.
	@$(THIS_CLONE) $(PY) -m pytest -p no:cacheprovider --durations=25

## Run the unit tests (pure functions, no processes, no stack).
test-unit: venv
	@$(THIS_CLONE) $(PY) -m pytest -m unit -q -p no:cacheprovider

## Run the in-process reconcile tier (API server and etcd only).
test-reconcile: stack-build venv
	@$(THIS_CLONE) $(PY) -m pytest -m reconcile -p no:cacheprovider --durations=10 tests/reconcile

## Run the integration tests against the real local stack (the tests start and stop it).
test-integration: stack-build venv
	@$(THIS_CLONE) $(PY) -m pytest -m integration -p no:cacheprovider --durations=25

## Run the end-to-end tests: whole tunes through the operator on the local stack.
test-e2e: stack-build venv
	@$(THIS_CLONE) $(PY) -m pytest -m e2e -p no:cacheprovider --durations=25

## Regenerate tests/golden: what the operator applies and submits for every example (review the diff).
golden: venv
	@$(THIS_CLONE) $(PY) hack/gen_golden.py

## Run the linters: ruff check, ruff format --check, mypy, import contracts, CRD, API-docs, values-schema and golden drift.
lint: venv
	@export $(THIS_CLONE); py=$(PY); bin=$$(dirname $$py); \
	$$bin/ruff check operator jobs cli tests hack bench && \
	$$bin/ruff format --check operator jobs cli tests hack bench && \
	$$bin/mypy && \
	$$bin/lint-imports && \
	$$py hack/gen_crd.py --check && \
	$$py hack/gen_api_docs.py --check && \
	$$py hack/gen_values_schema.py --check && \
	$$py hack/gen_golden.py --check

## Format the code and apply ruff's fixes (ruff format, then ruff check --fix).
fmt: venv
	@bin=$$(dirname $(PY)); \
	$$bin/ruff format operator jobs cli tests hack bench && \
	$$bin/ruff check --fix operator jobs cli tests hack bench

## Regenerate the CRD (crds/ and the chart's copy) from operator/instructune_operator/api.py.
crds: venv
	@$(THIS_CLONE) $(PY) hack/gen_crd.py

## Regenerate docs/api.md: the guide (hack/api_docs_guide.md) and the field reference from api.py.
api-docs: venv
	@$(THIS_CLONE) $(PY) hack/gen_api_docs.py

## Regenerate the chart's values.schema.json (its settings part from operator/instructune_operator/settings.py).
values-schema: venv
	@$(THIS_CLONE) $(PY) hack/gen_values_schema.py

## Create (once per lock) the locked virtual environment outside the clone; install this clone in it.
venv:
	@hack/venv.sh >/dev/null

# Every transitive Python dependency pinned with hashes, from pyproject.toml's pins (hack/lock.sh).
## Rewrite the lock files from pyproject.toml's pins.
lock:
	@hack/lock.sh

# The operator and job images (operator/Dockerfile, jobs/Dockerfile), built with buildah, no Docker
# daemon; prints `REF ARCHIVE` per image (OCI archives, cached outside the clone).
## Build the operator and job images with buildah into cached OCI archives.
images:
	@hack/build-images.sh operator job

## Build the local stack's pinned upstream programs (cached outside the clone).
stack-build:
	@hack/build-stack.sh

# The stack, then the product's images (built once, cached) imported into its real node, and the
# operator installed from charts/ with helm, running in a pod there.
## Start the local stack in .stack/ and install the operator in it with helm.
stack-up: stack-build venv
	@$(PY) hack/localstack.py up --dir $(STACK_DIR)
	@$(PY) hack/operator_release.py --dir $(STACK_DIR)

## Stop the local stack and remove everything it created.
stack-down:
	@python3 hack/localstack.py down --dir $(STACK_DIR)

## Run the CPU benchmarks (packing, data pipeline, prepared-data reuse).
bench: venv
	@$(PY) bench/bench_packing.py && $(PY) bench/bench_data_pipeline.py && $(PY) bench/bench_prepared_reuse.py
