//! The data-centre tree, its link weights and the communication level of two
//! hosts (paper §II).
//!
//! Hosts are the leaves of a tree whose leaves are all at the same depth
//! (fan-out may vary). Level 1 groups are racks (ToR switches), level 2 groups
//! pods (aggregation), and so on up to the root at level [`Topology::depth`].
//! The *level* of two hosts is the level of their lowest common ancestor: 0 for
//! the same host, 1 for two hosts in one rack, 2 for one pod, ... Traffic at
//! level `l` crosses links of levels 1..=l, so with link weights c_1..c_k its
//! cost per unit of rate is `W(l) = c_1 + ... + c_l` ([`LinkWeights::cumulative`],
//! `W(0) = 0`). A tree of depth `d` needs exactly `d` weights.
//!
//! Hosts get dense IDs ([`HostId`]) in depth-first order of the tree, so every
//! group (rack, pod, ...) is a contiguous range of host IDs
//! ([`Topology::group_hosts`]). Groups at each level are numbered densely in the
//! same order ([`Topology::group_of`]).
//!
//! # File format
//!
//! A topology is read from a TOML or JSON document an operator writes by hand
//! (score-core does no I/O: the caller reads the file and passes the text to
//! [`Topology::from_toml_str`] or [`Topology::from_json_str`]). The document is
//! the root of the tree. A node lists either `hosts` (it is a rack: its hosts
//! sit one level below it) or `children` (nodes one level below it), never
//! both; `name` is an optional label used in error messages. `weights` (only
//! at the root) gives c_1..c_k; when it is left out, the paper's weights
//! e^0, e^1, e^3, e^5 are used, truncated to the depth of the tree (a deeper
//! tree must give its weights).
//!
//! ```toml
//! # two pods of two racks; depth 3 (rack, pod, core), so three weights
//! weights = [1.0, 2.718281828459045, 20.085536923187668]
//!
//! [[children]]            # a pod
//! name = "pod-a"
//! [[children.children]]   # a rack in pod-a
//! hosts = ["10.0.0.1", "10.0.0.2"]
//! [[children.children]]
//! hosts = ["10.0.0.3", "10.0.0.4"]
//!
//! [[children]]
//! name = "pod-b"
//! [[children.children]]
//! hosts = ["10.0.1.1", "10.0.1.2"]
//! [[children.children]]
//! hosts = ["10.0.1.3"]
//! ```
//!
//! A regular tree can be written in one line instead:
//! `regular = { fanout = [20, 8, 16], first_host = "10.0.0.1" }` (20 hosts per
//! rack, 8 racks per pod, 16 pods; consecutive host addresses), see
//! [`Topology::regular`].

use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::token::MAX_LEVEL;

/// A host (hypervisor) as a dense index `0..host_count()` in tree order.
pub type HostId = u32;

/// The paper's link weights c_1..c_4 = e^0, e^1, e^3, e^5 (§IV-A), written as
/// the correctly rounded `f64` values so that every implementation agrees to
/// the last bit (`exp()` of the platform's libm need not be correctly rounded).
pub const PAPER_WEIGHTS: [f64; 4] = [
    1.0,
    std::f64::consts::E,
    20.085_536_923_187_668,
    148.413_159_102_576_6,
];

/// A regular tree with the paper's 2560 hosts in 128 racks of 20 (§IV-A) and
/// four link levels: 20 hosts per rack, 8 racks per pod, 4 pods per core
/// group, 4 core groups. The paper does not give the grouping above the
/// racks; this one makes every one of its four weights reachable.
pub const PAPER_FANOUT: [u32; 4] = [20, 8, 4, 4];

