#!/bin/sh
# Entrypoint of the local RabbitMQ image (Debian trixie's rabbitmq-server 4.0, see
# scripts/real_node_images.py). Like the official image: RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS
# (EnsureBrokerOperator's pods read them from the credentials Secret) become the broker's only user
# (guest is then never created); without them, guest/guest, as the tutorial's manifests expect. Config, data and the Erlang cookie live in $HOME (/var/lib/rabbitmq, the
# pod's volume); logs go to stdout (the pod's log). Runs as the image's rabbitmq user (uid 999).
set -eu
umask 077
export RABBITMQ_CONFIG_FILE="$HOME/rabbitmq.conf"
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then
  printf 'loopback_users = none\ndefault_user = %s\ndefault_pass = %s\n' \
    "$RABBITMQ_DEFAULT_USER" "$RABBITMQ_DEFAULT_PASS" > "$RABBITMQ_CONFIG_FILE"
  unset RABBITMQ_DEFAULT_PASS
else  # as the official image: guest/guest, from other hosts too (the tutorial's BROKER_URL)
  printf 'loopback_users.guest = false\n' > "$RABBITMQ_CONFIG_FILE"
fi
exec /usr/lib/rabbitmq/bin/rabbitmq-server
