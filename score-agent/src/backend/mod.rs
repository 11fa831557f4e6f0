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
//! [`BackendConfig`] is the `[backend]` table of the agent's TOML file,
//! selected by `kind = "netns" | "advisory" | "xl" | "qemu" | "libvirt"`; [`BackendConfig::validate`]
//! checks every key without touching the system, [`Backend::from_config`]
//! then checks what the host must provide (the tool, the namespace).

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::PathBuf, time::Duration};

use serde::Deserialize;

mod advisory;
mod libvirt;
mod netns;
mod qemu;
mod recording;
mod xl;

pub use advisory::AdvisoryBackend;
pub use libvirt::{LibvirtBackend, LibvirtConfig, LibvirtJobStats, LibvirtMigration};
pub use netns::NetnsBackend;
pub use qemu::{QemuBackend, QemuMigration, QemuMigrationStats, qmp};
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

    /// A short, bounded label for metrics (`failed`, `timed_out`...).
    pub fn label(&self) -> &'static str {
        match self {
            BackendError::NotFound { .. } => "not_found",
            BackendError::Refused { .. } => "refused",
            BackendError::Failed { .. } => "failed",
            BackendError::DoneWithError { .. } => "done_with_error",
            BackendError::Undefined { .. } => "undefined",
            BackendError::TimedOut { .. } => "timed_out",
        }
    }
}

/// Why a backend configuration was refused, or the backend could not be
/// set up on this host.
#[derive(Debug, thiserror::Error)]
pub enum BackendConfigError {
    /// A key has a value the backend cannot use. `key` is the full path in
    /// the agent's file (`backend.hosts."198.18.0.11"`).
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The key, as written in the file, under `backend.`.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// The host lacks what the backend needs (its tool, its namespace).
    #[error("backend {kind}: {reason}")]
    Unavailable {
        /// The backend kind.
        kind: &'static str,
        /// What is missing.
        reason: String,
    },
}

/// The `[backend]` table: which hypervisor the agent drives, and how.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendConfig {
    /// The emulated data centre: hosts and VMs are network namespaces.
    Netns(NetnsConfig),
    /// Decide and report, migrate nothing.
    Advisory(AdvisoryConfig),
    /// Xen, through its `xl` tool.
    Xl(XlConfig),
    /// QEMU guests run directly, through their QMP sockets.
    Qemu(QemuConfig),
    /// libvirt domains, through `virsh`.
    Libvirt(LibvirtConfig),
}

impl Default for BackendConfig {
    /// Advisory: an agent with no backend configured moves nothing.
    fn default() -> Self {
        BackendConfig::Advisory(AdvisoryConfig {})
    }
}

/// `kind = "advisory"`: no other keys.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvisoryConfig {}

/// `kind = "netns"`: the keys of the emulated data centre's backend.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetnsConfig {
    /// Host address -> name of that host's network namespace
    /// (`"198.18.0.11" = "dc-h1"`). Every host a VM may move to.
    pub hosts: BTreeMap<String, String>,
    /// A VM's namespace is this prefix followed by its IPv4 address
    /// (`dcvm-198.18.1.5`).
    #[serde(default = "defaults::vm_netns_prefix")]
    pub vm_netns_prefix: String,
    /// The VM's interface inside its namespace, the far end of its vif.
    #[serde(default = "defaults::vm_iface")]
    pub vm_iface: String,
    /// The bridge of every host namespace that vifs are attached to.
    #[serde(default = "defaults::bridge")]
    pub bridge: String,
    /// Announce the VM at its new place with a gratuitous ARP sent from
    /// its own interface, so that bridges relearn where its MAC lives.
    #[serde(default = "defaults::gratuitous_arp")]
    pub gratuitous_arp: bool,
    /// Longest time one migration may take.
    #[serde(default = "defaults::netns_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// `kind = "xl"`: the keys of the Xen backend.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XlConfig {
    /// The `xl` command: a path, or a name looked up in `PATH`.
    #[serde(default = "defaults::xl_path")]
    pub xl_path: PathBuf,
    /// Host address -> the name `xl migrate` is given for it (what ssh
    /// connects to). A host not listed is given as its address.
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
    /// Options put before `DOMAIN HOST` on `xl migrate`'s command line,
    /// e.g. `["-s", "ssh -o BatchMode=yes"]`.
    #[serde(default)]
    pub migrate_options: Vec<String>,
    /// Longest time one migration may take, `xl list` included.
    #[serde(default = "defaults::xl_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// `kind = "qemu"`: the keys of the QEMU backend.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// A glob matching the QMP sockets of the guests this host runs
    /// (`/run/score-qemu/h1/*.qmp`); the VM is the running guest whose
    /// NIC has the VM's MAC.
    pub qmp_sockets: String,
    /// The incoming helper: program and leading arguments; the agent adds
    /// `TARGET VM_IP VM_MAC TAP` and reads `uri=` and `qmp=` lines from
    /// its stdout (docs/BACKENDS.md, "Real guests").
    pub incoming_helper: Vec<String>,
    /// Host address -> the name the helper is given for that host. Every
    /// host a VM may move to.
    pub hosts: BTreeMap<String, String>,
    /// Longest time the helper may take to have the target listening.
    #[serde(default = "defaults::qemu_helper_timeout", with = "humantime_serde")]
    pub helper_timeout: Duration,
    /// Longest time one migration may take, helper included.
    #[serde(default = "defaults::xl_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