/// Errors from building a topology or its link weights.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    /// The TOML or JSON text could not be parsed into a topology document.
    #[error("cannot parse topology: {0}")]
    Parse(String),
    /// No link weight was given.
    #[error("no link weights given")]
    NoWeights,
    /// A link weight is not a finite number greater than zero.
    #[error("link weight c_{level} is {value}: weights must be finite and > 0")]
    BadWeight {
        /// The 1-based level of the offending weight.
        level: usize,
        /// The value found.
        value: f64,
    },
    /// The number of weights differs from the depth of the tree.
    #[error("{weights} link weights given but the tree has depth {depth}")]
    WeightsCount {
        /// Number of weights given.
        weights: usize,
        /// Depth of the tree (levels above the hosts).
        depth: usize,
    },
    /// Weights were left out and the tree is deeper than the paper's default.
    #[error("tree has depth {depth}: give `weights` (the paper's default has only 4)")]
    WeightsRequired {
        /// Depth of the tree.
        depth: usize,
    },
    /// The tree is deeper than the token's level field can carry.
    #[error("tree has depth {depth}, more than the supported {max}")]
    TooDeep {
        /// Depth of the tree.
        depth: usize,
        /// The largest supported depth.
        max: u8,
    },
    /// The same host address appears twice.
    #[error("duplicate host {addr} (at {path})")]
    DuplicateHost {
        /// The address listed twice.
        addr: Ipv4Addr,
        /// Where its second occurrence is.
        path: String,
    },
    /// Hosts are not all at the same depth.
    #[error("uneven depth: {path} has hosts {found} levels below it, its siblings {expected}")]
    UnevenDepth {
        /// The node whose subtree has a different depth.
        path: String,
        /// Depth of the subtree of its earlier siblings.
        expected: usize,
        /// Depth of its subtree.
        found: usize,
    },
    /// A node lists both `hosts` and `children`.
    #[error("{path} lists both hosts and children")]
    MixedNode {
        /// The offending node.
        path: String,
    },
    /// A node lists neither hosts nor children.
    #[error("{path} is empty: it lists no hosts and no children")]
    EmptyNode {
        /// The offending node.
        path: String,
    },
    /// The document gives both an explicit tree and `regular`.
    #[error("give either `regular` or an explicit tree of hosts/children, not both")]
    RegularAndTree,
    /// A fan-out of a regular tree is zero, or the fan-out list is empty.
    #[error("bad fan-out {fanout:?}: every level needs at least one child")]
    BadFanout {
        /// The fan-out given.
        fanout: Vec<u32>,
    },
    /// Too many hosts for a `u32` host index, or their addresses would run
    /// past 255.255.255.255.
    #[error("too many hosts ({count}) starting at {first}")]
    TooManyHosts {
        /// The number of hosts asked for.
        count: u64,
        /// The first host address.
        first: Ipv4Addr,
    },
}

/// Link weights c_1..c_k and their prefix sums W(0..=k).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkWeights {
    c: Vec<f64>,
    /// `cum[l] = W(l) = c_1 + ... + c_l`, `cum[0] = 0`.
    cum: Vec<f64>,
}

impl LinkWeights {
    /// Weights c_1..c_k as given; each must be finite and > 0, and `k` at
    /// most [`MAX_LEVEL`]. They need not increase (the paper's do).
    pub fn new(c: Vec<f64>) -> Result<Self, TopologyError> {
        if c.is_empty() {
            return Err(TopologyError::NoWeights);
        }
        if c.len() > usize::from(MAX_LEVEL) {
            return Err(TopologyError::TooDeep {
                depth: c.len(),
                max: MAX_LEVEL,
            });
        }
        for (i, &v) in c.iter().enumerate() {
            if !(v.is_finite() && v > 0.0) {
                return Err(TopologyError::BadWeight {
                    level: i + 1,
                    value: v,
                });
            }
        }
        let mut cum = Vec::with_capacity(c.len() + 1);
        let mut acc = 0.0;
        cum.push(acc);
        for &v in &c {
            acc += v;
            cum.push(acc);
        }
        Ok(LinkWeights { c, cum })
    }

    /// The paper's weights [`PAPER_WEIGHTS`] (four levels).
    pub fn paper() -> Self {
        Self::paper_truncated(PAPER_WEIGHTS.len())
    }

    /// The first `levels` of the paper's weights (1..=4; clamped).
    pub fn paper_truncated(levels: usize) -> Self {
        let n = levels.clamp(1, PAPER_WEIGHTS.len());
        let c = PAPER_WEIGHTS[..n].to_vec();
        let mut cum = vec![0.0];
        let mut acc = 0.0;
        for &v in &c {
            acc += v;
            cum.push(acc);
        }
        LinkWeights { c, cum }
    }

    /// Number of link levels `k`.
    pub fn levels(&self) -> u8 {
        // `new` caps the length at MAX_LEVEL, so this never truncates.
        self.c.len() as u8
    }

    /// The weights c_1..c_k as given.
    pub fn weights(&self) -> &[f64] {
        &self.c
    }

