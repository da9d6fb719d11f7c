"""Deployment: Kubernetes manifests (k8s/), the image's helper scripts (ops/), checks (check.py)."""
