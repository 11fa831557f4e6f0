//! Small tools for working with network namespaces from xtask: running
//! `ip` (alone or as a batch inside one namespace), running a closure on a
//! thread that has entered a namespace, and a minimal HTTP GET from inside
//! one (the agents listen on loopback inside their host namespaces).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    thread,
    time::Duration,
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

/// Runs `f` on a fresh thread that has entered network namespace `ns`;
/// sockets it opens live in that namespace. The calling thread is not
/// touched, so this is safe in a threaded program.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = std::path::Path::new(NETNS_DIR).join(ns);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    thread::spawn(move || {
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// `GET path` from `addr` inside namespace `ns`; the body of a 200 answer,
/// `None` when nobody answers or the status is not 200.
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<Option<String>> {
    let path = path.to_owned();
    in_netns(ns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
            return Ok(None);
        };
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: score\r\n\r\n")?;
        let mut text = String::new();
        if s.read_to_string(&mut text).is_err() {
            return Ok(None);
        }
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return Ok(None);
        };
        let status_ok = head
            .lines()
            .next()
            .is_some_and(|l| l.split_whitespace().nth(1) == Some("200"));
        Ok(status_ok.then(|| body.to_owned()))
    })
}
