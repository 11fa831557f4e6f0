//! The Linux capabilities the agent needs, checked before it loads anything,
//! so that an agent run with too few privileges says in one line which
//! capability is missing and why, instead of failing later with EPERM from
//! a syscall. The sets were found by trying, one capability taken away at a
//! time (docs/OPERATIONS.md, Least privilege): without CAP_BPF the first map
//! cannot be created, without CAP_NET_ADMIN the kernel refuses to load a TC
//! classifier, and CAP_PERFMON is not needed. The systemd unit grants
//! exactly these.

use std::fmt;

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
/// peer protocol, so no backend).
pub fn required(backend: Option<&str>) -> Vec<Need> {
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
    if backend == Some("netns") {
        v.push(Need {
            cap: CAP_SYS_ADMIN,
            what: "the netns backend moving a VM's link into another host's namespace (setns)",
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

/// The first of `need` not in `effective`.
pub fn first_missing(effective: u64, need: &[Need]) -> Option<Need> {
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

    #[test]
    fn netns_backend_needs_sys_admin_too() {
        let all = (1u64 << 12) | (1 << 39);
        assert_eq!(first_missing(all, &required(Some("advisory"))), None);
        assert_eq!(
            first_missing(all, &required(Some("netns"))).map(|n| n.cap),
            Some(CAP_SYS_ADMIN)
        );
        assert_eq!(first_missing(u64::MAX, &required(Some("netns"))), None);
    }
}
