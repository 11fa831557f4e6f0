//! Processes of the lab: running a command (echoed, or quietly, or for its
//! output), whether a PID still runs, stopping processes with a grace
//! period, and keeping a daemon we start from inheriting our descriptors.

use std::{
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// Runs a command, echoing it, and fails if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command with its output thrown away; its exit status.
pub fn quiet(cmd: &mut Command) -> std::io::Result<ExitStatus> {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status()
}

/// Runs `args[0]` with the rest as arguments; its stdout, or an error
/// with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawning {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`sh`] for tests: panics with the command's stderr if it fails.
pub fn must_sh(args: &[&str]) -> String {
    sh(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Whether the process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether process `pid` runs (a zombie does not count, and is reaped if it
/// is our child).
pub fn alive(pid: u32) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: waitpid on a PID that may or may not be our child; WNOHANG.
    unsafe {
        let mut status = 0;
        libc::waitpid(pid_t, &mut status, libc::WNOHANG);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends `sig` to `pid` (ignoring a process already gone).
pub fn signal(pid: u32, sig: i32) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        // SAFETY: plain kill(2) on a PID we started.
        unsafe { libc::kill(p, sig) };
    }
}

/// Stops processes: SIGTERM, up to `grace` to exit, then SIGKILL.
pub fn stop_pids(pids: &[u32], grace: Duration) {
    for &p in pids {
        signal(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    for &p in pids.iter().filter(|&&p| alive(p)) {
        signal(p, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a child (a score-agent: `ip netns exec` execs in place) with
/// SIGTERM and waits up to `grace` for its clean shutdown (it detaches
/// from every vif); kills it after that, and says so.
pub fn terminate(mut child: Child, grace: Duration) -> Result<()> {
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            ensure!(status.success(), "the process exited with {status}");
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("the process did not stop within {grace:?} of SIGTERM")
}

/// Marks every file descriptor above stderr that `cmd`'s child would
/// inherit close-on-exec. A daemon we start (an agent, a QEMU) would
/// otherwise keep, for its whole life, whatever our parent left open: the
/// shared lock of `flock /work/PRIV.lock cargo xtask ...`, say.
pub fn close_inherited_fds(cmd: &mut Command) {
    // SAFETY: close_range(2) is async-signal-safe and touches nothing but
    // the child's descriptor table; CLOEXEC (not closing) keeps std's own
    // exec-error pipe working until exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

/// The machine a result came from: cores, CPU model, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_returns_stdout_or_stderr() {
        assert_eq!(sh(&["echo", "hi"]).unwrap(), "hi\n");
        let e = sh(&["sh", "-c", "echo nope >&2; exit 3"]).unwrap_err();
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
    }

    #[test]
    fn a_stopped_child_is_not_alive() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(alive(pid));
        stop_pids(&[pid], Duration::from_secs(5));
        assert!(!alive(pid));
        drop(child);
    }
}
