#!/usr/bin/env bash
# Checks the monitoring kit in deploy/monitoring/ (CI runs it):
#   1. alerts.yaml is the rendering of alerts.template.yaml with the defaults
#      in thresholds.toml (render.py --check), and render.py refuses a bad
#      threshold;
#   2. promtool check rules on alerts.yaml;
#   3. promtool test rules: the unit tests in deploy/monitoring/tests/;
#   4. every dashboard query is valid PromQL (promtool check rules on a
#      rules file made of them, with Grafana's variables filled in).
# The names the rules and the dashboard use are checked against
# src/metric_names.rs by `cargo test --test monitoring`.
#
# Needs python3 (3.11+) and promtool: `apt-get install prometheus`
# (scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
MON=deploy/monitoring

if ! command -v promtool >/dev/null 2>&1; then
  echo "check-monitoring: promtool not found; install Prometheus (apt-get install prometheus, as scripts/test.sh does)" >&2
  exit 1
fi
promtool --version 2>&1 | head -n 1

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "--- render.py --check"
python3 "$MON/render.py" --check
if python3 "$MON/render.py" --set no_token_for=3 >/dev/null 2>"$work/err"; then
  echo "render.py accepted a duration without unit" >&2
  exit 1
fi
echo "  refuses a bad threshold: $(cat "$work/err")"

echo "--- promtool check rules"
promtool check rules "$MON/alerts.yaml"

echo "--- promtool test rules"
promtool test rules "$MON"/tests/*.yaml

echo "--- dashboard queries are valid PromQL"
python3 - "$MON/dashboard.json" "$work/dashboard-rules.yaml" <<'PY'
import json, sys

dashboard = json.load(open(sys.argv[1]))

def panels(node):
    for p in node.get("panels", []):
        yield p
        yield from panels(p)

exprs = []
for v in dashboard["templating"]["list"]:
    q = v.get("query")
    if isinstance(q, dict):
        q = q.get("query")
    if isinstance(q, str) and q.startswith("label_values("):
        # label_values(METRIC, label) is Grafana's; its metric part is PromQL.
        exprs.append(q[len("label_values("):].rsplit(",", 1)[0])
for p in panels(dashboard):
    for t in p.get("targets", []):
        exprs.append(t["expr"])
fill = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".+"}
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        for k, v in fill.items():
            e = e.replace(k, v)
        out.write(f"      - record: dashboard:query:{i}\n        expr: {json.dumps(e)}\n")
print(f"  {len(exprs)} queries")
PY
promtool check rules "$work/dashboard-rules.yaml"

echo
echo "check-monitoring: all passed"
