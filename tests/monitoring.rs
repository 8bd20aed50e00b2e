//! The monitoring kit in `deploy/monitoring/` against the metric table in
//! `src/metric_names.rs`: every metric and label the alert rules, their
//! promtool tests and the Grafana dashboard name exists, so a renamed metric
//! cannot leave a dead panel or an alert that never fires. Also: every alert
//! has a severity, a summary, a description and a runbook section, and a
//! firing and a quiet promtool test case.
//!
//! PromQL is not parsed in full: names are the identifiers that contain
//! `sso_token_proxy`, selector labels are read from the `{...}` after them,
//! and grouping labels from `by`/`without`/`on`/`ignoring (...)`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use sso_token_proxy::metric_names::{self, Metric, MetricKind};
use yaml_rust2::{Yaml, YamlLoader};

/// Metrics the rules and the dashboard already use whose code is on its
/// way: (name, labels, who adds it). Each entry must leave this list when
/// its metric lands in `metric_names` (a test below says so).
const ANNOUNCED_METRICS: &[(&str, &[&str], &str)] = &[];

/// Labels announced for existing metrics: (metric, label, who adds it).
const ANNOUNCED_LABELS: &[(&str, &str, &str)] = &[];

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

fn load_yaml(relative: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"));
    assert_eq!(docs.len(), 1, "{relative}: expected one YAML document");
    docs.remove(0)
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], Vec::as_slice)
}

// === the metric table ===

/// Known metrics with their label names, the announced ones included.
struct Table {
    metrics: BTreeMap<String, (MetricKind, BTreeSet<String>)>,
    /// Every label name of every metric, plus the target labels and `le`.
    all_labels: BTreeSet<String>,
    /// Names defined by `record:` rules.
    recorded: BTreeSet<String>,
}

impl Table {
    fn new(recorded: BTreeSet<String>) -> Self {
        let mut metrics: BTreeMap<String, (MetricKind, BTreeSet<String>)> = metric_names::ALL
            .iter()
            .map(|m: &Metric| {
                let labels = m.labels.iter().map(|l| (*l).to_owned()).collect();
                (m.name.to_owned(), (m.kind, labels))
            })
            .collect();
        for (name, labels, _) in ANNOUNCED_METRICS {
            let kind = if name.ends_with("_total") {
                MetricKind::Counter
            } else {
                MetricKind::Gauge
            };
            let labels = labels.iter().map(|l| (*l).to_owned()).collect();
            metrics.entry((*name).to_owned()).or_insert((kind, labels));
        }
        for (name, label, _) in ANNOUNCED_LABELS {
            if let Some((_, labels)) = metrics.get_mut(*name) {
                labels.insert((*label).to_owned());
            }
        }
        let mut all_labels: BTreeSet<String> = metrics
            .values()
            .flat_map(|(_, labels)| labels.iter().cloned())
            .collect();
        all_labels.extend(TARGET_LABELS.iter().map(|l| (*l).to_owned()));
        all_labels.insert("le".to_owned());
        Self {
            metrics,
            all_labels,
            recorded,
        }
    }

    /// The label names a series of `name` may carry, or why the name is
    /// not a metric. Histogram series are `_bucket` (with `le`), `_sum` and
    /// `_count`; a recording rule's output may carry any known label.
    fn series_labels(&self, name: &str) -> Result<BTreeSet<String>, String> {
        if name.contains(':') {
            return if self.recorded.contains(name) {
                Ok(self.all_labels.clone())
            } else {
                Err(format!(
                    "{name} looks like a recording rule, but no rule records it"
                ))
            };
        }
        let target = TARGET_LABELS.iter().map(|l| (*l).to_owned());
        if let Some((kind, labels)) = self.metrics.get(name) {
            if *kind == MetricKind::Histogram {
                return Err(format!(
                    "{name} is a histogram: use {name}_bucket, _sum or _count"
                ));
            }
            return Ok(labels.iter().cloned().chain(target).collect());
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && let Some((MetricKind::Histogram, labels)) = self.metrics.get(base)
            {
                let mut labels: BTreeSet<String> = labels.iter().cloned().chain(target).collect();
                if suffix == "_bucket" {
                    labels.insert("le".to_owned());
                }
                return Ok(labels);
            }
        }
        Err(format!("{name} is not in src/metric_names.rs"))
    }
}

// === PromQL scanning ===