    /// W(level) = c_1 + ... + c_level, W(0) = 0. A level above `k` is taken
    /// as `k` (it cannot arise from a [`Topology`] with these weights).
    #[inline]
    pub fn cumulative(&self, level: u8) -> f64 {
        let l = usize::from(level).min(self.c.len());
        self.cum[l]
    }

    /// All prefix sums W(0), W(1), ..., W(k).
    pub fn cumulative_all(&self) -> &[f64] {
        &self.cum
    }
}

/// One node of a topology document (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Optional label, used in error messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Hosts directly under this node (the node is a rack).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Ipv4Addr>,
    /// Child nodes one level down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<NodeSpec>,
}

/// A regular tree in a topology document: see [`Topology::regular`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegularSpec {
    /// Hosts per rack, racks per pod, pods per next group, ...
    pub fanout: Vec<u32>,
    /// Address of host 0; the others follow consecutively.
    pub first_host: Ipv4Addr,
}

/// A topology document: the root node, its weights, or a regular tree.
/// Embeddable in other configuration files (the agent's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// Link weights c_1..c_k; the paper's when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
    /// A regular tree instead of an explicit one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regular: Option<RegularSpec>,
    /// Optional label of the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Hosts directly under the root (a one-rack data centre).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Ipv4Addr>,
    /// Children of the root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<NodeSpec>,
}

/// The data-centre tree: hosts, their groups at every level, link weights.
#[derive(Debug, Clone)]
pub struct Topology {
    depth: u8,
    weights: LinkWeights,
    addrs: Vec<Ipv4Addr>,
    by_addr: HashMap<u32, HostId>,
    /// `anc[h * depth + (l - 1)]`: the group of host `h` at level `l`.
    anc: Vec<u32>,
    /// `starts[l - 1][g]`: first host of group `g` at level `l`, with a final
    /// sentinel equal to the host count.
    starts: Vec<Vec<u32>>,
}

impl Topology {
    /// Parses a TOML topology document (see the module documentation).
    pub fn from_toml_str(text: &str) -> Result<Self, TopologyError> {
        let spec: TopologySpec =
            toml::from_str(text).map_err(|e| TopologyError::Parse(e.to_string()))?;
        Self::from_spec(&spec)
    }

    /// Parses a JSON topology document (same fields as the TOML one).
    pub fn from_json_str(text: &str) -> Result<Self, TopologyError> {
        let spec: TopologySpec =
            serde_json::from_str(text).map_err(|e| TopologyError::Parse(e.to_string()))?;
        Self::from_spec(&spec)
    }

    /// Builds and validates a topology from a parsed document.
    pub fn from_spec(spec: &TopologySpec) -> Result<Self, TopologyError> {
        let explicit = !spec.hosts.is_empty() || !spec.children.is_empty();
        if let Some(reg) = &spec.regular {
            if explicit {
                return Err(TopologyError::RegularAndTree);
            }
            let weights = default_or_given(spec.weights.as_deref(), reg.fanout.len())?;
            return Self::regular(&reg.fanout, weights, reg.first_host);
        }
        let root = NodeSpec {
            name: spec.name.clone(),
            hosts: spec.hosts.clone(),
            children: spec.children.clone(),
        };
        let depth = node_depth(&root, "root")?;
        if depth > usize::from(MAX_LEVEL) {
            return Err(TopologyError::TooDeep {
                depth,
                max: MAX_LEVEL,
            });
        }
        let weights = default_or_given(spec.weights.as_deref(), depth)?;
        let mut b = Builder::new(depth);
        b.add_node(&root, depth, "root")?;
        b.finish(weights)
    }

