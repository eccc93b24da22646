"""Kubernetes manifests built as plain dicts (pure functions: nothing here talks to a cluster)."""
