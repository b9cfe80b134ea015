#!/usr/bin/env bash
# Validates every manifest in deploy/ offline: the kustomizations against the Kubernetes schemas
# (kubernetes-validate ships them) plus the trust-boundary rules they must keep, the cert-manager
# objects field by field (their CRDs have no bundled schema), the alerting rules with promtool,
# and the example kubeconfig with kubectl.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for overlay in server agent; do
  kubectl kustomize "$overlay" > "$tmp/$overlay.yaml"
  kubernetes-validate --strict --quiet "$tmp/$overlay.yaml"
  echo "ok: deploy/$overlay (kustomize build, strict schema validation)"
done

# What the rendered manifests must keep: no credential shipped, no CA key mounted, separate
# roots for agents and clients, no service-account token, NetworkPolicies on the listening ports,
# and an image name that is a kustomize variable rather than a made-up registry.
python3 - "$tmp/server.yaml" "$tmp/agent.yaml" <<'PY'
import sys, yaml

def load(path):
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(open(path)) if d}

server, agent = load(sys.argv[1]), load(sys.argv[2])

def pod(objs, name):
    spec = objs[("Deployment", name)]["spec"]["template"]["spec"]
    assert spec.get("automountServiceAccountToken") is False, f"{name}: service-account token mounted"
    (container,) = spec["containers"]
    assert "/" not in container["image"].split(":")[0], f"{name}: image {container['image']} names a registry; set it with kustomize"
    args = dict(a[2:].split("=", 1) for a in container["args"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    return args, mounts, volumes

def volume_of(path, mounts, volumes):
    """The volume (and key) a file path in the container comes from."""
    directory, _, file = path.rpartition("/")
    vol = volumes[mounts[directory]]
    source = vol.get("secret") or vol.get("configMap")
    items = {i["path"]: i["key"] for i in source["items"]}
    assert file in items, f"{path}: not among the volume's items {items}"
    return source.get("secretName") or source.get("name"), items[file], items

args, mounts, volumes = pod(server, "proxy-server")
ca_secrets = {}
for flag in ("agent-ca", "frontend-ca"):
    secret, key, items = volume_of(args[flag], mounts, volumes)
    # Only the CA's certificate: a CA Secret's key must never be mounted.
    assert list(items.values()) == ["tls.crt"], f"--{flag}: mounts {items} of {secret}"
    ca_secrets[flag] = secret
assert ca_secrets["agent-ca"] != ca_secrets["frontend-ca"], "one CA for agents and clients"
assert ca_secrets == {"agent-ca": "proxy-agent-ca", "frontend-ca": "proxy-client-ca"}, ca_secrets
for flag, secret in [("agent-tls-cert", "proxy-server-agent-listener-tls"), ("agent-tls-key", "proxy-server-agent-listener-tls"),
                     ("frontend-tls-cert", "proxy-server-frontend-tls"), ("frontend-tls-key", "proxy-server-frontend-tls")]:
    assert volume_of(args[flag], mounts, volumes)[0] == secret, flag
for flag in ("operator-addr",):
    assert args[flag].startswith("127.0.0.1:"), f"--{flag}={args[flag]} is not loopback"
secret, _, _ = volume_of(args["frontend-auth-file"], mounts, volumes)
auth = yaml.safe_load(server[("Secret", secret)]["stringData"]["auth.yaml"])
assert list(auth) == ["placeholder"] and isinstance(auth["placeholder"], str), f"auth Secret is not the placeholder: {auth}"

def ports_allowed(objs, name):
    (policy,) = [d for (k, _), d in objs.items() if k == "NetworkPolicy"
                 and d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == name]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return sorted(p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"])

assert ports_allowed(server, "proxy-server") == [8090, 8091, 8095]
args, mounts, volumes = pod(agent, "proxy-agent")
assert volume_of(args["upstream-ca"], mounts, volumes)[:2] == ("kube-root-ca.crt", "ca.crt")
for flag in ("tls-cert", "tls-key", "server-ca"):
    assert volume_of(args[flag], mounts, volumes)[0] == "proxy-agent-tls", flag
assert agent[("ServiceAccount", "proxy-agent")]["automountServiceAccountToken"] is False
assert ports_allowed(agent, "proxy-agent") == [8093]
PY
echo "ok: deploy/server, deploy/agent (no credential, no CA key mounted, separate CAs, no SA token, NetworkPolicies)"

# cert-manager objects: namespaced Issuers only, three CAs, every leaf naming its role.
python3 - server/pki.yaml server/certificates.yaml server/agent-certificate-example.yaml \
  server/client-certificate-example.yaml <<'PY'
import sys, yaml
docs = {}
for path in sys.argv[1:]:
    loaded = [d for d in yaml.safe_load_all(open(path)) if d]
    assert loaded, f"{path}: no documents"
    docs[path] = loaded
every = [d for ds in docs.values() for d in ds]
for d in every:
    assert d["apiVersion"] == "cert-manager.io/v1" and d["kind"] in ("Issuer", "Certificate"), d
    assert d["metadata"]["namespace"] == "multicluster-proxy", d["metadata"]
issuers = {d["metadata"]["name"]: d["spec"] for d in every if d["kind"] == "Issuer"}
certs = [d for d in every if d["kind"] == "Certificate"]
for issuer in issuers.values():
    if "ca" in issuer:
        (made,) = [d for d in certs if d["spec"]["secretName"] == issuer["ca"]["secretName"]]
        assert made["spec"].get("isCA") is True, f"{made['metadata']['name']}: a CA Issuer's certificate without isCA"
ca_secrets = {}
for d in certs:
    name, spec = d["metadata"]["name"], d["spec"]
    assert spec.get("secretName"), f"{name}: no secretName"
    ref = spec["issuerRef"]
    assert ref.get("kind") == "Issuer", f"{name}: issuerRef kind {ref.get('kind')!r}, must be a namespaced Issuer"
    assert ref.get("name") in issuers, f"{name}: issuer {ref.get('name')!r} is not defined in pki.yaml"
    uris = spec.get("uris", [])
    if spec.get("isCA"):
        assert "selfSigned" in issuers[ref["name"]], f"{name}: a CA not self-signed by the bootstrap Issuer"
        assert not uris, f"{name}: a CA carries no role URI"
        ca_secrets[spec["secretName"]] = name
        continue
    # A leaf: exactly one role URI, matching its issuer and its CN.
    assert len(uris) == 1 and uris[0].startswith("spiffe://multicluster-proxy/"), f"{name}: role URI {uris}"
    role = uris[0][len("spiffe://multicluster-proxy/"):]
    issuer_secret = issuers[ref["name"]]["ca"]["secretName"]
    usages = spec.get("usages", [])
    if role == "server":
        assert issuer_secret == "proxy-server-ca" and "server auth" in usages and spec.get("dnsNames"), name
    else:
        kind, _, who = role.partition("/")
        assert kind in ("agent", "client") and who == spec["commonName"], f"{name}: role {role} vs CN {spec.get('commonName')}"
        assert issuer_secret == f"proxy-{kind}-ca", f"{name}: a {kind} certificate from {issuer_secret}"
        assert "client auth" in usages and "server auth" not in usages, f"{name}: usages {usages}"
# The Secrets the server Deployment mounts are the ones made here.
servers = {d["spec"]["secretName"] for d in docs["server/certificates.yaml"]}
assert servers == {"proxy-server-agent-listener-tls", "proxy-server-frontend-tls"}, servers
# Three roots, each behind its own CA Issuer.
assert sorted(ca_secrets) == ["proxy-agent-ca", "proxy-client-ca", "proxy-server-ca"], ca_secrets
assert sorted(i["ca"]["secretName"] for i in issuers.values() if "ca" in i) == sorted(ca_secrets)
PY
echo "ok: deploy/server cert-manager objects (namespaced Issuers only, three CAs, a role URI in every leaf)"

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
