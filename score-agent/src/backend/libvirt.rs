//! The libvirt backend: live migration of libvirt domains (KVM or QEMU/TCG
//! hosts) through `virsh`, the way an operator would do it by hand.
//!
//! 1. The VM is found by MAC: `virsh -c URI list --uuid` names the active
//!    domains of this host's libvirtd, `virsh domiflist UUID` their NICs
//!    (a table whose last column is the MAC); exactly one running domain
//!    must carry the VM's MAC.
//! 2. `virsh -c URI migrate --live [--persistent] [--undefinesource]
//!    [--migrateuri MURI] [OPTIONS] --domain UUID --desturi TARGET-URI`,
//!    where TARGET-URI comes from the `hosts` table (`qemu+tcp://10.0.0.2/system`).
//! 3. Whatever `virsh migrate` says, where the domain is afterwards is
//!    asked of both ends (`virsh domstate --reason UUID` at the source and,
//!    with `-c TARGET-URI`, at the target) and mapped to the three
//!    outcomes: still at the source and running, at the target, or
//!    undefined (then the agent stops and reports; it never retries).
//! 4. On the time-out the job is aborted (`virsh domjobabort UUID`), the
//!    `virsh migrate` left to end, and both ends asked again.
//!
//! The domain is always named by its UUID, which libvirt keeps across a
//! migration and which needs no quoting.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use super::{
    BackendConfigError, BackendError, HostRef, LibvirtConfig, MigrationReport, Placement, VmRef,
    format_mac,
    process::{self, Output, ProcessError},
    tail,
    virsh::{
        DomState, parse_domiflist, parse_domstate, parse_jobinfo, parse_uuids, says_no_domain,
        virsh_error,
    },
};

/// How long one `virsh` query (list, domiflist, domstate...) may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `virsh migrate` may take to end once its job was aborted.
const ABORT_WAIT: Duration = Duration::from_secs(30);

/// Drives libvirt through `virsh`.
#[derive(Debug)]
pub struct LibvirtBackend {
    virsh: PathBuf,
    uri: String,
    hosts: BTreeMap<Ipv4Addr, String>,
    migrate_uris: BTreeMap<Ipv4Addr, String>,
    persistent: bool,
    undefine_source: bool,
    options: Vec<String>,
    timeout: Duration,
}

/// libvirt's own figures for one migration (`virsh domjobinfo
/// --completed` at the target), when it gave them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LibvirtJobStats {
    /// `Time elapsed`, in ms.
    pub elapsed_ms: Option<u64>,
    /// `Total downtime`, in ms.
    pub downtime_ms: Option<u64>,
    /// `Data processed`, in bytes.
    pub processed_bytes: Option<u64>,
}

/// A successful migration with libvirt's own figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LibvirtMigration {
    /// What every backend reports.
    pub report: MigrationReport,
    /// What libvirt reported.
    pub stats: LibvirtJobStats,
    /// How long `virsh migrate` itself ran (part of `report.duration`;
    /// the rest is finding the domain and asking both ends afterwards).
    pub virsh: Duration,
}

/// What one end said about the domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// It has the domain, in this state.
    State(DomState),
    /// It answered, and has no such domain.
    Absent,
    /// It could not be asked (no connection, time-out, unexpected answer).
    Unreachable(String),
}

impl Seen {
    fn running(&self) -> bool {
        matches!(self, Seen::State(s) if s.running())
    }

    fn paused(&self) -> bool {
        matches!(self, Seen::State(s) if s.paused())
    }

    fn reachable(&self) -> bool {
        !matches!(self, Seen::Unreachable(_))
    }
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::State(s) => write!(f, "{s}"),
            Seen::Absent => f.write_str("no such domain"),
            Seen::Unreachable(why) => write!(f, "could not ask: {why}"),
        }
    }
}

/// Where the domain is, from what both ends said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Runs at the target, and the source no longer runs it.
    Target,
    /// Runs at the target, with something left to say (a paused copy
    /// at the source, the target paused, the source not asked).
    TargetWithError(String),
    /// Runs at the source, and not at the target.
    Source,
    /// Paused at the source, and the target does not have it running:
    /// resume it at the source.
    ResumeSource,
    /// Nobody can say.
    Unknown(String),
}

