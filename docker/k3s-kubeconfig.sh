#!/bin/sh
# Copy k3s's admin kubeconfig for Airflow, pointing at the k3s service instead of 127.0.0.1.
set -eu
until [ -s /k3s-output/kubeconfig.yaml ]; do echo "waiting for k3s's kubeconfig..."; sleep 2; done
sed 's#https://127.0.0.1:6443#https://k3s:6443#' /k3s-output/kubeconfig.yaml > /kube/config
chmod 644 /kube/config
echo "kubeconfig for Airflow written to /kube/config"
