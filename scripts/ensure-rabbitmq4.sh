#!/usr/bin/env bash
# Make sure RabbitMQ 4.0 (Debian trixie's rabbitmq-server) answers on 127.0.0.1:5673, next to the
# host's RabbitMQ 3.10 on 5672 (scripts/ensure-rabbitmq.sh). Trixie's packages need a newer C
# library than this bookworm host has, so they are never installed into the host: a trixie root
# filesystem (`debootstrap --variant=minbase trixie` + `rabbitmq-server`) is built once per machine
# into $WORKQUEUE_CACHE/rabbitmq4-rootfs (outside the repo) and the broker runs from it with
# `chroot`, inside a private mount namespace (`unshare -m`) that holds its /proc and /dev mounts.
#
#   scripts/ensure-rabbitmq4.sh          build the rootfs if needed, start the node if nothing answers
#   scripts/ensure-rabbitmq4.sh --root   build the rootfs if needed and print its path (no node)
#   scripts/ensure-rabbitmq4.sh --bin    ... and print a dir whose `rabbitmqctl` manages the node
#   scripts/ensure-rabbitmq4.sh ctl ARGS rabbitmqctl ARGS against the node (the 4.0 CLI)
#   scripts/ensure-rabbitmq4.sh stop     stop the node
#
# The node: rabbit4@localhost, AMQP on port 5673 of every local address (like the host's 3.10: pods of
# the local cluster reach it at the host's address on their network), Erlang distribution on 25673,
# its own epmd on 4370 (ERL_EPMD_PORT), data, logs and Erlang cookie under /var/lib/workqueue-rabbit4
# inside the rootfs. guest/guest works from 127.0.0.1 (guest is limited to loopback connections).
# Exits non-zero with diagnostics if the node can't be built or started, so tests fail, never skip.
set -euo pipefail

cache=${WORKQUEUE_CACHE:-$HOME/.cache/workqueue}
root="$cache/rabbitmq4-rootfs"
port=${RABBITMQ4_PORT:-5673}
dist_port=${RABBITMQ4_DIST_PORT:-25673}
epmd_port=${RABBITMQ4_EPMD_PORT:-4370}
node=${RABBITMQ4_NODENAME:-rabbit4@localhost}
data=/var/lib/workqueue-rabbit4   # as seen inside the rootfs
say() { echo "ensure-rabbitmq4: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "must run as root (debootstrap, chroot, unshare)"; exit 1; }
mkdir -p "$cache"

# Run a command inside the rootfs ($1 = rootfs), with /proc, /sys and /dev mounted in a private
# mount namespace (they vanish with its last process; nothing is mounted in the host's namespace).
in_root() {
  local dir=$1; shift
  unshare --mount --propagation private -- /bin/sh -c '
    dir=$1; shift
    mount -t proc proc "$dir/proc" && mount -t sysfs sysfs "$dir/sys" && mount --rbind /dev "$dir/dev" || exit 125
    exec chroot "$dir" "$@"' sh "$dir" "$@"
}

# The broker's environment (inside the rootfs), for rabbitmq-server and rabbitmqctl alike.
node_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=$data/home LANG=C.UTF-8 LC_ALL=C.UTF-8
  RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=0.0.0.0 RABBITMQ_NODE_PORT="$port"
  RABBITMQ_DIST_PORT="$dist_port" ERL_EPMD_PORT="$epmd_port"
  RABBITMQ_MNESIA_BASE=$data/mnesia RABBITMQ_LOG_BASE=$data/log RABBITMQ_LOGS=$data/log/rabbit.log
  RABBITMQ_CONFIG_FILE=$data/rabbitmq.conf RABBITMQ_ADVANCED_CONFIG_FILE=$data/advanced.config
  RABBITMQ_ENABLED_PLUGINS_FILE=$data/enabled_plugins RABBITMQ_PID_FILE=$data/rabbitmq.pid)
# rabbitmqctl in the rootfs, killed after $1 seconds.
ctl() { local t=$1; shift; in_root "$root" "${node_env[@]}" timeout "$t" /usr/lib/rabbitmq/bin/rabbitmqctl -n "$node" "$@"; }
answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; }

