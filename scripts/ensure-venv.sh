#!/usr/bin/env bash
# Create the project venv outside the repo and install this checkout into it (editable).
# One venv per checkout folder and pyproject.toml version: two clones never share an editable
# install, and a venv is rebuilt only when the dependencies change. Wheels come from pip's cache
# (~/.cache/pip), so a new clone's venv takes about a minute.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${WORKQUEUE_CACHE:-$HOME/.cache/workqueue}
python=${PYTHON:-python3.11}
key=$( (sha256sum "$repo/pyproject.toml" "$repo/localkube/pyproject.toml" | cut -c1-12; echo "$repo") | sha256sum | cut -c1-16)
venv="$cache/venvs/$key"
mkdir -p "$cache/venvs"
exec 9>"$cache/venvs/.lock"  # one creator at a time: parallel callers wait, then find it ready
flock 9
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.installed" ]; then
  echo "ensure-venv: creating $venv for $repo" >&2
  mkdir -p "$cache/venvs"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -e "$repo[dev]" -e "$repo/localkube" >&2  # localkube: the local cluster (tests, demo)
  echo "$repo" > "$venv/.installed"
fi
echo "$venv"
