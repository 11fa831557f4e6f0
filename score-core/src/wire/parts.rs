//! Collects the parts of a list sent over several datagrams (a host's
//! [`FlowReport`], the coordinator's [`TokenOrder`]) until every part of it
//! has arrived, then yields the whole list in part order. Pure state with
//! bounded memory, like the token [`Reassembler`](super::Reassembler).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::message::{FlowEntry, FlowReport, TokenOrder};
use crate::token::VmId;

/// Bounds on what a [`PartsAssembler`] holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartsLimits {
    /// Lists in progress at once (e.g. one per reporting host); the least
    /// recently touched is dropped to make room.
    pub max_lists: usize,
    /// Items held across all lists in progress; the least recently touched
    /// lists are dropped to make room, and a part larger than this alone
    /// is refused.
    pub max_items: usize,
}

impl Default for PartsLimits {
    /// Room for a flow report from each of 4096 hosts at once, and 4M items.
    fn default() -> Self {
        PartsLimits {
            max_lists: 4096,
            max_items: 1 << 22,
        }
    }
}

/// What a part did to its list.
#[derive(Clone, Debug, PartialEq)]
pub enum PartsOutcome<T> {
    /// The part was new; the list still misses some.
    Incomplete {
        /// Parts received so far.
        received: u16,
        /// Parts in the list.
        parts: u16,
    },
    /// The part had already arrived with the same items; nothing changed.
    Duplicate,
    /// The part belongs to an older list than the newest seen from its
    /// sender, which was already completed or superseded; ignored.
    Superseded,
    /// The list is complete: its items, in part order.
    Complete(Vec<T>),
}

/// Why a part was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PartsError {
    /// `part` is not below `parts`, or `parts` is zero.
    #[error("part {part} of {parts} is out of range")]
    BadPart {
        /// The part index.
        part: u16,
        /// The part count.
        parts: u16,
    },
    /// The part disagrees with earlier parts of its list (`field`: part
    /// count, or the items of a duplicate).
    #[error("part inconsistent with its list: {field}")]
    Inconsistent {
        /// What differs.
        field: &'static str,
    },
    /// The part alone holds more items than the limit.
    #[error("part of {items} items exceeds the limit of {max}")]
    TooLarge {
        /// Items in the part.
        items: usize,
        /// The configured limit.
        max: usize,
    },
}

struct List<T> {
    sender: Ipv4Addr,
    id: u64,
    parts: u16,
    got: BTreeMap<u16, Vec<T>>,
    items: usize,
    touched: u64,
}

/// Assembles lists sent in parts, keyed by (sender, list id). A sender's
/// list ids increase (a report per window, an order per round): a part of
/// a newer list drops that sender's older one, and a part of a list older
/// than the newest seen is [`PartsOutcome::Superseded`].
pub struct PartsAssembler<T> {
    limits: PartsLimits,
    lists: Vec<List<T>>,
    newest: std::collections::HashMap<Ipv4Addr, u64>,
    items: usize,
    tick: u64,
}

impl<T: Clone + PartialEq> Default for PartsAssembler<T> {
    fn default() -> Self {
        PartsAssembler::new(PartsLimits::default())
    }
}

impl<T: Clone + PartialEq> PartsAssembler<T> {
    /// An empty assembler with the given bounds.
    pub fn new(limits: PartsLimits) -> Self {
        PartsAssembler {
            limits,
            lists: Vec::new(),
            newest: std::collections::HashMap::new(),
            items: 0,
            tick: 0,
        }
    }

