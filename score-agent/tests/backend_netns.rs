//! The netns backend for real: host and VM namespaces joined by bridges,
//! the backend run from inside a host namespace as the agent is, VMs moved
//! between hosts and pinged across the rack afterwards. Privileged:
//! `#[ignore]`d, run by `cargo xtask test`.

mod support;

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use score_agent::backend::{
    Backend, BackendConfig, BackendConfigError, BackendError, HostRef, NetnsBackend, Placement,
    VmRef,
};
use support::{Lab, in_netns, ping, sh};

const PREFIX: &str = "sct-bk-";
const VM: &str = "198.18.1.5";
const P1: &str = "198.18.1.6";
const P2: &str = "198.18.1.7";
const HOST_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const HOST_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
/// In the configuration, but its namespace does not exist.
const HOST_GONE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 13);
/// Its namespace exists, without a bridge.
const HOST_BARE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 14);

/// A rack bridge with hosts A and B under it; the VM and peer P1 behind
/// A, peer P2 behind B.
struct Dc {
    /// Owns every namespace; removes them in `Drop`.
    _lab: Lab,
    rack: String,
    a: String,
    b: String,
    vm: String,
    p1: String,
    p2: String,
}

fn uplink(rack: &str, rack_end: &str, host: &str) {
    sh(&[
        "ip", "-n", rack, "link", "add", rack_end, "type", "veth", "peer", "name", "up0", "netns",
        host,
    ]);
    sh(&[
        "ip", "-n", rack, "link", "set", rack_end, "master", "br0", "up",
    ]);
    sh(&[
        "ip", "-n", host, "link", "set", "up0", "master", "br0", "up",
    ]);
}

impl Dc {
    fn new() -> Dc {
        let mut lab = Lab::new(PREFIX);
        let rack = lab.host("rack");
        let a = lab.host("a");
        let b = lab.host("b");
        uplink(&rack, "up-a", &a);
        uplink(&rack, "up-b", &b);
        // The VM's namespace is the configured prefix plus its address.
        let vm = lab.vm(&a, "vif5.0", &format!("vm-{VM}"), VM);
        // No IPv6 in the VM: its link-local address would announce the VM
        // on every link flap (DAD, MLD), and hide a missing gratuitous ARP.
        for key in ["all", "default", "eth0"] {
            let key = format!("net.ipv6.conf.{key}.disable_ipv6=1");
            sh(&["ip", "netns", "exec", &vm, "sysctl", "-qw", &key]);
        }
        let p1 = lab.vm(&a, "vif6.0", "p1", P1);
        let p2 = lab.vm(&b, "vif7.0", "p2", P2);
        let bare = lab.host("bare");
        sh(&["ip", "-n", &bare, "link", "del", "br0"]);
        let dc = Dc {
            _lab: lab,
            rack,
            a,
            b,
            vm,
            p1,
            p2,
        };
        dc.reachable();
        dc
    }

    fn config(&self) -> BackendConfig {
        self.config_with_timeout("5s")
    }

    fn config_with_timeout(&self, timeout: &str) -> BackendConfig {
        let text = format!(
            r#"
            kind = "netns"
            vm_netns_prefix = "{PREFIX}vm-"
            timeout = "{timeout}"
            [hosts]
            "{HOST_A}" = "{a}"
            "{HOST_B}" = "{b}"
            "{HOST_GONE}" = "{PREFIX}gone"
            "{HOST_BARE}" = "{PREFIX}bare"
            "#,
            a = self.a,
            b = self.b,
        );
        toml::from_str(&text).unwrap()
    }

    fn vm_ref(&self) -> VmRef {
        let mac = sh(&[
            "ip",
            "netns",
            "exec",
            &self.vm,
            "cat",
            "/sys/class/net/eth0/address",
        ]);
        VmRef {
            ip: VM.parse().unwrap(),
            mac: score_agent::backend::parse_mac(mac.trim()).unwrap(),
            vif: "vif5.0".into(),
        }
    }

