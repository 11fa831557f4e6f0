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

mod dc;
mod fixtures;
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
        fixtures::link_stand_in("virsh-standin", &dir.path().join("virsh"));
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
        self.calls()
            .into_iter()
            .filter(|c| c.get(2).map(String::as_str) == Some(cmd))
            .collect()
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

/// Moves web1 to h2 through a stand-in whose `migrate` ends as `mode`
/// says, expecting an error: the stand-in (for its state and calls) and
/// the error.
async fn failed_move(mode: &str) -> (StandIn, BackendError) {
    let v = StandIn::with_mode(mode);
    let e = v
        .backend()
        .migrate(&vm(WEB1_MAC), &to(H2))
        .await
        .unwrap_err();
    (v, e)
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
    let (v, e) = failed_move("target-fails").await;
    assert!(matches!(e, BackendError::Failed { .. }), "{e:?}");
    assert!(e.to_string().contains("could not open kernel file"), "{e}");
    assert_eq!(v.state("b", WEB1), None);
}

#[tokio::test]
async fn a_source_left_paused_is_resumed() {
    let (v, e) = failed_move("paused-left").await;
    assert!(matches!(e, BackendError::Failed { .. }), "{e:?}");
    assert_eq!(v.calls_of("resume").len(), 1);
    assert_eq!(v.state("a", WEB1).as_deref(), Some("running (unpaused)"));
}

#[tokio::test]
async fn a_source_that_cannot_resume_is_undefined() {
    let (_v, e) = failed_move("paused-stuck").await;
    assert!(matches!(e, BackendError::Undefined { .. }), "{e:?}");
    assert!(e.is_undefined());
    assert!(e.to_string().contains("did not resume"), "{e}");
}

#[tokio::test]
async fn a_source_crash_is_undefined() {
    let (v, e) = failed_move("source-crash").await;
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
    let (_v, e) = failed_move("both-running").await;
    assert!(e.is_undefined(), "{e:?}");
    assert!(e.to_string().contains("both ends"), "{e}");
}

#[tokio::test]
async fn at_the_target_despite_an_error_is_done_with_error() {
    let (_v, e) = failed_move("confirm-fails").await;
    assert!(matches!(e, BackendError::DoneWithError { .. }), "{e:?}");
    assert!(e.at_target());
    assert!(e.to_string().contains("Confirm phase failed"), "{e}");
}

#[tokio::test]
async fn success_without_the_domain_at_the_target_is_undefined() {
    let (_v, e) = failed_move("ok-but-nowhere").await;
    assert!(e.is_undefined(), "{e:?}");
    assert!(e.to_string().contains("runs nowhere"), "{e}");
}

#[tokio::test]
async fn a_domain_gone_before_the_migration_is_undefined() {
    let (v, e) = failed_move("vanished").await;
    assert!(e.is_undefined(), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("failed to get domain"), "{text}");
    assert!(text.contains("no such domain"), "{text}");
    assert_eq!(v.calls_of("migrate").len(), 1);
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

// ---------------------------------------------------------------------
// Real libvirt: two libvirtds on this machine, each in its own network
// and mount namespace, live-migrating the tiny guest.

#[path = "support/libvirt.rs"]
mod libvirt_lab;

use libvirt_lab::LibvirtHost;
use support::guest::{GUEST_DIR, Status, rt, spread, status_of, wait_status_of};
use support::{Agent, BpfFs, Lab, address_host, bridge_link, http_get, sh};

const PREFIX: &str = "sct-lv-";
const VM: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 5);
const MAC: &str = "02:00:00:01:00:05";
const TAP: &str = "tap5";
const DOM: &str = "sct-guest5";
const DOM_UUID: &str = "5c0e2a11-0000-4000-8000-000000000005";
const HOST_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const HOST_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
const HOST_C: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 13);

fn real_skip_reason() -> Option<String> {
    libvirt_lab::skip_reason().or_else(support::guest::skip_reason)
}

macro_rules! skip_unless_ready {
    () => {
        if support::guest::skip(real_skip_reason()) {
            return;
        }
    };
}

fn wait_status(ns: &str, timeout: Duration) -> Status {
    wait_status_of(ns, VM, timeout)
}