mod defaults {
    use std::{path::PathBuf, time::Duration};

    pub fn vm_netns_prefix() -> String {
        "dcvm-".into()
    }
    pub fn vm_iface() -> String {
        "eth0".into()
    }
    pub fn bridge() -> String {
        "br0".into()
    }
    pub fn gratuitous_arp() -> bool {
        true
    }
    // Relinking a veth takes 10-35 ms (TESTBED.md); 10 s means the
    // machine is wedged, not busy.
    pub fn netns_timeout() -> Duration {
        Duration::from_secs(10)
    }
    // Starting QEMU takes well under a second; an incoming helper that
    // reaches its host over ssh adds a connection set-up.
    pub fn qemu_helper_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn xl_path() -> PathBuf {
        PathBuf::from("xl")
    }
    // The paper measured mean migration times of 2.9-9.3 s depending on
    // background traffic (§IV-F, Fig. 4b); a guest with a high dirty rate
    // can take minutes.
    pub fn xl_timeout() -> Duration {
        Duration::from_secs(300)
    }
}

impl BackendConfig {
    /// The backend kind, as written in `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Netns(_) => "netns",
            BackendConfig::Advisory(_) => "advisory",
            BackendConfig::Xl(_) => "xl",
            BackendConfig::Qemu(_) => "qemu",
            BackendConfig::Libvirt(_) => "libvirt",
        }
    }

    /// Checks every key; touches nothing outside the value itself.
    pub fn validate(&self) -> Result<(), BackendConfigError> {
        match self {
            BackendConfig::Advisory(_) => Ok(()),
            BackendConfig::Netns(c) => c.validate(),
            BackendConfig::Xl(c) => c.validate(),
            BackendConfig::Qemu(c) => c.validate(),
            BackendConfig::Libvirt(c) => c.validate(),
        }
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> BackendConfigError {
    BackendConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Parses a `hosts` table's keys into addresses; `check` vets each value.
fn parse_hosts(
    hosts: &BTreeMap<String, String>,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<BTreeMap<Ipv4Addr, String>, BackendConfigError> {
    let mut out = BTreeMap::new();
    for (addr, value) in hosts {
        let key = format!("backend.hosts.\"{addr}\"");
        let ip: Ipv4Addr = addr
            .parse()
            .map_err(|_| invalid(&key, "the key must be a host's IPv4 address"))?;
        check(value).map_err(|reason| invalid(&key, reason))?;
        if out.insert(ip, value.clone()).is_some() {
            return Err(invalid(key, "this address is listed twice"));
        }
    }
    Ok(out)
}

/// An interface name the kernel accepts: 1-15 bytes, no `/`, no blanks.
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("`{name}` is not an interface name (1 to 15 bytes)"));
    }
    if name.contains(['/', ':']) || name.chars().any(char::is_whitespace) || name == "." {
        return Err(format!("`{name}` is not an interface name"));
    }
    Ok(())
}

