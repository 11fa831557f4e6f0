//! The libvirt backend, in two layers.
//!
//! - Against a stand-in `virsh` (tests/fixtures/virsh-standin) that replays
//!   the real tool's output for two libvirtds and records its calls: the
//!   domain found by MAC, the command line, and every way a migration can
//!   end mapped to where the VM is. Unprivileged.
//! - Against real libvirt: two libvirtds on this machine, each in its own
//!   network and mount namespace standing in for a host (support in
//!   tests/support/libvirt.rs), live-migrating the tiny guest of `cargo
//!   xtask guest`. Privileged: `#[ignore]`d, run by `cargo xtask test`;
//!   each test skips with a printed reason when libvirt, QEMU or the guest
//!   is missing.

mod support;

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use score_agent::backend::{
    Backend, BackendConfig, BackendConfigError, BackendError, HostRef, LibvirtBackend, Placement,
    VmRef,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

const WEB1: &str = "7b0c1a2e-0000-4000-8000-000000000001";
const DB1: &str = "7b0c1a2e-0000-4000-8000-000000000002";
const WEB1_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x01, 0x00, 0x05];
const DB1_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x01, 0x00, 0x16];
const H2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const H3: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 13);
const H2_URI: &str = "qemu+tcp://10.0.0.12/system";

/// A private copy of the stand-in: this host (`a`, `qemu:///system`)
/// runs web1 and db1 (its second NIC has the MAC); host `b` is the
/// target, `c` is listed in the config but its libvirtd is down.
struct StandIn {
    dir: tempfile::TempDir,
}

impl StandIn {
    fn new() -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            format!("{FIXTURES}/virsh-standin"),
            dir.path().join("virsh"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("uris"),
            format!(
                "qemu:///system a 10.0.0.11\n{H2_URI} b 10.0.0.12\nqemu+tcp://10.0.0.13/system c 10.0.0.13\n"
            ),
        )
        .unwrap();
        let s = StandIn { dir };
        s.domain("a", WEB1, "web1", "running", "booted", "52:54:00:01:00:05");
        s.domain(
            "a",
            DB1,
            "db1",
            "running",
            "booted",
            "52:54:00:01:00:06,52:54:00:01:00:16",
        );
        s.down("c");
        s
    }

    fn with_mode(mode: &str) -> StandIn {
        let s = StandIn::new();
        std::fs::write(s.path().join("migrate-mode"), mode).unwrap();
        s
    }

    fn domain(&self, host: &str, uuid: &str, name: &str, state: &str, reason: &str, macs: &str) {
        let dir = self.path().join("hosts").join(host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(uuid),
            format!("name={name}\nstate={state}\nreason={reason}\nmacs={macs}\n"),
        )
        .unwrap();
    }

    fn down(&self, host: &str) {
        std::fs::create_dir_all(self.path().join("down")).unwrap();
        std::fs::write(self.path().join("down").join(host), "").unwrap();
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self, extra: &str) -> BackendConfig {
        let text = format!(
            "kind = \"libvirt\"\nvirsh_path = \"{}\"\n\
             hosts = {{ \"10.0.0.12\" = \"{H2_URI}\", \"10.0.0.13\" = \"qemu+tcp://10.0.0.13/system\" }}\n{extra}",
            self.path().join("virsh").display()
        );
        toml::from_str(&text).unwrap()
    }

    fn backend_with(&self, extra: &str) -> Backend {
        Backend::from_config(&self.config(extra)).unwrap()
    }

    fn backend(&self) -> Backend {
        self.backend_with("")
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

    /// The calls of one virsh command (the word after `-c URI`).
    fn calls_of(&self, cmd: &str) -> Vec<Vec<String>> {
        self.calls().into_iter().filter(|c| c[2] == cmd).collect()
    }

    /// `state (reason)` of `uuid` at `host`, or `None` if it has none.
    fn state(&self, host: &str, uuid: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.path().join("hosts").join(host).join(uuid)).ok()?;
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_owned()
        };
        Some(format!("{} ({})", get("state"), get("reason")))
    }
}

