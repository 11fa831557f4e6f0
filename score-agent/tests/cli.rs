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

/// The example configuration shipped for operators parses and validates,
/// with every key it shows.
#[test]
fn example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/agent.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let c = score_agent::config::Config::parse(std::path::Path::new(path), &text).unwrap();
    assert_eq!(c.interfaces, ["vif*"]);
    let node = c.node.expect("[node]");
    assert_eq!(node.vm_slots, 16);
    let peer = c.peer.expect("[peer]");
    assert_eq!(peer.port, 7760);
    assert_eq!(c.policy.kind, score_core::policy::PolicyKind::Distributed);
    // The distributed settings need the topology and key files, which an
    // example cannot ship: resolving says which key names the missing file.
    let err = c_cluster_error(&text);
    assert!(err.contains("topology.file"), "{err}");
}

fn c_cluster_error(text: &str) -> String {
    let c = score_agent::config::Config::parse(std::path::Path::new("x.toml"), text).unwrap();
    c.cluster(false).unwrap_err().to_string()
}

#[test]
fn a_world_readable_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    std::fs::write(&key, (1..=32u8).collect::<Vec<u8>>()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let topo = dir.path().join("topology.toml");
    std::fs::write(
        &topo,
        "[[children]]\nhosts = [\"10.0.0.1\", \"10.0.0.2\"]\n",
    )
    .unwrap();
    let (code, err) = run_with(&format!(
        "interfaces = [\"vif*\"]\n[node]\naddress = \"10.0.0.1\"\nvm_slots = 4\nmemory_mib = 4096\n\
         [topology]\nfile = \"{}\"\n[peer]\nkey_file = \"{}\"\n",
        topo.display(),
        key.display()
    ));
    assert_eq!(code, Some(2));
    assert_one_line(&err, "peer.key_file");
}
