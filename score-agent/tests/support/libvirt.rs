//! Real libvirt hosts on one machine, for the libvirt backend's privileged
//! tests: the lab's (score-testbed's `libvirt`).
#![allow(unused_imports)]

pub(crate) use score_testbed::libvirt::{LibvirtHost, guest_xml, skip_reason};