fn vm(mac: [u8; 6]) -> VmRef {
    VmRef {
        ip: Ipv4Addr::new(10, 1, 0, mac[5]),
        mac,
        vif: "vnet0".into(),
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
    let v = StandIn::new();
    let backend = v.backend_with(
        "migrate_uris = { \"10.0.0.12\" = \"tcp://10.0.0.12\" }\n\
         migrate_options = [\"--p2p\", \"--bandwidth\", \"100\"]\n",
    );
    let report = backend.migrate(&vm(WEB1_MAC), &to(H2)).await.unwrap();
    assert!(!report.advisory);
    assert_eq!(
        v.calls_of("migrate"),
        vec![args(&[
            "-c",
            "qemu:///system",
            "migrate",
            "--live",
            "--persistent",
            "--undefinesource",
            "--migrateuri",
            "tcp://10.0.0.12",
            "--p2p",
            "--bandwidth",
            "100",
            "--domain",
            WEB1,
            "--desturi",
            H2_URI,
        ])]
    );
    // Both ends were asked afterwards.
    let asked: Vec<String> = v
        .calls_of("domstate")
        .into_iter()
        .map(|c| c[1].clone())
        .collect();
    assert!(asked.contains(&H2_URI.to_owned()), "{asked:?}");
    assert_eq!(v.state("b", WEB1).as_deref(), Some("running (migrated)"));
    assert_eq!(v.state("a", WEB1), None, "--undefinesource");
    assert_eq!(v.state("a", DB1).as_deref(), Some("running (booted)"));
}

#[tokio::test]
async fn any_nic_matches_and_libvirt_figures_are_read() {
    let v = StandIn::new();
    let Backend::Libvirt(_) = v.backend() else {
        panic!()
    };
    let BackendConfig::Libvirt(c) = v.config("persistent = false\nundefine_source = false\n")
    else {
        panic!()
    };
    let backend = LibvirtBackend::from_config(&c).unwrap();
    let m = backend
        .migrate_with_stats(&vm(DB1_MAC), &to(H2))
        .await
        .unwrap();
    assert_eq!(m.stats.elapsed_ms, Some(2615));
    assert_eq!(m.stats.downtime_ms, Some(62));
    let call = &v.calls_of("migrate")[0];
    assert!(!call.contains(&"--persistent".to_owned()), "{call:?}");
    assert!(!call.contains(&"--undefinesource".to_owned()), "{call:?}");
    assert!(call.contains(&DB1.to_owned()));
    // Without --undefinesource libvirt keeps the definition, shut off.
    assert_eq!(v.state("a", DB1).as_deref(), Some("shut off (migrated)"));
    assert_eq!(v.state("b", DB1).as_deref(), Some("running (migrated)"));
}

#[tokio::test]
async fn unknown_mac_is_not_found_and_nothing_runs() {
    let v = StandIn::new();
    let e = v
        .backend()
        .migrate(&vm([0x52, 0x54, 0, 9, 9, 9]), &to(H2))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::NotFound { .. }), "{e}");
    assert_eq!(e.placement(), Placement::Absent);
    assert!(e.to_string().contains("2 active domains"), "{e}");
    assert!(v.calls_of("migrate").is_empty());
}

#[tokio::test]
async fn unlisted_target_two_owners_or_a_paused_domain_are_refused() {
    let v = StandIn::new();
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(Ipv4Addr::new(10, 0, 0, 99)))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Refused { .. }), "{e}");
    assert!(v.calls().is_empty(), "nothing asked: {:?}", v.calls());

    // A second domain with web1's MAC (a leftover copy, a clone).
    v.domain(
        "a",
        "7b0c1a2e-0000-4000-8000-000000000003",
        "web1-clone",
        "running",
        "booted",
        "52:54:00:01:00:05",
    );
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Refused { .. }), "{e}");
    assert!(
        e.to_string().contains("web1") || e.to_string().contains(WEB1),
        "{e}"
    );

    let v = StandIn::new();
    v.domain("a", WEB1, "web1", "paused", "user", "52:54:00:01:00:05");
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("paused (user)"), "{e}");
    assert_eq!(e.placement(), Placement::Source);
    assert!(v.calls_of("migrate").is_empty());
}

#[tokio::test]
async fn target_down_is_a_failure_at_the_source() {
    let v = StandIn::new();
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H3))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Failed { .. }), "{e:?}");
    assert_eq!(e.placement(), Placement::Source);
    assert!(e.to_string().contains("Connection refused"), "{e}");
    assert_eq!(v.state("a", WEB1).as_deref(), Some("running (booted)"));
}