    /// A regular tree: `fanout[0]` hosts per rack, `fanout[1]` racks per pod,
    /// ..., `fanout[d-1]` groups under the root; depth `d = fanout.len()`,
    /// which must equal the number of weights. Host `i` gets address
    /// `first_host + i`.
    pub fn regular(
        fanout: &[u32],
        weights: LinkWeights,
        first_host: Ipv4Addr,
    ) -> Result<Self, TopologyError> {
        if fanout.is_empty() || fanout.contains(&0) {
            return Err(TopologyError::BadFanout {
                fanout: fanout.to_vec(),
            });
        }
        let depth = fanout.len();
        if depth > usize::from(MAX_LEVEL) {
            return Err(TopologyError::TooDeep {
                depth,
                max: MAX_LEVEL,
            });
        }
        if weights.c.len() != depth {
            return Err(TopologyError::WeightsCount {
                weights: weights.c.len(),
                depth,
            });
        }
        let count = fanout
            .iter()
            .try_fold(1u64, |acc, &f| acc.checked_mul(u64::from(f)))
            .unwrap_or(u64::MAX);
        let first = u32::from(first_host);
        let too_many = TopologyError::TooManyHosts {
            count,
            first: first_host,
        };
        // The last address must fit in u32, and so must the host count.
        if count > u64::from(u32::MAX) || u64::from(first) + count - 1 > u64::from(u32::MAX) {
            return Err(too_many);
        }
        let n = count as u32;
        // size[l] = hosts in a group at level l (size[0] = 1).
        let mut size = vec![1u32; depth + 1];
        for l in 1..=depth {
            size[l] = size[l - 1] * fanout[l - 1];
        }
        let mut anc = Vec::with_capacity(n as usize * depth);
        for h in 0..n {
            for s in &size[1..] {
                anc.push(h / s);
            }
        }
        let starts = (1..=depth)
            .map(|l| (0..=n / size[l]).map(|g| g * size[l]).collect())
            .collect();
        let addrs: Vec<Ipv4Addr> = (0..n).map(|i| Ipv4Addr::from(first + i)).collect();
        let by_addr = (0..n).map(|i| (first + i, i)).collect();
        Ok(Topology {
            depth: depth as u8,
            weights,
            addrs,
            by_addr,
            anc,
            starts,
        })
    }

    /// The paper's simulated data centre: [`PAPER_FANOUT`] with
    /// [`PAPER_WEIGHTS`], hosts from 10.0.0.1 on (2560 hosts).
    pub fn paper() -> Self {
        match Self::regular(
            &PAPER_FANOUT,
            LinkWeights::paper(),
            Ipv4Addr::new(10, 0, 0, 1),
        ) {
            Ok(t) => t,
            // The arguments are constants that satisfy every check.
            Err(e) => unreachable!("paper topology is valid: {e}"),
        }
    }

    /// Number of hosts.
    #[inline]
    pub fn host_count(&self) -> u32 {
        self.addrs.len() as u32
    }

    /// Depth of the tree: levels above the hosts (the root is at this level).
    #[inline]
    pub fn depth(&self) -> u8 {
        self.depth
    }

    /// The link weights.
    #[inline]
    pub fn weights(&self) -> &LinkWeights {
        &self.weights
    }

    /// Address of a host. Panics if `h` is not a host of this topology.
    pub fn host_addr(&self, h: HostId) -> Ipv4Addr {
        self.addrs[h as usize]
    }

    /// The host with this address, if any.
    pub fn host_by_addr(&self, addr: Ipv4Addr) -> Option<HostId> {
        self.by_addr.get(&u32::from(addr)).copied()
    }

    /// The group of host `h` at `level`: `h` itself at level 0, its rack at
    /// level 1, its pod at level 2, ..., 0 (the root) at `depth()` and above.
    /// Panics if `h` is not a host of this topology.
    #[inline]
    pub fn group_of(&self, h: HostId, level: u8) -> u32 {
        if level == 0 {
            return h;
        }
        if level >= self.depth {
            return 0;
        }
        let d = usize::from(self.depth);
        self.anc[h as usize * d + usize::from(level) - 1]
    }

    /// Number of groups at `level` (hosts at 0, racks at 1, ..., 1 at the root).
    pub fn group_count(&self, level: u8) -> u32 {
        match level {
            0 => self.host_count(),
            l if l >= self.depth => 1,
            l => (self.starts[usize::from(l) - 1].len() - 1) as u32,
        }
    }

    /// The hosts of group `g` at `level`, a contiguous range of host IDs.
    /// Panics if there is no such group.
    pub fn group_hosts(&self, level: u8, g: u32) -> std::ops::Range<HostId> {
        match level {
            0 => g..g + 1,
            l if l >= self.depth => 0..self.host_count(),
            l => {
                let s = &self.starts[usize::from(l) - 1];
                s[g as usize]..s[g as usize + 1]
            }
        }
    }

