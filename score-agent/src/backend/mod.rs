//! Hypervisor backends: how the agent live-migrates a VM once score-core's
//! decision says "move VM u to host x'". One interface, [`Backend`], with
//! one implementation per hypervisor kind plus a recording fake for tests.
//!
//! # The interface
//!
//! - The VM is named by what the agent knows of it: [`VmRef`] (its IPv4
//!   address, the MAC address seen on its vif, the vif's name).
//! - The target is a hypervisor host's address, [`HostRef`]; each backend
//!   maps it to what its tool needs (a namespace name, an ssh host name)
//!   through its own `hosts` table.
//! - [`Backend::migrate`] returns a [`MigrationReport`] when the VM runs at
//!   the target (or, for the advisory backend, when nothing was meant to
//!   move), or a [`BackendError`] that says where the VM is afterwards:
//!   [`BackendError::placement`] and [`BackendError::still_at_source`].
//!   A failed migration leaves the VM where it was; an undefined one must
//!   stop further migrations of that VM until an operator has looked.
//!
//! # Configuration
//!
//! [`BackendConfig`] (module `config`) is the `[backend]` table of the
//! agent's TOML file, selected by `kind = "netns" | "advisory" | "xl" |
//! "qemu" | "libvirt"`; [`BackendConfig::validate`] checks every key without
//! touching the system, [`Backend::from_config`] then checks what the host
//! must provide (the tool, the namespace). The tools are found and run
//! through one module, `process`.

use std::{fmt, net::Ipv4Addr, time::Duration};

mod advisory;
mod config;
mod libvirt;
mod netns;
mod process;
mod qemu;
pub mod qmp;
mod recording;
mod virsh;
mod xl;

pub use advisory::AdvisoryBackend;
pub use config::{
    AdvisoryConfig, BackendConfig, BackendConfigError, LibvirtConfig, NetnsConfig, QemuConfig,
    XlConfig,
};
pub use libvirt::{LibvirtBackend, LibvirtJobStats, LibvirtMigration};
pub use netns::NetnsBackend;
pub use qemu::{QemuBackend, QemuMigration, QemuMigrationStats};
pub use recording::{MigrationCall, RecordingBackend};
pub use xl::XlBackend;

/// A VM hosted here, as the agent knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VmRef {
    /// Its IPv4 address: the VM's ID in the token (paper §III-D).
    pub ip: Ipv4Addr,
    /// The MAC address of its network interface, as seen on the vif: how
    /// Xen's tools name its NIC (paper §III-E).
    pub mac: [u8; 6],
    /// The host-side name of its backend interface (`vif3.0`).
    pub vif: String,
}

/// A hypervisor host to migrate to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostRef {
    /// The host's address (the one its agent answers location requests
    /// with).
    pub addr: Ipv4Addr,
}

/// What a successful call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    /// Wall-clock time of the migration, from the first command to the VM
    /// running (and announced) at the target.
    pub duration: Duration,
    /// Nothing moved: the advisory backend only says what it would do.
    pub advisory: bool,
}

/// Where a VM is after a call that returned an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Still on this host, attached and running as before the call.
    Source,
    /// At the target host.
    Target,
    /// Not known: the agent must not migrate this VM again, nor announce
    /// a move, until an operator has checked both ends.
    Unknown,
    /// The backend found no such VM on this host; nothing was done.
    Absent,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::Source => "vm still at the source",
            Placement::Target => "vm at the target",
            Placement::Unknown => "vm location unknown",
            Placement::Absent => "vm not on this host",
        })
    }
}

