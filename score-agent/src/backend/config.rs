//! The `[backend]` table of the agent's file: one settings type per
//! backend kind, their defaults (written once, in the `defaults` module), and their
//! validation, which checks every key without touching the system.
//! [`super::Backend::from_config`] then checks what the host must provide.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use serde::Deserialize;

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
    #[serde(default = "defaults::yes")]
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
    #[serde(default = "defaults::migration_timeout", with = "humantime_serde")]
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
    #[serde(default = "defaults::migration_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

mod defaults {
    use std::{path::PathBuf, time::Duration};

    pub(super) fn vm_netns_prefix() -> String {
        "dcvm-".into()
    }
    pub(super) fn vm_iface() -> String {
        "eth0".into()
    }
    pub(super) fn bridge() -> String {
        "br0".into()
    }
    // Relinking a veth takes 10-35 ms (TESTBED.md); 10 s means the
    // machine is wedged, not busy.
    pub(super) fn netns_timeout() -> Duration {
        Duration::from_secs(10)
    }
    // Starting QEMU takes well under a second; an incoming helper that
    // reaches its host over ssh adds a connection set-up.
    pub(super) fn qemu_helper_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn xl_path() -> PathBuf {
        PathBuf::from("xl")
    }
    pub(super) fn virsh_path() -> PathBuf {
        PathBuf::from("virsh")
    }
    pub(super) fn libvirt_uri() -> String {
        "qemu:///system".into()
    }
    pub(super) fn yes() -> bool {
        true
    }
    // For every backend that moves real guests (xl, qemu, libvirt): the
    // paper measured mean migration times of 2.9-9.3 s depending on
    // background traffic (§IV-F, Fig. 4b); a guest with a high dirty rate
    // can take minutes.
    pub(super) fn migration_timeout() -> Duration {
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

/// A value refused by one of the checks below; the caller names the key
/// it was read from.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum BadValue {
    /// Longer than the kernel's 15 bytes, or empty.
    #[error("`{0}` is not an interface name (1 to 15 bytes)")]
    IfnameLength(String),
    /// A character the kernel refuses in an interface name.
    #[error("`{0}` is not an interface name")]
    Ifname(String),
    /// Not a file name under /run/netns.
    #[error("`{0}` is not a network namespace name")]
    NetnsName(String),
    /// A character `xl migrate`'s shell command line would read.
    #[error("`{0}` is not a host name xl can pass to its shell (letters, digits, `._:-@[]`)")]
    XlHost(String),
    /// Empty, an option, or with control characters: not a name the qemu
    /// backend's incoming helper can take as its first argument.
    #[error("`{0}` is not a host name to pass to the helper")]
    HelperHost(String),
    /// Not one blank-free argument with a scheme.
    #[error("`{0}` is not a URI (`driver+transport://host/path`, no blanks)")]
    Uri(String),
}

/// Parses a `hosts` table's keys into addresses; `check` vets each value.
fn parse_hosts(
    hosts: &BTreeMap<String, String>,
    check: impl Fn(&str) -> Result<(), BadValue>,
) -> Result<BTreeMap<Ipv4Addr, String>, BackendConfigError> {
    let mut out = BTreeMap::new();
    for (addr, value) in hosts {
        let key = format!("backend.hosts.\"{addr}\"");
        let ip: Ipv4Addr = addr
            .parse()
            .map_err(|_| invalid(&key, "the key must be a host's IPv4 address"))?;
        check(value).map_err(|bad| invalid(&key, bad.to_string()))?;
        if out.insert(ip, value.clone()).is_some() {
            return Err(invalid(key, "this address is listed twice"));
        }
    }
    Ok(out)
}

/// An interface name the kernel accepts: 1-15 bytes, no `/`, no blanks.
fn check_ifname(name: &str) -> Result<(), BadValue> {
    if name.is_empty() || name.len() > 15 {
        return Err(BadValue::IfnameLength(name.into()));
    }
    if name.contains(['/', ':']) || name.chars().any(char::is_whitespace) || name == "." {
        return Err(BadValue::Ifname(name.into()));
    }
    Ok(())
}

/// A namespace name `ip netns` accepts: a file name under /run/netns.
fn check_netns_name(name: &str) -> Result<(), BadValue> {
    if name.is_empty()
        || name.len() > 200
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(BadValue::NetnsName(name.into()));
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
            .map_err(|bad| invalid("backend.vm_netns_prefix", bad.to_string()))?;
        check_ifname(&self.vm_iface).map_err(|bad| invalid("backend.vm_iface", bad.to_string()))?;
        check_ifname(&self.bridge).map_err(|bad| invalid("backend.bridge", bad.to_string()))?;
        check_timeout(self.timeout)
    }