    /// Communication level of two hosts: the level of their lowest common
    /// ancestor (0 same host, 1 same rack, 2 same pod, ..., `depth()`).
    /// O(depth); panics if either is not a host of this topology.
    #[inline]
    pub fn level(&self, a: HostId, b: HostId) -> u8 {
        if a == b {
            return 0;
        }
        let d = usize::from(self.depth);
        let ra = &self.anc[a as usize * d..a as usize * d + d];
        let rb = &self.anc[b as usize * d..b as usize * d + d];
        for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
            if x == y {
                return i as u8 + 1;
            }
        }
        // Unreachable for valid hosts: every host shares the root.
        self.depth
    }

    /// W(level(a, b)): the cost of one unit of rate between the two hosts.
    #[inline]
    pub fn weight(&self, a: HostId, b: HostId) -> f64 {
        self.weights.cumulative(self.level(a, b))
    }
}

/// The weights given, or the paper's truncated to `depth`, checked against it.
fn default_or_given(given: Option<&[f64]>, depth: usize) -> Result<LinkWeights, TopologyError> {
    let w = match given {
        Some(c) => LinkWeights::new(c.to_vec())?,
        None if depth <= PAPER_WEIGHTS.len() => LinkWeights::paper_truncated(depth),
        None => return Err(TopologyError::WeightsRequired { depth }),
    };
    if w.c.len() != depth {
        return Err(TopologyError::WeightsCount {
            weights: w.c.len(),
            depth,
        });
    }
    Ok(w)
}

/// Human-readable location of a child node, for error messages.
fn child_path(parent: &str, i: usize, child: &NodeSpec) -> String {
    match &child.name {
        Some(n) => format!("{parent}.children[{i}] ({n:?})"),
        None => format!("{parent}.children[{i}]"),
    }
}

/// Depth of the subtree under `node` (1 for a rack), checking that it is even.
fn node_depth(node: &NodeSpec, path: &str) -> Result<usize, TopologyError> {
    match (node.hosts.is_empty(), node.children.is_empty()) {
        (false, false) => Err(TopologyError::MixedNode {
            path: path.to_string(),
        }),
        (true, true) => Err(TopologyError::EmptyNode {
            path: path.to_string(),
        }),
        (false, true) => Ok(1),
        (true, false) => {
            let mut expected = None;
            for (i, c) in node.children.iter().enumerate() {
                let p = child_path(path, i, c);
                let d = node_depth(c, &p)?;
                match expected {
                    None => expected = Some(d),
                    Some(e) if e != d => {
                        return Err(TopologyError::UnevenDepth {
                            path: p,
                            expected: e,
                            found: d,
                        });
                    }
                    Some(_) => {}
                }
            }
            Ok(expected.unwrap_or(0) + 1)
        }
    }
}

/// Assigns host and group IDs in depth-first order.
struct Builder {
    depth: usize,
    addrs: Vec<Ipv4Addr>,
    by_addr: HashMap<u32, HostId>,
    anc: Vec<u32>,
    starts: Vec<Vec<u32>>,
    /// Current group at each level 1..=depth (index l - 1).
    chain: Vec<u32>,
}

impl Builder {
    fn new(depth: usize) -> Self {
        Builder {
            depth,
            addrs: Vec::new(),
            by_addr: HashMap::new(),
            anc: Vec::new(),
            starts: vec![Vec::new(); depth],
            chain: vec![0; depth],
        }
    }

    /// Adds the subtree of `node`, which sits at `level` (already validated).
    fn add_node(&mut self, node: &NodeSpec, level: usize, path: &str) -> Result<(), TopologyError> {
        let first_host = self.addrs.len() as u32;
        let g = self.starts[level - 1].len() as u32;
        self.starts[level - 1].push(first_host);
        self.chain[level - 1] = g;
        if level == 1 {
            for &addr in &node.hosts {
                let id =
                    u32::try_from(self.addrs.len()).map_err(|_| TopologyError::TooManyHosts {
                        count: self.addrs.len() as u64 + 1,
                        first: self.addrs.first().copied().unwrap_or(addr),
                    })?;
                if self.by_addr.insert(u32::from(addr), id).is_some() {
                    return Err(TopologyError::DuplicateHost {
                        addr,
                        path: path.to_string(),
                    });
                }
                self.addrs.push(addr);
                self.anc.extend_from_slice(&self.chain);
            }
        } else {
            for (i, c) in node.children.iter().enumerate() {
                self.add_node(c, level - 1, &child_path(path, i, c))?;
            }
        }
        Ok(())
    }

