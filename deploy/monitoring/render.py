#!/usr/bin/env python3
"""Renders deploy/monitoring/alerts.yaml from alerts.template.yaml and the
thresholds in thresholds.toml (Python 3.11+, standard library only).

    python3 deploy/monitoring/render.py                       # defaults, to stdout
    python3 deploy/monitoring/render.py --thresholds mine.toml > alerts.yaml
    python3 deploy/monitoring/render.py --set no_token_for=5m --set upstream_error_ratio=0.1
    python3 deploy/monitoring/render.py --format prometheusrule > rule.yaml  # Prometheus Operator
    python3 deploy/monitoring/render.py --write               # regenerate the two files below
    python3 deploy/monitoring/render.py --check               # CI: they are up to date

--write and --check cover alerts.yaml and, in the PrometheusRule format,
deploy/kubernetes/prometheus-operator/prometheusrule.yaml.

A thresholds file may hold any subset of the keys of thresholds.toml; an
unknown key, a value of the wrong type or a malformed duration is an error
(exit 2), as is a ${name} in the template that thresholds.toml lacks.
"""

import argparse
import difflib
import math
import pathlib
import re
import sys
import tomllib

HERE = pathlib.Path(__file__).resolve().parent
TEMPLATE = HERE / "alerts.template.yaml"
DEFAULTS = HERE / "thresholds.toml"
OUTPUT = HERE / "alerts.yaml"
OPERATOR_RULE = HERE.parent / "kubernetes" / "prometheus-operator" / "prometheusrule.yaml"

# Only ${name}: Go templates in annotations ({{ $value }}, $labels) pass through.
PLACEHOLDER = re.compile(r"\$\{([a-z0-9_]+)\}")
# A Prometheus duration: one or more number+unit pairs, largest unit first.
DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")


class Invalid(Exception):
    """A threshold that cannot be used; the message names it."""


