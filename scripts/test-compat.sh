#!/usr/bin/env bash
# Run the provider's tests at the oldest supported Airflow (the newest 3.1.x) in a second venv,
# kept outside the repo like the main one. The main venv (`make test`) covers the newest 3.x.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${WORKQUEUE_CACHE:-$HOME/.cache/workqueue}
python=${PYTHON:-python3.11}
airflow_version=${COMPAT_AIRFLOW_VERSION:-3.1.8}
constraints="$repo/scripts/compat-constraints.txt"  # a resolved Airflow 3.1.8 set: fast, repeatable installs
key=$( (sha256sum "$repo/pyproject.toml" "$repo/localkube/pyproject.toml" "$constraints"; echo "$repo $airflow_version") | sha256sum | cut -c1-16)
venv="$cache/venvs/compat-$key"
mkdir -p "$cache/venvs"
exec 9>"$cache/venvs/.compat-lock"  # one creator at a time (make test starts one in the background)
flock 9
if [ ! -f "$venv/.installed" ]; then
  echo "test-compat: creating $venv (Airflow $airflow_version)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -c "$constraints" "apache-airflow==$airflow_version" -e "$repo[dev]" -e "$repo/localkube" >&2
  echo "$repo" > "$venv/.installed"
fi
"$venv/bin/python" -c "import airflow; assert airflow.__version__ == '$airflow_version', airflow.__version__"
exec 9>&-
[ "${1:-}" = "--venv-only" ] && exit 0
cd "$repo"
CI=true "$venv/bin/python" -m pytest -q tests/unit tests/integration/test_job_side.py tests/integration/test_queue_operators.py \
  tests/reliability/test_job_faults.py tests/reliability/test_job_account.py \
  tests/integration/test_amqp_message_trigger.py tests/e2e/test_event_driven.py \
  tests/e2e/test_example_dag.py --deselect tests/unit/test_hygiene.py "$@"
