//! The host's kernel settings that a flat L2 network of many VMs needs,
//! raised by `testbed up` and put back by `down`.
//!
//! The neighbour (ARP, and IPv6 ND) tables are the host's: one table per
//! protocol, shared by every network namespace, with its limits
//! `net.ipv4.neigh.default.gc_thresh1/2/3` visible only in the root
//! namespace. Below `gc_thresh1` entries are never collected; above
//! `gc_thresh2` those older than 5 s are; at `gc_thresh3` a new entry
//! fails (`table_fulls` in /proc/net/stat/arp_cache) and the packet that
//! needed it is dropped. The kernel's defaults (128/512/1024) fit one
//! small host. On the test bed every host namespace may resolve every host
//! (the peer protocol) and, through location requests and flow reports,
//! every VM address: 64 hosts x 4 VMs may need about 64 x 320 = 20,480
//! entries, where the defaults allow 1,024 (docs/TESTBED.md, "Many VMs on
//! one flat L2 network").

use std::fs;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::plan::Sizes;

/// The neighbour tables' limits, root namespace: IPv4 (ARP), IPv6 (ND).
const NEIGH: [&str; 2] = [
    "/proc/sys/net/ipv4/neigh/default",
    "/proc/sys/net/ipv6/neigh/default",
];

/// One setting changed by `up`: what it was, what `up` wrote.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Setting {
    /// Its file under /proc/sys.
    pub path: String,
    /// Its value before `up`.
    pub before: u64,
    /// The value `up` wrote.
    pub set: u64,
}

/// Neighbour entries the data centre of `sizes` may hold at once over all
/// its namespaces: every host namespace may resolve every host and every
/// VM address; every VM its few peers and its host (16 is generous for the
/// test bed's traffic plans).
pub(crate) fn neighbours_needed(sizes: &Sizes) -> u64 {
    let (hosts, vms) = (u64::from(sizes.hosts()), u64::from(sizes.vms()));
    hosts * (hosts + vms) + vms * 16
}

/// The limits for `needed` entries: nothing of the working set is ever
/// collected (`gc_thresh1`), the soft and hard limits leave it room to
/// double and quadruple (VMs that move are resolved anew).
pub(crate) fn neighbour_limits(needed: u64) -> [(&'static str, u64); 3] {
    [
        ("gc_thresh1", needed),
        ("gc_thresh2", 2 * needed),
        ("gc_thresh3", 4 * needed),
    ]
}

/// Every neighbour-table limit with its value now.
pub(crate) fn neighbour_limits_now() -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for dir in NEIGH {
        for (name, _) in neighbour_limits(0) {
            let path = format!("{dir}/{name}");
            out.push((path.clone(), read(&path)?));
        }
    }
    Ok(out)
}

/// Whether every neighbour-table limit is at least what `sizes` needs;
/// the first one short, with its value, if not.
pub(crate) fn short_of(sizes: &Sizes) -> Result<Option<(String, u64, u64)>> {
    let want = neighbour_limits(neighbours_needed(sizes));
    for (path, now) in neighbour_limits_now()? {
        let need = want
            .iter()
            .find(|(name, _)| path.ends_with(name))
            .map_or(0, |(_, v)| *v);
        if now < need {
            return Ok(Some((path, now, need)));
        }
    }
    Ok(None)
}

/// What `up` should write for `sizes`: each limit raised to what the data
/// centre needs, never lowered (a host already set higher keeps its value).
pub(crate) fn wanted(sizes: &Sizes) -> Result<Vec<Setting>> {
    let mut out = Vec::new();
    for dir in NEIGH {
        // The hard limit first when raising: the kernel does not order
        // them, but a reader in between then sees a consistent triple.
        for (name, value) in neighbour_limits(neighbours_needed(sizes)).into_iter().rev() {
            let path = format!("{dir}/{name}");
            let before = read(&path)?;
            if value > before {
                out.push(Setting {
                    path,
                    before,
                    set: value,
                });
            }
        }
    }
    Ok(out)
}