def load(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise Invalid(f"{path}: cannot read: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise Invalid(f"{path}: not valid TOML: {e}")


def check_value(where, key, value, default):
    """Returns value, formatted for the template, or raises Invalid."""
    if key.endswith(("_for", "_window")):
        if not isinstance(value, str) or not value or not DURATION.match(value):
            raise Invalid(f"{where}: {key}: {value!r} is not a Prometheus duration (e.g. \"90s\", \"5m\", \"1h\")")
        return value
    if isinstance(default, str):
        if not isinstance(value, str) or not value:
            raise Invalid(f"{where}: {key}: must be a non-empty string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise Invalid(f"{where}: {key}: {value!r} is not a non-negative number")
    if key.endswith("_ratio") and value > 1:
        raise Invalid(f"{where}: {key}: {value!r} is a ratio, between 0 and 1")
    return repr(value) if isinstance(value, float) else str(value)


def thresholds(overrides_file, sets):
    defaults = load(DEFAULTS)
    default_values = {k: check_value(DEFAULTS.name, k, v, v) for k, v in defaults.items()}
    values = dict(default_values)
    layers = []
    if overrides_file:
        layers.append((overrides_file, load(overrides_file)))
    if sets:
        parsed = {}
        for item in sets:
            key, sep, raw = item.partition("=")
            if not sep:
                raise Invalid(f"--set {item}: expected NAME=VALUE")
            if isinstance(defaults.get(key), (int, float)) and not isinstance(defaults.get(key), bool):
                try:
                    parsed[key] = float(raw) if "." in raw or "e" in raw else int(raw)
                except ValueError:
                    raise Invalid(f"--set {key}: {raw!r} is not a number")
            else:
                parsed[key] = raw
        layers.append(("--set", parsed))
    for where, layer in layers:
        for key, value in layer.items():
            if key not in defaults:
                known = ", ".join(sorted(defaults))
                raise Invalid(f"{where}: {key}: unknown threshold (known: {known})")
            values[key] = check_value(where, key, value, defaults[key])
    changed = {k: v for k, v in values.items() if v != default_values[k]}
    return values, changed


def render(values, changed):
    template = TEMPLATE.read_text()
    used = set()

    def substitute(m):
        key = m.group(1)
        if key not in values:
            raise Invalid(f"{TEMPLATE.name}: ${{{key}}} is not a key of {DEFAULTS.name}")
        used.add(key)
        return values[key]

    # The template's own header comment is replaced by the generated one.
    body = template.split("\ngroups:", 1)
    if len(body) != 2:
        raise Invalid(f"{TEMPLATE.name}: no top-level 'groups:' key")
    rules = PLACEHOLDER.sub(substitute, "groups:" + body[1])
    unused = sorted(set(values) - used)
    if unused:
        raise Invalid(f"{DEFAULTS.name}: {', '.join(unused)}: not used by {TEMPLATE.name}")
    header = [
        "# Prometheus rules for sso-token-proxy. GENERATED by deploy/monitoring/render.py",
        "# from alerts.template.yaml and thresholds.toml: edit those, not this file.",
        "# What each alert means and what to do: docs/runbook.md.",
    ]
    if changed:
        header.append("# Thresholds changed from the defaults:")
        header += [f"#   {k} = {v}" for k, v in sorted(changed.items())]
    return "\n".join(header) + "\n" + rules


def as_prometheus_rule(rules_text):
    """The rules file wrapped in a monitoring.coreos.com/v1 PrometheusRule."""
    body = rules_text.split("\ngroups:", 1)[1]
    spec = "\n".join(("  " + line) if line else line for line in ("groups:" + body).split("\n"))
    return "\n".join([
        "# The alert rules of deploy/monitoring/alerts.yaml as a PrometheusRule for the",
        "# Prometheus Operator. GENERATED by deploy/monitoring/render.py: edit",
        "# alerts.template.yaml and thresholds.toml there, then run render.py --write.",
        "# The Prometheus object's ruleSelector must select it: add the labels it",
        "# expects (e.g. `release: <helm release>` with kube-prometheus-stack).",
        "apiVersion: monitoring.coreos.com/v1",
        "kind: PrometheusRule",
        "metadata:",
        "  name: sso-token-proxy",
        "  labels:",
        "    app.kubernetes.io/name: sso-token-proxy",
        "    app.kubernetes.io/part-of: example-app",
        "spec:",
        spec,
    ]).rstrip("\n ") + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", metavar="FILE", help="TOML file overriding some defaults")
    parser.add_argument("--set", metavar="NAME=VALUE", action="append", default=[], help="override one threshold")
    parser.add_argument("--format", choices=["rules", "prometheusrule"], default="rules",
                        help="a Prometheus rules file (default) or a PrometheusRule manifest")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {OUTPUT.name} (defaults only)")
    mode.add_argument("--check", action="store_true", help=f"fail if {OUTPUT.name} differs from the defaults' rendering")
    args = parser.parse_args()
    try:
        if (args.write or args.check) and (args.thresholds or args.set):
            raise Invalid("the committed files hold the defaults: --write and --check take no overrides")
        values, changed = thresholds(args.thresholds, args.set)
        text = render(values, changed)
    except Invalid as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    outputs = {OUTPUT: text, OPERATOR_RULE: as_prometheus_rule(text)}
    if args.write:
        for path, content in outputs.items():
            path.write_text(content)
    elif args.check:
        stale = 0
        for path, content in outputs.items():
            current = path.read_text() if path.exists() else ""
            if current != content:
                diff = difflib.unified_diff(
                    current.splitlines(True), content.splitlines(True), str(path), "rendered"
                )
                sys.stdout.writelines(diff)
                print(f"{path} is out of date: run python3 deploy/monitoring/render.py --write", file=sys.stderr)
                stale += 1
            else:
                print(f"{path.name}: up to date with {TEMPLATE.name} and {DEFAULTS.name}")
        return 1 if stale else 0
    else:
        sys.stdout.write(text if args.format == "rules" else as_prometheus_rule(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
