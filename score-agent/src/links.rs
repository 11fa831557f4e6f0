//! Follows the host's network interfaces as VMs start, stop and migrate:
//! the current list from `if_nameindex(3)`, then RTM_NEWLINK/RTM_DELLINK
//! events from a netlink socket subscribed to RTMGRP_LINK. Events, not a
//! rescan timer: a VM's vif is counted from the moment it appears.

use std::{ffi::CStr, io};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};

/// A change in the set of interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// An interface exists (new, or changed state: callers make it idempotent).
    Up {
        /// Its name.
        name: String,
        /// Its index.
        index: u32,
    },
    /// An interface was deleted or moved to another network namespace.
    Gone {
        /// Its name.
        name: String,
        /// Its index.
        index: u32,
    },
}

/// The interfaces that exist now in this network namespace.
pub(crate) fn current_links() -> io::Result<Vec<(String, u32)>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // which we walk and then free with if_freenameindex.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push((name, (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

/// A netlink socket that reports link events.
pub struct LinkMonitor {
    socket: TokioSocket,
}

impl std::fmt::Debug for LinkMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkMonitor")
    }
}

const RTMGRP_LINK: u32 = 1;

impl LinkMonitor {
    /// Subscribes to link events. Open it before listing the current links
    /// so that nothing that appears in between is missed.
    pub fn open() -> io::Result<Self> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        socket.socket_mut().bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        Ok(LinkMonitor { socket })
    }

    /// Waits for the next batch of events.
    pub async fn next(&mut self) -> io::Result<Vec<LinkEvent>> {
        loop {
            let (buf, _) = self.socket.recv_from_full().await?;
            let events = parse_events(&buf);
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}

/// Decodes every link message in one netlink read; anything else, or
/// anything malformed, is skipped.
pub(crate) fn parse_events(mut buf: &[u8]) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    if let Some((name, index)) = name_index(&l) {
                        out.push(LinkEvent::Up { name, index });
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    if let Some((name, index)) = name_index(&l) {
                        out.push(LinkEvent::Gone { name, index });
                    }
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        buf = &buf[step.min(buf.len())..];
    }
    out
}

fn name_index(l: &LinkMessage) -> Option<(String, u32)> {
    let name = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some((name, l.header.index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed() {
        let links = current_links().unwrap();
        assert!(links.iter().any(|(n, i)| n == "lo" && *i == 1), "{links:?}");
    }

    /// RTM_NEWLINK and RTM_DELLINK as the kernel sends them, two in one
    /// read, become events in order.
    #[test]
    fn link_messages_become_events() {
        use netlink_packet_core::NetlinkHeader;
        let encode = |inner: RouteNetlinkMessage| {
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), inner.into());
            msg.finalize();
            let mut buf = vec![0u8; msg.buffer_len()];
            msg.serialize(&mut buf);
            buf
        };
        let link = |index: u32, name: &str| {
            let mut l = LinkMessage::default();
            l.header.index = index;
            l.attributes.push(LinkAttribute::IfName(name.to_owned()));
            l
        };
        let mut buf = encode(RouteNetlinkMessage::NewLink(link(7, "vif3.0")));
        buf.extend(encode(RouteNetlinkMessage::DelLink(link(5, "vif2.0"))));
        assert_eq!(
            parse_events(&buf),
            [
                LinkEvent::Up {
                    name: "vif3.0".into(),
                    index: 7
                },
                LinkEvent::Gone {
                    name: "vif2.0".into(),
                    index: 5
                },
            ]
        );
    }

    #[test]
    fn garbage_yields_no_events() {
        assert!(parse_events(&[]).is_empty());
        assert!(parse_events(&[0xff; 64]).is_empty());
        assert!(parse_events(&[16, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_empty());
    }
}