    /// Runs one migration as the agent of host namespace `from` would.
    fn migrate(
        &self,
        from: &str,
        vm: VmRef,
        to: Ipv4Addr,
    ) -> Result<score_agent::backend::MigrationReport, BackendError> {
        self.migrate_with(self.config(), from, vm, to)
    }

    fn migrate_with(
        &self,
        config: BackendConfig,
        from: &str,
        vm: VmRef,
        to: Ipv4Addr,
    ) -> Result<score_agent::backend::MigrationReport, BackendError> {
        in_netns(from, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let backend = Backend::from_config(&config).expect("backend");
                backend.migrate(&vm, &HostRef { addr: to }).await
            })
        })
    }

    /// Both peers reach the VM, from its host and across the rack.
    fn reachable(&self) {
        ping(&self.p1, VM);
        ping(&self.p2, VM);
    }

    fn assert_attached(&self, host: &str) {
        let out = sh(&["ip", "-n", host, "link", "show", "dev", "vif5.0"]);
        assert!(out.contains("master br0"), "{out}");
        assert!(out.contains(",UP") || out.contains("<UP"), "{out}");
    }

    fn assert_absent(&self, host: &str) {
        let status = Command::new("ip")
            .args(["-n", host, "link", "show", "dev", "vif5.0"])
            .output()
            .unwrap()
            .status;
        assert!(!status.success(), "vif5.0 still in {host}");
    }

    /// Waits until the rack bridge has learnt `mac` behind port `port`.
    fn rack_learnt(&self, mac: &[u8; 6], port: &str) -> bool {
        let mac = score_agent::backend::format_mac(mac);
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let fdb = sh(&["bridge", "-n", &self.rack, "fdb", "show", "br", "br0"]);
            if fdb
                .lines()
                .any(|l| l.starts_with(&mac) && l.contains(&format!("dev {port} ")))
            {
                return true;
            }
            if Instant::now() > deadline {
                eprintln!("rack fdb:\n{fdb}");
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
#[ignore = "privileged: needs root and netns; run by `cargo xtask test`"]
fn moves_a_vm_to_another_host_and_back_keeping_it_reachable() {
    let dc = Dc::new();
    let vm = dc.vm_ref();
    let before = sh(&["ip", "-n", &dc.vm, "-br", "addr", "show", "dev", "eth0"]);

    let report = dc.migrate(&dc.a, vm.clone(), HOST_B).expect("migrate to B");
    eprintln!("A -> B: {:?}", report.duration);
    assert!(!report.advisory);
    dc.assert_absent(&dc.a);
    dc.assert_attached(&dc.b);
    // The gratuitous ARP, not later traffic, told the rack where the VM
    // is now: checked before anyone pings.
    assert!(dc.rack_learnt(&vm.mac, "up-b"), "no gratuitous ARP seen");
    let after = sh(&["ip", "-n", &dc.vm, "-br", "addr", "show", "dev", "eth0"]);
    assert!(after.contains(&format!("{VM}/16")), "{after}");
    assert_eq!(dc.vm_ref().mac, vm.mac, "the MAC moved with the VM");
    assert_eq!(
        before.split_whitespace().nth(2),
        after.split_whitespace().nth(2)
    );
    dc.reachable();

    // The agent of B sends it back.
    let report = dc.migrate(&dc.b, vm.clone(), HOST_A).expect("migrate to A");
    eprintln!("B -> A: {:?}", report.duration);
    dc.assert_absent(&dc.b);
    dc.assert_attached(&dc.a);
    assert!(dc.rack_learnt(&vm.mac, "up-a"), "no gratuitous ARP seen");
    dc.reachable();
}

#[test]
#[ignore = "privileged: needs root and netns; run by `cargo xtask test`"]
fn a_move_to_a_missing_namespace_fails_and_leaves_the_vm_at_home() {
    let dc = Dc::new();
    let err = dc
        .migrate(&dc.a, dc.vm_ref(), HOST_GONE)
        .expect_err("there is no such namespace");
    assert!(matches!(err, BackendError::Failed { .. }), "{err:?}");
    assert!(err.still_at_source());
    assert!(err.to_string().contains("still attached"), "{err}");
    dc.assert_attached(&dc.a);
    dc.reachable();
}

#[test]
#[ignore = "privileged: needs root and netns; run by `cargo xtask test`"]
fn a_target_without_a_bridge_is_rolled_back() {
    let dc = Dc::new();
    let err = dc
        .migrate(&dc.a, dc.vm_ref(), HOST_BARE)
        .expect_err("the target has no br0");
    assert!(matches!(err, BackendError::Failed { .. }), "{err:?}");
    assert!(err.still_at_source());
    assert!(err.to_string().contains("moved back"), "{err}");
    dc.assert_absent(&format!("{PREFIX}bare"));
    dc.assert_attached(&dc.a);
    dc.reachable();
}

#[test]
#[ignore = "privileged: needs root and netns; run by `cargo xtask test`"]
fn unknown_vms_and_hosts_move_nothing() {
    let dc = Dc::new();
    let mut ghost = dc.vm_ref();
    ghost.vif = "vif9.0".into();
    let err = dc.migrate(&dc.a, ghost, HOST_B).unwrap_err();
    assert_eq!(err.placement(), Placement::Absent, "{err}");

    let err = dc
        .migrate(&dc.a, dc.vm_ref(), Ipv4Addr::new(198, 18, 0, 99))
        .unwrap_err();
    assert!(matches!(err, BackendError::Refused { .. }), "{err:?}");
    let err = dc.migrate(&dc.a, dc.vm_ref(), HOST_A).unwrap_err();
    assert!(matches!(err, BackendError::Refused { .. }), "{err:?}");
    dc.assert_attached(&dc.a);
    dc.reachable();
}

#[test]
#[ignore = "privileged: needs root and netns; run by `cargo xtask test`"]
fn the_agent_must_run_in_a_named_namespace() {
    let dc = Dc::new();
    let BackendConfig::Netns(config) = dc.config() else {
        unreachable!()
    };
    // This test's own thread is in the root namespace, which has no name.
    let err = NetnsBackend::from_config(&config).unwrap_err();
    assert!(
        matches!(err, BackendConfigError::Unavailable { kind: "netns", .. }),
        "{err}"
    );
    let home = in_netns(&dc.a, move || {
        NetnsBackend::from_config(&config)
            .unwrap()
            .home()
            .to_owned()
    });
    assert_eq!(home, dc.a);
}

#[test]
#[ignore = "privileged: needs root and netns; run by `cargo xtask test`"]
fn a_vm_that_cannot_be_announced_is_moved_with_an_error() {
    let dc = Dc::new();
    // P1's namespace is not named prefix + address: no gratuitous ARP.
    let mac = sh(&[
        "ip",
        "netns",
        "exec",
        &dc.p1,
        "cat",
        "/sys/class/net/eth0/address",
    ]);
    let p1 = VmRef {
        ip: P1.parse().unwrap(),
        mac: score_agent::backend::parse_mac(mac.trim()).unwrap(),
        vif: "vif6.0".into(),
    };
    let err = dc.migrate(&dc.a, p1, HOST_B).unwrap_err();
    assert!(matches!(err, BackendError::DoneWithError { .. }), "{err:?}");
    assert!(err.at_target());
    assert!(err.to_string().contains("gratuitous ARP"), "{err}");
    let out = sh(&["ip", "-n", &dc.b, "link", "show", "dev", "vif6.0"]);
    assert!(out.contains("master br0"), "{out}");
}

#[test]
#[ignore = "privileged: needs root and netns; run by `cargo xtask test`"]
fn a_time_out_is_reported_with_where_the_vm_was_found() {
    let dc = Dc::new();
    // No `ip` finishes within a millisecond: the time-out strikes while
    // the backend is still looking at the vif, before it moves.
    let config = dc.config_with_timeout("1ms");
    let err = dc
        .migrate_with(config, &dc.a, dc.vm_ref(), HOST_B)
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::TimedOut {
                placement: Placement::Source,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.still_at_source());
    dc.assert_absent(&dc.b);
    dc.assert_attached(&dc.a);
    dc.reachable();
}
