#!/bin/sh
# The `rabbitmq` image for the local node agent (localkube): a private rabbitmq-server node
# (Debian's 3.10) running in the foreground as the pod's process, beside the host's main node.
#
# Register it from a test (ports chosen free by the test):
#   local_cluster.register_image("rabbitmq", entrypoint=["{repo}/localkube/src/localkube/images/rabbitmq-local.sh"],
#       env={"RABBITMQ_NODENAME": "{namespace}-{pod}@localhost", "RABBITMQ_POD_DIR": "{pod_dir}",
#            "RABBITMQ_NODE_PORT": "<amqp port>", "RABBITMQ_DIST_PORT": "<distribution port>"})
#
# Environment: RABBITMQ_NODE_PORT (AMQP, on 127.0.0.1) and RABBITMQ_DIST_PORT (Erlang
# distribution) are required; RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS (the pod's env, from
# the credentials Secret) become the only user: 3.10 ignores these variables, so they are written
# into a private rabbitmq.conf (mode 600) as default_user / default_pass, and guest is never
# created. Data, logs, config and plugins live under RABBITMQ_POD_DIR (default: the working
# directory, which the agent sets to the pod's scratch dir); logs also go to stdout (the pod log).
# The node uses the host's `rabbitmq` user's Erlang cookie, so `rabbitmq-diagnostics` (the
# StatefulSet's readiness probe, run by root through Debian's wrapper as that user) can reach it.
# SIGTERM to the process group (pod deletion) stops the node gracefully; the shared epmd stays.
set -eu

: "${RABBITMQ_NODE_PORT:?set RABBITMQ_NODE_PORT (the AMQP port) in the image entry}"
: "${RABBITMQ_DIST_PORT:?set RABBITMQ_DIST_PORT (a free Erlang distribution port) in the image entry}"
user="${RABBITMQ_DEFAULT_USER:-}"
pass="${RABBITMQ_DEFAULT_PASS:-}"
if [ -z "$user" ] || [ -z "$pass" ]; then
  echo "rabbitmq-local: RABBITMQ_DEFAULT_USER and RABBITMQ_DEFAULT_PASS must be set (secretKeyRef)" >&2
  exit 1
fi
base="${RABBITMQ_POD_DIR:-$PWD}/rabbitmq"
mkdir -p "$base/mnesia" "$base/log" "$base/home"
umask 077
cookie=/var/lib/rabbitmq/.erlang.cookie
if [ -r "$cookie" ] && [ ! -f "$base/home/.erlang.cookie" ]; then
  cp "$cookie" "$base/home/.erlang.cookie"
  chmod 400 "$base/home/.erlang.cookie"
fi
cat > "$base/rabbitmq.conf" <<CONF
loopback_users = none
default_user = $user
default_pass = $pass
CONF
echo '[].' > "$base/enabled_plugins"
unset RABBITMQ_DEFAULT_USER RABBITMQ_DEFAULT_PASS pass

export HOME="$base/home"
export RABBITMQ_NODENAME="${RABBITMQ_NODENAME:-rabbit-${HOSTNAME:-pod}@localhost}"
export RABBITMQ_NODE_IP_ADDRESS="${RABBITMQ_NODE_IP_ADDRESS:-127.0.0.1}"
export RABBITMQ_MNESIA_BASE="$base/mnesia"
export RABBITMQ_LOG_BASE="$base/log"
export RABBITMQ_LOGS=-
export RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf"
export RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins"
export RABBITMQ_PID_FILE="$base/rabbitmq.pid"
echo "rabbitmq-local: starting node $RABBITMQ_NODENAME on 127.0.0.1:$RABBITMQ_NODE_PORT (user $user)"
exec /usr/lib/rabbitmq/bin/rabbitmq-server
