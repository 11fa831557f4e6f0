//! The xl backend: Xen live migration through the `xl` tool, as the
//! paper's "Xen wrapper" did with `xm` (§III-E). The VM is found by the MAC
//! address of one of its NICs in `xl list -l` (JSON: one object per domain,
//! `{"domid": N, "config": libxl_domain_config}`, whose `nics[].mac` Xen
//! prints as `00:16:3e:xx:xx:xx`), then moved with
//! `xl migrate [OPTIONS] DOMID HOST`.
//!
//! What `xl migrate` prints on the way decides the outcome
//! (tools/xl/xl_migrate.c, `migrate_domain`): before "migration sender:
//! Giving target permission to start." the domain has not left (xl resumes
//! it at the source on failure); after it, only "Target reports successful
//! startup" or "Resumed OK" say where it runs, and "Domain state is now
//! undefined" says nobody knows. Whenever the text alone is not enough,
//! `xl list -l` is asked again whether the domain is still here.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::{
    BackendConfigError, BackendError, HostRef, MigrationReport, Placement, VmRef, XlConfig,
    format_mac, parse_mac, process, tail,
};

/// How long the `xl list -l` that checks the outcome may take, after the
/// migration itself.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// Markers in `xl migrate`'s stderr (tools/xl/xl_migrate.c).
mod says {
    /// The point of no return: the target may start the domain.
    pub(super) const GO: &str = "Giving target permission to start";
    /// The target runs the domain.
    pub(super) const TARGET_STARTED: &str = "Target reports successful startup";
    /// The target failed, and the sender resumed the domain.
    pub(super) const RESUMED: &str = "Resumed OK";
    /// The final handshake broke: two copies may exist, or none.
    pub(super) const UNDEFINED: &str = "Domain state is now undefined";
}

/// Drives Xen's `xl`.
#[derive(Debug)]
pub struct XlBackend {
    xl: PathBuf,
    hosts: BTreeMap<Ipv4Addr, String>,
    options: Vec<String>,
    timeout: Duration,
}

/// One domain of `xl list -l`, the parts the backend reads.
#[derive(Clone, Debug, Deserialize)]
struct ListedDomain {
    domid: u32,
    #[serde(default)]
    config: DomainConfig,
}

