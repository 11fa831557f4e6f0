//! Running the tools the backends drive (`xl`, `virsh`, `ip`, the qemu
//! backend's incoming helper): one way to find them, one way to run them
//! with a time-out that never leaves one behind, and one guard that cleans
//! up after a migration whose future was dropped.

use std::{
    ffi::OsStr,
    future::Future,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

/// Why a tool could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProcessError {
    /// It could not be started.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program, as given.
        program: String,
        /// What exec said.
        #[source]
        source: std::io::Error,
    },
    /// It did not finish in time, and was killed.
    #[error("`{command}` did not finish within {limit:?}")]
    TimedOut {
        /// The command line.
        command: String,
        /// The time it had.
        limit: Duration,
    },
    /// It ran to its end and exited with another status than 0.
    #[error("`{command}` failed ({status}): {message}")]
    Failed {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// The last lines of its standard error.
        message: String,
    },
}

/// What a tool that ran to its end printed.
#[derive(Debug)]
pub(crate) struct Output {
    /// How it ended.
    pub(crate) status: ExitStatus,
    /// Its standard output (lossy UTF-8).
    pub(crate) stdout: String,
    /// Its standard error (lossy UTF-8).
    pub(crate) stderr: String,
}

impl Output {
    /// Whether it exited with 0.
    pub(crate) fn success(&self) -> bool {
        self.status.success()
    }
}

/// `program` itself if it names a path (has a `/`), else the first
/// `program` in `PATH`; `None` unless that is an executable file.
pub(crate) fn resolve(program: &Path) -> Option<PathBuf> {
    which::which(program).ok()
}

/// Runs `program ARGS` with stdin closed, to its end or for at most
/// `limit`. The child is killed when it runs over, and when the returned
/// future is dropped (a migration's own time-out, the agent shutting
/// down): no tool outlives the call that started it.
pub(crate) async fn run<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    limit: Option<Duration>,
) -> Result<Output, ProcessError> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match limit {
        None => child.await,
        Some(limit) => match tokio::time::timeout(limit, child).await {
            Ok(out) => out,
            Err(_) => {
                return Err(ProcessError::TimedOut {
                    command: command_line(program, args),
                    limit,
                });
            }
        },
    };
    let out = out.map_err(|source| ProcessError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    Ok(Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// [`run`], where an exit status other than 0 is an error too (with the
/// last `stderr_lines` lines the tool printed); returns its standard
/// output.
pub(crate) async fn run_ok<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    limit: Option<Duration>,
    stderr_lines: usize,
) -> Result<String, ProcessError> {
    let out = run(program, args, limit).await?;
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(ProcessError::Failed {
            command: command_line(program, args),
            status: out.status,
            message: super::tail(&out.stderr, stderr_lines),
        })
    }
}

/// `program ARGS` as one line, for messages.
fn command_line<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> String {
    let mut line = program.display().to_string();
    for a in args {
        line.push(' ');
        line.push_str(&a.as_ref().to_string_lossy());
    }
    line
}

/// Cleans up after a migration whose future is dropped before it ends
/// (the agent shutting down mid-migration): while armed, dropping it
/// spawns `cleanup` (which says what it does in `why`) on the runtime, so
/// that the hypervisor is not left with a job nobody follows.
pub(crate) struct CleanupOnDrop<F: Future<Output = ()> + Send + 'static> {
    cleanup: Option<F>,
    why: &'static str,
}

impl<F: Future<Output = ()> + Send + 'static> CleanupOnDrop<F> {
    /// Armed with `cleanup` (a future does nothing until it is spawned).
    pub(crate) fn new(why: &'static str, cleanup: F) -> Self {
        CleanupOnDrop {
            cleanup: Some(cleanup),
            why,
        }
    }

    /// The migration ended and was handled: nothing to clean up.
    pub(crate) fn disarm(&mut self) {
        self.cleanup = None;
    }
}

impl<F: Future<Output = ()> + Send + 'static> Drop for CleanupOnDrop<F> {
    fn drop(&mut self) {
        let Some(cleanup) = self.cleanup.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        tracing::warn!("migration abandoned; {}", self.why);
        rt.spawn(cleanup);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_path_or_by_path() {
        let sh = resolve(Path::new("sh")).expect("sh is in PATH");
        assert!(sh.is_absolute());
        assert_eq!(resolve(&sh), Some(sh.clone()));
        assert_eq!(resolve(Path::new("no-such-tool-score")), None);
        // A file that is not executable is no program.
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        assert_eq!(resolve(&plain), None);
    }

    #[tokio::test]
    async fn runs_capture_output_and_time_out() {
        let sh = Path::new("sh");
        let out = run(sh, &["-c", "echo out; echo err >&2; exit 3"], None)
            .await
            .unwrap();
        assert_eq!(
            (out.stdout.as_str(), out.stderr.as_str()),
            ("out\n", "err\n")
        );
        assert!(!out.success());
        assert_eq!(out.status.code(), Some(3));
        let started = std::time::Instant::now();
        let err = run(sh, &["-c", "sleep 30"], Some(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("sh -c sleep 30"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(
            run_ok(sh, &["-c", "echo ok"], None, 1).await.unwrap(),
            "ok\n"
        );
        let err = run_ok(sh, &["-c", "echo a >&2; echo b >&2; exit 2"], None, 1)
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::Failed { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "`sh -c echo a >&2; echo b >&2; exit 2` failed (exit status: 2): b"
        );
        let err = run(Path::new("/nonexistent/tool"), &["x"], None)
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_armed_guard_cleans_up_once_dropped() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        drop(CleanupOnDrop::new("test", async move {
            let _ = tx.send(());
        }));
        rx.await.expect("the cleanup ran");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut g = CleanupOnDrop::new("test", async move {
            let _ = tx.send(());
        });
        g.disarm();
        drop(g);
        assert!(rx.await.is_err(), "a disarmed guard does nothing");
    }
}
