//! The xl backend against a stand-in `xl` (tests/fixtures/xl-standin) that
//! replays what xl 4.17 printed on the Xen rig (tests/fixtures/xl-4.17)
//! and records its calls: the right commands for the right domain, found
//! by MAC, and every way `xl migrate` can end mapped to where the VM is.
//! Unprivileged; tests/xen.rs checks the captures against the real tool.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use score_agent::backend::{
    Backend, BackendConfig, BackendConfigError, BackendError, HostRef, Placement, VmRef,
};

mod fixtures;

use fixtures::{XlOutput, link_stand_in};

/// web1 (domid 3), one NIC.
const WEB1: [u8; 6] = [0x00, 0x16, 0x3e, 0x12, 0x01, 0x05];
/// db1 (domid 4), on its second NIC.
const DB1: [u8; 6] = [0x00, 0x16, 0x3e, 0x12, 0x01, 0x06];

const H2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
const H3: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 13);

/// A private copy of the stand-in and its domains.
struct StandIn {
    dir: tempfile::TempDir,
}

impl StandIn {
    fn new() -> StandIn {
        let s = StandIn::empty();
        for entry in std::fs::read_dir(fixtures::path("xl-domains")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(
                entry.path(),
                s.path().join("domains").join(entry.file_name()),
            )
            .unwrap();
        }
        s
    }