    /// Adds part `part` of `parts` of list `id` from `sender`.
    pub fn insert(
        &mut self,
        sender: Ipv4Addr,
        id: u64,
        part: u16,
        parts: u16,
        items: Vec<T>,
    ) -> Result<PartsOutcome<T>, PartsError> {
        if parts == 0 || part >= parts {
            return Err(PartsError::BadPart { part, parts });
        }
        if items.len() > self.limits.max_items {
            return Err(PartsError::TooLarge {
                items: items.len(),
                max: self.limits.max_items,
            });
        }
        match self.newest.get(&sender) {
            Some(&n) if id < n => return Ok(PartsOutcome::Superseded),
            Some(&n) if id == n && self.find(sender, id).is_none() => {
                return Ok(PartsOutcome::Superseded);
            }
            Some(&n) if id > n => {
                if let Some(i) = self.find(sender, n) {
                    self.take(i);
                }
            }
            _ => {}
        }
        self.newest.insert(sender, id);
        self.tick += 1;
        let key = (sender, id);
        if self.find(sender, id).is_none() {
            // A new list: evict others until one more list fits.
            while self.lists.len() >= self.limits.max_lists.max(1) {
                let Some(i) = self.oldest_except(key) else {
                    break;
                };
                self.take(i);
            }
            self.lists.push(List {
                sender,
                id,
                parts,
                got: BTreeMap::new(),
                items: 0,
                touched: self.tick,
            });
        }
        let mut i = self.find(sender, id).unwrap_or(self.lists.len() - 1);
        let list = &mut self.lists[i];
        list.touched = self.tick;
        if list.parts != parts {
            return Err(PartsError::Inconsistent { field: "parts" });
        }
        if let Some(old) = list.got.get(&part) {
            return if *old == items {
                Ok(PartsOutcome::Duplicate)
            } else {
                Err(PartsError::Inconsistent { field: "items" })
            };
        }
        let n = items.len();
        // Evict other lists until these items fit; if the list itself is
        // what does not fit, drop it.
        while self.items + n > self.limits.max_items {
            let Some(j) = self.oldest_except(key) else {
                break;
            };
            self.take(j);
        }
        i = self.find(sender, id).unwrap_or(i);
        if self.items + n > self.limits.max_items {
            let dropped = self.take(i);
            return Err(PartsError::TooLarge {
                items: dropped.items + n,
                max: self.limits.max_items,
            });
        }
        let list = &mut self.lists[i];
        list.items += n;
        list.got.insert(part, items);
        self.items += n;
        let received = list.got.len() as u16; // at most `parts` distinct keys
        if received < parts {
            return Ok(PartsOutcome::Incomplete { received, parts });
        }
        let list = self.take(i);
        Ok(PartsOutcome::Complete(
            list.got.into_values().flatten().collect(),
        ))
    }

    /// Assembles a host's flow report from its parts.
    pub fn insert_flow_report(
        &mut self,
        sender: Ipv4Addr,
        r: FlowReport,
    ) -> Result<PartsOutcome<T>, PartsError>
    where
        T: From<FlowEntry>,
    {
        let items = r.entries.into_iter().map(T::from).collect();
        self.insert(sender, r.report, r.part, r.parts, items)
    }

    /// Assembles the coordinator's token order from its parts.
    pub fn insert_token_order(
        &mut self,
        sender: Ipv4Addr,
        o: TokenOrder,
    ) -> Result<PartsOutcome<T>, PartsError>
    where
        T: From<VmId>,
    {
        let items = o.vms.into_iter().map(T::from).collect();
        self.insert(sender, o.order, o.part, o.parts, items)
    }

    /// Lists in progress.
    pub fn in_progress(&self) -> usize {
        self.lists.len()
    }

    /// Items held by lists in progress.
    pub fn buffered_items(&self) -> usize {
        self.items
    }

    /// Drops every list in progress from `sender` (e.g. it went silent).
    pub fn forget(&mut self, sender: Ipv4Addr) {
        let mut i = 0;
        while i < self.lists.len() {
            if self.lists[i].sender == sender {
                self.take(i);
            } else {
                i += 1;
            }
        }
        self.newest.remove(&sender);
    }

    fn find(&self, sender: Ipv4Addr, id: u64) -> Option<usize> {
        self.lists
            .iter()
            .position(|l| l.sender == sender && l.id == id)
    }

    fn take(&mut self, i: usize) -> List<T> {
        let l = self.lists.swap_remove(i);
        self.items -= l.items;
        l
    }

    /// The least recently touched list other than `key`.
    fn oldest_except(&self, key: (Ipv4Addr, u64)) -> Option<usize> {
        self.lists
            .iter()
            .enumerate()
            .filter(|(_, l)| (l.sender, l.id) != key)
            .min_by_key(|(_, l)| l.touched)
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(a: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, a)
    }

