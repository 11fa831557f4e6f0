//! The command line without privileges: a bad configuration or argument
//! ends the agent before it loads or binds anything, with exit code 2 and
//! one line that names the problem.

use std::process::Command;

fn agent(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_score-agent"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run score-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_with(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).unwrap();
    agent(&["run", "--config", path.to_str().unwrap()])
}

fn assert_one_line(err: &str, needle: &str) {
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err:?}"
    );
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

#[test]
fn missing_config_file() {
    let (code, err) = agent(&["run", "--config", "/nonexistent/score.toml"]);
    assert_eq!(code, Some(2));
    assert_one_line(&err, "/nonexistent/score.toml");
}

#[test]
fn unknown_key() {
    let (code, err) = run_with("interfaces = [\"vif*\"]\ndrain_intervall = \"1s\"\n");
    assert_eq!(code, Some(2));
    assert_one_line(&err, "drain_intervall");
}

#[test]
fn bad_interface_pattern() {
    let (code, err) = run_with("interfaces = [\"vif[\"]\n");
    assert_eq!(code, Some(2));
    assert_one_line(&err, "interfaces[0]");
}

#[test]
fn bad_value() {
    let (code, err) = run_with("interfaces = [\"vif*\"]\ndrain_interval = \"0s\"\n");
    assert_eq!(code, Some(2));
    assert_one_line(&err, "drain_interval");
}

#[test]
fn watch_rejects_a_bad_pattern() {
    let (code, err) = agent(&["watch", "--iface", "vif[", "--duration", "1"]);
    assert_eq!(code, Some(2));
    assert_one_line(&err, "vif[");
}