#[tokio::test]
async fn source_libvirtd_down_is_a_failure_and_nothing_runs() {
    let v = StandIn::new();
    v.down("a");
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Failed { .. }), "{e:?}");
    assert!(e.to_string().contains("virsh list"), "{e}");
    assert!(v.calls_of("migrate").is_empty());
}

#[tokio::test]
async fn target_qemu_fails_and_the_domain_runs_at_the_source() {
    let v = StandIn::with_mode("target-fails");
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Failed { .. }), "{e:?}");
    assert!(e.to_string().contains("could not open kernel file"), "{e}");
    assert_eq!(v.state("b", WEB1), None);
}

#[tokio::test]
async fn a_source_left_paused_is_resumed() {
    let v = StandIn::with_mode("paused-left");
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Failed { .. }), "{e:?}");
    assert_eq!(v.calls_of("resume").len(), 1);
    assert_eq!(v.state("a", WEB1).as_deref(), Some("running (unpaused)"));
}

#[tokio::test]
async fn a_source_that_cannot_resume_is_undefined() {
    let v = StandIn::with_mode("paused-stuck");
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Undefined { .. }), "{e:?}");
    assert!(e.is_undefined());
    assert!(e.to_string().contains("did not resume"), "{e}");
}

#[tokio::test]
async fn a_source_crash_is_undefined() {
    let v = StandIn::with_mode("source-crash");
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(e.is_undefined(), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("domain is not running"), "{text}");
    assert!(text.contains("shut off (crashed)"), "{text}");
    // Never retried, nothing resumed or started.
    assert_eq!(v.calls_of("migrate").len(), 1);
    assert!(v.calls_of("resume").is_empty());
}

#[tokio::test]
async fn running_at_both_ends_is_undefined() {
    let v = StandIn::with_mode("both-running");
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(e.is_undefined(), "{e:?}");
    assert!(e.to_string().contains("both ends"), "{e}");
}

#[tokio::test]
async fn at_the_target_despite_an_error_is_done_with_error() {
    let v = StandIn::with_mode("confirm-fails");
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::DoneWithError { .. }), "{e:?}");
    assert!(e.at_target());
    assert!(e.to_string().contains("Confirm phase failed"), "{e}");
}

#[tokio::test]
async fn success_without_the_domain_at_the_target_is_undefined() {
    let v = StandIn::with_mode("ok-but-nowhere");
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(e.is_undefined(), "{e:?}");
    assert!(e.to_string().contains("runs nowhere"), "{e}");
}

#[tokio::test]
async fn time_out_aborts_the_job_and_finds_the_domain_at_the_source() {
    let v = StandIn::with_mode("slow");
    let t = Instant::now();
    let e = v
        .backend_with("timeout = \"1s\"\n")
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(matches!(e, BackendError::TimedOut { .. }), "{e:?}");
    assert_eq!(e.placement(), Placement::Source);
    assert_eq!(
        v.calls_of("domjobabort"),
        vec![args(&["-c", "qemu:///system", "domjobabort", WEB1])]
    );
    assert_eq!(v.state("a", WEB1).as_deref(), Some("running (booted)"));
}

#[tokio::test]
async fn a_dropped_migration_aborts_its_job() {
    let v = StandIn::with_mode("slow");
    let backend = v.backend();
    let r = tokio::time::timeout(
        Duration::from_millis(800),
        backend.migrate(&vm(WEB1_MAC), &to(H2)),
    )
    .await;
    assert!(r.is_err(), "the stand-in runs until aborted");
    let deadline = Instant::now() + Duration::from_secs(10);
    while v.calls_of("domjobabort").is_empty() {
        assert!(Instant::now() < deadline, "no domjobabort: {:?}", v.calls());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And virsh migrate ended (the stand-in removes its job file).
    while v.path().join("job").exists() {
        assert!(Instant::now() < deadline, "virsh migrate still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_missing_virsh_is_reported() {
    let config: BackendConfig = toml::from_str(
        "kind = \"libvirt\"\nvirsh_path = \"/nonexistent/virsh\"\n\
         hosts = { \"10.0.0.12\" = \"qemu+tcp://10.0.0.12/system\" }",
    )
    .unwrap();
    let e = Backend::from_config(&config).unwrap_err();
    assert!(
        matches!(
            e,
            BackendConfigError::Unavailable {
                kind: "libvirt",
                ..
            }
        ),
        "{e}"
    );
}
