#!/usr/bin/env bash
# Make sure a RabbitMQ server answers on localhost:5672: install Debian's rabbitmq-server and
# amqp-tools when missing (as root), start the server when nothing answers. Exits non-zero if it
# can't, so tests that need the broker fail instead of skipping.
set -euo pipefail
need=()
command -v rabbitmq-server >/dev/null || need+=(rabbitmq-server)
command -v amqp-consume >/dev/null || need+=(amqp-tools)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "ensure-rabbitmq: installing ${need[*]}" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=900 install -y -qq "${need[@]}" >/dev/null
  # Debian's postinst may start the service; we manage the node ourselves below.
fi
answers() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' 2>/dev/null; }
if answers && rabbitmqctl -q status >/dev/null 2>&1; then
  echo "ensure-rabbitmq: RabbitMQ already answers on 127.0.0.1:5672" >&2
  exit 0
fi
echo "ensure-rabbitmq: starting rabbitmq-server" >&2
rabbitmq-server -detached >/dev/null 2>&1 || true
# `await_startup` fails at once ("node not running at all") until the new node has registered
# with epmd, which takes a few seconds after `-detached` returns, so retry it until a deadline.
deadline=$((SECONDS + 120))
until timeout 15 rabbitmqctl -q await_startup >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ]; then
    echo "ensure-rabbitmq: RabbitMQ did not start within 120 s; see /var/log/rabbitmq/" >&2
    timeout 15 rabbitmqctl -q await_startup || true  # print the CLI's diagnostics
    exit 1
  fi
  sleep 1
done
answers || { echo "ensure-rabbitmq: RabbitMQ started but 127.0.0.1:5672 does not answer" >&2; exit 1; }
echo "ensure-rabbitmq: RabbitMQ $(rabbitmqctl -q version) is up" >&2