/// Maps what both ends said, after `virsh migrate` ended (`success` is its
/// exit status), to where the domain is. Pure: the backend's whole
/// outcome table, tested on its own.
pub(crate) fn judge(success: bool, source: &Seen, target: &Seen) -> Verdict {
    let both = || format!("source: {source}; target: {target}");
    if target.running() {
        return match source {
            Seen::State(s) if s.running() => {
                Verdict::Unknown(format!("the domain runs at both ends ({})", both()))
            }
            Seen::State(s) if s.paused() => Verdict::TargetWithError(format!(
                "a paused copy is left at the source ({s}): destroy it there"
            )),
            Seen::State(_) | Seen::Absent => Verdict::Target,
            // The target runs it; whether the source also does cannot be
            // told. After a reported success libvirt's confirm step had
            // already stopped the source; after a failure it may not have.
            Seen::Unreachable(why) if success => {
                Verdict::TargetWithError(format!("the source could not be asked afterwards: {why}"))
            }
            Seen::Unreachable(_) => Verdict::Unknown(format!(
                "the target runs the domain, the source could not be asked ({})",
                both()
            )),
        };
    }
    if source.running() {
        return if success {
            Verdict::Unknown(format!(
                "virsh reported success, but the domain still runs at the source and not at the target ({})",
                both()
            ))
        } else {
            Verdict::Source
        };
    }
    if let Seen::State(t) = target
        && !success
        && source.paused()
        && t.paused()
    {
        // Both paused: a failed post-copy, or a switch-over cut short.
        // Resuming either could run a stale copy.
        return Verdict::Unknown(format!("the domain is paused at both ends ({})", both()));
    }
    if source.paused() && target.reachable() && !success {
        return Verdict::ResumeSource;
    }
    if success
        && let Seen::State(t) = target
        && t.paused()
    {
        // `--suspend` among the options leaves it paused there on purpose.
        return Verdict::TargetWithError(format!("the domain is at the target, {t}"));
    }
    Verdict::Unknown(format!("the domain runs nowhere ({})", both()))
}

impl Verdict {
    fn placement(&self) -> Placement {
        match self {
            Verdict::Target | Verdict::TargetWithError(_) => Placement::Target,
            Verdict::Source | Verdict::ResumeSource => Placement::Source,
            Verdict::Unknown(_) => Placement::Unknown,
        }
    }
}

/// The domain found for a VM.
#[derive(Clone, Debug)]
struct Domain {
    uuid: String,
    name: String,
}

impl LibvirtBackend {
    /// Builds the backend; `virsh_path` must name an executable file.
    pub fn from_config(config: &LibvirtConfig) -> Result<Self, BackendConfigError> {
        config.validate()?;
        let virsh = process::resolve(&config.virsh_path).ok_or_else(|| BackendConfigError::Unavailable {
            kind: "libvirt",
            reason: format!(
                "no executable {} (backend.virsh_path; Debian: apt-get install libvirt-clients)",
                config.virsh_path.display()
            ),
        })?;
        Ok(LibvirtBackend {
            virsh,
            uri: config.uri.clone(),
            hosts: config.parsed_hosts()?,
            migrate_uris: config.parsed_migrate_uris()?,
            persistent: config.persistent,
            undefine_source: config.undefine_source,
            options: config.migrate_options.clone(),
            timeout: config.timeout,
        })
    }