/// Why a migration did not simply succeed. Every variant says where the
/// VM is afterwards ([`BackendError::placement`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// No VM with this address or MAC on this host; nothing was done.
    #[error("vm {vm} not found on this host: {detail}")]
    NotFound {
        /// The VM asked for.
        vm: Ipv4Addr,
        /// What was searched, and what was there.
        detail: String,
    },
    /// The backend would not try (the target host is not in its
    /// configuration, or is this host); nothing was done.
    #[error("migration of {vm} to {to} refused: {reason}")]
    Refused {
        /// The VM.
        vm: Ipv4Addr,
        /// The target host.
        to: Ipv4Addr,
        /// Why.
        reason: String,
    },
    /// The migration failed; the VM is still at the source, running.
    #[error("migration of {vm} to {to} failed, vm still at the source: {reason}")]
    Failed {
        /// The VM.
        vm: Ipv4Addr,
        /// The target host.
        to: Ipv4Addr,
        /// What the tool reported.
        reason: String,
    },
    /// The VM runs at the target, but the backend reported an error (the
    /// source copy was not cleaned up, the move was not announced...).
    #[error("migration of {vm} to {to} done, with an error: {reason}")]
    DoneWithError {
        /// The VM.
        vm: Ipv4Addr,
        /// The target host.
        to: Ipv4Addr,
        /// What went wrong after the VM reached the target.
        reason: String,
    },
    /// The outcome is not known: stop and report, never retry blindly.
    #[error("migration of {vm} to {to} left the vm in an undefined state: {reason}")]
    Undefined {
        /// The VM.
        vm: Ipv4Addr,
        /// The target host.
        to: Ipv4Addr,
        /// What the tool reported.
        reason: String,
    },
    /// The migration did not end within the configured time-out.
    #[error("migration of {vm} to {to} timed out after {after:?} ({placement})")]
    TimedOut {
        /// The VM.
        vm: Ipv4Addr,
        /// The target host.
        to: Ipv4Addr,
        /// The configured time-out.
        after: Duration,
        /// Where the backend found the VM afterwards ([`Placement::Unknown`]
        /// when it could not check).
        placement: Placement,
    },
}

impl BackendError {
    /// Where the VM is after this error.
    pub fn placement(&self) -> Placement {
        match self {
            BackendError::NotFound { .. } => Placement::Absent,
            BackendError::Refused { .. } | BackendError::Failed { .. } => Placement::Source,
            BackendError::DoneWithError { .. } => Placement::Target,
            BackendError::Undefined { .. } => Placement::Unknown,
            BackendError::TimedOut { placement, .. } => *placement,
        }
    }

    /// The VM is still here, running as before: count a failed migration
    /// and pass the token on.
    pub fn still_at_source(&self) -> bool {
        self.placement() == Placement::Source
    }

    /// The VM moved despite the error: announce the move.
    pub fn at_target(&self) -> bool {
        self.placement() == Placement::Target
    }

    /// Nobody knows where the VM is: stop migrating it and report.
    pub fn is_undefined(&self) -> bool {
        self.placement() == Placement::Unknown
    }
}

/// The hypervisor backend the agent calls.
#[derive(Debug)]
pub enum Backend {
    /// Network namespaces (the emulated data centre).
    Netns(NetnsBackend),
    /// Moves nothing.
    Advisory(AdvisoryBackend),
    /// Xen's `xl`.
    Xl(XlBackend),
    /// QEMU over QMP.
    Qemu(QemuBackend),
    /// libvirt through `virsh`.
    Libvirt(LibvirtBackend),
    /// Records calls and answers as told (tests).
    Recording(RecordingBackend),
}

impl Backend {
    /// Builds the backend a validated configuration names, checking what
    /// this host must provide.
    pub fn from_config(config: &BackendConfig) -> Result<Backend, BackendConfigError> {
        config.validate()?;
        Ok(match config {
            BackendConfig::Netns(c) => Backend::Netns(NetnsBackend::from_config(c)?),
            BackendConfig::Advisory(_) => Backend::Advisory(AdvisoryBackend),
            BackendConfig::Xl(c) => Backend::Xl(XlBackend::from_config(c)?),
            BackendConfig::Qemu(c) => Backend::Qemu(QemuBackend::from_config(c)?),
            BackendConfig::Libvirt(c) => Backend::Libvirt(LibvirtBackend::from_config(c)?),
        })
    }