/// Hosts A and B (libvirtds) and C (an observer), 198.18.0.11-13 on their
/// br0, under one rack bridge. Everything stopped and removed in `Drop`
/// (the hosts' QEMUs and daemons first, then the namespaces).
struct Bed {
    a: LibvirtHost,
    b: LibvirtHost,
    c: String,
    rack: String,
    lab: Lab,
}

impl Bed {
    fn new() -> Bed {
        let mut lab = Lab::new(PREFIX);
        let rack = lab.host("rack");
        let mut names = Vec::new();
        for (name, addr) in [("a", HOST_A), ("b", HOST_B), ("c", HOST_C)] {
            let ns = lab.host(name);
            bridge_link(&rack, &format!("up-{name}"), &ns, "up0");
            address_host(&ns, addr);
            names.push(ns);
        }
        let root = Path::new("/run").join(format!("{PREFIX}libvirt"));
        let t = Instant::now();
        // Both daemons start together: each probes QEMU at its first start.
        let mut a = LibvirtHost::start(
            &names[0],
            HOST_A,
            &root.join("a"),
            "5c0e2a11-aaaa-4aaa-8aaa-00000000000a",
        );
        let mut b = LibvirtHost::start(
            &names[1],
            HOST_B,
            &root.join("b"),
            "5c0e2a11-bbbb-4bbb-8bbb-00000000000b",
        );
        a.wait_ready(Duration::from_secs(90));
        b.wait_ready(Duration::from_secs(90));
        eprintln!("two libvirtds ready in {:.1} s", t.elapsed().as_secs_f64());
        Bed {
            a,
            b,
            c: names[2].clone(),
            rack,
            lab,
        }
    }

    /// Defines and starts the guest at A; returns its first status.
    fn start_guest(&self) -> Status {
        define_and_start(&self.a, &Guest::main(), "");
        let t = Instant::now();
        let s = wait_status(&self.c, Duration::from_secs(90));
        eprintln!("guest up in {:.1} s: {s:?}", t.elapsed().as_secs_f64());
        s
    }

    fn config_text(&self, home: &LibvirtHost, timeout: &str, extra: &str) -> String {
        format!(
            r#"
            kind = "libvirt"
            virsh_path = "{virsh}"
            timeout = "{timeout}"
            {extra}
            [hosts]
            "{HOST_A}" = "{a}"
            "{HOST_B}" = "{b}"
            [migrate_uris]
            "{HOST_A}" = "tcp://{HOST_A}"
            "{HOST_B}" = "tcp://{HOST_B}"
            "#,
            virsh = home.virsh_path().display(),
            a = self.a.uri(),
            b = self.b.uri(),
        )
    }

    fn backend(&self, home: &LibvirtHost, timeout: &str, extra: &str) -> LibvirtBackend {
        let BackendConfig::Libvirt(c) =
            toml::from_str(&self.config_text(home, timeout, extra)).unwrap()
        else {
            panic!()
        };
        LibvirtBackend::from_config(&c).unwrap()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // The hosts' Drop kills their QEMUs and daemons; the namespaces
        // go after them (field order).
        let _ = &self.lab;
    }
}

/// A guest's identity on the test bed.
struct Guest {
    name: String,
    uuid: String,
    ip: Ipv4Addr,
    mac: String,
    tap: String,
}

impl Guest {
    /// The guest of the backend tests.
    fn main() -> Guest {
        Guest {
            name: DOM.into(),
            uuid: DOM_UUID.into(),
            ip: VM,
            mac: MAC.into(),
            tap: TAP.into(),
        }
    }

    /// Guest `n` (1-9) of the agent test: 198.18.1.n.
    fn numbered(n: u8) -> Guest {
        Guest {
            name: format!("sct-guest{n}"),
            uuid: format!("5c0e2a11-0000-4000-8000-00000000000{n}"),
            ip: Ipv4Addr::new(198, 18, 1, n),
            mac: format!("02:00:00:01:00:{n:02x}"),
            tap: format!("tap{n}"),
        }
    }
}

/// Defines `guest` at `host` (persistent, as the backend's defaults
/// expect) and starts it.
fn define_and_start(host: &LibvirtHost, guest: &Guest, cmdline: &str) {
    let xml = libvirt_lab::guest_xml(
        &guest.name,
        &guest.uuid,
        GUEST_DIR,
        guest.ip,
        &guest.mac,
        &guest.tap,
        cmdline,
    );
    let file = host.root.join(format!("{}.xml", guest.name));
    std::fs::write(&file, xml).unwrap();
    host.virsh_ok(&["define", &file.display().to_string()]);
    host.virsh_ok(&["start", &guest.name]);
}

