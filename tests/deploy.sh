#!/usr/bin/env bash
# Checks the deployment files that cannot run here (no container runtime, no Kubernetes):
# examples/deploy/k8s/*.yaml against the Kubernetes API schemas (kubernetes-validate, strict:
# unknown fields fail), examples/deploy/compose.yaml against the Compose specification's schema
# (check-jsonschema), and the Dockerfile's COPY sources exist. The nginx config runs for real in
# tests/it/deploy.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  'kubernetes-validate==1.37.0' 'check-jsonschema==0.39.0'

echo "==> Kubernetes manifests (kubernetes-validate --strict)"
kubernetes-validate --strict --quiet examples/deploy/k8s/*.yaml
echo "==> Compose file (Compose specification schema)"
check-jsonschema --builtin-schema vendor.compose-spec examples/deploy/compose.yaml
echo "==> Dockerfile COPY sources"
grep -E '^COPY [^-]' Dockerfile | while read -r _ sources; do
  for src in ${sources% *}; do
    [ -e "$src" ] || { echo "Dockerfile copies $src, which does not exist"; exit 1; }
  done
done
echo "deployment files: ok"
