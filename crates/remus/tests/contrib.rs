//! The monitoring files in contrib/: Prometheus alerting rules, their unit
//! tests and an example scrape config (checked and run with promtool), the
//! Grafana dashboard, and the metric table of docs/operations.md. Every
//! `remus_*` name in them must be one the agent exports (METRICS below,
//! which mirrors the metric list of issue 20), so that a typo fails here
//! instead of leaving a panel empty or an alert silent.
//!
//! promtool comes with Debian's `prometheus` package, which
//! scripts/install-deps.sh installs; these tests fail without it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The metrics `remusd --metrics` exports: (name, kind, labels).
const METRICS: &[(&str, Kind, &[&str])] = &[
    // Per VM.
    ("remus_vm_info", Kind::Gauge, &["vm", "role", "state"]),
    ("remus_vm_protected", Kind::Gauge, &["vm"]),
    ("remus_vm_protection_wanted", Kind::Gauge, &["vm"]),
    ("remus_vm_fenced", Kind::Gauge, &["vm"]),
    ("remus_vm_last_checkpoint_age_seconds", Kind::Gauge, &["vm"]),
    ("remus_checkpoint_pause_seconds", Kind::Histogram, &["vm"]),
    ("remus_checkpoint_ack_seconds", Kind::Histogram, &["vm"]),
    ("remus_checkpoints_total", Kind::Counter, &["vm"]),
    ("remus_checkpoint_dirty_pages", Kind::Gauge, &["vm"]),
    ("remus_dirty_pages_total", Kind::Counter, &["vm"]),
    (
        "remus_checkpoint_bytes_total",
        Kind::Counter,
        &["vm", "kind"],
    ),
    (
        "remus_disk_journal_wait_seconds_total",
        Kind::Counter,
        &["vm"],
    ),
    ("remus_net_held_frames", Kind::Gauge, &["vm"]),
    ("remus_net_held_bytes", Kind::Gauge, &["vm"]),
    ("remus_disk_sync_compared_bytes", Kind::Gauge, &["vm"]),
    ("remus_disk_sync_total_bytes", Kind::Gauge, &["vm"]),
    ("remus_failovers_total", Kind::Counter, &["vm"]),
    ("remus_backup_lost_total", Kind::Counter, &["vm"]),
    ("remus_fences_total", Kind::Counter, &["vm"]),
    ("remus_stale_copies_total", Kind::Counter, &["vm"]),
    // Per agent.
    ("remus_build_info", Kind::Gauge, &["version", "protocol"]),
    ("remus_arbiter_up", Kind::Gauge, &[]),
    (
        "remus_refused_connections_total",
        Kind::Counter,
        &["reason"],
    ),
    ("remus_stale_copies_listed", Kind::Gauge, &[]),
    ("remus_hook_runs_total", Kind::Counter, &["event", "result"]),
];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Gauge,
    Counter,
    Histogram,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn prom_dir() -> PathBuf {
    repo().join("contrib/prometheus")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs promtool with `args` in `dir` and fails the test, with its output,
/// unless it succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = match Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool not found: it comes with Debian's prometheus package, which scripts/install-deps.sh installs (apt-get install prometheus)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

/// Every `remus_*` name in `text`: starting at a word boundary, of lower
/// case letters, digits and underscores (the bare prefix, as in `grep
/// '^remus_'`, is no name).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("remus_") {
        let start = from + i;
        let mut end = start + "remus_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if (start == 0 || !word(bytes[start - 1])) && end > start + "remus_".len() {
            names.insert(text[start..end].to_string());
        }
        from = end;
    }
    names
}

/// The exported metric `name` stands for, if any: itself, or for a
/// histogram's `_bucket`, `_sum` and `_count` series the histogram.
fn known(name: &str) -> Option<&'static (&'static str, Kind, &'static [&'static str])> {
    METRICS.iter().find(|(m, kind, _)| {
        *m == name
            || (*kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(m)))
    })
}

fn assert_known(what: &str, names: &BTreeSet<String>) {
    let unknown: Vec<&String> = names.iter().filter(|n| known(n).is_none()).collect();
    assert!(
        unknown.is_empty(),
        "{what} uses metric names remusd does not export: {unknown:?} (known: {:?})",
        METRICS.iter().map(|m| m.0).collect::<Vec<_>>()
    );
}

