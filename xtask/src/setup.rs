//! `cargo xtask setup`: makes a fresh machine of our kind (Debian 12, root,
//! registries reachable) able to build and test score. Each step checks
//! first and does nothing when its piece is already there.

use std::process::Command;

use anyhow::{Context as _, Result};

use score_testbed::apt;

use crate::run;

/// The nightly that builds the eBPF side, pinned by date: bpf-linker 0.10.4
/// loads this rustc's LLVM 22; a moved `nightly` would bring LLVM 23.
pub(crate) const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
/// The last bpf-linker that needs no system LLVM: it loads the pinned
/// nightly's own.
pub(crate) const BPF_LINKER_VERSION: &str = "0.10.4";
/// Debian packages the tests and the test bed use.
pub(crate) const APT_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "iputils-ping",
    "prometheus",
    "iperf3",
    // The testbed: a gratuitous ARP after a hand-made move; reading an
    // agent's /metrics inside its host namespace.
    "arping",
    "curl",
    // `bench compare`: the baselines score is measured against (OVS with
    // the userspace datapath, started by hand; nftables bridge sets).
    "openvswitch-switch",
    "nftables",
];

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn stdout_of(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Runs every setup step.
pub(crate) fn setup() -> Result<()> {
    toolchain()?;
    bpf_linker()?;
    apt()?;
    Ok(())
}

fn toolchain() -> Result<()> {
    let has_src = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
    .lines()
    .any(|l| l.starts_with("rust-src"));
    if has_src {
        return Ok(());
    }
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--no-self-update",
    ]))
    .context("installing the eBPF toolchain")
}

fn bpf_linker() -> Result<()> {
    let version = stdout_of(Command::new("bpf-linker").arg("--version"));
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    run(Command::new("cargo").args([
        &format!("+{EBPF_TOOLCHAIN}"),
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
    ]))
    .context("installing bpf-linker")
}

fn apt() -> Result<()> {
    let missing = apt::missing(APT_PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    if !succeeds(Command::new("apt-get").arg("--version")) {
        eprintln!(
            "xtask: no apt-get here; install these yourself: {}",
            missing.join(" ")
        );
        return Ok(());
    }
    apt::install(&missing, None)
}
