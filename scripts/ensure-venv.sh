#!/usr/bin/env bash
# Create (once per machine) the project venv outside the repo and install this checkout into it.
# The venv is keyed by the hash of pyproject.toml, so it is rebuilt only when dependencies change;
# `pip install -e .` runs every time because each clone lives in another folder.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${WORKQUEUE_CACHE:-$HOME/.cache/workqueue}
python=${PYTHON:-python3.11}
key=$(sha256sum "$repo/pyproject.toml" | cut -c1-12)
venv="$cache/venv-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.deps-installed" ]; then
  echo "ensure-venv: creating $venv" >&2
  mkdir -p "$cache"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$repo[dev]"
  touch "$venv/.deps-installed"
else
  "$venv/bin/pip" install -q --no-deps -e "$repo" >/dev/null
fi
ln -sfn "$venv" "$cache/venv-current"
echo "$venv"