/// What one expression names.
#[derive(Default, Debug)]
struct Names {
    /// (metric or recorded name, label names in its selector).
    selectors: Vec<(String, Vec<String>)>,
    /// Label names in `by`, `without`, `on` and `ignoring` clauses.
    grouping: Vec<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Scans a PromQL expression (Grafana's `$variables` allowed).
fn scan_promql(expr: &str) -> Names {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Names::default();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '$' {
            // Numbers, durations (5m) and Grafana variables ($__rate_interval).
            i += 1;
            while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_space(i);
            let opens = next < chars.len() && (chars[next] == '(' || chars[next] == '{');
            if ["by", "without", "on", "ignoring"].contains(&word.as_str()) && opens {
                let (labels, end) = label_list(&chars, next + 1, ')');
                names.grouping.extend(labels);
                i = end;
            } else if word.contains("sso_token_proxy") {
                let mut labels = Vec::new();
                if next < chars.len() && chars[next] == '{' {
                    let (found, end) = label_list(&chars, next + 1, '}');
                    labels = found;
                    i = end;
                }
                names.selectors.push((word, labels));
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The label names in a `(a, b)` list or a `{a="x", b=~"y"}` selector
/// starting at `i`; returns them and the index after `close`.
fn label_list(chars: &[char], mut i: usize, close: char) -> (Vec<String>, usize) {
    let mut labels = Vec::new();
    let mut expecting_name = true;
    while i < chars.len() && chars[i] != close {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if is_ident_start(c) && expecting_name {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            labels.push(chars[start..i].iter().collect());
            expecting_name = false;
        } else {
            if c == ',' {
                expecting_name = true;
            }
            i += 1;
        }
    }
    (labels, i + 1)
}

/// Problems with the names in `expr`; `what` says where it is.
fn check_promql(table: &Table, what: &str, expr: &str) -> (Names, Vec<String>) {
    let names = scan_promql(expr);
    let mut problems = Vec::new();
    for (name, labels) in &names.selectors {
        match table.series_labels(name) {
            Ok(known) => {
                for label in labels.iter().filter(|l| !known.contains(*l)) {
                    problems.push(format!("{what}: {name} has no label {label:?}"));
                }
            }
            Err(e) => problems.push(format!("{what}: {e}")),
        }
    }
    for label in names
        .grouping
        .iter()
        .filter(|l| !table.all_labels.contains(*l))
    {
        problems.push(format!("{what}: no metric has the label {label:?}"));
    }
    (names, problems)
}

/// Names and `$labels.x` in an annotation (Go template text).
fn check_template(table: &Table, what: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let words = text.split(|c: char| !is_ident(c) && c != '$' && c != '.');
    for word in words {
        if let Some(label) = word.strip_prefix("$labels.") {
            if !table.all_labels.contains(label) {
                problems.push(format!("{what}: $labels.{label}: no metric has that label"));
            }
        } else if word.contains("sso_token_proxy") {
            let name = word.trim_matches('.');
            if let Err(e) = table.series_labels(name) {
                problems.push(format!("{what}: {e}"));
            }
        }
    }
    problems
}

// === the rules ===

struct Rules {
    doc: Yaml,
    recorded: BTreeSet<String>,
    alerts: BTreeSet<String>,
}

fn rules() -> Rules {
    let doc = load_yaml("deploy/monitoring/alerts.yaml");
    let mut recorded = BTreeSet::new();
    let mut alerts = BTreeSet::new();
    let groups = list(&doc["groups"]);
    assert!(!groups.is_empty(), "alerts.yaml has no groups");
    for rule in groups.iter().flat_map(|g| list(&g["rules"])) {
        if let Some(name) = rule["record"].as_str() {
            assert!(recorded.insert(name.to_owned()), "{name} recorded twice");
        }
        if let Some(name) = rule["alert"].as_str() {
            assert!(alerts.insert(name.to_owned()), "alert {name} defined twice");
        }
    }
    Rules {
        doc,
        recorded,
        alerts,
    }
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, other
/// punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn runbook_anchors() -> BTreeMap<String, String> {
    read("docs/runbook.md")
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| (anchor(h), h.trim().to_owned()))
        .collect()
}

#[test]
fn rules_name_only_existing_metrics_and_labels() {
    let rules = rules();
    let table = Table::new(rules.recorded.clone());
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for group in list(&rules.doc["groups"]) {
        for rule in list(&group["rules"]) {
            let id = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .unwrap_or("a rule without alert or record")
                .to_owned();
            let expr = rule["expr"].as_str().unwrap_or_default();
            let (names, found) = check_promql(&table, &id, expr);
            problems.extend(found);
            if names.selectors.is_empty() {
                problems.push(format!("{id}: expr names no metric"));
            }
            seen.extend(names.selectors.into_iter().map(|(n, _)| n));
            if let Some(annotations) = rule["annotations"].as_hash() {
                for (key, value) in annotations {
                    let what = format!("{id} annotation {}", key.as_str().unwrap_or("?"));
                    problems.extend(check_template(
                        &table,
                        &what,
                        value.as_str().unwrap_or_default(),
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "alerts.yaml:\n{}", problems.join("\n"));
    // The scan does find names (a scanner that finds nothing passes the above).
    for expected in [
        "sso_token_proxy_needs_login",
        "sso_token_proxy_token_fetches_total",
        "instance:sso_token_proxy_requests:rate5m",
    ] {
        assert!(seen.contains(expected), "scan missed {expected}: {seen:?}");
    }
}

#[test]
fn every_alert_has_severity_summary_description_and_a_runbook_section() {
    let rules = rules();
    let anchors = runbook_anchors();
    let mut problems = Vec::new();
    let alert_rules = list(&rules.doc["groups"])
        .iter()
        .flat_map(|g| list(&g["rules"]))
        .filter(|r| r["alert"].as_str().is_some());
    for rule in alert_rules {
        let name = rule["alert"].as_str().unwrap();
        if !name.starts_with("SsoTokenProxy") {
            problems.push(format!("{name}: alert names start with SsoTokenProxy"));
        }
        match rule["labels"]["severity"].as_str() {
            Some("critical" | "warning") => {}
            other => problems.push(format!(
                "{name}: severity {other:?}, want critical or warning"
            )),
        }
        for key in ["summary", "description"] {
            if rule["annotations"][key].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{name}: no {key} annotation"));
            }
        }
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        match url.split_once("docs/runbook.md#") {
            Some((_, fragment)) if anchors.get(fragment).is_some_and(|h| h == name) => {}
            Some((_, fragment)) => problems.push(format!(
                "{name}: runbook_url points at #{fragment}, which is not a section named {name} in docs/runbook.md"
            )),
            None => problems.push(format!("{name}: runbook_url {url:?} is not docs/runbook.md#...")),
        }
    }
    // No runbook section for an alert that no longer exists.
    for heading in anchors.values().filter(|h| h.starts_with("SsoTokenProxy")) {
        if !rules.alerts.contains(heading) {
            problems.push(format!("docs/runbook.md: section {heading} has no alert"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// === promtool tests ===

fn promtool_test_files() -> Vec<String> {
    let dir = repo_path("deploy/monitoring/tests");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| format!("deploy/monitoring/tests/{n}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no promtool tests in {}", dir.display());
    files
}

/// `name{a="x", b="y"}` of an input series.
fn parse_series(series: &str) -> (String, Vec<String>) {
    let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
    let (labels, _) = label_list(&rest.chars().collect::<Vec<_>>(), 0, '}');
    (name.trim().to_owned(), labels)
}

#[test]
fn promtool_tests_use_real_series_and_cover_every_alert_both_ways() {
    let rules = rules();
    let table = Table::new(rules.recorded.clone());
    let mut firing: BTreeSet<String> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    let mut problems = Vec::new();
    for file in promtool_test_files() {
        let doc = load_yaml(&file);
        let rule_files: Vec<&str> = list(&doc["rule_files"])
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        if rule_files != ["../alerts.yaml"] {
            problems.push(format!(
                "{file}: rule_files {rule_files:?}, want [../alerts.yaml]"
            ));
        }
        for test in list(&doc["tests"]) {
            let test_name = test["name"].as_str().unwrap_or("(unnamed)");
            let what = format!("{file}: {test_name}");
            for input in list(&test["input_series"]) {
                let (name, labels) = parse_series(input["series"].as_str().unwrap_or_default());
                if name.contains(':') {
                    problems.push(format!(
                        "{what}: input {name} is a recorded series; feed the raw metrics"
                    ));
                    continue;
                }
                match table.series_labels(&name) {
                    Ok(known) => {
                        for label in labels.iter().filter(|l| !known.contains(*l)) {
                            problems.push(format!("{what}: input {name} has no label {label:?}"));
                        }
                    }
                    Err(e) => problems.push(format!("{what}: input: {e}")),
                }
            }
            for case in list(&test["alert_rule_test"]) {
                let alert = case["alertname"].as_str().unwrap_or_default().to_owned();
                if !rules.alerts.contains(&alert) {
                    problems.push(format!("{what}: alert {alert:?} is not in alerts.yaml"));
                }
                if list(&case["exp_alerts"]).is_empty() {
                    quiet.insert(alert);
                } else {
                    firing.insert(alert);
                }
            }
            for case in list(&test["promql_expr_test"]) {
                let expr = case["expr"].as_str().unwrap_or_default();
                problems.extend(check_promql(&table, &what, expr).1);
            }
        }
    }
    for alert in &rules.alerts {
        if !firing.contains(alert) {
            problems.push(format!("{alert}: no promtool test where it fires"));
        }
        if !quiet.contains(alert) {
            problems.push(format!("{alert}: no promtool test where it stays quiet"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// === the dashboard ===

/// Every panel, rows' nested panels included.
fn panels(value: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in value["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panels(panel));
    }
    out
}

#[test]
fn dashboard_is_json_and_every_query_names_existing_metrics_per_instance() {
    let text = read("deploy/monitoring/dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("dashboard.json is valid JSON");
    let table = Table::new(rules().recorded);
    let mut problems = Vec::new();

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let instance = variables
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("a template variable named instance");
    let query = instance["query"]["query"]
        .as_str()
        .or(instance["query"].as_str())
        .expect("the instance variable's query");
    let (names, found) = check_promql(&table, "variable instance", query);
    problems.extend(found);
    assert!(
        !names.selectors.is_empty(),
        "the instance variable's query names no metric: {query}"
    );

    let all = panels(&dashboard);
    let mut queries = 0;
    for panel in &all {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        if targets.is_empty() {
            problems.push(format!("panel {title:?}: no queries"));
        }
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            let what = format!("panel {title:?} query {}", target["refId"]);
            let (names, found) = check_promql(&table, &what, expr);
            problems.extend(found);
            if names.selectors.is_empty() {
                problems.push(format!("{what}: names no metric: {expr}"));
            }
            for (name, _) in &names.selectors {
                // Each selector is limited to the chosen instances.
                let at = expr.find(name.as_str()).unwrap();
                let selector = &expr[at + name.len()..];
                if !selector.trim_start().starts_with('{')
                    || !selector[..selector.find('}').unwrap_or(0)]
                        .contains("instance=~\"$instance\"")
                {
                    problems.push(format!("{what}: {name} is not filtered by $instance"));
                }
            }
            queries += 1;
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard.json:\n{}",
        problems.join("\n")
    );
    assert!(queries >= 20, "only {queries} queries in the dashboard");

    // The panels the issue asks for are there.
    let titles: Vec<&str> = all.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Requests by route and status class",
        "Latency by route",
        "Token lifetime left per source",
        "Token fetches by outcome and kind",
        "Upstream connections opened",
        "Store state",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted:?}: {titles:?}");
    }
}

// === the scanner and the announced names ===

#[test]
fn the_checks_catch_unknown_names_labels_and_suffixes() {
    let table = Table::new(BTreeSet::from([
        "instance:sso_token_proxy_x:rate5m".to_owned()
    ]));
    let problems = |expr| check_promql(&table, "t", expr).1;
    assert!(
        problems("sum by (outcome) (rate(sso_token_proxy_token_fetches_total[5m]))").is_empty()
    );
    assert!(problems(r#"rate(sso_token_proxy_request_duration_seconds_bucket{le="1", instance=~"$instance"}[$__rate_interval])"#).is_empty());
    assert!(problems("instance:sso_token_proxy_x:rate5m > 0").is_empty());
    for bad in [
        "sso_token_proxy_token_fetchez_total",
        "sso_token_proxy_request_duration_seconds",
        "sso_token_proxy_token_valid_bucket",
        r#"sso_token_proxy_token_fetches_total{outcom="fatal"}"#,
        "sum by (outcom) (sso_token_proxy_token_fetches_total)",
        "sum without (sourze) (sso_token_proxy_token_fetches_total)",
        "instance:sso_token_proxy_y:rate5m",
        r#"sso_token_proxy_store_up{le="1"}"#,
    ] {
        assert!(!problems(bad).is_empty(), "{bad} passed");
    }
    assert!(!check_template(&table, "t", "{{ $labels.sorce }}").is_empty());
    assert!(check_template(&table, "t", "{{ $labels.instance }}: {{ $value }}").is_empty());
}

#[test]
fn announced_names_leave_the_list_once_they_exist() {
    for (name, _, who) in ANNOUNCED_METRICS {
        assert!(
            !metric_names::ALL.iter().any(|m| m.name == *name),
            "{name} ({who}) is in metric_names now: remove it from ANNOUNCED_METRICS"
        );
    }
    for (name, label, who) in ANNOUNCED_LABELS {
        let metric = metric_names::ALL
            .iter()
            .find(|m| m.name == *name)
            .unwrap_or_else(|| panic!("{name} is not in metric_names"));
        assert!(
            !metric.labels.contains(label),
            "{name} has the label {label} ({who}) now: remove it from ANNOUNCED_LABELS"
        );
    }
}