    pub(crate) fn parsed_hosts(&self) -> Result<BTreeMap<Ipv4Addr, String>, BackendConfigError> {
        parse_hosts(&self.hosts, check_netns_name)
    }
}

/// A host name safe to hand to `xl migrate`, which pastes it into a
/// `sh -c` command line (`exec ssh HOST xl migrate-receive`).
fn check_xl_host(name: &str) -> Result<(), BadValue> {
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-@[]".contains(c));
    if ok {
        Ok(())
    } else {
        Err(BadValue::XlHost(name.into()))
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
                Err(BadValue::HelperHost(name.into()))
            } else {
                Ok(())
            }
        })
    }
}

/// `kind = "libvirt"`: the keys of the libvirt backend.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// The `virsh` command: a path, or a name looked up in `PATH`.
    #[serde(default = "defaults::virsh_path")]
    pub virsh_path: PathBuf,
    /// This host's libvirtd, as `virsh -c` takes it.
    #[serde(default = "defaults::libvirt_uri")]
    pub uri: String,
    /// Host address -> that host's libvirt URI as seen from this host
    /// (`"10.0.0.12" = "qemu+tcp://10.0.0.12/system"`). Every host a VM
    /// may move to.
    pub hosts: BTreeMap<String, String>,
    /// Host address -> where QEMU sends the migration stream for that
    /// host (`--migrateuri`, e.g. `tcp://10.0.0.12`). A host not listed
    /// lets the target's libvirtd choose (its `migration_host` in
    /// qemu.conf, else its host name).
    #[serde(default)]
    pub migrate_uris: BTreeMap<String, String>,
    /// `--persistent`: the domain is defined at the target, not only run.
    #[serde(default = "defaults::yes")]
    pub persistent: bool,
    /// `--undefinesource`: the source forgets the domain's definition.
    #[serde(default = "defaults::yes")]
    pub undefine_source: bool,
    /// More `virsh migrate` options (`--p2p`, `--auto-converge`,
    /// `--bandwidth`, `100`...). The ones the agent sets itself are refused.
    #[serde(default)]
    pub migrate_options: Vec<String>,
    /// Longest time one migration may take, finding the domain included;
    /// then the job is aborted.
    #[serde(default = "defaults::migration_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// `virsh migrate` options that take a value (virsh-domain.c,
/// `opts_migrate`), so that the value is not mistaken for a stray word.
const LIBVIRT_OPTIONS_WITH_VALUE: &[&str] = &[
    "--bandwidth",
    "--comp-methods",
    "--comp-mt-dthreads",
    "--comp-mt-level",
    "--comp-mt-threads",
    "--comp-xbzrle-cache",
    "--comp-zlib-level",
    "--comp-zstd-level",
    "--auto-converge-increment",
    "--auto-converge-initial",
    "--disks-port",
    "--disks-uri",
    "--dname",
    "--graphicsuri",
    "--listen-address",
    "--migrate-disks",
    "--parallel-connections",
    "--persistent-xml",
    "--timeout",
    "--tls-destination",
    "--xml",
];