fn vm_ref() -> VmRef {
    VmRef {
        ip: VM,
        mac: score_agent::backend::parse_mac(MAC).unwrap(),
        vif: TAP.into(),
    }
}

/// Live-migrates the guest A -> B -> A ... (`SCORE_LIBVIRT_ROUNDS`
/// migrations, default 2) with the backend, and checks after each that it
/// is the same boot, still counting, answering from its new host, and
/// known to the target's libvirtd only.
#[test]
#[ignore = "privileged: runs libvirtd and QEMU guests in namespaces"]
fn libvirt_live_migration_keeps_the_guest_running() {
    skip_unless_ready!();
    let rounds: usize = std::env::var("SCORE_LIBVIRT_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let bed = Bed::new();
    let first = bed.start_guest();
    let mut last = first.clone();
    let mut walls = Vec::new();
    let mut virsh_times = Vec::new();
    let mut elapsed = Vec::new();
    let mut downtimes = Vec::new();
    for i in 0..rounds {
        let (from, to, to_addr, to_up) = if i % 2 == 0 {
            (&bed.a, &bed.b, HOST_B, "up-b")
        } else {
            (&bed.b, &bed.a, HOST_A, "up-a")
        };
        let backend = bed.backend(from, "60s", "");
        let m = rt()
            .block_on(backend.migrate_with_stats(&vm_ref(), &HostRef { addr: to_addr }))
            .unwrap_or_else(|e| {
                panic!(
                    "round {i}: {e}\nsource log:\n{}\ntarget log:\n{}",
                    from.log_tail(),
                    to.log_tail()
                )
            });
        eprintln!(
            "round {i}: {} -> {}: {:?} (virsh migrate {:?}; libvirt: {:?} ms elapsed, {:?} ms downtime, {:?} bytes)",
            from.ns,
            to.ns,
            m.report.duration,
            m.virsh,
            m.stats.elapsed_ms,
            m.stats.downtime_ms,
            m.stats.processed_bytes
        );
        walls.push(m.report.duration.as_secs_f64());
        virsh_times.push(m.virsh.as_secs_f64());
        if let Some(e) = m.stats.elapsed_ms {
            elapsed.push(e as f64);
        }
        if let Some(d) = m.stats.downtime_ms {
            downtimes.push(d as f64);
        }
        assert_eq!(to.domstate(DOM).as_deref(), Some("running"));
        assert_eq!(
            from.domstate(DOM),
            None,
            "--undefinesource: the source forgot the domain"
        );
        // Seen from the third host: the rack bridge learnt the guest's
        // new port from QEMU's announcement.
        let now = wait_status(&bed.c, Duration::from_secs(10));
        assert_eq!(now.boot_id, first.boot_id, "a live migration, not a reboot");
        assert!(now.uptime > last.uptime, "{last:?} -> {now:?}");
        assert!(now.counter >= last.counter, "{last:?} -> {now:?}");
        let fdb = sh(&["bridge", "-n", &bed.rack, "fdb", "show", "br", "br0"]);
        assert!(
            fdb.lines().any(|l| l.starts_with(MAC) && l.contains(to_up)),
            "the rack bridge sends the guest's MAC towards {to_up}:\n{fdb}"
        );
        last = now;
    }
    let (m, lo, hi) = spread(&walls);
    eprintln!(
        "backend wall time over {rounds} migrations: median {m:.2} s (min {lo:.2}, max {hi:.2})"
    );
    let (m, lo, hi) = spread(&virsh_times);
    eprintln!("`virsh migrate` alone: median {m:.2} s (min {lo:.2}, max {hi:.2})");
    if !elapsed.is_empty() {
        let (m, lo, hi) = spread(&elapsed);
        eprintln!("libvirt's elapsed: median {m:.0} ms (min {lo:.0}, max {hi:.0})");
    }
    if !downtimes.is_empty() {
        let (m, lo, hi) = spread(&downtimes);
        eprintln!("libvirt's downtime: median {m:.0} ms (min {lo:.0}, max {hi:.0})");
    }
}

/// Real failures: a migration that cannot finish within the time-out is
/// aborted and the guest keeps running at the source; a target whose
/// libvirtd is stopped fails and leaves it at the source; an unknown MAC
/// is not found.
#[test]
#[ignore = "privileged: runs libvirtd and QEMU guests in namespaces"]
fn libvirt_migration_failures_leave_the_guest_at_the_source() {
    skip_unless_ready!();
    let mut bed = Bed::new();
    let before = bed.start_guest();
    let to_b = HostRef { addr: HOST_B };

    // 256 MiB at 1 MiB/s cannot finish in 4 s: the job is aborted.
    let backend = bed.backend(&bed.a, "4s", "migrate_options = [\"--bandwidth\", \"1\"]");
    let t = Instant::now();
    let err = rt()
        .block_on(backend.migrate(&vm_ref(), &to_b))
        .unwrap_err();
    eprintln!("time-out after {:?}: {err}", t.elapsed());
    assert!(matches!(err, BackendError::TimedOut { .. }), "{err:?}");
    assert_eq!(err.placement(), Placement::Source, "{err}");
    assert_eq!(bed.a.domstate(DOM).as_deref(), Some("running"));
    assert_eq!(bed.b.domstate(DOM), None);
    let after = wait_status(&bed.c, Duration::from_secs(10));
    assert_eq!(after.boot_id, before.boot_id);
    assert!(after.uptime > before.uptime);

    // An unknown MAC: not found, nothing done.
    let mut other = vm_ref();
    other.mac[5] = 0x99;
    let err = rt()
        .block_on(bed.backend(&bed.a, "30s", "").migrate(&other, &to_b))
        .unwrap_err();
    assert_eq!(err.placement(), Placement::Absent, "{err}");

    // The target's libvirtd stopped: nothing listens at its URI.
    bed.b.stop_daemon();
    let err = rt()
        .block_on(bed.backend(&bed.a, "30s", "").migrate(&vm_ref(), &to_b))
        .unwrap_err();
    eprintln!("target down: {err}");
    assert!(matches!(err, BackendError::Failed { .. }), "{err:?}");
    assert!(err.still_at_source());
    assert!(err.to_string().contains("Connection refused"), "{err}");
    assert_eq!(bed.a.domstate(DOM).as_deref(), Some("running"));
    let after_down = wait_status(&bed.c, Duration::from_secs(10));
    assert_eq!(after_down.boot_id, before.boot_id);
    assert!(after_down.uptime > after.uptime);
}

/// The sum over the agents in `hosts` of one of their metrics.
fn metric_sum(hosts: &[&str], name: &str) -> f64 {
    hosts
        .iter()
        .map(|ns| {
            http_get(ns, dc::HTTP, "/metrics")
                .map(|t| dc::metric_value(&t, name))
                .unwrap_or(0.0)
        })
        .sum()
}

/// One score-agent per host, with this backend: guest 1 at A and guest 2
/// at B, in one rack, each sending 2 Mbit/s to the other. The agents
/// bring the pair onto one host by one live migration through libvirt;
/// both guests keep their boot ids, and the agents count the migration
/// done.
#[test]
#[ignore = "privileged: runs libvirtd, QEMU guests and score-agents in namespaces"]
fn agents_live_migrate_a_libvirt_guest_to_its_peer() {
    skip_unless_ready!();
    let bed = Bed::new();
    let hosts = [&bed.a, &bed.b];
    let guests = [Guest::numbered(1), Guest::numbered(2)];
    for (i, g) in guests.iter().enumerate() {
        define_and_start(hosts[i], g, &format!("score.peers={}:2M", guests[1 - i].ip));
    }
    let boot: Vec<Status> = guests
        .iter()
        .map(|g| {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                if let Some(s) = status_of(&bed.c, g.ip) {
                    break s;
                }
                assert!(Instant::now() < deadline, "guest {} never answered", g.ip);
                std::thread::sleep(Duration::from_millis(300));
            }
        })
        .collect();

    let work = tempfile::tempdir().unwrap();
    let key_path = work.path().join("cluster.key");
    let key: Vec<u8> = (0..32u8)
        .map(|b| b.wrapping_mul(37).wrapping_add(5))
        .collect();
    std::fs::write(&key_path, key).unwrap();
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let topo_path = work.path().join("topology.toml");
    std::fs::write(
        &topo_path,
        format!(
            "weights = [1.0, 2.718281828459045, 20.085536923187668]
             [[children]]
[[children.children]]
hosts = [\"{HOST_A}\", \"{HOST_B}\"]
"
        ),
    )
    .unwrap();
    let bpffs = BpfFs::mount(&format!("/run/{PREFIX}bpf-{}", std::process::id()));
    let mut agents = Vec::new();
    for h in hosts {
        // Its tables as sub-tables of [backend] in the agent's file.
        let backend = bed
            .config_text(h, "60s", "")
            .replace("[hosts]", "[backend.hosts]")
            .replace("[migrate_uris]", "[backend.migrate_uris]");
        let config = format!(
            "interfaces = [\"tap*\"]\ndrain_interval = \"200ms\"\nrate_window = \"3s\"\nidle_timeout = \"6s\"\n\
             pin_path = \"{bpf}/{ns}\"\nhttp_listen = \"{http}\"\n\
             [node]\naddress = \"{addr}\"\nvm_slots = 2\nmemory_mib = 4096\nvm_memory_mib = 256\n\
             [topology]\nfile = \"{topo}\"\n\
             [peer]\nport = 7946\nkey_file = \"{key}\"\nhop_timeout = \"200ms\"\nhop_retries = 3\n\
             request_timeout = \"300ms\"\ntoken_timeout = \"10s\"\nreport_interval = \"1s\"\n\
             [policy]\nkind = \"distributed\"\ntoken_hold = \"400ms\"\nhold_down = \"30s\"\n\
             [backend]\n{backend}",
            bpf = bpffs.path,
            ns = h.ns,
            http = dc::HTTP,
            addr = h.addr,
            topo = topo_path.display(),
            key = key_path.display(),
        );
        let path = work.path().join(format!("{}.toml", h.ns));
        std::fs::write(&path, config).unwrap();
        agents.push(Agent::start(
            &h.ns,
            &["run", "--config", path.to_str().unwrap()],
        ));
    }
    for a in &agents {
        a.wait_for(&["score-agent running"], Duration::from_secs(30));
    }
    let logs = || agents.iter().map(Agent::stderr).collect::<String>();

    // Together: both domains run at one host's libvirtd.
    let running_at = |g: &Guest| -> Vec<usize> {
        (0..2)
            .filter(|&h| hosts[h].domstate(&g.name).as_deref() == Some("running"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let host = loop {
        let (g1, g2) = (running_at(&guests[0]), running_at(&guests[1]));
        if g1.len() == 1 && g1 == g2 {
            break g1[0];
        }
        assert!(
            Instant::now() < deadline,
            "the pair was never brought together (guest 1 at {g1:?}, guest 2 at {g2:?}):\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!("both guests at {}", hosts[host].ns);
    let names: Vec<&str> = hosts.iter().map(|h| h.ns.as_str()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let d = metric_sum(&names, "score_migrations_total{outcome=\"done\"}");
        if d >= 1.0 {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "no migration counted done:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done, 1.0, "one live migration brought them together");
    assert_eq!(
        metric_sum(&names, "score_migrations_total{outcome=\"failed\"}"),
        0.0,
        "{}",
        logs()
    );
    for (g, before) in guests.iter().zip(&boot) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let now = loop {
            if let Some(s) = status_of(&bed.c, g.ip) {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "guest {} stopped answering",
                g.ip
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(now.boot_id, before.boot_id, "{} was live-migrated", g.ip);
        assert!(now.uptime > before.uptime, "{before:?} -> {now:?}");
    }
    let logs = logs();
    assert!(logs.contains("libvirt: migration completed"), "{logs}");
    let took: Vec<f64> = logs
        .lines()
        .filter(|l| l.contains("migration done"))
        .filter_map(|l| {
            l.split(" seconds=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    eprintln!("the agent's migration took {took:?} s");
    assert_eq!(took.len(), 1, "{logs}");
    // The same figure in the agents' metrics (METRICS.md,
    // `score_migration_duration_seconds`).
    assert_eq!(
        metric_sum(&names, "score_migration_duration_seconds_count"),
        1.0
    );
    let seconds = metric_sum(&names, "score_migration_duration_seconds_sum");
    assert!(
        (took[0] - seconds).abs() < 1e-6,
        "log {took:?} s, metric {seconds} s"
    );
    for a in agents {
        a.stop(libc::SIGTERM);
    }
}
