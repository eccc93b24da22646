# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Caches (venv, Go build, control-plane binaries) live in $(WORKQUEUE_CACHE), outside the repo.
SHELL := /bin/bash
export WORKQUEUE_CACHE ?= $(HOME)/.cache/workqueue
VENV = $(shell scripts/ensure-venv.sh)
PYTEST_ARGS ?=

.PHONY: venv broker test test-compat test-unit demo cluster bench lint

venv:
	@scripts/ensure-venv.sh

broker:
	@scripts/ensure-rabbitmq.sh

## make test: every test (unit, real broker, real control plane). Services that can't start fail the run.
test: broker
	@venv="$(VENV)"; CI=true "$$venv/bin/python" -m pytest $(PYTEST_ARGS)
	@scripts/test-compat.sh

## make test-compat: the provider's tests again at the oldest supported Airflow (3.1.x).
test-compat: broker
	@scripts/test-compat.sh

test-unit:
	@venv="$(VENV)"; "$$venv/bin/python" -m pytest tests/unit $(PYTEST_ARGS)

## make demo: the example DAG end to end (local broker + local control plane unless KUBECONFIG is set).
demo: broker
	@venv="$(VENV)"; "$$venv/bin/python" scripts/demo.py

## make cluster: start the local control plane in the foreground; prints the kubeconfig path.
cluster:
	@venv="$(VENV)"; "$$venv/bin/python" tests/cluster/local_cluster.py up

## make bench: every benchmark (ratios measured side by side; ~40 min). Figures: bench/results/.
## Fill throughput and memory (bench/run.py), then on the local control plane: waiting cost,
## drain mode, scale. Exits non-zero if any target is missed.
bench: broker
	@venv="$(VENV)"; status=0; \
	"$$venv/bin/python" bench/run.py || status=1; \
	for b in wait_cost drain scale; do PYTHONPATH=. "$$venv/bin/python" bench/$$b.py || status=1; done; \
	exit $$status

lint:
	@venv="$(VENV)"; "$$venv/bin/ruff" check provider tests dags bench && "$$venv/bin/mypy"