    /// Migrates `vm`, hosted here, to host `to`, and returns once it runs
    /// there or the attempt is over. See [`BackendError::placement`] for
    /// where the VM is after an error.
    pub async fn migrate(&self, vm: &VmRef, to: &HostRef) -> Result<MigrationReport, BackendError> {
        let span =
            tracing::info_span!("migrate", vm = %vm.ip, to = %to.addr, backend = self.kind());
        let result = tracing::Instrument::instrument(
            async {
                match self {
                    Backend::Netns(b) => b.migrate(vm, to).await,
                    Backend::Advisory(b) => b.migrate(vm, to).await,
                    Backend::Xl(b) => b.migrate(vm, to).await,
                    Backend::Qemu(b) => b.migrate(vm, to).await,
                    Backend::Libvirt(b) => b.migrate(vm, to).await,
                    Backend::Recording(b) => b.migrate(vm, to).await,
                }
            },
            span,
        )
        .await;
        match &result {
            Ok(r) if r.advisory => {}
            Ok(r) => tracing::info!(vm = %vm.ip, to = %to.addr, duration = ?r.duration, "migrated"),
            Err(e) => tracing::warn!(vm = %vm.ip, to = %to.addr, placement = %e.placement(), "{e}"),
        }
        result
    }

    /// The kind, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Netns(_) => "netns",
            Backend::Advisory(_) => "advisory",
            Backend::Xl(_) => "xl",
            Backend::Qemu(_) => "qemu",
            Backend::Libvirt(_) => "libvirt",
            Backend::Recording(_) => "recording",
        }
    }

    /// Whether this backend never moves anything.
    pub fn is_advisory(&self) -> bool {
        matches!(self, Backend::Advisory(_))
    }
}

/// `00:16:3e:5a:01:05`: the lower-case form Xen's tools print.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = *mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Parses `00:16:3E:5a:01:05` (either case, `:` or `-`).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The last lines of a tool's stderr, bounded, for an error message.
fn tail(text: &str, lines: usize) -> String {
    let kept: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = kept.len().saturating_sub(lines);
    let mut s = kept[start..].join(" | ");
    if s.len() > 600 {
        let mut cut = s.len() - 600;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = format!("...{}", &s[cut..]);
    }
    if s.is_empty() {
        "(no message)".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decision loop holds the backend in an `Arc` and awaits
    /// migrations inside spawned tasks.
    #[test]
    fn backend_and_its_futures_are_send() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: T) {}
        let backend = Backend::Recording(RecordingBackend::new());
        send_sync(&backend);
        let vm = VmRef {
            ip: Ipv4Addr::LOCALHOST,
            mac: [0; 6],
            vif: "vif1.0".into(),
        };
        let to = HostRef {
            addr: Ipv4Addr::LOCALHOST,
        };
        send(backend.migrate(&vm, &to));
    }

    #[test]
    fn macs_round_trip() {
        let mac = [0x00, 0x16, 0x3e, 0x5a, 0x01, 0xff];
        assert_eq!(format_mac(&mac), "00:16:3e:5a:01:ff");
        assert_eq!(parse_mac("00:16:3E:5A:01:FF"), Some(mac));
        assert_eq!(parse_mac("00-16-3e-5a-01-ff"), Some(mac));
        assert_eq!(parse_mac("00:16:3e:5a:01"), None);
        assert_eq!(parse_mac("00:16:3e:5a:01:ff:00"), None);
        assert_eq!(parse_mac("00:16:3e:5a:01:fff"), None);
        assert_eq!(parse_mac("00:16:3e:5a:01:zz"), None);
    }

    #[test]
    fn placement_of_each_error() {
        let vm = Ipv4Addr::new(198, 18, 1, 5);
        let to = Ipv4Addr::new(198, 18, 0, 12);
        let failed = BackendError::Failed {
            vm,
            to,
            reason: "x".into(),
        };
        assert!(failed.still_at_source());
        let done = BackendError::DoneWithError {
            vm,
            to,
            reason: "x".into(),
        };
        assert!(done.at_target() && !done.still_at_source());
        let undefined = BackendError::Undefined {
            vm,
            to,
            reason: "x".into(),
        };
        assert!(undefined.is_undefined());
        let timed_out = BackendError::TimedOut {
            vm,
            to,
            after: Duration::from_secs(1),
            placement: Placement::Source,
        };
        assert!(timed_out.still_at_source());
        let nf = BackendError::NotFound {
            vm,
            detail: "x".into(),
        };
        assert_eq!(nf.placement(), Placement::Absent);
        assert!(!nf.still_at_source());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(tail("", 2), "(no message)");
        assert!(tail(&"é".repeat(1000), 1).len() <= 604);
    }
}