    fn finish(mut self, weights: LinkWeights) -> Result<Topology, TopologyError> {
        let n = self.addrs.len() as u32;
        for s in &mut self.starts {
            s.push(n);
        }
        Ok(Topology {
            depth: self.depth as u8,
            weights,
            addrs: self.addrs,
            by_addr: self.by_addr,
            anc: self.anc,
            starts: self.starts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_weights_are_the_rounded_exponentials() {
        // Within one ulp of libm's exp (which need not be correctly rounded).
        for (w, x) in PAPER_WEIGHTS.iter().zip([0.0f64, 1.0, 3.0, 5.0]) {
            assert!((w - x.exp()).abs() <= w * f64::EPSILON, "{w} vs e^{x}");
        }
        let w = LinkWeights::paper();
        assert_eq!(w.cumulative(0), 0.0);
        assert_eq!(w.cumulative(1), 1.0);
        assert_eq!(w.cumulative(2), 1.0 + std::f64::consts::E);
        assert_eq!(w.cumulative(4), w.cumulative_all()[4]);
        assert_eq!(w.cumulative(9), w.cumulative(4));
    }

    #[test]
    fn weights_are_validated() {
        assert_eq!(LinkWeights::new(vec![]), Err(TopologyError::NoWeights));
        assert!(matches!(
            LinkWeights::new(vec![1.0, 0.0]),
            Err(TopologyError::BadWeight { level: 2, .. })
        ));
        assert!(matches!(
            LinkWeights::new(vec![f64::NAN]),
            Err(TopologyError::BadWeight { level: 1, .. })
        ));
        assert!(matches!(
            LinkWeights::new(vec![1.0, f64::INFINITY]),
            Err(TopologyError::BadWeight { level: 2, .. })
        ));
    }

    #[test]
    fn regular_tree_levels_and_groups() {
        let t = Topology::regular(
            &[2, 3, 2],
            LinkWeights::paper_truncated(3),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        assert_eq!(t.host_count(), 12);
        assert_eq!(t.depth(), 3);
        assert_eq!(t.level(0, 0), 0);
        assert_eq!(t.level(0, 1), 1);
        assert_eq!(t.level(1, 2), 2);
        assert_eq!(t.level(0, 5), 2);
        assert_eq!(t.level(5, 6), 3);
        assert_eq!(t.level(11, 0), 3);
        assert_eq!(t.group_of(7, 1), 3);
        assert_eq!(t.group_of(7, 2), 1);
        assert_eq!(t.group_of(7, 3), 0);
        assert_eq!(t.group_count(1), 6);
        assert_eq!(t.group_count(2), 2);
        assert_eq!(t.group_hosts(2, 1), 6..12);
        assert_eq!(t.group_hosts(1, 5), 10..12);
        assert_eq!(t.host_addr(11), Ipv4Addr::new(10, 0, 0, 12));
        assert_eq!(t.host_by_addr(Ipv4Addr::new(10, 0, 0, 3)), Some(2));
        assert_eq!(t.host_by_addr(Ipv4Addr::new(10, 0, 0, 13)), None);
        assert_eq!(t.weight(5, 6), 1.0 + PAPER_WEIGHTS[1] + PAPER_WEIGHTS[2]);
    }

    #[test]
    fn regular_rejects_bad_input() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        assert!(matches!(
            Topology::regular(&[2, 0], LinkWeights::paper_truncated(2), a),
            Err(TopologyError::BadFanout { .. })
        ));
        assert!(matches!(
            Topology::regular(&[2, 2], LinkWeights::paper(), a),
            Err(TopologyError::WeightsCount {
                weights: 4,
                depth: 2
            })
        ));
        assert!(matches!(
            Topology::regular(&[4], LinkWeights::paper_truncated(1), Ipv4Addr::BROADCAST),
            Err(TopologyError::TooManyHosts { .. })
        ));
    }

    #[test]
    fn paper_topology_has_2560_hosts_in_128_racks() {
        let t = Topology::paper();
        assert_eq!(t.host_count(), 2560);
        assert_eq!(t.group_count(1), 128);
        assert_eq!(t.depth(), 4);
        assert_eq!(t.level(0, 2559), 4);
    }
}
