# The two commands a user needs are `make demo` and `make test`; the rest are their parts.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV = $$(hack/venv.sh)
PY = $(VENV)/bin/python
STACK_DIR ?= $(CURDIR)/.stack
export INSTRUCTUNE_CACHE ?= $(HOME)/.cache/instructune

.PHONY: demo test test-unit lint crds golden stack-build stack-up stack-down venv bench lock

venv:
	@hack/venv.sh >/dev/null

# The operator and job images (operator/Dockerfile, jobs/Dockerfile), built with buildah, no Docker
# daemon; prints `REF ARCHIVE` per image (OCI archives, cached outside the clone).
images:
	@hack/build-images.sh operator job

stack-build:
	@hack/build-stack.sh

# The stack, then the product's images (built once, cached) imported into its real node, and the
# operator installed from charts/ with helm, running in a pod there.
stack-up: stack-build venv
	@$(PY) hack/localstack.py up --dir $(STACK_DIR)
	@$(PY) hack/operator_release.py --dir $(STACK_DIR)

stack-down:
	@python3 hack/localstack.py down --dir $(STACK_DIR)

# Every transitive Python dependency pinned with hashes, from pyproject.toml's pins (hack/lock.sh).
lock:
	@hack/lock.sh

crds: venv
	@$(PY) hack/gen_crd.py

# What the operator applies and submits for every example (tests/golden); review the diff.
golden: venv
	@$(PY) hack/gen_golden.py

lint: venv
	@py=$(PY); bin=$$(dirname $$py); \
	$$bin/ruff check operator jobs tests hack bench && \
	$$bin/ruff format --check operator jobs tests hack bench && \
	$$bin/mypy && \
	$$bin/lint-imports && \
	$$py hack/gen_crd.py --check && \
	$$py hack/gen_golden.py --check

test-unit: venv
	@$(PY) -m pytest -m unit -q

# Everything from a fresh machine: Go programs and Python wheels are cached outside the clone.
test: stack-build venv
	@$(MAKE) --no-print-directory lint
	@# This clone's code first, whichever clone the shared venv's editable install points at.
	@PYTHONPATH=$(CURDIR)/operator:$(CURDIR)/jobs $(PY) -m pytest -p no:cacheprovider --durations=25

demo: stack-build venv
	@$(PY) hack/demo.py --dir $(STACK_DIR)

bench: venv
	@$(PY) bench/bench_packing.py && $(PY) bench/bench_data_pipeline.py && $(PY) bench/bench_prepared_reuse.py