/// Reads a numeric setting.
pub(crate) fn read(path: &str) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("{path}: {:?} is not a number", text.trim()))
}

fn write(path: &str, value: u64) -> Result<()> {
    fs::write(path, value.to_string()).with_context(|| format!("writing {value} to {path}"))
}

/// Writes every setting; if one fails, puts back those already written.
pub(crate) fn raise(settings: &[Setting]) -> Result<()> {
    for (i, s) in settings.iter().enumerate() {
        if let Err(e) = write(&s.path, s.set) {
            restore(&settings[..i]);
            return Err(e);
        }
    }
    Ok(())
}

/// Puts back what `raise` wrote, in reverse order, where the value is
/// still the one written (someone who changed it since keeps theirs);
/// returns the settings left alone, with their value now.
pub(crate) fn restore(settings: &[Setting]) -> Vec<(Setting, Option<u64>)> {
    let mut left = Vec::new();
    for s in settings.iter().rev() {
        match read(&s.path) {
            Ok(now) if now == s.set => {
                if write(&s.path, s.before).is_err() {
                    left.push((s.clone(), Some(now)));
                }
            }
            Ok(now) => left.push((s.clone(), Some(now))),
            Err(_) => left.push((s.clone(), None)),
        }
    }
    left
}

/// The host's neighbour-table overflows so far (`table_fulls` of
/// /proc/net/stat/arp_cache, summed over CPUs): a data centre that
/// outgrew the limits shows it here.
pub(crate) fn arp_table_fulls() -> Result<u64> {
    let path = "/proc/net/stat/arp_cache";
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let col = head
        .iter()
        .position(|h| *h == "table_fulls")
        .with_context(|| format!("no table_fulls in {path}"))?;
    // One line per CPU, hexadecimal.
    Ok(lines
        .filter_map(|l| l.split_whitespace().nth(col))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(hosts_per_rack: u32, vms_per_host: u32) -> Sizes {
        Sizes {
            pods: 2,
            racks_per_pod: 2,
            hosts_per_rack,
            vms_per_host,
            slots: vms_per_host + 2,
        }
    }

    #[test]
    fn limits_grow_with_the_data_centre() {
        // The default 8 hosts x 2 VMs fit the kernel's defaults ...
        let small = neighbours_needed(&sizes(2, 2));
        assert_eq!(small, 8 * (8 + 16) + 16 * 16);
        assert!(neighbour_limits(small)[2].1 <= 2048);
        // ... 64 hosts x 4 VMs do not (docs/TESTBED.md).
        let big = neighbours_needed(&sizes(16, 4));
        assert_eq!(big, 64 * (64 + 256) + 256 * 16);
        let l = neighbour_limits(big);
        assert!(
            l[0].1 >= 20_480 && l[0].1 < l[1].1 && l[1].1 < l[2].1,
            "{l:?}"
        );
    }

    #[test]
    fn restore_leaves_a_value_someone_else_changed() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a").display().to_string();
        let b = dir.path().join("b").display().to_string();
        fs::write(&a, "128\n").unwrap();
        fs::write(&b, "512\n").unwrap();
        let s = vec![
            Setting {
                path: a.clone(),
                before: 128,
                set: 4000,
            },
            Setting {
                path: b.clone(),
                before: 512,
                set: 8000,
            },
        ];
        raise(&s).unwrap();
        assert_eq!((read(&a).unwrap(), read(&b).unwrap()), (4000, 8000));
        write(&b, 9000).unwrap();
        let left = restore(&s);
        assert_eq!(read(&a).unwrap(), 128);
        assert_eq!(read(&b).unwrap(), 9000);
        assert_eq!(left, vec![(s[1].clone(), Some(9000))]);
    }

    #[test]
    fn table_fulls_read() {
        // Every Linux host has the file; the sum is whatever it is.
        assert!(arp_table_fulls().is_ok());
    }
}
