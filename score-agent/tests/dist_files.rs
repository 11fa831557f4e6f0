//! The shipped dashboard and alert rules, without privileges: the rules
//! pass `promtool check rules` and their unit tests (`promtool test
//! rules`), and every metric the dashboard and the rules name is one the
//! agent exports (docs/METRICS.md lists them all). That every panel's query
//! returns data from real agents is a privileged test (tests/dashboard.rs).

use std::{collections::BTreeSet, path::Path, process::Command};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Every `score_*` metric name in `text`, histogram suffixes cut.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("score_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        // Rule and dashboard names (ScoreTokenStalled, score-overview) are
        // not metrics; metric names have a unit or _total after a word.
        if base.len() > "score_".len() && !base.starts_with("score_rules") {
            names.insert(base.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

fn documented() -> String {
    std::fs::read_to_string(repo().join("docs/METRICS.md")).unwrap()
}

fn promtool() -> Option<std::path::PathBuf> {
    let ok = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "SKIPPED: no promtool here (Debian's prometheus; `cargo xtask setup` installs it)"
        );
    }
    ok.then(|| "promtool".into())
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let dir = repo().join("dist/prometheus");
    for args in [
        &["check", "rules", "score-rules.yml"][..],
        &["test", "rules", "score-rules.test.yml"][..],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_alert_has_a_unit_test() {
    let rules = std::fs::read_to_string(repo().join("dist/prometheus/score-rules.yml")).unwrap();
    let tests =
        std::fs::read_to_string(repo().join("dist/prometheus/score-rules.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for a in alerts {
        let firing = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(a) && t.contains("exp_labels"));
        assert!(firing, "no test of {a} firing");
    }
}

#[test]
fn rules_and_dashboard_name_only_exported_metrics() {
    let docs = documented();
    let rules = std::fs::read_to_string(repo().join("dist/prometheus/score-rules.yml")).unwrap();
    let dashboard = std::fs::read_to_string(repo().join("dist/grafana/score.json")).unwrap();
    for (what, text) in [("rules", &rules), ("dashboard", &dashboard)] {
        for name in metric_names(text) {
            assert!(
                docs.contains(&format!("`{name}")),
                "{what} names {name}, which docs/METRICS.md does not list"
            );
        }
    }
}

#[test]
fn dashboard_panels_each_have_queries() {
    let text = std::fs::read_to_string(repo().join("dist/grafana/score.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let panels = d["panels"].as_array().unwrap();
    let mut queries = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| e.contains("score_")));
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
    for topic in [
        "cost per host",
        "per VM",
        "Top pairs",
        "Token",
        "Migrations",
        "duration",
        "Rejected datagrams",
        "Flow map",
    ] {
        assert!(
            panels
                .iter()
                .any(|p| p["title"].as_str().unwrap_or("").contains(topic)),
            "no panel on {topic}"
        );
    }
}