#[test]
fn alert_rules_pass_promtool_check() {
    let out = promtool(&prom_dir(), &["check", "rules", "remus-alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let out = promtool(&prom_dir(), &["test", "rules", "remus-alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn example_prometheus_config_is_valid_and_loads_the_rules() {
    let out = promtool(&prom_dir(), &["check", "config", "prometheus.yml"]);
    assert!(out.contains("1 rule files found"), "{out}");
    let cfg = read(&prom_dir().join("prometheus.yml"));
    assert!(
        cfg.contains("job_name: remus"),
        "RemusAgentDown matches job \"remus\""
    );
    assert!(cfg.contains(":9477"), "the documented example port");
}

#[test]
fn alert_rules_use_only_exported_metrics_and_cover_the_required_alerts() {
    let rules = read(&prom_dir().join("remus-alerts.yml"));
    let tests = read(&prom_dir().join("remus-alerts.test.yml"));
    assert_known("contrib/prometheus/remus-alerts.yml", &metric_names(&rules));
    assert_known(
        "contrib/prometheus/remus-alerts.test.yml",
        &metric_names(&tests),
    );
    for alert in [
        "RemusAgentDown",
        "RemusBackupStale",
        "RemusVmUnprotected",
        "RemusVmFenced",
        "RemusFailover",
        "RemusArbiterDown",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "remus-alerts.yml has no alert {alert}"
        );
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "remus-alerts.test.yml does not test {alert}"
        );
    }
    // Every alert is tested, has a severity and points to the docs.
    for block in rules.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap_or_default().trim();
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "remus-alerts.test.yml does not test {name}"
        );
        assert!(block.contains("severity: "), "{name} has no severity label");
        assert!(block.contains("summary: "), "{name} has no summary");
        assert!(
            block.contains("description: ") && block.contains("docs/"),
            "{name}'s description does not point to the docs"
        );
    }
}

/// Every query string of the dashboard: panel targets' `expr` and the
/// template variables' queries.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains('(') => out.push(s.clone()),
                    _ => dashboard_queries(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

fn dashboard() -> (String, Value) {
    let path = repo().join("contrib/grafana/remus-dashboard.json");
    let text = read(&path);
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (text, json)
}

#[test]
fn dashboard_uses_only_exported_metrics_and_shows_them_all() {
    let (text, d) = dashboard();
    let mut queries = Vec::new();
    dashboard_queries(&d, &mut queries);
    assert!(queries.len() > 20, "only {} queries found", queries.len());
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    assert_known("the dashboard's queries", &used);
    // Descriptions and titles too.
    assert_known("contrib/grafana/remus-dashboard.json", &metric_names(&text));
    let shown: BTreeSet<&str> = used.iter().filter_map(|n| known(n)).map(|m| m.0).collect();
    let missing: Vec<&str> = METRICS
        .iter()
        .map(|m| m.0)
        .filter(|m| !shown.contains(m))
        .collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
    // A per-VM metric is filtered by the $vm variable wherever it is used.
    for q in &queries {
        if q.starts_with("label_values(") {
            continue;
        }
        let per_vm = metric_names(q)
            .iter()
            .any(|n| known(n).is_some_and(|m| m.2.contains(&"vm")));
        if per_vm {
            for n in metric_names(q) {
                let needle = format!("{n}{{vm=~\"$vm\"");
                assert!(
                    q.contains(&needle) || known(&n).is_some_and(|m| !m.2.contains(&"vm")),
                    "{n} is not filtered by $vm in: {q}"
                );
            }
        }
    }
}

#[test]
fn dashboard_is_a_grafana_dashboard_with_vm_and_datasource_variables() {
    let (_, d) = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(schema >= 36, "schemaVersion {schema} < 36");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("vm")["definition"], "label_values(remus_vm_info, vm)");
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "panel id twice: {title}"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the grid");
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title}: datasource"
            );
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{title}: expr"
            );
        }
    }
}

/// promtool has no command that parses a bare expression, so the
/// dashboard's queries, with Grafana's variables filled in, become
/// recording rules that `promtool check rules` parses.
#[test]
fn dashboard_queries_are_valid_promql() {
    let (_, d) = dashboard();
    let mut queries = Vec::new();
    dashboard_queries(&d, &mut queries);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for q in queries.iter().filter(|q| !q.starts_with("label_values(")) {
        let q = q
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$vm", ".*");
        assert!(
            !q.contains('$'),
            "a Grafana variable this test does not fill in: {q}"
        );
        n += 1;
        rules.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: '{}'\n",
            q.replace('\'', "''").replace('\n', " ")
        ));
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let file = dir.join(format!(
        "remus-dashboard-queries-{}.yml",
        std::process::id()
    ));
    std::fs::write(&file, rules).unwrap();
    let out = promtool(&dir, &["check", "rules", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
}

/// The metric table in docs/operations.md ("What to monitor") names every
/// exported metric and nothing else.
#[test]
fn operations_doc_lists_exactly_the_exported_metrics() {
    let doc = read(&repo().join("docs/operations.md"));
    let start = doc
        .find("\n## What to monitor\n")
        .expect("docs/operations.md has a section \"What to monitor\"");
    let rest = &doc[start + 1..];
    let section = match rest[3..].find("\n## ") {
        Some(end) => &rest[..end + 3],
        None => rest,
    };
    let named = metric_names(section);
    assert_known("docs/operations.md, \"What to monitor\"", &named);
    let missing: Vec<&str> = METRICS
        .iter()
        .map(|m| m.0)
        .filter(|m| !named.contains(*m))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md, \"What to monitor\", does not describe {missing:?}"
    );
}
