#!/usr/bin/env bash
# Validates every manifest in deploy/ against the Kubernetes schemas, offline
# (kubernetes-validate ships them), and the example kubeconfig with kubectl.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for overlay in server agent; do
  kubectl kustomize "$overlay" > "$tmp/$overlay.yaml"
  kubernetes-validate --strict --quiet "$tmp/$overlay.yaml"
  echo "ok: deploy/$overlay (kustomize build, strict schema validation)"
done
# cert-manager CRDs have no bundled schema: check they parse and carry what the servers need.
for cert in server/certificates.yaml agent/certificate.yaml; do
  python3 - "$cert" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
assert docs, "no documents"
for d in docs:
    assert d["apiVersion"] == "cert-manager.io/v1" and d["kind"] == "Certificate", d
    spec = d["spec"]
    assert spec["secretName"] and spec["issuerRef"]["name"] and spec["commonName"], spec
PY
  echo "ok: deploy/$cert (cert-manager Certificate fields)"
done
# Alerting rules: syntax, their unit tests, and the PrometheusRule carrying the same groups.
promtool check rules monitoring/rules.yaml
promtool test rules monitoring/rules_test.yaml
python3 - <<'PY'
import yaml
plain = yaml.safe_load(open("monitoring/rules.yaml"))
crd = yaml.safe_load(open("monitoring/prometheusrule.yaml"))
assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule", crd
assert crd["spec"] == plain, "monitoring/prometheusrule.yaml differs from rules.yaml: regenerate it"
PY
echo "ok: deploy/monitoring (promtool check and unit tests; PrometheusRule matches rules.yaml)"
kubectl config view --kubeconfig examples/kubeconfig-controller.yaml > /dev/null
echo "ok: deploy/examples/kubeconfig-controller.yaml (kubectl config view)"