build_rootfs() {
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq debootstrap >/dev/null
  fi
  # The Debian mirror this machine's apt uses (deb.debian.org unless configured otherwise).
  local mirror
  mirror=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | grep -oE 'https?://[^ ]+' | head -n1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  # An interrupted build leaves a *.tmp.* dir: never reused, removed here (under the lock).
  local stale
  for stale in "$cache"/rabbitmq4-rootfs.tmp.*; do
    [ -e "$stale" ] && rm -rf --one-file-system "$stale"
  done
  local tmp start=$SECONDS
  tmp=$(mktemp -d "$cache/rabbitmq4-rootfs.tmp.XXXXXX")
  say "building a Debian trixie rootfs with rabbitmq-server in $root (from $mirror; once per machine, a few minutes)"
  if ! debootstrap --variant=minbase trixie "$tmp" "$mirror" >"$cache/rabbitmq4-debootstrap.log" 2>&1; then
    say "debootstrap failed; last lines of $cache/rabbitmq4-debootstrap.log:"
    tail -n 30 "$cache/rabbitmq4-debootstrap.log" >&2
    tail -n 20 "$tmp/debootstrap/debootstrap.log" >&2 2>/dev/null || true
    exit 1
  fi
  # Packages' maintainer scripts must not start services (the node is started below, on our ports).
  printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
  chmod 755 "$tmp/usr/sbin/policy-rc.d"
  cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
  if ! in_root "$tmp" /usr/bin/env DEBIAN_FRONTEND=noninteractive /bin/sh -c \
      'apt-get update -qq && apt-get install -y -qq --no-install-recommends rabbitmq-server && apt-get clean' \
      >>"$cache/rabbitmq4-debootstrap.log" 2>&1; then
    say "installing rabbitmq-server in the rootfs failed; last lines of $cache/rabbitmq4-debootstrap.log:"
    tail -n 30 "$cache/rabbitmq4-debootstrap.log" >&2
    exit 1
  fi
  [ -x "$tmp/usr/lib/rabbitmq/bin/rabbitmq-server" ] || { say "rabbitmq-server missing from the rootfs"; exit 1; }
  rm -rf --one-file-system "$root"
  mv -T "$tmp" "$root"   # atomic: $root exists only once complete
  say "rootfs ready in $((SECONDS - start)) s: $(chroot "$root" dpkg-query -W -f '${Package} ${Version}' rabbitmq-server)"
}

if [ "${1:-}" = ctl ] && [ -x "$root/usr/lib/rabbitmq/bin/rabbitmqctl" ]; then
  shift; ctl 600 "$@"; exit   # no lock: the shim below calls this while a test runs
fi

exec 9>"$cache/rabbitmq4.lock"
flock 9   # one build / start at a time (make broker and a test fixture may race)
[ -x "$root/usr/lib/rabbitmq/bin/rabbitmq-server" ] || build_rootfs

# A `rabbitmqctl` for this node, to put first on PATH in the test pass against RabbitMQ 4
# (tests that call `rabbitmqctl` then reach the broker they test, with the 4.0 CLI).
bin="$cache/rabbitmq4-bin"
mkdir -p "$bin"
printf '#!/bin/sh
exec %q ctl "$@"
' "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" >"$bin/rabbitmqctl.tmp"
chmod 755 "$bin/rabbitmqctl.tmp" && mv -f "$bin/rabbitmqctl.tmp" "$bin/rabbitmqctl"

case "${1:-}" in
  --root) echo "$root"; exit 0 ;;
  --bin) echo "$bin"; exit 0 ;;
  stop) ctl 60 stop >/dev/null 2>&1 && say "stopped $node" || say "$node was not running"; exit 0 ;;
  ctl) shift; ctl 600 "$@"; exit ;;
  "") ;;
  *) say "unknown argument: $1"; exit 2 ;;
esac

if answers && ctl 30 -q status >/dev/null 2>&1; then
  say "RabbitMQ $(ctl 30 -q version 2>/dev/null) already answers on 127.0.0.1:$port"
  exit 0
fi
if answers; then
  say "something else answers on 127.0.0.1:$port (not $node); free the port or set RABBITMQ4_PORT"
  exit 1
fi

dir="$root$data"
mkdir -p "$dir/mnesia" "$dir/log" "$dir/home"
[ -s "$dir/home/.erlang.cookie" ] || { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/home/.erlang.cookie"; }
chmod 400 "$dir/home/.erlang.cookie"
printf '%s\n' "loopback_users.guest = true" >"$dir/rabbitmq.conf"
echo "[]." >"$dir/advanced.config"
echo "[]." >"$dir/enabled_plugins"
say "starting RabbitMQ 4 ($node) on 127.0.0.1:$port"
start=$SECONDS
# Detached: its own session, output to the node's log dir, lock fd closed.
setsid nohup bash -c "$(declare -f in_root); in_root \"\$@\"" sh "$root" "${node_env[@]}" \
  /usr/lib/rabbitmq/bin/rabbitmq-server >"$dir/log/stdout.log" 2>&1 </dev/null 9>&- &
# `await_startup` fails at once until the node has registered with epmd: retry until a deadline.
deadline=$((SECONDS + 120))
until ctl 15 -q await_startup >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ]; then
    say "RabbitMQ 4 did not start within 120 s; diagnostics:"
    ctl 15 -q await_startup >&2 || true
    tail -n 30 "$dir/log/stdout.log" "$dir/log/rabbit.log" >&2 2>/dev/null || true
    exit 1
  fi
  sleep 1
done
answers || { say "RabbitMQ 4 started but 127.0.0.1:$port does not answer"; tail -n 30 "$dir/log/rabbit.log" >&2; exit 1; }
say "RabbitMQ $(ctl 30 -q version) is up on 127.0.0.1:$port in $((SECONDS - start)) s"
