//! Network namespaces: running `ip` (alone or as a batch inside one
//! namespace), listing them, and running code on a thread that has entered
//! one.

use std::{
    io::Write as _,
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, Result, bail};

/// Where `ip netns add` puts its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("spawning ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip ARGS` and returns its stdout; failure is an error.
pub fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("spawning ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `lines` as one `ip -batch` inside namespace `ns` (or the current one
/// when `ns` is `None`): one process per namespace instead of one per
/// command, which is what makes setting up tens of namespaces take well
/// under a second.
pub fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    // -force: keep going is not what we want; without it ip stops at the
    // first failing line and reports it.
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawning ip -batch")?;
    let mut text = lines.join("\n");
    text.push('\n');
    child
        .stdin
        .take()
        .context("ip -batch stdin")?
        .write_all(text.as_bytes())
        .context("writing to ip -batch")?;
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() {
        bail!(
            "ip -batch in {}: {}",
            ns.unwrap_or("the root namespace"),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Names of every network namespace `ip netns` knows.
pub fn list() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Whether namespace `ns` exists.
pub fn exists(ns: &str) -> bool {
    std::path::Path::new(NETNS_DIR).join(ns).exists()
}

/// Moves the calling thread into network namespace `ns`: sockets it opens
/// from now on live there. Only for a thread of our own making (a test's
/// sender, a sink), never one that goes back to a pool.
pub fn enter(ns: &str) -> Result<()> {
    let path = std::path::Path::new(NETNS_DIR).join(ns);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a valid namespace fd; setns changes only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has entered network namespace `ns`;
/// sockets it opens live in that namespace. The calling thread is not
/// touched, so this is safe in a threaded program.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = ns.to_owned();
    thread::spawn(move || {
        enter(&ns)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}
