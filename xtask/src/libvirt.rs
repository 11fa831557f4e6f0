//! What the libvirt backend's real tests need on this machine: libvirtd
//! with its QEMU driver and virsh, from Debian bookworm (libvirt 9.0, which
//! drives the QEMU 10.0 that `cargo xtask guest` installs from
//! bookworm-backports). Not `libvirt-daemon-system`, and not libvirt from
//! bookworm-backports: both pull in a newer systemd (TESTBED.md; checked
//! with `apt-get install -s` here). The tests start their own daemons, one
//! per host namespace (score-agent/tests/support/libvirt.rs), so nothing
//! is enabled or started here.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::run;

/// The packages, installed without their recommendations.
pub const PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs [`PACKAGES`] unless they are all there (idempotent; root).
/// QEMU itself comes from `guest::install`. Called by `cargo xtask guest`
/// and `cargo xtask test`.
#[allow(
    dead_code,
    reason = "called by `cargo xtask guest` and `cargo xtask test`"
)]
pub fn ensure_libvirt() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
    .with_context(|| format!("installing {}", missing.join(" ")))
}
