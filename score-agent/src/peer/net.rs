//! The protocol socket's plumbing: the wall clock every header carries
//! and the socket's receive buffer. Sealing, opening, freshness and the
//! replay windows are the protocol state machine's (score-core's
//! `proto::Node`, with `wire`).

use tokio::net::UdpSocket;

/// Wall-clock milliseconds since the Unix epoch: the send time in every
/// header, and the receiver's "now" for freshness.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Receive buffer asked for the protocol socket. The kernel's default
/// (`net.core.rmem_default`, 208 KiB) lost 418 of a burst of 1,000
/// datagrams at 70k/s; 8 MiB holds about 6,000 full datagrams with their
/// overhead, a whole token of a large data centre sent back to back.
pub const RECEIVE_BUFFER_BYTES: usize = 8 << 20;

/// Sets the socket's receive buffer to `bytes`: with SO_RCVBUFFORCE (root,
/// above `net.core.rmem_max`), else SO_RCVBUF (capped by rmem_max).
/// Returns the size the kernel reports afterwards (it doubles the value
/// for its bookkeeping).
pub fn raise_receive_buffer(sock: &UdpSocket, bytes: usize) -> std::io::Result<usize> {
    use rustix::net::sockopt;
    if sockopt::set_socket_recv_buffer_size_force(sock, bytes).is_err() {
        sockopt::set_socket_recv_buffer_size(sock, bytes)?;
    }
    Ok(sockopt::socket_recv_buffer_size(sock)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bursts were lost at the socket (the sixth defect of the review):
    /// the protocol socket's receive buffer is raised far above the
    /// kernel's 208 KiB default (to the full size as root, else to
    /// rmem_max).
    #[tokio::test]
    async fn the_receive_buffer_is_raised() {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let default = raise_receive_buffer(&sock, 0).unwrap();
        let raised = raise_receive_buffer(&sock, RECEIVE_BUFFER_BYTES).unwrap();
        if rustix::process::geteuid().is_root() {
            assert!(raised >= RECEIVE_BUFFER_BYTES, "{raised}");
        } else {
            assert!(raised >= default, "{raised} < {default}");
        }
    }
}