/// A namespace name `ip netns` accepts: a file name under /run/netns.
fn check_netns_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 || name == "." || name == ".." || name.contains('/') {
        return Err(format!("`{name}` is not a network namespace name"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{name}` is not a network namespace name"));
    }
    Ok(())
}

fn check_timeout(t: Duration) -> Result<(), BackendConfigError> {
    if t.is_zero() {
        return Err(invalid("backend.timeout", "must be greater than zero"));
    }
    Ok(())
}

impl NetnsConfig {
    /// Checks every key.
    pub fn validate(&self) -> Result<(), BackendConfigError> {
        self.parsed_hosts().map(|_| ())?;
        if self.hosts.is_empty() {
            return Err(invalid(
                "backend.hosts",
                "list every host a VM may move to (address = namespace)",
            ));
        }
        // The prefix plus a dotted quad (15 bytes) must still be a name.
        check_netns_name(&format!("{}255.255.255.255", self.vm_netns_prefix))
            .map_err(|reason| invalid("backend.vm_netns_prefix", reason))?;
        check_ifname(&self.vm_iface).map_err(|reason| invalid("backend.vm_iface", reason))?;
        check_ifname(&self.bridge).map_err(|reason| invalid("backend.bridge", reason))?;
        check_timeout(self.timeout)
    }

    pub(crate) fn parsed_hosts(&self) -> Result<BTreeMap<Ipv4Addr, String>, BackendConfigError> {
        parse_hosts(&self.hosts, check_netns_name)
    }
}

/// A host name safe to hand to `xl migrate`, which pastes it into a
/// `sh -c` command line (`exec ssh HOST xl migrate-receive`).
fn check_xl_host(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-@[]".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a host name xl can pass to its shell (letters, digits, `._:-@[]`)"
        ))
    }
}

/// `xl migrate` options that take a value (tools/xl/xl_migrate.c:
/// getopt string "FC:s:epD").
const XL_OPTIONS_WITH_VALUE: [&str; 2] = ["-s", "-C"];

impl XlConfig {
    /// Checks every key.
    pub fn validate(&self) -> Result<(), BackendConfigError> {
        self.parsed_hosts()?;
        if self.xl_path.as_os_str().is_empty() {
            return Err(invalid("backend.xl_path", "must not be empty"));
        }
        let mut expect_value = false;
        for (i, opt) in self.migrate_options.iter().enumerate() {
            let key = format!("backend.migrate_options[{i}]");
            if expect_value {
                expect_value = false;
                continue;
            }
            if !opt.starts_with('-') || opt == "-" || opt == "--" {
                return Err(invalid(
                    key,
                    format!("`{opt}` is not an option: the domain and host are added by the agent"),
                ));
            }
            expect_value = XL_OPTIONS_WITH_VALUE.contains(&opt.as_str());
        }
        if expect_value {
            return Err(invalid(
                format!(
                    "backend.migrate_options[{}]",
                    self.migrate_options.len() - 1
                ),
                "this option needs a value after it",
            ));
        }
        check_timeout(self.timeout)
    }

    pub(crate) fn parsed_hosts(&self) -> Result<BTreeMap<Ipv4Addr, String>, BackendConfigError> {
        parse_hosts(&self.hosts, check_xl_host)
    }
}

impl QemuConfig {
    /// Checks every key.
    pub fn validate(&self) -> Result<(), BackendConfigError> {
        self.parsed_hosts()?;
        if self.hosts.is_empty() {
            return Err(invalid(
                "backend.hosts",
                "list every host a VM may move to (address = name for the helper)",
            ));
        }
        if self.qmp_sockets.is_empty() {
            return Err(invalid("backend.qmp_sockets", "must not be empty"));
        }
        glob::Pattern::new(&self.qmp_sockets)
            .map_err(|e| invalid("backend.qmp_sockets", format!("not a glob pattern: {e}")))?;
        match self.incoming_helper.first() {
            None => {
                return Err(invalid(
                    "backend.incoming_helper",
                    "name the program that starts the incoming QEMU on a target host",
                ));
            }
            Some(p) if p.is_empty() => {
                return Err(invalid("backend.incoming_helper[0]", "must not be empty"));
            }
            Some(_) => {}
        }
        if self.helper_timeout.is_zero() {
            return Err(invalid(
                "backend.helper_timeout",
                "must be greater than zero",
            ));
        }
        check_timeout(self.timeout)
    }

    pub(crate) fn parsed_hosts(&self) -> Result<BTreeMap<Ipv4Addr, String>, BackendConfigError> {
        // Passed as one argument, never through a shell: any printable name.
        parse_hosts(&self.hosts, |name| {
            if name.is_empty() || name.starts_with('-') || name.chars().any(|c| c.is_control()) {
                Err(format!("`{name}` is not a host name to pass to the helper"))
            } else {
                Ok(())
            }
        })
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

    fn parse(text: &str) -> Result<BackendConfig, String> {
        toml::from_str::<BackendConfig>(text).map_err(|e| e.message().to_owned())
    }

    /// A `[backend]` table that must parse.
    pub(super) fn config(text: &str) -> BackendConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn netns_defaults_and_validation() {
        let c = parse(
            r#"
            kind = "netns"
            hosts = { "198.18.0.11" = "dc-h1", "198.18.0.12" = "dc-h2" }
            "#,
        )
        .unwrap();
        let BackendConfig::Netns(n) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(n.vm_netns_prefix, "dcvm-");
        assert_eq!(n.bridge, "br0");
        assert_eq!(n.vm_iface, "eth0");
        assert!(n.gratuitous_arp);
        assert_eq!(n.timeout, Duration::from_secs(10));
        c.validate().unwrap();
        let hosts = n.parsed_hosts().unwrap();
        assert_eq!(hosts[&Ipv4Addr::new(198, 18, 0, 12)], "dc-h2");
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused() {
        let e = parse("kind = \"netns\"\nhosts = {}\nbridg = \"br1\"").unwrap_err();
        assert!(e.contains("bridg"), "{e}");
        let e = parse("kind = \"hyperv\"").unwrap_err();
        assert!(e.contains("hyperv"), "{e}");
        let e = parse("kind = \"advisory\"\ntimeout = \"1s\"").unwrap_err();
        assert!(e.contains("timeout"), "{e}");
    }

    /// The key an invalid configuration names (shared with the backends'
    /// own configuration tests).
    pub(super) fn key_of(e: BackendConfigError) -> String {
        match e {
            BackendConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn invalid_values_name_their_key() {
        let bad = |text: &str| key_of(parse(text).unwrap().validate().unwrap_err());
        assert_eq!(
            bad("kind = \"netns\"\nhosts = { \"h1\" = \"dc-h1\" }"),
            "backend.hosts.\"h1\""
        );
        assert_eq!(
            bad("kind = \"netns\"\nhosts = { \"198.18.0.1\" = \"a/b\" }"),
            "backend.hosts.\"198.18.0.1\""
        );
        assert_eq!(bad("kind = \"netns\"\nhosts = {}"), "backend.hosts");
        assert_eq!(
            bad(
                "kind = \"netns\"\nhosts = { \"198.18.0.1\" = \"a\" }\nbridge = \"a very long bridge\""
            ),
            "backend.bridge"
        );
        assert_eq!(
            bad("kind = \"netns\"\nhosts = { \"198.18.0.1\" = \"a\" }\ntimeout = \"0s\""),
            "backend.timeout"
        );
        assert_eq!(
            bad("kind = \"xl\"\nhosts = { \"198.18.0.1\" = \"h; rm -rf /\" }"),
            "backend.hosts.\"198.18.0.1\""
        );
        assert_eq!(
            bad("kind = \"xl\"\nmigrate_options = [\"-s\", \"ssh\", \"vm1\"]"),
            "backend.migrate_options[2]"
        );
        assert_eq!(
            bad("kind = \"xl\"\nmigrate_options = [\"-e\", \"-s\"]"),
            "backend.migrate_options[1]"
        );
    }

    #[test]
    fn xl_config_accepts_options_with_values() {
        let c = parse(
            r#"
            kind = "xl"
            xl_path = "/usr/sbin/xl"
            hosts = { "198.18.0.12" = "xen-h2.example" }
            migrate_options = ["-s", "ssh -o BatchMode=yes", "--debug"]
            timeout = "2m"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let BackendConfig::Xl(x) = c else { panic!() };
        assert_eq!(x.timeout, Duration::from_secs(120));
    }

    #[test]
    fn default_is_advisory() {
        assert_eq!(BackendConfig::default().kind(), "advisory");
        assert!(
            Backend::from_config(&BackendConfig::default())
                .unwrap()
                .is_advisory()
        );
    }

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
