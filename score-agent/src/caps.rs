//! The Linux capabilities the agent needs, checked before it loads anything,
//! so that an agent run with too few privileges says in one line which
//! capability is missing and why, instead of failing later with EPERM from
//! a syscall. The sets were found by trying, one capability taken away at a
//! time (docs/OPERATIONS.md, Least privilege): without CAP_BPF the first map
//! cannot be created, without CAP_NET_ADMIN the kernel refuses to load a TC
//! classifier, and CAP_PERFMON is not needed. The systemd unit grants
//! exactly these. With the peer protocol the classifiers also intercept
//! control datagrams, and the verifier allows their variable-offset packet
//! access only with CAP_PERFMON ("pointer arithmetic with it prohibited
//! for !root" without it). The netns backend of the test bed needs two
//! more: `ip -n` enters the hosts' namespaces (setns, CAP_SYS_ADMIN), and
//! its gratuitous ARP goes out on a packet socket (CAP_NET_RAW).

use std::fmt;

use crate::backend::BackendConfig;

/// One capability, by its number in linux/capability.h.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Its number (the bit in CapEff).
    pub bit: u8,
    /// Its name, as systemd and setpriv write it.
    pub name: &'static str,
}

/// Administration of the network stack: TC attach, netlink link changes.
pub const CAP_NET_ADMIN: Cap = Cap {
    bit: 12,
    name: "CAP_NET_ADMIN",
};
/// Raw and packet sockets.
pub const CAP_NET_RAW: Cap = Cap {
    bit: 13,
    name: "CAP_NET_RAW",
};
/// Performance monitoring; for the verifier, what lets a program do
/// pointer arithmetic that speculative execution could abuse.
pub const CAP_PERFMON: Cap = Cap {
    bit: 38,
    name: "CAP_PERFMON",
};
/// Namespaces (setns), mounts.
pub const CAP_SYS_ADMIN: Cap = Cap {
    bit: 21,
    name: "CAP_SYS_ADMIN",
};
/// The bpf() syscall: programs, maps, pins.
pub const CAP_BPF: Cap = Cap {
    bit: 39,
    name: "CAP_BPF",
};

/// A capability the agent needs, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    /// The capability.
    pub cap: Cap,
    /// What the agent does with it, said to the operator.
    pub what: &'static str,
}

/// What the agent needs to run with `backend` (`None`: counting only, no
/// peer protocol, so no backend), in the order it is checked.
pub fn required(backend: Option<&BackendConfig>) -> Vec<Need> {
    let mut v = vec![
        Need {
            cap: CAP_BPF,
            what: "creating the eBPF maps, loading the classifiers and pinning the maps",
        },
        Need {
            cap: CAP_NET_ADMIN,
            what: "loading and attaching the TC classifiers on the VM interfaces",
        },
    ];
    if let Some(BackendConfig::Netns(n)) = backend {
        v.push(Need {
            cap: CAP_SYS_ADMIN,
            what: "the netns backend moving a VM's link into another host's namespace (setns)",
        });
        if n.gratuitous_arp {
            v.push(Need {
                cap: CAP_NET_RAW,
                what: "the netns backend's gratuitous ARP from a moved VM (a packet socket; or set backend.gratuitous_arp = false)",
            });
        }
    }
    if backend.is_some() {
        v.push(Need {
            cap: CAP_PERFMON,
            what: "loading the classifiers that intercept the peer protocol's control datagrams (the verifier allows their packet access only with it)",
        });
    }
    v
}

/// The first capability the process lacks.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// A needed capability is not in the effective set.
    #[error(
        "missing capability {}: needed for {}; run as root or grant it (systemd: AmbientCapabilities=, see docs/OPERATIONS.md)",
        need.cap.name,
        need.what
    )]
    Missing {
        /// What is missing and why it is needed.
        need: Need,
    },
    /// The effective set could not be read.
    #[error("reading the process's capabilities from /proc/self/status: {0}")]
    Read(String),
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The effective set from the text of /proc/self/status.
pub fn parse_effective(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The first of `need` not in `effective`. CAP_SYS_ADMIN counts as
/// CAP_PERFMON too, as it does in the kernel (`perfmon_capable()`).
pub fn first_missing(effective: u64, need: &[Need]) -> Option<Need> {
    let sys_admin = 1u64 << CAP_SYS_ADMIN.bit;
    let effective = if effective & sys_admin != 0 {
        effective | (1u64 << CAP_PERFMON.bit)
    } else {
        effective
    };
    need.iter()
        .copied()
        .find(|n| effective & (1u64 << n.cap.bit) == 0)
}

/// Checks this process's effective capabilities against `need`.
pub fn check(need: &[Need]) -> Result<(), CapsError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|e| CapsError::Read(e.to_string()))?;
    let eff = parse_effective(&status).ok_or_else(|| CapsError::Read("no CapEff line".into()))?;
    match first_missing(eff, need) {
        Some(need) => Err(CapsError::Missing { need }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff() {
        let s = "Name:\tscore-agent\nCapInh:\t0000000000000000\nCapPrm:\t000000c000001000\nCapEff:\t000000c000001000\n";
        assert_eq!(parse_effective(s), Some(0xc0_0000_1000));
        assert_eq!(parse_effective("Name: x\n"), None);
    }

    #[test]
    fn names_the_first_missing_capability() {
        let need = required(None);
        let all = (1u64 << 12) | (1 << 39);
        assert_eq!(first_missing(all, &need), None);
        let m = first_missing(all & !(1 << 39), &need).unwrap();
        assert_eq!(m.cap, CAP_BPF);
        let line = CapsError::Missing { need: m }.to_string();
        assert!(line.starts_with("missing capability CAP_BPF: needed for creating the eBPF maps"));
        assert!(!line.contains('\n'));
        assert_eq!(
            first_missing(all & !(1 << 12), &need).map(|n| n.cap),
            Some(CAP_NET_ADMIN)
        );
    }

    fn backend(toml: &str) -> BackendConfig {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn the_peer_protocol_needs_perfmon_too() {
        let count = (1u64 << 12) | (1 << 39);
        let advisory = backend("kind = \"advisory\"");
        let need = required(Some(&advisory));
        assert_eq!(
            first_missing(count, &need).map(|n| n.cap),
            Some(CAP_PERFMON)
        );
        assert_eq!(first_missing(count | (1 << 38), &need), None);
        // CAP_SYS_ADMIN stands in for CAP_PERFMON, as in the kernel.
        assert_eq!(first_missing(count | (1 << 21), &need), None);
        assert_eq!(first_missing(count, &required(None)), None);
    }

    #[test]
    fn netns_backend_needs_sys_admin_and_net_raw_too() {
        let all = (1u64 << 12) | (1 << 39);
        let netns = backend("kind = \"netns\"\nhosts = { \"198.18.0.1\" = \"h1\" }");
        let need = required(Some(&netns));
        assert_eq!(
            first_missing(all, &need).map(|n| n.cap),
            Some(CAP_SYS_ADMIN)
        );
        assert_eq!(
            first_missing(all | (1 << 21), &need).map(|n| n.cap),
            Some(CAP_NET_RAW)
        );
        assert_eq!(first_missing(all | (1 << 21) | (1 << 13), &need), None);
        // Without the gratuitous ARP no packet socket is opened.
        let quiet = backend(
            "kind = \"netns\"\nhosts = { \"198.18.0.1\" = \"h1\" }\ngratuitous_arp = false",
        );
        assert_eq!(
            first_missing(all | (1 << 21), &required(Some(&quiet))),
            None
        );
    }
}
