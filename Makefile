# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Caches (venv, Go build, control-plane binaries) live in $(WORKQUEUE_CACHE), outside the repo.
SHELL := /bin/bash
export WORKQUEUE_CACHE ?= $(HOME)/.cache/workqueue
VENV = $(shell scripts/ensure-venv.sh)
PYTEST_ARGS ?=

.PHONY: venv broker background-builds test test-rabbitmq4 test-compat test-unit demo cluster dist docs bench lint

venv:
	@scripts/ensure-venv.sh

## make broker: RabbitMQ 3.10 (the host's, 127.0.0.1:5672) and 4.0 (a trixie rootfs, 127.0.0.1:5673).
broker:
	@scripts/ensure-rabbitmq.sh
	@scripts/ensure-rabbitmq4.sh

## make test: every test (unit, real broker, real control plane), then two passes side by side (their
## lines prefixed): the broker-side tests again against RabbitMQ 4.0, and the compat run (Airflow
## 3.1). Each pytest session starts its own control plane; most of their time is spent waiting on
## brokers and pods, so side by side they take the time of the longer one on two cores.
## Services that can't start fail the run. Every pass runs; the target fails if any of them failed.
test: background-builds broker
	@venv="$(VENV)"; status=0; \
	CI=true "$$venv/bin/python" -m pytest $(PYTEST_ARGS) || status=1; \
	( $(MAKE) --no-print-directory test-rabbitmq4 2>&1 | sed -u 's/^/[rabbitmq-4.0] /'; exit $${PIPESTATUS[0]} ) & r4=$$!; \
	( scripts/test-compat.sh 2>&1 | sed -u 's/^/[airflow-3.1] /'; exit $${PIPESTATUS[0]} ) & compat=$$!; \
	wait $$r4 || status=1; wait $$compat || status=1; \
	exit $$status

## On a cold machine the control plane's Go build (minutes), the real node's images (debootstrap) and the
## Airflow 3.1 venv are started in
## the background while the brokers and the main venv are set up; whoever needs them first waits
## (both hold a lock), and a failure there still fails the pass that needs them.
background-builds:
	@mkdir -p "$(WORKQUEUE_CACHE)"; \
	nohup bash localkube/src/localkube/build.sh > "$(WORKQUEUE_CACHE)/control-plane-build.log" 2>&1 & \
	nohup bash -c 'venv=$$(scripts/ensure-venv.sh) && "$$venv/bin/localkube" build --node-images' \
	  > "$(WORKQUEUE_CACHE)/node-images-build.log" 2>&1 & \
	nohup scripts/test-compat.sh --venv-only > "$(WORKQUEUE_CACHE)/compat-venv.log" 2>&1 &

## make test-rabbitmq4: the broker-side tests (integration, reliability, TLS) against RabbitMQ 4.0:
## shared broker 127.0.0.1:5673, private nodes and `rabbitmqctl` from the trixie rootfs; of the tests
## that need the local control plane, those marked `both_brokers` (the item account and broker outages
## while pods consume); RABBITMQ4_MARKERS= runs all of them. See docs/rabbitmq-versions.md.
RABBITMQ4_TESTS ?= tests/integration tests/reliability tests/security
RABBITMQ4_MARKERS ?= not cluster or both_brokers
RABBITMQ4_PYTEST_ARGS ?=
test-rabbitmq4:
	@scripts/ensure-rabbitmq4.sh
	@venv="$(VENV)"; echo "== the broker-side tests against RabbitMQ 4.0 (127.0.0.1:5673) =="; \
	CI=true WORKQUEUE_TEST_BROKER_URL=amqp://guest:guest@127.0.0.1:5673/ \
	WORKQUEUE_TEST_RABBITMQ_ROOT="$$(scripts/ensure-rabbitmq4.sh --root)" \
	PATH="$$(scripts/ensure-rabbitmq4.sh --bin):$$PATH" \
	"$$venv/bin/python" -m pytest -p no:cacheprovider -m "$(RABBITMQ4_MARKERS)" $(RABBITMQ4_TESTS) $(RABBITMQ4_PYTEST_ARGS)

## make test-compat: the provider's tests again at the oldest supported Airflow (3.1.x).
test-compat: broker
	@scripts/test-compat.sh

test-unit:
	@venv="$(VENV)"; "$$venv/bin/python" -m pytest tests/unit $(PYTEST_ARGS)

## make demo: the example DAG end to end (local broker + local control plane unless KUBECONFIG is set).
demo: broker
	@venv="$(VENV)"; "$$venv/bin/python" scripts/demo.py

## make cluster: the local cluster with a real node and the example's images, in the foreground; prints the
## kubeconfig path and the commands to run the example against it.
cluster:
	@venv="$(VENV)"; "$$venv/bin/python" scripts/cluster.py up --kubeconfig-out "$(WORKQUEUE_CACHE)/local-cluster/kubeconfig"

## make dist: the sdist and wheel a release would upload (the package is not on PyPI), into dist/,
## checked with `twine check`. Install the wheel with `pip install dist/airflow_provider_workqueue-*.whl`.
dist:
	@venv="$(VENV)"; rm -rf dist; \
	"$$venv/bin/python" -m build --outdir dist . && "$$venv/bin/twine" check --strict dist/*

## make docs: the docs site (MkDocs, mkdocs.yml) into site/, strict: a broken internal link or a page
## missing from the nav fails. The generated pages (operator reference, example DAG) are rewritten first.
docs:
	@venv="$(VENV)"; "$$venv/bin/python" scripts/docs.py && "$$venv/bin/mkdocs" build --strict --site-dir site

## make bench: every benchmark (ratios measured side by side; ~40 min). Figures: bench/results/.
## Fill throughput and memory (bench/run.py), the receipts' cost, the fill vs PerfTest (installed from
## Maven Central when missing), the worker's per-item cost vs amqp-consume (amqp-tools installed when
## missing) and the in-process API, then on the local control plane: waiting cost, drain mode, scale.
## Exits non-zero if any target is missed.
bench: broker
	@venv="$(VENV)"; status=0; \
	"$$venv/bin/python" bench/run.py || status=1; \
	"$$venv/bin/python" bench/receipts.py || status=1; \
	"$$venv/bin/python" bench/perftest.py || status=1; \
	"$$venv/bin/python" bench/consumer.py || status=1; \
	for b in wait_cost drain scale; do PYTHONPATH=. "$$venv/bin/python" bench/$$b.py || status=1; done; \
	exit $$status

lint:
	@venv="$(VENV)"; "$$venv/bin/ruff" check provider localkube tests dags bench scripts && "$$venv/bin/mypy"
