#!/usr/bin/env bash
# Validates the manifests offline: renders them with `kubectl kustomize` and checks every
# object against the Kubernetes OpenAPI schemas that the PyPI package kubernetes-validate
# ships, strictly (an unknown field is an error), for the newest version it ships and for
# the oldest this deployment supports (1.30: the first with securityContext.appArmorProfile).
# The PodMonitor is a CRD with no schema there: it is checked on its own against the
# DaemonSet it scrapes (selector, port name, scrape annotations).
#
# Usage: bash deploy/kubernetes/validate.sh   (from anywhere; installs kubernetes-validate
# into a venv under target/ on first use)
set -euo pipefail
cd "$(dirname "$0")/../.."

versions=(1.37.0 1.30.0)
venv=${HITLESS_VALIDATE_VENV:-target/kubernetes-validate-venv}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
kubectl=${KUBECTL:-kubectl}
if command -v "$kubectl" >/dev/null; then
  "$kubectl" kustomize deploy/kubernetes >"$out/default.yaml"
  "$kubectl" kustomize deploy/kubernetes/with-monitoring >"$out/with-monitoring.yaml"
  echo "validate: rendered deploy/kubernetes and deploy/kubernetes/with-monitoring with kubectl kustomize"
else
  # No kubectl: the base's files as they are (without kustomize's namespace and image).
  for f in deploy/kubernetes/base/{namespace,agent,coordinator}.yaml; do cat "$f"; echo "---"; done >"$out/default.yaml"
  { cat "$out/default.yaml"; cat deploy/kubernetes/monitoring/podmonitor.yaml; } >"$out/with-monitoring.yaml"
  echo "validate: no kubectl here; validating the base's files concatenated, not kustomize's rendering"
fi

for v in "${versions[@]}"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$out/default.yaml"
  echo "validate: deploy/kubernetes: every object valid against Kubernetes $v (strict)"
done

"$venv/bin/python" - "$out/with-monitoring.yaml" <<'PY'
import sys, yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
def one(kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]

ds, pm = one("DaemonSet"), one("PodMonitor")
assert pm["apiVersion"] == "monitoring.coreos.com/v1", pm["apiVersion"]
ns = lambda d: d["metadata"].get("namespace")
assert ns(pm) == ns(ds), f"PodMonitor in namespace {ns(pm)}, DaemonSet in {ns(ds)}"
labels = ds["spec"]["template"]["metadata"]["labels"]
for k, v in pm["spec"]["selector"]["matchLabels"].items():
    assert labels.get(k) == v, f"PodMonitor selects {k}={v}; the agent pods have {labels}"
agent = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "hitless-agent")
ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
for ep in pm["spec"]["podMetricsEndpoints"]:
    assert ep["port"] in ports, f"PodMonitor scrapes port {ep['port']!r}; the agent has {sorted(ports)}"
    assert ep["path"] == "/metrics", ep["path"]
ann = ds["spec"]["template"]["metadata"]["annotations"]
assert int(ann["prometheus.io/port"]) == ports["metrics"], f"prometheus.io/port {ann['prometheus.io/port']} is not the metrics port {ports['metrics']}"
addr = next(a for a in agent["args"] if a.startswith("--metrics-addr="))
assert addr.endswith(f":{ports['metrics']}"), f"{addr} does not listen on the metrics port {ports['metrics']}"
print("validate: PodMonitor (CRD, no schema shipped): selects the agent pods, scrapes their metrics port; scrape annotations agree")
PY
echo "validate: manifests ok"