    /// Runs `virsh -c URI ARGS` for at most `limit` (killed after it).
    async fn virsh(
        &self,
        uri: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<Output, ProcessError> {
        let mut all = vec!["-c", uri];
        all.extend_from_slice(args);
        process::run(&self.virsh, &all, Some(limit)).await
    }

    /// What the libvirtd at `uri` says about domain `uuid`.
    async fn state(&self, uri: &str, uuid: &str) -> Seen {
        match self
            .virsh(uri, &["domstate", "--reason", uuid], QUERY_TIMEOUT)
            .await
        {
            Err(e) => Seen::Unreachable(e.to_string()),
            Ok(run) if run.success() => match parse_domstate(&run.stdout) {
                Some(s) => Seen::State(s),
                None => Seen::Unreachable(format!(
                    "`virsh domstate` printed `{}`",
                    tail(&run.stdout, 2)
                )),
            },
            Ok(run) if says_no_domain(&run.stderr) => Seen::Absent,
            Ok(run) => Seen::Unreachable(virsh_error(&run.stderr)),
        }
    }

    /// Both ends' answers, asked at once.
    async fn states(&self, target_uri: &str, uuid: &str) -> (Seen, Seen) {
        tokio::join!(self.state(&self.uri, uuid), self.state(target_uri, uuid))
    }

    /// The one running domain here with `vm`'s MAC.
    async fn find(&self, vm: &VmRef, to: &HostRef) -> Result<Domain, BackendError> {
        let failed = |reason: String| BackendError::Failed {
            vm: vm.ip,
            to: to.addr,
            reason,
        };
        let mac = format_mac(&vm.mac);
        let list = self
            .virsh(&self.uri, &["list", "--uuid"], QUERY_TIMEOUT)
            .await
            .map_err(|e| failed(e.to_string()))?;
        if !list.success() {
            return Err(failed(format!(
                "`virsh list` failed: {}",
                virsh_error(&list.stderr)
            )));
        }
        let uuids = parse_uuids(&list.stdout).map_err(|e| failed(e.to_string()))?;
        let mut matching = Vec::new();
        for uuid in &uuids {
            let run = self
                .virsh(&self.uri, &["domiflist", uuid], QUERY_TIMEOUT)
                .await
                .map_err(|e| failed(e.to_string()))?;
            if !run.success() {
                // Gone between `list` and now: not this VM's concern.
                tracing::debug!(%uuid, "domiflist: {}", virsh_error(&run.stderr));
                continue;
            }
            if parse_domiflist(&run.stdout).contains(&vm.mac) {
                matching.push(uuid.clone());
            }
        }
        let uuid = match matching.as_slice() {
            [] => {
                return Err(BackendError::NotFound {
                    vm: vm.ip,
                    detail: format!(
                        "no active domain has a NIC with MAC {mac} ({} active domains at {})",
                        uuids.len(),
                        self.uri
                    ),
                });
            }
            [one] => one.clone(),
            many => {
                return Err(BackendError::Refused {
                    vm: vm.ip,
                    to: to.addr,
                    reason: format!("MAC {mac} belongs to domains {}", many.join(", ")),
                });
            }
        };
        let name = match self
            .virsh(&self.uri, &["domname", &uuid], QUERY_TIMEOUT)
            .await
        {
            Ok(run) if run.success() => run.stdout.trim().to_owned(),
            _ => uuid.clone(),
        };
        match self.state(&self.uri, &uuid).await {
            Seen::State(s) if s.running() => Ok(Domain { uuid, name }),
            Seen::State(s) => Err(BackendError::Refused {
                vm: vm.ip,
                to: to.addr,
                reason: format!("domain {name} ({uuid}) is {s}, not running"),
            }),
            Seen::Absent => Err(BackendError::NotFound {
                vm: vm.ip,
                detail: format!("domain {name} ({uuid}) went away while it was looked up"),
            }),
            Seen::Unreachable(why) => Err(failed(format!("`virsh domstate {uuid}`: {why}"))),
        }
    }

    /// `virsh migrate`'s arguments after `-c URI`.
    fn migrate_args(&self, uuid: &str, to: &HostRef, target_uri: &str) -> Vec<String> {
        let mut args = vec!["migrate".to_owned(), "--live".to_owned()];
        if self.persistent {
            args.push("--persistent".into());
        }
        if self.undefine_source {
            args.push("--undefinesource".into());
        }
        if let Some(m) = self.migrate_uris.get(&to.addr) {
            args.extend(["--migrateuri".to_owned(), m.clone()]);
        }
        args.extend(self.options.iter().cloned());
        args.extend([
            "--domain".to_owned(),
            uuid.to_owned(),
            "--desturi".to_owned(),
            target_uri.to_owned(),
        ]);
        args
    }

    /// Migrates `vm` to `to`; see the module documentation.
    pub async fn migrate(&self, vm: &VmRef, to: &HostRef) -> Result<MigrationReport, BackendError> {
        self.migrate_with_stats(vm, to).await.map(|m| m.report)
    }

    /// [`LibvirtBackend::migrate`], also returning libvirt's own figures
    /// (for measurements).
    pub async fn migrate_with_stats(
        &self,
        vm: &VmRef,
        to: &HostRef,
    ) -> Result<LibvirtMigration, BackendError> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let Some(target_uri) = self.hosts.get(&to.addr) else {
            return Err(BackendError::Refused {
                vm: vm.ip,
                to: to.addr,
                reason: "the target is not in backend.hosts".into(),
            });
        };
        if *target_uri == self.uri {
            return Err(BackendError::Refused {
                vm: vm.ip,
                to: to.addr,
                reason: format!("the target's URI {target_uri} is this host's"),
            });
        }
        let domain = match tokio::time::timeout_at(deadline, self.find(vm, to)).await {
            Ok(found) => found?,
            Err(_) => {
                return Err(BackendError::TimedOut {
                    vm: vm.ip,
                    to: to.addr,
                    after: self.timeout,
                    placement: Placement::Source,
                });
            }
        };
        let args = self.migrate_args(&domain.uuid, to, target_uri);
        tracing::info!(domain = %domain.name, uuid = %domain.uuid, target = %target_uri, found_in = ?start.elapsed(), "virsh migrate");
        let virsh_start = Instant::now();

        let child = tokio::process::Command::new(&self.virsh)
            .arg("-c")
            .arg(&self.uri)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BackendError::Failed {
                vm: vm.ip,
                to: to.addr,
                reason: format!("running {}: {e}", self.virsh.display()),
            })?;
        // virsh waits on its own task: if the agent drops this future, the
        // guard aborts the job and virsh still ends (and is reaped) there.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(child.wait_with_output().await);
        });
        // If this future is dropped: `virsh domjobabort` on a task of its
        // own; libvirt then resumes the domain at the source itself.
        let mut guard = {
            let (virsh, uri, uuid) = (self.virsh.clone(), self.uri.clone(), domain.uuid.clone());
            process::CleanupOnDrop::new("aborting its libvirt job", async move {
                let args = ["-c", &uri, "domjobabort", &uuid];
                match process::run(&virsh, &args, Some(QUERY_TIMEOUT)).await {
                    Ok(out) if out.success() => {}
                    Ok(out) => tracing::warn!("domjobabort: {}", virsh_error(&out.stderr)),
                    Err(e) => tracing::warn!("domjobabort: {e}"),
                }
            })
        };

        let mut timed_out = false;
        let ended = match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(r) => r,
            Err(_) => {
                timed_out = true;
                tracing::warn!(domain = %domain.name, after = ?self.timeout, "migration timed out; aborting its job");
                match self
                    .virsh(&self.uri, &["domjobabort", &domain.uuid], QUERY_TIMEOUT)
                    .await
                {
                    Ok(run) if !run.success() => {
                        // "no job is active": it ended just now.
                        tracing::warn!("domjobabort: {}", virsh_error(&run.stderr));
                    }
                    Err(e) => tracing::warn!("domjobabort: {e}"),
                    Ok(_) => {}
                }
                match tokio::time::timeout(ABORT_WAIT, &mut rx).await {
                    Ok(r) => r,
                    Err(_) => {
                        guard.disarm();
                        return Err(BackendError::TimedOut {
                            vm: vm.ip,
                            to: to.addr,
                            after: self.timeout,
                            placement: Placement::Unknown,
                        });
                    }
                }
            }
        };
        guard.disarm();
        let virsh = virsh_start.elapsed();
        let (success, reason) = match ended {
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                (out.status.success(), virsh_error(&stderr))
            }
            Ok(Err(e)) => (false, format!("waiting for `virsh migrate`: {e}")),
            Err(_) => (false, "lost track of `virsh migrate`".to_owned()),
        };
        if !success {
            tracing::warn!(domain = %domain.name, "virsh migrate failed: {reason}");
        }

        let (source, target) = self.states(target_uri, &domain.uuid).await;
        let mut verdict = judge(success, &source, &target);
        tracing::info!(%source, %target, ?verdict, "where the domain is");
        if verdict == Verdict::ResumeSource {
            verdict = self.resume_source(&domain).await;
        }
        let err = |verdict: Verdict| -> BackendError {
            if timed_out {
                return BackendError::TimedOut {
                    vm: vm.ip,
                    to: to.addr,
                    after: self.timeout,
                    placement: verdict.placement(),
                };
            }
            match verdict {
                Verdict::Source | Verdict::ResumeSource => BackendError::Failed {
                    vm: vm.ip,
                    to: to.addr,
                    reason: reason.clone(),
                },
                Verdict::Target => BackendError::DoneWithError {
                    vm: vm.ip,
                    to: to.addr,
                    reason: format!("the domain runs at the target, but virsh failed: {reason}"),
                },
                Verdict::TargetWithError(why) => BackendError::DoneWithError {
                    vm: vm.ip,
                    to: to.addr,
                    reason: if success {
                        why
                    } else {
                        format!("{reason}; {why}")
                    },
                },
                Verdict::Unknown(why) => BackendError::Undefined {
                    vm: vm.ip,
                    to: to.addr,
                    reason: if success {
                        why
                    } else {
                        format!("{reason}; {why}")
                    },
                },
            }
        };
        if !success || timed_out || verdict != Verdict::Target {
            return Err(err(verdict));
        }
        let report = MigrationReport {
            duration: start.elapsed(),
            advisory: false,
        };
        let stats = match self
            .virsh(
                target_uri,
                &["domjobinfo", "--completed", &domain.uuid],
                QUERY_TIMEOUT,
            )
            .await
        {
            Ok(run) if run.success() => parse_jobinfo(&run.stdout),
            _ => LibvirtJobStats::default(),
        };
        tracing::info!(
            domain = %domain.name,
            elapsed_ms = ?stats.elapsed_ms,
            downtime_ms = ?stats.downtime_ms,
            duration = ?report.duration,
            virsh = ?virsh,
            "libvirt: migration completed"
        );
        Ok(LibvirtMigration {
            report,
            stats,
            virsh,
        })
    }

    /// libvirt left the source paused after a failure and the target does
    /// not run the domain: `virsh resume`, then check it runs.
    async fn resume_source(&self, domain: &Domain) -> Verdict {
        tracing::warn!(domain = %domain.name, "libvirt: source left paused; resuming it");
        if let Ok(run) = self
            .virsh(&self.uri, &["resume", &domain.uuid], QUERY_TIMEOUT)
            .await
            && !run.success()
        {
            tracing::warn!("virsh resume: {}", virsh_error(&run.stderr));
        }
        match self.state(&self.uri, &domain.uuid).await {
            Seen::State(s) if s.running() => Verdict::Source,
            other => Verdict::Unknown(format!(
                "the source was left paused and did not resume: {other}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(state: &str, reason: &str) -> Seen {
        Seen::State(DomState {
            state: state.into(),
            reason: Some(reason.into()),
        })
    }

    fn down() -> Seen {
        Seen::Unreachable(
            "unable to connect to server at '10.0.0.12:16509': Connection refused".into(),
        )
    }

    #[test]
    fn outcome_table() {
        let running = || st("running", "migrated");
        let src_running = || st("running", "migration canceled");
        let paused = || st("paused", "migration");
        let off = || st("shut off", "migrated");
        // Success: at the target, the source gone or shut off.
        assert_eq!(judge(true, &Seen::Absent, &running()), Verdict::Target);
        assert_eq!(judge(true, &off(), &running()), Verdict::Target);
        assert!(matches!(
            judge(true, &down(), &running()),
            Verdict::TargetWithError(_)
        ));
        assert!(matches!(
            judge(true, &paused(), &running()),
            Verdict::TargetWithError(_)
        ));
        assert!(matches!(
            judge(true, &Seen::Absent, &paused()),
            Verdict::TargetWithError(_)
        ));
        // Success claimed, but not at the target (or shut off there):
        // nobody knows.
        assert!(matches!(
            judge(true, &Seen::Absent, &off()),
            Verdict::Unknown(_)
        ));
        assert!(matches!(
            judge(true, &Seen::Absent, &Seen::Absent),
            Verdict::Unknown(_)
        ));
        assert!(matches!(
            judge(true, &src_running(), &Seen::Absent),
            Verdict::Unknown(_)
        ));
        // Failure: still running at the source (target down, or absent).
        assert_eq!(judge(false, &src_running(), &down()), Verdict::Source);
        assert_eq!(judge(false, &src_running(), &Seen::Absent), Verdict::Source);
        assert_eq!(judge(false, &src_running(), &off()), Verdict::Source);
        // Failure, but at the target anyway.
        assert_eq!(judge(false, &Seen::Absent, &running()), Verdict::Target);
        // Running at both ends, or at neither: undefined.
        assert!(matches!(
            judge(false, &src_running(), &running()),
            Verdict::Unknown(_)
        ));
        assert!(matches!(
            judge(false, &st("shut off", "crashed"), &Seen::Absent),
            Verdict::Unknown(_)
        ));
        assert!(matches!(
            judge(false, &Seen::Absent, &down()),
            Verdict::Unknown(_)
        ));
        assert!(matches!(
            judge(false, &down(), &running()),
            Verdict::Unknown(_)
        ));
        // Left paused at the source: resume it only when the target
        // answered and does not run it.
        assert_eq!(
            judge(false, &paused(), &Seen::Absent),
            Verdict::ResumeSource
        );
        assert!(matches!(
            judge(false, &paused(), &down()),
            Verdict::Unknown(_)
        ));
        assert!(matches!(
            judge(false, &paused(), &st("paused", "post-copy failed")),
            Verdict::Unknown(_)
        ));
    }
}
