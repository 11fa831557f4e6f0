//! Swaps on the agent (docs/WIRE.md, "Swaps"): whether this host may
//! hold one VM more than its slots for the time of a swap, by its slots,
//! its headroom and its memory. The order of a swap's two migrations and
//! the asked host's reservations of the partners it gave are score-core's
//! (`proto::swap`, shared with the protocol's state machine), with time as
//! monotonic nanoseconds; the messages and the hypervisor calls are in the
//! parent module.

pub use score_core::proto::swap::{CommitAction, Reservations, order};

/// A host's room for VMs, as its `[node]` table and its attached VMs say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// VMs running here now.
    pub used: u32,
    /// `node.vm_slots`.
    pub slots: u32,
    /// `node.migration_headroom`.
    pub headroom: u32,
    /// `node.memory_mib`.
    pub memory_mib: u64,
    /// `node.vm_memory_mib`.
    pub vm_memory_mib: u64,
}

impl Room {
    /// Whether one more VM may arrive before one leaves: a slot or the
    /// headroom, and its memory (reserved by the hypervisor before the
    /// outgoing VM's is freed).
    pub fn can_hold_one_more(&self) -> bool {
        let n = u64::from(self.used) + 1;
        n <= u64::from(self.slots) + u64::from(self.headroom)
            && n.saturating_mul(self.vm_memory_mib) <= self.memory_mib
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(used: u32, headroom: u32) -> Room {
        Room {
            used,
            slots: 2,
            headroom,
            memory_mib: 1024,
            vm_memory_mib: 256,
        }
    }

    #[test]
    fn headroom_is_slots_and_memory() {
        assert!(room(1, 0).can_hold_one_more());
        assert!(!room(2, 0).can_hold_one_more());
        assert!(room(2, 1).can_hold_one_more());
        assert!(!room(3, 1).can_hold_one_more());
        // Slots of headroom without the memory for them are no headroom.
        let tight = Room {
            memory_mib: 512,
            ..room(2, 1)
        };
        assert!(!tight.can_hold_one_more());
    }
}
