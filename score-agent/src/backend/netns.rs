//! The netns backend: migration in the emulated data centre, where hosts
//! and VMs are network namespaces (TESTBED.md, "Namespaces as hosts and
//! VMs"). The agent runs inside its host's namespace; moving VM u to host
//! B moves u's vif into B's namespace and onto B's bridge, keeping the
//! VM's address, MAC and processes, then announces u with a gratuitous ARP
//! from u's own interface so that every bridge relearns where u lives.
//!
//! Commands are `ip -n NAMESPACE ...` (iproute2), each bounded by the
//! migration's time-out. A move that fails half-way is rolled back: the vif
//! goes back into this host's namespace, onto its bridge, up.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::{
    BackendConfigError, BackendError, HostRef, MigrationReport, NetnsConfig, Placement, VmRef,
    format_mac, process,
};

/// Where `ip netns` keeps its namespaces (iproute2's NETNS_RUN_DIR).
const NETNS_DIR: &str = "/var/run/netns";

/// What went wrong moving or announcing a VM, or finding this host's
/// namespace.
#[derive(Debug, thiserror::Error)]
enum NetnsError {
    /// `ip` could not be run, or failed.
    #[error(transparent)]
    Ip(#[from] process::ProcessError),
    /// `ip -j` printed JSON of another shape.
    #[error("`ip -j link show` printed unexpected JSON: {0}")]
    IpJson(#[from] serde_json::Error),
    /// A file or system call failed; `what` names it and its object.
    #[error("{what}: {source}")]
    Os {
        /// The call or file.
        what: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The namespaces' directory cannot be read.
    #[error("{NETNS_DIR}: {0}: the agent must run in a named namespace (`ip netns exec HOST ...`)")]
    NoNetnsDir(#[source] std::io::Error),
    /// This process's namespace is not one of those named there.
    #[error(
        "this process's network namespace has no name in {NETNS_DIR}: run the agent with `ip netns exec HOST score-agent ...`"
    )]
    Unnamed,
    /// The VM's interface name does not fit the kernel's.
    #[error("interface name {0} too long")]
    IfnameTooLong(String),
    /// The VM's interface did not come up on its new bridge in time.
    #[error("{iface} has no carrier after {after:?}")]
    NoCarrier {
        /// The VM's interface.
        iface: String,
        /// How long it was given.
        after: Duration,
    },
    /// The thread sending the announcement ended without an answer.
    #[error("the announcing thread died")]
    ThreadDied,
}

impl NetnsError {
    /// `what`: the last OS error (errno).
    fn last_os(what: impl Into<String>) -> NetnsError {
        NetnsError::Os {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}

/// How long the recovery after a time-out may take, on top of the
/// time-out itself.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Moves vifs between host namespaces.
#[derive(Debug)]
pub struct NetnsBackend {
    hosts: BTreeMap<Ipv4Addr, String>,
    home: String,
    vm_netns_prefix: String,
    vm_iface: String,
    bridge: String,
    gratuitous_arp: bool,
    timeout: Duration,
}

impl NetnsBackend {
    /// Builds the backend for the namespace this thread runs in, which
    /// must be a named one (`ip netns exec HOST score-agent ...`).
    pub fn from_config(config: &NetnsConfig) -> Result<Self, BackendConfigError> {
        let home = identify_netns().map_err(|e| BackendConfigError::Unavailable {
            kind: "netns",
            reason: e.to_string(),
        })?;
        Self::new(config, home)
    }

    /// Builds the backend for the host namespace named `home` (where the
    /// VMs to migrate are).
    pub fn new(config: &NetnsConfig, home: String) -> Result<Self, BackendConfigError> {
        config.validate()?;
        let hosts = config.parsed_hosts()?;
        let unavailable = |reason: String| BackendConfigError::Unavailable {
            kind: "netns",
            reason,
        };
        if !Path::new(NETNS_DIR).join(&home).exists() {
            return Err(unavailable(format!(
                "this host's namespace {home} is not in {NETNS_DIR}"
            )));
        }
        match std::process::Command::new("ip")
            .arg("-V")
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(unavailable(format!("`ip -V` failed: {}", out.status))),
            Err(e) => return Err(unavailable(format!("cannot run `ip` (iproute2): {e}"))),
        }
        if !hosts.values().any(|ns| *ns == home) {
            tracing::warn!(home = %home, "this host's namespace is not among backend.hosts");
        }
        Ok(NetnsBackend {
            hosts,
            home,
            vm_netns_prefix: config.vm_netns_prefix.clone(),
            vm_iface: config.vm_iface.clone(),
            bridge: config.bridge.clone(),
            gratuitous_arp: config.gratuitous_arp,
            timeout: config.timeout,
        })
    }

    /// The name of this host's namespace.
    pub fn home(&self) -> &str {
        &self.home
    }

    /// Moves `vm`'s vif to host `to`'s namespace and bridge.
    pub async fn migrate(&self, vm: &VmRef, to: &HostRef) -> Result<MigrationReport, BackendError> {
        let refused = |reason: String| BackendError::Refused {
            vm: vm.ip,
            to: to.addr,
            reason,
        };
        let Some(target) = self.hosts.get(&to.addr) else {
            return Err(refused(format!("host {} is not in backend.hosts", to.addr)));
        };
        if *target == self.home {
            return Err(refused(format!("the vm is already on {target}")));
        }
        let start = Instant::now();
        match tokio::time::timeout(self.timeout, self.relink(vm, to, target)).await {
            Ok(result) => result.map(|()| MigrationReport {
                duration: start.elapsed(),
                advisory: false,
            }),
            Err(_) => {
                // The `ip` child in flight was killed with its future; each
                // `ip link set` is one netlink request, so the vif is whole
                // in one namespace or the other.
                let placement = tokio::time::timeout(SETTLE_TIMEOUT, self.settle(vm, target))
                    .await
                    .unwrap_or(Placement::Unknown);
                Err(BackendError::TimedOut {
                    vm: vm.ip,
                    to: to.addr,
                    after: self.timeout,
                    placement,
                })
            }
        }
    }

    async fn relink(&self, vm: &VmRef, to: &HostRef, target: &str) -> Result<(), BackendError> {
        let vif = vm.vif.as_str();
        match link(&self.home, vif).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(BackendError::NotFound {
                    vm: vm.ip,
                    detail: format!("no interface {vif} in namespace {}", self.home),
                });
            }
            Err(e) => {
                return Err(BackendError::Failed {
                    vm: vm.ip,
                    to: to.addr,
                    reason: e.to_string(),
                });
            }
        }
        if let Err(cause) =
            ip(&["-n", &self.home, "link", "set", "dev", vif, "netns", target]).await
        {
            return Err(self.recover(vm, to, target, cause).await);
        }
        // Entering a namespace takes the link down and off any bridge.
        if let Err(cause) = self.attach(target, vif).await {
            return Err(self.recover(vm, to, target, cause).await);
        }
        if self.gratuitous_arp {
            match self.announce(vm).await {
                Ok(mac) if mac != vm.mac => tracing::warn!(
                    vm = %vm.ip,
                    announced = %format_mac(&mac),
                    known = %format_mac(&vm.mac),
                    "the vm's interface has another MAC than the agent knows"
                ),
                Ok(_) => {}
                Err(reason) => {
                    return Err(BackendError::DoneWithError {
                        vm: vm.ip,
                        to: to.addr,
                        reason: format!("gratuitous ARP: {reason}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// After a failed step: puts the vif back at home, attached and up,
    /// and says what happened.
    async fn recover(
        &self,
        vm: &VmRef,
        to: &HostRef,
        target: &str,
        cause: NetnsError,
    ) -> BackendError {
        let undefined = |reason: String| BackendError::Undefined {
            vm: vm.ip,
            to: to.addr,
            reason,
        };
        let vif = vm.vif.as_str();
        let rolled_back = match link(&self.home, vif).await {
            Ok(Some(_)) => false,
            Ok(None) => match link(target, vif).await {
                Ok(Some(_)) => {
                    if let Err(e) =
                        ip(&["-n", target, "link", "set", "dev", vif, "netns", &self.home]).await
                    {
                        return undefined(format!("{cause}; moving the vif back failed: {e}"));
                    }
                    true
                }
                Ok(None) => {
                    return undefined(format!(
                        "{cause}; {vif} is in neither {} nor {target}",
                        self.home
                    ));
                }
                Err(e) => return undefined(format!("{cause}; looking for {vif}: {e}")),
            },
            Err(e) => return undefined(format!("{cause}; looking for {vif}: {e}")),
        };
        if let Err(e) = self.attach(&self.home, vif).await {
            return undefined(format!("{cause}; re-attaching {vif} at home failed: {e}"));
        }
        let how = if rolled_back {
            "moved back and re-attached"
        } else {
            "still attached"
        };
        BackendError::Failed {
            vm: vm.ip,
            to: to.addr,
            reason: format!("{cause} ({vif} {how} to {} in {})", self.bridge, self.home),
        }
    }

    /// After a time-out: where is the vif, and is it whole?
    async fn settle(&self, vm: &VmRef, target: &str) -> Placement {
        let vif = vm.vif.as_str();
        match link(&self.home, vif).await {
            Ok(Some(_)) => {
                return match self.attach(&self.home, vif).await {
                    Ok(()) => Placement::Source,
                    Err(_) => Placement::Unknown,
                };
            }
            Ok(None) => {}
            Err(_) => return Placement::Unknown,
        }
        match link(target, vif).await {
            Ok(Some(l)) if l.is_attached_up(&self.bridge) => Placement::Target,
            _ => Placement::Unknown,
        }
    }

    /// Puts `vif`, in namespace `ns`, on that namespace's bridge, up.
    async fn attach(&self, ns: &str, vif: &str) -> Result<(), NetnsError> {
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "dev",
            vif,
            "master",
            &self.bridge,
            "up",
        ])
        .await
        .map(|_| ())
    }

    /// Sends the gratuitous ARP from inside the VM's namespace, on a thread
    /// of its own: `setns` changes the calling thread, which must not be
    /// one that tokio reuses.
    async fn announce(&self, vm: &VmRef) -> Result<[u8; 6], NetnsError> {
        let netns = PathBuf::from(NETNS_DIR).join(format!("{}{}", self.vm_netns_prefix, vm.ip));
        let iface = self.vm_iface.clone();
        let ip = vm.ip;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("score-garp".into())
            .spawn(move || {
                let _ = tx.send(garp::announce(&netns, &iface, ip));
            })
            .map_err(|source| NetnsError::Os {
                what: "spawning a thread".into(),
                source,
            })?;
        rx.await.map_err(|_| NetnsError::ThreadDied)?
    }
}

/// The part of `ip -j link show` the backend reads.
#[derive(Debug, Deserialize)]
struct IpLink {
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    flags: Vec<String>,
}

impl IpLink {
    fn is_attached_up(&self, bridge: &str) -> bool {
        self.master.as_deref() == Some(bridge) && self.flags.iter().any(|f| f == "UP")
    }
}

/// Runs `ip ARGS`; returns its stdout. The child dies with the future
/// (a time-out).
async fn ip(args: &[&str]) -> Result<String, NetnsError> {
    Ok(process::run_ok(Path::new("ip"), args, None, 2).await?)
}

/// The link `vif` in namespace `ns`, or `None` if there is no such link.
async fn link(ns: &str, vif: &str) -> Result<Option<IpLink>, NetnsError> {
    match ip(&["-j", "-n", ns, "link", "show", "dev", vif]).await {
        Ok(json) => {
            let links: Vec<IpLink> = serde_json::from_str(&json)?;
            Ok(links.into_iter().next())
        }
        // iproute2: `Device "X" does not exist.`
        Err(NetnsError::Ip(process::ProcessError::Failed { message, .. }))
            if message.contains("does not exist") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The name under /var/run/netns of this thread's network namespace (what
/// `ip netns identify` prints).
fn identify_netns() -> Result<String, NetnsError> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/thread-self/ns/net").map_err(|source| NetnsError::Os {
        what: "/proc/thread-self/ns/net".into(),
        source,
    })?;
    let entries = std::fs::read_dir(NETNS_DIR).map_err(NetnsError::NoNetnsDir)?;
    for entry in entries.flatten() {
        if let Ok(m) = std::fs::metadata(entry.path())
            && m.dev() == me.dev()
            && m.ino() == me.ino()
        {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err(NetnsError::Unnamed)
}

/// A gratuitous ARP sent on a raw packet socket, as `arping -U` does but
/// without depending on which of Debian's two `arping` packages (with
/// different flags) is installed, and without its one-second wait.
mod garp {
    use std::{
        fs::File,
        net::Ipv4Addr,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        path::Path,
        time::{Duration, Instant},
    };

    use super::NetnsError;

    /// How long to wait for the VM's interface to see carrier again after
    /// its vif came up on the new bridge.
    const CARRIER_WAIT: Duration = Duration::from_secs(1);

    /// Enters `netns` (this thread only: it must be a thread of its own),
    /// and broadcasts "`ip` is at MAC-of-`iface`" twice, as an ARP request
    /// and as an ARP reply, since hosts differ in which they learn from.
    /// Returns the MAC announced.
    pub(super) fn announce(netns: &Path, iface: &str, ip: Ipv4Addr) -> Result<[u8; 6], NetnsError> {
        let ns = File::open(netns).map_err(|source| NetnsError::Os {
            what: netns.display().to_string(),
            source,
        })?;
        // SAFETY: a valid namespace fd; setns changes only this thread,
        // which was spawned for this call and ends with it.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetnsError::last_os(format!("entering {}", netns.display())));
        }
        let proto = (libc::ETH_P_ARP as u16).to_be();
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(NetnsError::last_os("packet socket"));
        }
        // SAFETY: fd was just returned by socket(2) and is owned here.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };

        let mut req = ifreq(iface)?;
        ioctl(&sock, libc::SIOCGIFINDEX, &mut req, iface)?;
        // SAFETY: SIOCGIFINDEX filled the ifindex member.
        let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
        ioctl(&sock, libc::SIOCGIFHWADDR, &mut req, iface)?;
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
        let mac: [u8; 6] = std::array::from_fn(|i| hw[i] as u8);

        // Moving the vif dropped the VM's carrier; a frame sent before the
        // kernel has re-activated the queue is silently lost.
        let deadline = Instant::now() + CARRIER_WAIT;
        loop {
            ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, iface)?;
            // SAFETY: SIOCGIFFLAGS filled the flags member.
            let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
            if flags & libc::IFF_RUNNING != 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(NetnsError::NoCarrier {
                    iface: iface.into(),
                    after: CARRIER_WAIT,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }

        for op in [1u16, 2] {
            let frame = frame(mac, ip, op);
            // SAFETY: sockaddr_ll is plain data; zero is a valid value.
            let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_protocol = proto;
            to.sll_ifindex = ifindex;
            to.sll_halen = 6;
            to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
            // SAFETY: buffer and address are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                return Err(NetnsError::last_os(format!("sending on {iface}")));
            }
        }
        Ok(mac)
    }

    fn ifreq(iface: &str) -> Result<libc::ifreq, NetnsError> {
        // SAFETY: ifreq is plain data; zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if iface.len() >= req.ifr_name.len() {
            return Err(NetnsError::IfnameTooLong(iface.into()));
        }
        for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl(
        sock: &OwnedFd,
        request: libc::c_ulong,
        req: &mut libc::ifreq,
        iface: &str,
    ) -> Result<(), NetnsError> {
        // SAFETY: the three requests used here read and write one ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) } != 0 {
            return Err(NetnsError::last_os(iface));
        }
        Ok(())
    }

    /// An Ethernet broadcast frame carrying a gratuitous ARP: sender and
    /// target protocol address are both `ip` (RFC 5227, section 3).
    pub(super) fn frame(mac: [u8; 6], ip: Ipv4Addr, op: u16) -> [u8; 42] {
        let mut f = [0u8; 42];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        f[18] = 6;
        f[19] = 4;
        f[20..22].copy_from_slice(&op.to_be_bytes());
        f[22..28].copy_from_slice(&mac);
        f[28..32].copy_from_slice(&ip.octets());
        // Target hardware address: zero in a request, broadcast in a reply.
        if op == 2 {
            f[32..38].copy_from_slice(&[0xff; 6]);
        }
        f[38..42].copy_from_slice(&ip.octets());
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_frame_layout() {
        let mac = [0x02, 0, 0, 0, 1, 5];
        let ip = Ipv4Addr::new(198, 18, 1, 5);
        let f = garp::frame(mac, ip, 1);
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac, "source MAC");
        assert_eq!(&f[12..14], &[0x08, 0x06], "ethertype ARP");
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1], "request");
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &ip.octets());
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &ip.octets(), "target IP = sender IP");
        let r = garp::frame(mac, ip, 2);
        assert_eq!(&r[20..22], &[0, 2], "reply");
        assert_eq!(&r[32..38], &[0xff; 6]);
    }

    #[test]
    fn reads_ip_json() {
        let links: Vec<IpLink> = serde_json::from_str(
            r#"[{"ifindex":5,"ifname":"vif5.0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,"master":"br0","operstate":"UP"}]"#,
        )
        .unwrap();
        assert!(links[0].is_attached_up("br0"));
        assert!(!links[0].is_attached_up("br1"));
        let down: Vec<IpLink> =
            serde_json::from_str(r#"[{"ifname":"vif5.0","flags":["BROADCAST"]}]"#).unwrap();
        assert!(!down[0].is_attached_up("br0"));
    }
}