/// `libxl_domain_config`: libxl leaves out every field at its default.
#[derive(Clone, Debug, Default, Deserialize)]
struct DomainConfig {
    #[serde(default)]
    c_info: CreateInfo,
    #[serde(default)]
    nics: Vec<Nic>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct CreateInfo {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct Nic {
    #[serde(default)]
    mac: Option<String>,
}

impl ListedDomain {
    fn name(&self) -> &str {
        self.config.c_info.name.as_deref().unwrap_or("?")
    }

    fn has_mac(&self, mac: &[u8; 6]) -> bool {
        self.config
            .nics
            .iter()
            .any(|n| n.mac.as_deref().and_then(parse_mac).as_ref() == Some(mac))
    }
}

/// Why the domains could not be listed.
#[derive(Debug, thiserror::Error)]
enum ListError {
    /// `xl list -l` could not be run, or failed.
    #[error(transparent)]
    Run(#[from] process::ProcessError),
    /// It printed the SXP format, which this backend does not read.
    #[error("`xl list -l` printed SXP, not JSON: set output_format=\"json\" in xl.conf")]
    Sxp,
    /// It printed JSON of another shape.
    #[error("`xl list -l` printed unexpected JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Parses `xl list -l`'s JSON. An empty output (no domains but dom0, on
/// some versions) is an empty list.
fn parse_list(stdout: &str) -> Result<Vec<ListedDomain>, ListError> {
    let text = stdout.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    if text.starts_with('(') {
        return Err(ListError::Sxp);
    }
    Ok(serde_json::from_str(text)?)
}

impl XlBackend {
    /// Builds the backend; `xl_path` must name an executable file.
    pub fn from_config(config: &XlConfig) -> Result<Self, BackendConfigError> {
        config.validate()?;
        let hosts = config.parsed_hosts()?;
        let xl =
            process::resolve(&config.xl_path).ok_or_else(|| BackendConfigError::Unavailable {
                kind: "xl",
                reason: format!(
                    "no executable {} (backend.xl_path)",
                    config.xl_path.display()
                ),
            })?;
        Ok(XlBackend {
            xl,
            hosts,
            options: config.migrate_options.clone(),
            timeout: config.timeout,
        })
    }

    /// The name `xl migrate` is given for host `to`.
    fn host_name(&self, to: &HostRef) -> String {
        self.hosts
            .get(&to.addr)
            .cloned()
            .unwrap_or_else(|| to.addr.to_string())
    }

    async fn list(&self) -> Result<Vec<ListedDomain>, ListError> {
        // Killed if the caller's time-out drops the future.
        let stdout = process::run_ok(&self.xl, &["list", "-l"], None, 3).await?;
        parse_list(&stdout)
    }

    /// Whether domain `domid` with `mac` is still listed here; `None` if
    /// `xl list -l` could not say.
    async fn still_here(&self, domid: u32, mac: &[u8; 6]) -> Option<bool> {
        match tokio::time::timeout(VERIFY_TIMEOUT, self.list()).await {
            Ok(Ok(domains)) => Some(domains.iter().any(|d| d.domid == domid && d.has_mac(mac))),
            Ok(Err(e)) => {
                tracing::warn!("checking the outcome: {e}");
                None
            }
            Err(_) => {
                tracing::warn!("checking the outcome: `xl list -l` timed out");
                None
            }
        }
    }

    /// Finds the domain with `vm`'s MAC and migrates it to `to`.
    pub async fn migrate(&self, vm: &VmRef, to: &HostRef) -> Result<MigrationReport, BackendError> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mac = format_mac(&vm.mac);
        let timed_out = |placement| BackendError::TimedOut {
            vm: vm.ip,
            to: to.addr,
            after: self.timeout,
            placement,
        };
        let failed = |reason: String| BackendError::Failed {
            vm: vm.ip,
            to: to.addr,
            reason,
        };

        let domains = match tokio::time::timeout_at(deadline, self.list()).await {
            Err(_) => return Err(timed_out(Placement::Source)),
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Ok(Ok(d)) => d,
        };
        let matching: Vec<&ListedDomain> = domains.iter().filter(|d| d.has_mac(&vm.mac)).collect();
        let domain = match matching.as_slice() {
            [] => {
                return Err(BackendError::NotFound {
                    vm: vm.ip,
                    detail: format!(
                        "no domain has a NIC with MAC {mac} ({} domains listed by `xl list -l`)",
                        domains.len()
                    ),
                });
            }
            [one] => (*one).clone(),
            many => {
                // Two domains with one MAC: a leftover "--migratedaway" copy
                // of an earlier broken migration, or a misconfiguration.
                // Moving either could be the wrong one.
                let which: Vec<String> = many
                    .iter()
                    .map(|d| format!("{} ({})", d.domid, d.name()))
                    .collect();
                return Err(BackendError::Refused {
                    vm: vm.ip,
                    to: to.addr,
                    reason: format!("MAC {mac} belongs to domains {}", which.join(", ")),
                });
            }
        };

        let domid = domain.domid.to_string();
        let host = self.host_name(to);
        let mut args: Vec<&str> = vec!["migrate"];
        args.extend(self.options.iter().map(String::as_str));
        args.extend([domid.as_str(), host.as_str()]);
        tracing::info!(domain = %domain.name(), domid = domain.domid, host = %host, "xl migrate");

        // xl runs on its own task: if it outlives the time-out it is left to
        // finish, because killing it mid-stream could leave the domain
        // suspended at the source; its final words are logged.
        let child = tokio::process::Command::new(&self.xl)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("running {}: {e}", self.xl.display())))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let log_name = domain.name().to_owned();
        tokio::spawn(async move {
            let out = child.wait_with_output().await;
            if let Err(Ok(out)) = tx.send(out) {
                tracing::warn!(
                    domain = %log_name,
                    status = %out.status,
                    stderr = %tail(&String::from_utf8_lossy(&out.stderr), 4),
                    "xl migrate ended after its time-out"
                );
            }
        });
        let out = match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => return Err(timed_out(Placement::Unknown)),
            Ok(Err(_)) => {
                return Err(BackendError::Undefined {
                    vm: vm.ip,
                    to: to.addr,
                    reason: "lost track of `xl migrate`".into(),
                });
            }
            Ok(Ok(Err(e))) => {
                return Err(BackendError::Undefined {
                    vm: vm.ip,
                    to: to.addr,
                    reason: format!("waiting for `xl migrate`: {e}"),
                });
            }
            Ok(Ok(Ok(out))) => out,
        };
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        self.judge(vm, to, &domain, out.status.success(), &stderr)
            .await?;
        Ok(MigrationReport {
            duration: start.elapsed(),
            advisory: false,
        })
    }

