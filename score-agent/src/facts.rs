//! The host's facts as the collector publishes them at each drain: the
//! hosted VMs (as the datapath saw them sending) and each one's measured
//! peers with their windowed rates. The peer protocol reads the latest
//! snapshot from a watch channel, so it never takes the datapath's or the
//! flow table's lock.

use std::{collections::HashMap, net::Ipv4Addr};

use score_core::proto::{HostFacts, VmFacts};

use crate::{datapath::HostedVm, flows::Pair};

/// One drain's view of this host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostSnapshot {
    /// The hosted VMs, by address.
    pub vms: Vec<HostedVm>,
    /// Each hosted VM's peers and rates (bytes/s, both directions summed),
    /// by peer address.
    pub peers: HashMap<Ipv4Addr, Vec<(Ipv4Addr, f64)>>,
    /// Interfaces attached: VMs that run here, seen sending or not.
    pub attached: usize,
}

impl HostSnapshot {
    /// The snapshot of `vms` with the rates of one drain's `pairs`
    /// (directed, bytes/s).
    pub fn new(vms: Vec<HostedVm>, pairs: &[(Pair, f64)], attached: usize) -> Self {
        let mut acc: HashMap<Ipv4Addr, HashMap<Ipv4Addr, f64>> =
            vms.iter().map(|v| (v.ip, HashMap::new())).collect();
        for &((src, dst), rate) in pairs {
            if src == dst {
                continue;
            }
            if let Some(m) = acc.get_mut(&src) {
                *m.entry(dst).or_default() += rate;
            }
            if let Some(m) = acc.get_mut(&dst) {
                *m.entry(src).or_default() += rate;
            }
        }
        let peers = acc
            .into_iter()
            .map(|(vm, m)| {
                let mut v: Vec<(Ipv4Addr, f64)> = m.into_iter().collect();
                v.sort_by_key(|(p, _)| *p);
                (vm, v)
            })
            .collect();
        HostSnapshot {
            vms,
            peers,
            attached,
        }
    }

    /// The protocol node's view: its VMs and their peers, by ID.
    pub fn facts(&self) -> HostFacts {
        HostFacts {
            vms: self
                .vms
                .iter()
                .map(|v| VmFacts {
                    id: u32::from(v.ip),
                    peers: self
                        .peers
                        .get(&v.ip)
                        .map(|ps| ps.iter().map(|(p, r)| (u32::from(*p), *r)).collect())
                        .unwrap_or_default(),
                    undefined: false,
                })
                .collect(),
            // Attached interfaces whose VM has not sent yet.
            unnamed: u32::try_from(self.attached.saturating_sub(self.vms.len()))
                .unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(src: [u8; 4], dst: [u8; 4], rate_bps: f64) -> (Pair, f64) {
        ((Ipv4Addr::from(src), Ipv4Addr::from(dst)), rate_bps)
    }

    #[test]
    fn both_directions_are_summed_per_hosted_vm() {
        let a = HostedVm {
            ip: Ipv4Addr::new(10, 1, 0, 1),
            mac: [2, 0, 0, 0, 0, 1],
            vif: "vif1.0".into(),
        };
        let s = HostSnapshot::new(
            vec![a.clone()],
            &[
                sample([10, 1, 0, 1], [10, 1, 0, 2], 100.0),
                sample([10, 1, 0, 2], [10, 1, 0, 1], 50.0),
                sample([10, 1, 0, 3], [10, 1, 0, 2], 7.0),
            ],
            1,
        );
        assert_eq!(s.peers[&a.ip], vec![(Ipv4Addr::new(10, 1, 0, 2), 150.0)]);
        let f = s.facts();
        assert_eq!(f.vms.len(), 1);
        assert_eq!(
            f.vms[0].peers,
            vec![(u32::from(Ipv4Addr::new(10, 1, 0, 2)), 150.0)]
        );
    }
}
