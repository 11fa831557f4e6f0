//! The one lab of score (development only): network namespaces standing in
//! for the switches, hosts and VMs of a data centre, score-agent processes
//! in them, traffic between the VMs, real QEMU guests and libvirt hosts,
//! and the clients that read what the agents measure. `cargo xtask
//! testbed`/`demo`, the privileged tests and the benches all build their
//! data centres from here.
//!
//! Two kinds of rig live here. The test bed proper ([`testbed`]: `up`,
//! `down`, with its state file under /run/score-testbed) is what xtask
//! drives; its functions return errors with context, as a tool's do. The
//! test rigs ([`lab`], [`dc`], [`prometheus`], [`libvirt::LibvirtHost`])
//! are made and dropped by one test each, remove everything in `Drop`, and
//! panic on failure, as tests do.
//!
//! Modules by concern: the address plan ([`plan`]), the state file
//! ([`state`]), namespaces ([`netns`]), processes ([`process`]), agent
//! configurations ([`config`]), agents ([`agents`]), real guests
//! ([`guests`], their image [`image`], [`libvirt`]), status ([`status`]),
//! traffic ([`traffic`]), what the agents measure ([`measure`], read with
//! [`http`] and [`metrics`]), the test bed's own check ([`check`]), and
//! the Debian packages all of it needs ([`apt`]); real Xen hosts under QEMU
//! ([`xen`]) and the agents in their dom0s ([`xen_cluster`]).

pub mod agents;
pub mod apt;
pub mod check;
pub mod config;
pub mod dc;
pub mod guests;
pub mod http;
pub mod image;
pub mod lab;
pub mod libvirt;
pub mod measure;
pub mod metrics;
pub mod netns;
pub mod plan;
pub mod process;
pub mod prometheus;
pub mod state;
pub mod status;
pub(crate) mod sysctl;
pub mod testbed;
pub mod traffic;
pub mod xen;
pub mod xen_cluster;