    /// A host running Domain-0 only.
    fn empty() -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        link_stand_in("xl-standin", &dir.path().join("xl"));
        std::fs::create_dir(dir.path().join("domains")).unwrap();
        StandIn { dir }
    }

    /// Runs the stand-in with `args`.
    fn run(&self, args: &[&str]) -> XlOutput {
        let out = std::process::Command::new(self.path().join("xl"))
            .args(args)
            .output()
            .unwrap();
        XlOutput::of(&out)
    }

    fn with_mode(mode: &str) -> StandIn {
        let s = StandIn::new();
        s.write("migrate-mode", mode);
        s
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn backend_with(&self, extra: &str) -> Backend {
        let text = format!(
            "kind = \"xl\"\nxl_path = \"{}\"\n{extra}",
            self.path().join("xl").display()
        );
        let config: BackendConfig = toml::from_str(&text).unwrap();
        Backend::from_config(&config).unwrap()
    }

    fn backend(&self) -> Backend {
        self.backend_with("hosts = { \"198.18.0.12\" = \"xen-h2.example\" }\n")
    }

    /// Every call the stand-in received, as argument lists.
    fn calls(&self) -> Vec<Vec<String>> {
        let log = std::fs::read_to_string(self.path().join("calls.log")).unwrap_or_default();
        log.lines()
            .map(|l| {
                l.split('\x1f')
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    }

    fn migrate_calls(&self) -> Vec<Vec<String>> {
        self.calls()
            .into_iter()
            .filter(|c| c[0] == "migrate")
            .collect()
    }

    /// The names of the domains the stand-in still runs, Domain-0 left out.
    fn names(&self) -> Vec<String> {
        let out = std::process::Command::new(self.path().join("xl"))
            .args(["list", "-l"])
            .output()
            .unwrap();
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .filter(|d| d["domid"] != 0)
            .map(|d| d["config"]["c_info"]["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn vm(mac: [u8; 6]) -> VmRef {
    VmRef {
        ip: Ipv4Addr::new(198, 18, 1, mac[5]),
        mac,
        vif: "vif3.0".into(),
    }
}

fn to(addr: Ipv4Addr) -> HostRef {
    HostRef { addr }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn migrates_the_domain_whose_nic_has_the_mac() {
    let xl = StandIn::new();
    let backend = xl.backend_with(
        "hosts = { \"198.18.0.12\" = \"xen-h2.example\" }\n\
         migrate_options = [\"-s\", \"ssh -o BatchMode=yes\"]\n",
    );
    let report = backend.migrate(&vm(WEB1), &to(H2)).await.unwrap();
    assert!(!report.advisory);
    assert_eq!(
        xl.calls(),
        vec![
            args(&["list", "-l"]),
            args(&[
                "migrate",
                "-s",
                "ssh -o BatchMode=yes",
                "3",
                "xen-h2.example"
            ]),
            // The outcome is checked: the source copy is gone.
            args(&["list", "-l"]),
        ]
    );
    assert_eq!(xl.names(), ["db1", "cache1"]);
}

#[tokio::test]
async fn any_nic_of_a_domain_matches_and_unlisted_hosts_go_by_address() {
    let xl = StandIn::new();
    xl.backend().migrate(&vm(DB1), &to(H3)).await.unwrap();
    assert_eq!(
        xl.migrate_calls(),
        vec![args(&["migrate", "4", "198.18.0.13"])]
    );
    assert_eq!(xl.names(), ["web1", "cache1"]);
}

#[tokio::test]
async fn an_unknown_mac_is_not_found_and_nothing_is_migrated() {
    let xl = StandIn::new();
    let err = xl
        .backend()
        .migrate(&vm([0x00, 0x16, 0x3e, 0x12, 0x01, 0x99]), &to(H2))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    assert_eq!(err.placement(), Placement::Absent);
    assert!(err.to_string().contains("00:16:3e:12:01:99"), "{err}");
    assert_eq!(xl.calls(), vec![args(&["list", "-l"])]);
}

#[tokio::test]
async fn two_domains_with_one_mac_are_refused() {
    // A leftover of a broken migration: web1--migratedaway, same NIC.
    let xl = StandIn::new();
    let web1 = std::fs::read_to_string(xl.path().join("domains/3.json")).unwrap();
    let copy = web1
        .replace("\"domid\": 3", "\"domid\": 9")
        .replace("\"web1\"", "\"web1--migratedaway\"");
    xl.write("domains/9.json", &copy);
    let err = xl.backend().migrate(&vm(WEB1), &to(H2)).await.unwrap_err();
    assert!(matches!(err, BackendError::Refused { .. }), "{err}");
    assert!(err.still_at_source());
    assert!(err.to_string().contains("web1--migratedaway"), "{err}");
    assert!(xl.migrate_calls().is_empty());
}

#[tokio::test]
async fn a_failing_xl_list_moves_nothing() {
    let xl = StandIn::new();
    xl.write("list-fails", "");
    let err = xl.backend().migrate(&vm(WEB1), &to(H2)).await.unwrap_err();
    assert!(matches!(err, BackendError::Failed { .. }), "{err}");
    assert!(
        err.to_string().contains("libxl_list_domain failed"),
        "{err}"
    );
    assert!(xl.migrate_calls().is_empty());
}

/// Runs one migration of web1 in `mode`; returns the error and the
/// domains left here.
async fn fail_with(mode: &str) -> (BackendError, Vec<String>) {
    let xl = StandIn::with_mode(mode);
    let err = xl
        .backend()
        .migrate(&vm(WEB1), &to(H2))
        .await
        .expect_err(mode);
    assert_eq!(
        xl.migrate_calls(),
        vec![args(&["migrate", "3", "xen-h2.example"])],
        "{mode}"
    );
    (err, xl.names())
}

#[tokio::test]
async fn failures_before_the_go_leave_the_vm_at_the_source() {
    // Each as xl 4.17 printed it on the rig.
    for (mode, last_words) in [
        ("no-receiver", "exited with error status 1"),
        ("target-down", "exited with error status 1"),
        (
            "receiver-killed",
            "xc_domain_resume failed: Invalid argument",
        ),
        (
            "save-fails",
            "Migration failed, failed to suspend at sender.",
        ),
    ] {
        let (err, names) = fail_with(mode).await;
        assert!(
            matches!(err, BackendError::Failed { .. }),
            "{mode}: {err:?}"
        );
        assert!(err.still_at_source(), "{mode}");
        assert!(names.contains(&"web1".to_owned()), "{mode}: {names:?}");
        assert!(
            err.to_string().contains(last_words),
            "{mode}: the reason carries xl's last words: {err}"
        );
    }
}

/// Every captured case, replayed: the stand-in prints exactly what xl 4.17
/// printed on the rig (tests/fixtures/xl-4.17), so that the backend's
/// classification above is of the real tool's words.
#[test]
fn the_stand_in_prints_what_xl_4_17_printed_on_the_rig() {
    let host = "10.77.0.2";
    for (mode, case) in [
        ("ok", "migrate-ok"),
        ("no-receiver", "migrate-no-receiver"),
        ("target-down", "migrate-target-down"),
        ("receiver-killed", "migrate-receiver-killed"),
        ("save-fails", "migrate-save-fails"),
    ] {
        let xl = StandIn::with_mode(mode);
        let got = xl.run(&["migrate", "-s", "score-xl-send", "web1", host]);
        assert_eq!(
            got.masked(),
            XlOutput::captured(case, "", 3, host),
            "{mode}"
        );
    }
    let xl = StandIn::new();
    for (args, case, name) in [
        (
            &["migrate", "-s", "score-xl-send", "nosuch", host][..],
            "not-found",
            "nosuch",
        ),
        (&["list", "nosuch"][..], "not-found", "nosuch"),
        (&["migrate"][..], "migrate-usage", ""),
        (&["migrate", "web1"][..], "migrate-usage", ""),
        (&["migrate", "-Z", "web1", host][..], "bad-option", "Z"),
        (&["migrate", "-s"][..], "bad-option", "s"),
    ] {
        assert_eq!(
            xl.run(args),
            XlOutput::captured(case, name, 0, host),
            "{args:?}"
        );
    }
    // `xl list -l` on a host with no guests: Domain-0 alone.
    let empty = StandIn::empty().run(&["list", "-l"]);
    let domain0 =
        std::fs::read_to_string(fixtures::path("xl-4.17/list-long-domain0.json")).unwrap();
    assert_eq!(empty.stdout, format!("[\n{domain0}]\n\n"));
    let header = std::fs::read_to_string(fixtures::path("xl-4.17/list-header.stdout")).unwrap();
    assert!(xl.run(&["list"]).stdout.starts_with(&header));
}

#[test]
fn pids_are_masked_and_nothing_else() {
    assert_eq!(
        fixtures::mask_pids("process [312] exited; L1[380]: [x] [] [7]"),
        "process [@PID@] exited; L1[380]: [x] [] [@PID@]"
    );
}

/// The rig's guest as real `xl list -l` printed it (Domain-0 first, the
/// guest's NIC with its MAC): found by its MAC and migrated by domid.
#[tokio::test]
async fn the_guest_real_xl_listed_is_found_by_its_mac() {
    let xl = StandIn::empty();
    std::fs::copy(
        fixtures::path("xl-4.17/list-long-g1.json"),
        xl.path().join("domains/1.json"),
    )
    .unwrap();
    let g1 = [0x00, 0x16, 0x3e, 0x77, 0x00, 0x65];
    xl.backend().migrate(&vm(g1), &to(H2)).await.unwrap();
    assert_eq!(
        xl.migrate_calls(),
        vec![args(&["migrate", "1", "xen-h2.example"])]
    );
    assert!(xl.names().is_empty());
}

#[tokio::test]
async fn a_target_that_gives_the_domain_back_is_a_failure_at_the_source() {
    let (err, names) = fail_with("target-fails").await;
    assert!(matches!(err, BackendError::Failed { .. }), "{err:?}");
    assert!(err.still_at_source());
    assert!(names.contains(&"web1".to_owned()));
}

#[tokio::test]
async fn past_the_go_without_a_resume_is_undefined() {
    let (err, _) = fail_with("target-fails-no-resume").await;
    assert!(matches!(err, BackendError::Undefined { .. }), "{err:?}");
    assert!(err.is_undefined() && !err.still_at_source());
}

#[tokio::test]
async fn a_broken_final_handshake_is_undefined() {
    let (err, names) = fail_with("handshake-broken").await;
    assert!(matches!(err, BackendError::Undefined { .. }), "{err:?}");
    assert!(err.to_string().contains("Domain state is now undefined"));
    // The renamed copy is still listed here, which must not be read as
    // "still at the source".
    assert!(names.contains(&"web1--migratedaway".to_owned()));
}

#[tokio::test]
async fn a_failure_whose_domain_vanished_is_undefined() {
    let (err, names) = fail_with("gone-after-failure").await;
    assert!(matches!(err, BackendError::Undefined { .. }), "{err:?}");
    assert!(err.to_string().contains("no longer listed"), "{err}");
    assert!(!names.contains(&"web1".to_owned()));
}

#[tokio::test]
async fn started_at_the_target_with_errors_is_done_with_error() {
    for mode in ["started-then-died", "source-not-destroyed"] {
        let (err, _) = fail_with(mode).await;
        assert!(
            matches!(err, BackendError::DoneWithError { .. }),
            "{mode}: {err:?}"
        );
        assert!(err.at_target(), "{mode}");
    }
    let (err, _) = fail_with("source-not-destroyed").await;
    assert!(err.to_string().contains("still listed"), "{err}");
}

#[tokio::test]
async fn a_migration_past_its_time_out_is_undefined_and_returns_on_time() {
    let xl = StandIn::new();
    xl.write("migrate-sleep", "3");
    let backend = xl.backend_with("timeout = \"300ms\"\n");
    let start = Instant::now();
    let err = backend.migrate(&vm(WEB1), &to(H2)).await.unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            err,
            BackendError::TimedOut {
                placement: Placement::Unknown,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_undefined());
    assert!(
        took < Duration::from_secs(2),
        "returned after {took:?}, not at the time-out"
    );
    // xl was left to finish (killing it could strand the domain suspended).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(xl.names(), ["db1", "cache1"], "the late xl still ran");
}

#[tokio::test]
async fn a_missing_xl_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let missing: PathBuf = dir.path().join("xl");
    let config: BackendConfig = toml::from_str(&format!(
        "kind = \"xl\"\nxl_path = \"{}\"",
        missing.display()
    ))
    .unwrap();
    let err = Backend::from_config(&config).unwrap_err();
    assert!(
        matches!(err, BackendConfigError::Unavailable { kind: "xl", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("backend.xl_path"), "{err}");
}

/// Stand-ins are run while other threads of the test binary keep forking
/// (as the other tests do): a stand-in copied into place failed here with
/// ETXTBSY, a linked one never may (tests/fixtures/mod.rs).
#[test]
fn stand_ins_run_while_other_threads_fork() {
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let _ = Command::new("true").status();
                }
            });
        }
        for _ in 0..100 {
            let xl = StandIn::new();
            let out = Command::new(xl.path().join("xl")).arg("list").output();
            if out.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            let out = out.expect("running the stand-in");
            assert!(out.status.success(), "{out:?}");
        }
        stop.store(true, Ordering::Relaxed);
    });
}
