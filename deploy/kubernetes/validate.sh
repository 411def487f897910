#!/usr/bin/env bash
# Validates the manifests offline: renders them with `kubectl kustomize` and checks every
# object against the Kubernetes OpenAPI schemas that the PyPI package kubernetes-validate
# ships, strictly (an unknown field is an error), for the newest version it ships and for
# the oldest this deployment supports (1.30: the first with securityContext.appArmorProfile).
# The PodMonitor is a CRD with no schema there: it is checked on its own against the
# DaemonSet it scrapes (selector, port name, scrape annotations). The example application
# (deploy/kubernetes/example) is validated the same way, then checked against the agent's
# DaemonSet and its registry file: hooks that run `hitless-agent register`/`prestop` on the
# agent's socket, the socket's group among the pods' groups, a grace period longer than the
# prestop deadline, readiness, the Service and PodDisruptionBudget selecting the pods, and
# the Service's clusterIP:port as the hitless VIP.
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
  "$kubectl" kustomize deploy/kubernetes/example >"$out/example.yaml"
  echo "validate: rendered deploy/kubernetes, deploy/kubernetes/with-monitoring and deploy/kubernetes/example with kubectl kustomize"
else
  # No kubectl: the base's files as they are (without kustomize's namespace and image).
  for f in deploy/kubernetes/base/{namespace,agent,coordinator}.yaml; do cat "$f"; echo "---"; done >"$out/default.yaml"
  { cat "$out/default.yaml"; cat deploy/kubernetes/monitoring/podmonitor.yaml; } >"$out/with-monitoring.yaml"
  for f in deploy/kubernetes/example/{namespace,web}.yaml; do cat "$f"; echo "---"; done >"$out/example.yaml"
  echo "validate: no kubectl here; validating the base's files concatenated, not kustomize's rendering"
fi

for v in "${versions[@]}"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$out/default.yaml"
  echo "validate: deploy/kubernetes: every object valid against Kubernetes $v (strict)"
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$out/example.yaml"
  echo "validate: deploy/kubernetes/example: every object valid against Kubernetes $v (strict)"
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
"$venv/bin/python" - "$out/default.yaml" "$out/example.yaml" deploy/kubernetes/example/registry.yaml <<'PY'
import posixpath, re, sys, yaml

load = lambda path: [d for d in yaml.safe_load_all(open(path)) if d]
agent_docs, app_docs, registry = load(sys.argv[1]), load(sys.argv[2]), yaml.safe_load(open(sys.argv[3]))
def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
def flags(argv):
    """--name=value and --name value pairs of an argv."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1); out[k] = v
        elif a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[a[2:]] = argv[i + 1]; i += 1
        elif a.startswith("--"):
            out[a[2:]] = ""
        i += 1
    return out
def seconds(d):
    m = re.fullmatch(r"(\d+)(ms|s|m)", d)
    assert m, f"cannot read the duration {d!r}"
    return int(m[1]) * {"ms": 0.001, "s": 1, "m": 60}[m[2]]

# The agent: serves the local API on the host's /run/hitless, in the socket's group.
ds = one(agent_docs, "DaemonSet")
dspec = ds["spec"]["template"]["spec"]
agent = next(c for c in dspec["containers"] if c["name"] == "hitless-agent")
aflags = flags(agent["args"])
assert "local-api" in aflags, f"the agent DaemonSet passes no --local-api: {agent['args']}"
socket, group = aflags["local-api"], int(aflags["local-api-group"])
sock_dir = posixpath.dirname(socket)
def host_dir(spec, container, mount_path):
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert mount_path in mounts, f"{container['name']} mounts nothing at {mount_path}: {sorted(mounts)}"
    vol = next(v for v in spec["volumes"] if v["name"] == mounts[mount_path])
    assert "hostPath" in vol, f"{container['name']}: {mount_path} must be the host's (hostPath), not {vol}"
    return vol["hostPath"]["path"]
agent_host_dir = host_dir(dspec, agent, sock_dir)
assert group in dspec.get("securityContext", {}).get("supplementalGroups", []), \
    f"the agent must be in the socket's group {group} (pod supplementalGroups) to give it that group without CAP_CHOWN"

# The application.
dep, svc, pdb = one(app_docs, "Deployment"), one(app_docs, "Service"), one(app_docs, "PodDisruptionBudget")
spec = dep["spec"]["template"]["spec"]
labels = dep["spec"]["template"]["metadata"]["labels"]
sc = spec.get("securityContext", {})
assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, "the example pods run as a non-root user"
assert group in sc.get("supplementalGroups", []), \
    f"the pods need the socket's group {group} in supplementalGroups (it is 0660 root:{group}); they have {sc.get('supplementalGroups')}"
hooked = [c for c in spec["containers"] if "lifecycle" in c]
assert len(hooked) == 1, "one container runs the hooks"
c = hooked[0]
env = {e["name"]: e.get("value") for e in c.get("env", [])}
def hook(phase, verb):
    argv = c["lifecycle"][phase]["exec"]["command"]
    assert posixpath.basename(argv[0]) == "hitless-agent" and argv[1] == verb, f"{phase} must run `hitless-agent {verb}`: {argv}"
    return flags(argv[2:])
reg, stop = hook("postStart", "register"), hook("preStop", "prestop")
for name, f in (("register", reg), ("prestop", stop)):
    assert f.get("socket", "/run/hitless/agent.sock") == socket, f"{name} dials {f.get('socket', '/run/hitless/agent.sock')}, the agent serves {socket}"
    assert "address" in f or "HITLESS_ADDRESS" in env, f"{name}: no --address and no HITLESS_ADDRESS"
assert "service" in reg or "HITLESS_SERVICE" in env, "register: no --service and no HITLESS_SERVICE"
assert "wait" in reg and seconds(reg["wait"]) > 0, "register must --wait until the pod listens (or clients are sent to it first)"
assert host_dir(spec, c, sock_dir) == agent_host_dir, f"the pods must mount the agent's host directory {agent_host_dir} at {sock_dir}"
deadline = seconds(stop.get("deadline", "30s"))
grace = spec.get("terminationGracePeriodSeconds", 30)
assert grace > deadline, f"terminationGracePeriodSeconds {grace} must exceed the prestop deadline {deadline}s (the hook counts against it)"
assert "readinessProbe" in c, "the example container needs a readinessProbe"
address = reg.get("address") or env["HITLESS_ADDRESS"]
port = int(address.rsplit(":", 1)[1])
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
assert port in ports.values(), f"the registered port {port} is not a containerPort {ports}"
for obj, sel in ((svc, svc["spec"]["selector"]), (pdb, pdb["spec"]["selector"]["matchLabels"])):
    for k, v in sel.items():
        assert labels.get(k) == v, f"{obj['kind']} selects {k}={v}; the pods have {labels}"
service = reg.get("service") or env["HITLESS_SERVICE"]
vips = next((s.get("vips", []) for s in registry["services"] if s["name"] == service), None)
assert vips is not None, f"registry.yaml declares no service {service!r}"
for p in svc["spec"]["ports"]:
    target = ports.get(p["targetPort"], p["targetPort"])
    assert target == port, f"the Service sends port {p['port']} to {target}, the pods register {port}"
    vip = f"{svc['spec']['clusterIP']}:{p['port']}"
    assert vip in vips, f"the Service's {vip} is not a VIP of {service} in registry.yaml ({vips})"
print(f"validate: example: hooks register/prestop on {socket} (group {group}), grace {grace}s > deadline {deadline:g}s, readiness, Service and PDB select the pods, VIP {vips} = the Service")
PY
echo "validate: manifests ok"
