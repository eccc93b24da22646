#!/usr/bin/env bash
# Make sure Debian's headless-capable Chromium is at /usr/bin/chromium (the browser test drives it
# with Playwright; Playwright's own browser download doesn't work offline). Installs it with
# apt-get (as root, or with sudo) when missing; exits non-zero if it can't, so the test fails
# instead of skipping.
set -euo pipefail
chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  echo "ensure-chromium: installing Debian's chromium" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
fi
"$chromium" --version >&2 || { echo "ensure-chromium: $chromium does not run" >&2; exit 1; }
echo "$chromium"