    #[test]
    fn parts_assemble_in_order_whatever_the_arrival_order() {
        let vms: Vec<VmId> = (0..700).rev().collect();
        let parts = TokenOrder::split(5, &vms).unwrap();
        assert_eq!(parts.len(), 3);
        let mut a: PartsAssembler<VmId> = PartsAssembler::default();
        let c = host(1);
        assert_eq!(
            a.insert_token_order(c, parts[2].clone()).unwrap(),
            PartsOutcome::Incomplete {
                received: 1,
                parts: 3
            }
        );
        assert_eq!(
            a.insert_token_order(c, parts[2].clone()).unwrap(),
            PartsOutcome::Duplicate
        );
        a.insert_token_order(c, parts[0].clone()).unwrap();
        assert_eq!(
            a.insert_token_order(c, parts[1].clone()).unwrap(),
            PartsOutcome::Complete(vms)
        );
        assert_eq!(a.in_progress(), 0);
        assert_eq!(a.buffered_items(), 0);
        // A late duplicate of a completed list does not start it again.
        assert_eq!(
            a.insert_token_order(c, parts[0].clone()).unwrap(),
            PartsOutcome::Superseded
        );
    }

    #[test]
    fn flow_reports_from_several_hosts() {
        let flows = |k: u32| -> Vec<FlowEntry> {
            (0..100)
                .map(|i| FlowEntry {
                    vm: k,
                    peer: i,
                    rate: f64::from(i),
                })
                .collect()
        };
        let mut a: PartsAssembler<FlowEntry> = PartsAssembler::default();
        let r1 = FlowReport::split(1, &flows(1)).unwrap();
        let r2 = FlowReport::split(1, &flows(2)).unwrap();
        a.insert_flow_report(host(1), r1[0].clone()).unwrap();
        a.insert_flow_report(host(2), r2[1].clone()).unwrap();
        assert_eq!(a.in_progress(), 2);
        assert_eq!(
            a.insert_flow_report(host(2), r2[0].clone()).unwrap(),
            PartsOutcome::Complete(flows(2))
        );
        // A newer report from host 1 supersedes its unfinished older one.
        let r1b = FlowReport::split(2, &flows(3)).unwrap();
        a.insert_flow_report(host(1), r1b[0].clone()).unwrap();
        assert_eq!(
            a.insert_flow_report(host(1), r1[1].clone()).unwrap(),
            PartsOutcome::Superseded
        );
        assert_eq!(
            a.insert_flow_report(host(1), r1b[1].clone()).unwrap(),
            PartsOutcome::Complete(flows(3))
        );
    }

    #[test]
    fn bad_and_inconsistent_parts_are_refused() {
        let mut a: PartsAssembler<u32> = PartsAssembler::default();
        assert_eq!(
            a.insert(host(1), 0, 2, 2, vec![]),
            Err(PartsError::BadPart { part: 2, parts: 2 })
        );
        a.insert(host(1), 0, 0, 2, vec![1]).unwrap();
        assert_eq!(
            a.insert(host(1), 0, 1, 3, vec![2]),
            Err(PartsError::Inconsistent { field: "parts" })
        );
        assert_eq!(
            a.insert(host(1), 0, 0, 2, vec![9]),
            Err(PartsError::Inconsistent { field: "items" })
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut a: PartsAssembler<u32> = PartsAssembler::new(PartsLimits {
            max_lists: 2,
            max_items: 10,
        });
        for h in 1..=5 {
            a.insert(host(h), 0, 0, 2, vec![0; 4]).unwrap();
            assert!(a.in_progress() <= 2);
            assert!(a.buffered_items() <= 10);
        }
        // Hosts 4 and 5 remain (8 items); 5 more items for host 5 evict
        // host 4's list and complete host 5's.
        assert_eq!(
            a.insert(host(5), 0, 1, 2, vec![1; 5]).unwrap(),
            PartsOutcome::Complete(vec![0, 0, 0, 0, 1, 1, 1, 1, 1])
        );
        assert_eq!(a.in_progress(), 0);
        assert_eq!(a.buffered_items(), 0);
        assert_eq!(
            a.insert(host(6), 0, 0, 1, vec![0; 11]),
            Err(PartsError::TooLarge { items: 11, max: 10 })
        );
        assert_eq!(
            a.insert(host(6), 1, 0, 2, vec![0; 6]).unwrap(),
            PartsOutcome::Incomplete {
                received: 1,
                parts: 2
            }
        );
        assert!(a.buffered_items() <= 10);
    }
}