    /// Maps `xl migrate`'s exit status and messages to an outcome.
    async fn judge(
        &self,
        vm: &VmRef,
        to: &HostRef,
        domain: &ListedDomain,
        success: bool,
        stderr: &str,
    ) -> Result<(), BackendError> {
        let reason = tail(stderr, 3);
        let (ip, addr) = (vm.ip, to.addr);
        if success {
            // xl destroys the source copy after the target's report, and
            // does not check that it worked.
            return match self.still_here(domain.domid, &vm.mac).await {
                Some(true) => Err(BackendError::DoneWithError {
                    vm: ip,
                    to: addr,
                    reason: format!(
                        "xl reported success, but the source copy (domid {}) is still listed here",
                        domain.domid
                    ),
                }),
                _ => Ok(()),
            };
        }
        if stderr.contains(says::TARGET_STARTED) {
            return Err(BackendError::DoneWithError {
                vm: ip,
                to: addr,
                reason,
            });
        }
        if let Some(at) = stderr.find(says::UNDEFINED) {
            // xl's own warning says what to check: keep all of it.
            let start = stderr[..at].rfind('\n').map_or(0, |i| i + 1);
            return Err(BackendError::Undefined {
                vm: ip,
                to: addr,
                reason: tail(&stderr[start..], 8),
            });
        }
        let passed_go = stderr.contains(says::GO);
        if passed_go && !stderr.contains(says::RESUMED) {
            return Err(BackendError::Undefined {
                vm: ip,
                to: addr,
                reason,
            });
        }
        // Either xl never let the target start the domain, or the target
        // gave it back and it resumed here: it should be listed here.
        match self.still_here(domain.domid, &vm.mac).await {
            Some(true) => Err(BackendError::Failed {
                vm: ip,
                to: addr,
                reason,
            }),
            Some(false) => Err(BackendError::Undefined {
                vm: ip,
                to: addr,
                reason: format!(
                    "{reason}; and domain {} is no longer listed here",
                    domain.domid
                ),
            }),
            None => Err(BackendError::Undefined {
                vm: ip,
                to: addr,
                reason: format!("{reason}; and `xl list -l` could not confirm it is still here"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libxl_json_and_matches_macs() {
        // The shape `xl list -l` prints: libxl_domain_config per domain,
        // fields at their default left out (a NIC without "mac").
        let list = parse_list(
            r#"[
            {"domid": 3, "config": {"c_info": {"type": "pv", "name": "web"},
              "nics": [{"devid": 0, "mac": "00:16:3E:00:01:05", "bridge": "xenbr0"},
                       {"devid": 1}]}},
            {"domid": 4, "config": {"c_info": {"name": "db"}}}
        ]"#,
        )
        .unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0].has_mac(&[0, 0x16, 0x3e, 0, 1, 5]));
        assert!(!list[1].has_mac(&[0, 0x16, 0x3e, 0, 1, 5]));
        assert_eq!(list[1].name(), "db");
        assert!(parse_list("").unwrap().is_empty());
        assert!(parse_list("[\n]\n").unwrap().is_empty());
        assert!(matches!(
            parse_list("(domain (domid 3))"),
            Err(ListError::Sxp)
        ));
        assert!(matches!(
            parse_list("[{\"config\": {}}]"),
            Err(ListError::Json(_))
        ));
    }
}
