//! Debian packages the lab and the tools need: which are missing, and
//! installing those (as root), each without its recommendations.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::process::run;

/// Whether Debian package `package` is installed here.
pub fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The packages of `packages` that are not installed here.
pub fn missing<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    packages.iter().copied().filter(|p| !installed(p)).collect()
}

/// Installs `packages` after `apt-get update`, from `release` (`-t`) if
/// one is given.
pub fn install(packages: &[&str], release: Option<&str>) -> Result<()> {
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
    ]);
    if let Some(release) = release {
        cmd.args(["-t", release]);
    }
    run(cmd.args(packages)).with_context(|| format!("installing {}", packages.join(" ")))
}

/// Installs those of `packages` that are missing; nothing when all are
/// there.
pub fn ensure(packages: &[&str]) -> Result<()> {
    let missing = missing(packages);
    if missing.is_empty() {
        return Ok(());
    }
    install(&missing, None)
}
