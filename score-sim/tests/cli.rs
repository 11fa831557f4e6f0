//! The `score-sim` command's option checks: a bad value exits non-zero with
//! one line naming it, before any work.

use std::process::Command;

fn score_sim(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_score-sim"))
        .args(args)
        .output()
        .expect("score-sim runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn migration_cost_refuses_bad_options_in_one_line() {
    let out = std::env::temp_dir().join(format!("score-sim-cli-{}", std::process::id()));
    let out = out.to_str().unwrap();
    for (flag, value, says) in [
        ("--horizon", "0", "--horizon 0"),
        ("--horizon", "60,-1", "--horizon -1"),
        ("--dirty-mb-s", "-2", "--dirty-mb-s -2"),
        ("--link-mbit", "0", "--link-mbit 0"),
    ] {
        let arg = format!("{flag}={value}");
        let (ok, err) = score_sim(&["migration-cost", "--out", out, &arg]);
        assert!(!ok, "{flag} {value} was taken");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(says), "{err}");
    }
    assert!(!std::path::Path::new(out).exists(), "nothing is written");
}