/// Options the agent sets itself, from its own keys.
const LIBVIRT_OPTIONS_OF_THE_AGENT: &[&str] = &[
    "--live",
    "--offline",
    "--persistent",
    "--undefinesource",
    "--migrateuri",
    "--domain",
    "--desturi",
];

/// A libvirt URI or `--migrateuri` value safe to pass as one argument.
fn check_uri(text: &str) -> Result<(), BadValue> {
    if text.is_empty()
        || text.starts_with('-')
        || !text.contains(':')
        || text.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(BadValue::Uri(text.into()));
    }
    Ok(())
}

impl LibvirtConfig {
    /// Checks every key; touches nothing outside the value itself.
    pub fn validate(&self) -> Result<(), BackendConfigError> {
        self.parsed_hosts()?;
        if self.hosts.is_empty() {
            return Err(invalid(
                "backend.hosts",
                "list every host a VM may move to (address = libvirt URI)",
            ));
        }
        self.parsed_migrate_uris()?;
        if self.virsh_path.as_os_str().is_empty() {
            return Err(invalid("backend.virsh_path", "must not be empty"));
        }
        check_uri(&self.uri).map_err(|bad| invalid("backend.uri", bad.to_string()))?;
        let mut expect_value = false;
        for (i, opt) in self.migrate_options.iter().enumerate() {
            let key = format!("backend.migrate_options[{i}]");
            if expect_value {
                expect_value = false;
                continue;
            }
            let name = opt.split('=').next().unwrap_or(opt);
            if !name.starts_with("--") || name == "--" {
                return Err(invalid(
                    key,
                    format!(
                        "`{opt}` is not a `--option`: the domain and target are added by the agent"
                    ),
                ));
            }
            if LIBVIRT_OPTIONS_OF_THE_AGENT.contains(&name) {
                return Err(invalid(
                    key,
                    format!(
                        "`{name}` is set by the agent (see persistent, undefine_source, migrate_uris)"
                    ),
                ));
            }
            expect_value = !opt.contains('=') && LIBVIRT_OPTIONS_WITH_VALUE.contains(&name);
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
        if self.timeout.is_zero() {
            return Err(invalid("backend.timeout", "must be greater than zero"));
        }
        Ok(())
    }

    pub(crate) fn parsed_hosts(&self) -> Result<BTreeMap<Ipv4Addr, String>, BackendConfigError> {
        parse_hosts(&self.hosts, check_uri)
    }

    pub(crate) fn parsed_migrate_uris(
        &self,
    ) -> Result<BTreeMap<Ipv4Addr, String>, BackendConfigError> {
        parse_hosts(&self.migrate_uris, check_uri).map_err(|e| match e {
            BackendConfigError::Invalid { key, reason } => BackendConfigError::Invalid {
                key: key.replacen("backend.hosts", "backend.migrate_uris", 1),
                reason,
            },
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

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

    #[test]
    fn libvirt_config_defaults_and_validation() {
        let c = config(
            r#"
            kind = "libvirt"
            hosts = { "10.0.0.12" = "qemu+tcp://10.0.0.12/system" }
            "#,
        );
        c.validate().unwrap();
        assert_eq!(c.kind(), "libvirt");
        let BackendConfig::Libvirt(l) = &c else {
            panic!()
        };
        assert_eq!(l.uri, "qemu:///system");
        assert!(l.persistent && l.undefine_source);
        assert_eq!(l.timeout, std::time::Duration::from_secs(300));
        assert_eq!(l.virsh_path, std::path::PathBuf::from("virsh"));

        let c = config(
            r#"
            kind = "libvirt"
            uri = "qemu+unix:///system?socket=/run/h1/libvirt-sock"
            hosts = { "10.0.0.12" = "qemu+ssh://root@h2/system" }
            migrate_uris = { "10.0.0.12" = "tcp://10.0.0.12" }
            migrate_options = ["--p2p", "--bandwidth", "100", "--comp-methods=xbzrle", "--auto-converge"]
            persistent = false
            timeout = "2m"
            "#,
        );
        c.validate().unwrap();

        let bad = |extra: &str| {
            key_of(config(&format!(
                "kind = \"libvirt\"\nhosts = {{ \"10.0.0.12\" = \"qemu+tcp://10.0.0.12/system\" }}\n{extra}"
            ))
            .validate()
            .unwrap_err())
        };
        assert_eq!(bad("timeout = \"0s\""), "backend.timeout");
        assert_eq!(bad("uri = \"qemu system\""), "backend.uri");
        assert_eq!(
            bad("migrate_uris = { \"10.0.0.12\" = \"-x\" }"),
            "backend.migrate_uris.\"10.0.0.12\""
        );
        assert_eq!(
            bad("migrate_uris = { \"h2\" = \"tcp://h2\" }"),
            "backend.migrate_uris.\"h2\""
        );
        assert_eq!(
            bad("migrate_options = [\"--live\"]"),
            "backend.migrate_options[0]"
        );
        assert_eq!(
            bad("migrate_options = [\"--p2p\", \"vm1\"]"),
            "backend.migrate_options[1]"
        );
        assert_eq!(
            bad("migrate_options = [\"--bandwidth\"]"),
            "backend.migrate_options[0]"
        );
        assert_eq!(bad("virsh_path = \"\""), "backend.virsh_path");
        assert_eq!(
            key_of(
                config("kind = \"libvirt\"\nhosts = {}")
                    .validate()
                    .unwrap_err()
            ),
            "backend.hosts"
        );
        assert_eq!(
            key_of(
                config("kind = \"libvirt\"\nhosts = { \"10.0.0.12\" = \"h2\" }")
                    .validate()
                    .unwrap_err()
            ),
            "backend.hosts.\"10.0.0.12\""
        );
        let e =
            toml::from_str::<BackendConfig>("kind = \"libvirt\"\nhosts = {}\nqmp_sockets = \"/q\"")
                .unwrap_err();
        assert!(e.message().contains("qmp_sockets"), "{e}");
    }

    #[test]
    fn qemu_config_defaults_and_validation() {
        let c = config(
            r#"
            kind = "qemu"
            qmp_sockets = "/run/score-qemu/h1/*.qmp"
            incoming_helper = ["/usr/local/bin/score-qemu-vm", "incoming"]
            hosts = { "198.18.0.12" = "h2" }
            "#,
        );
        c.validate().unwrap();
        assert_eq!(c.kind(), "qemu");
        let BackendConfig::Qemu(q) = &c else { panic!() };
        assert_eq!(q.helper_timeout, std::time::Duration::from_secs(30));
        assert_eq!(q.timeout, std::time::Duration::from_secs(300));
        let bad = |extra: &str, helper: &str| {
            key_of(config(&format!(
                "kind = \"qemu\"\nqmp_sockets = \"/q/*.qmp\"\nincoming_helper = {helper}\n{extra}"
            ))
            .validate()
            .unwrap_err())
        };
        assert_eq!(bad("hosts = {}", "[\"x\"]"), "backend.hosts");
        assert_eq!(
            bad("hosts = { \"198.18.0.1\" = \"-o\" }", "[\"x\"]"),
            "backend.hosts.\"198.18.0.1\""
        );
        assert_eq!(
            bad("hosts = { \"198.18.0.1\" = \"h\" }", "[]"),
            "backend.incoming_helper"
        );
        assert_eq!(
            bad(
                "hosts = { \"198.18.0.1\" = \"h\" }\ntimeout = \"0s\"",
                "[\"x\"]"
            ),
            "backend.timeout"
        );
        let e = toml::from_str::<BackendConfig>("kind = \"qemu\"\nqmp_sockets = \"/q\"\nhosts = {}\nincoming_helper = [\"x\"]\nxl_path = \"xl\"")
            .unwrap_err();
        assert!(e.message().contains("xl_path"), "{e}");
    }
}
