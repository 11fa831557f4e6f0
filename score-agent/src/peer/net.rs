//! The peer protocol's transport: one UDP socket on the host address for
//! datagrams addressed to this host, plus the datagrams the eBPF program
//! intercepted on their way to a hosted VM. Every datagram is sealed with
//! the cluster key and a fresh sequence number; requests are matched to
//! their answers by that number.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use score_core::wire::{
    ClusterKey, Datagram, Header, HopAck, Message, ReplayTable, SeqCounter, WireError,
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
};
use tracing::debug;

/// Where a datagram came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Sent to this host's own address.
    Host,
    /// Sent to a hosted VM's address and intercepted on its vif.
    Vm(Ipv4Addr),
}

/// Why a received datagram was dropped: the metrics label.
pub fn reject_reason(e: &WireError) -> &'static str {
    match e {
        WireError::Truncated { .. } => "truncated",
        WireError::BadMagic => "bad_magic",
        WireError::BadVersion(_) => "bad_version",
        WireError::UnknownKind(_) => "unknown_kind",
        WireError::BadLength { .. } | WireError::PayloadTooLarge { .. } => "bad_length",
        WireError::BadMac => "bad_mac",
        WireError::StaleEpoch { .. } => "stale_epoch",
        WireError::Replayed { .. } => "replayed",
        _ => "other",
    }
}

/// The socket, the key and the bookkeeping of requests in flight.
pub struct Net {
    sock: UdpSocket,
    key: ClusterKey,
    me: Ipv4Addr,
    port: u16,
    seq: Mutex<SeqCounter>,
    replay: Mutex<ReplayTable>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Message>>>,
    acks: Mutex<HashMap<u64, mpsc::UnboundedSender<HopAck>>>,
}

/// Acknowledgements of one token transfer, as they come in; unregisters
/// itself when dropped.
pub struct AckWaiter<'a> {
    net: &'a Net,
    transfer: u64,
    rx: mpsc::UnboundedReceiver<HopAck>,
}

impl AckWaiter<'_> {
    /// The next acknowledgement, or `None` at the deadline.
    pub async fn next_until(&mut self, deadline: tokio::time::Instant) -> Option<HopAck> {
        tokio::time::timeout_at(deadline, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for AckWaiter<'_> {
    fn drop(&mut self) {
        self.net
            .acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.transfer);
    }
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("me", &self.me)
            .field("port", &self.port)
            .finish()
    }
}

/// Wall-clock nanoseconds: sequence numbers must grow across restarts, or
/// peers would drop a restarted agent's datagrams as replays.
fn seq_start() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

impl Net {
    /// Binds the host address and port.
    pub async fn bind(
        me: Ipv4Addr,
        port: u16,
        key: ClusterKey,
        hosts: usize,
    ) -> std::io::Result<Arc<Net>> {
        let sock = UdpSocket::bind(SocketAddrV4::new(me, port)).await?;
        Ok(Arc::new(Net {
            sock,
            key,
            me,
            port,
            seq: Mutex::new(SeqCounter::starting_at(seq_start())),
            replay: Mutex::new(ReplayTable::new(hosts.max(16) * 2)),
            pending: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
        }))
    }

    /// This host's address.
    pub fn me(&self) -> Ipv4Addr {
        self.me
    }

    /// The protocol port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Seals and sends one message to `to` (a host or a VM address);
    /// returns its sequence number.
    pub async fn send(&self, to: Ipv4Addr, epoch: u64, message: &Message) -> std::io::Result<u64> {
        let seq = self
            .seq
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_seq();
        let header = Header {
            sender: self.me,
            epoch,
            seq,
        };
        let mut buf = BytesMut::new();
        Datagram {
            header,
            message: message.clone(),
        }
        .encode(&self.key, &mut buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        self.sock
            .send_to(&buf, SocketAddrV4::new(to, self.port))
            .await?;
        Ok(seq)
    }

    /// Sends a request and waits for the message that answers it (matched
    /// by `in_reply_to`), or `None` on time-out.
    pub async fn request(
        &self,
        to: Ipv4Addr,
        epoch: u64,
        message: &Message,
        timeout: Duration,
    ) -> Option<Message> {
        let (tx, rx) = oneshot::channel();
        // Register before sending: the answer can beat `send` back.
        let seq = self
            .seq
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_seq();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq, tx);
        let header = Header {
            sender: self.me,
            epoch,
            seq,
        };
        let mut buf = BytesMut::new();
        let sent = match (Datagram {
            header,
            message: message.clone(),
        })
        .encode(&self.key, &mut buf)
        {
            Ok(()) => self
                .sock
                .send_to(&buf, SocketAddrV4::new(to, self.port))
                .await
                .is_ok(),
            Err(_) => false,
        };
        let answer = if sent {
            tokio::time::timeout(timeout, rx)
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&seq);
        answer
    }

    /// Hands an answer to the request waiting for it; false if none was.
    pub fn answer(&self, in_reply_to: u64, message: Message) -> bool {
        match self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&in_reply_to)
        {
            Some(tx) => tx.send(message).is_ok(),
            None => false,
        }
    }

    /// Starts collecting the acknowledgements of token transfer `transfer`.
    pub fn await_acks(&self, transfer: u64) -> AckWaiter<'_> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(transfer, tx);
        AckWaiter {
            net: self,
            transfer,
            rx,
        }
    }

    /// Hands a hop acknowledgement to the transfer waiting for it.
    pub fn deliver_ack(&self, ack: HopAck) -> bool {
        match self
            .acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ack.transfer)
        {
            Some(tx) => tx.send(ack).is_ok(),
            None => false,
        }
    }

    /// Decodes and authenticates one datagram, and drops replays.
    pub fn open(&self, bytes: &[u8]) -> Result<Datagram, WireError> {
        let d = Datagram::decode(bytes, &self.key)?;
        self.replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accept(&d.header)?;
        Ok(d)
    }

    /// Waits for the next datagram sent to the host address.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, std::net::SocketAddr)> {
        let r = self.sock.recv_from(buf).await;
        if let Err(e) = &r {
            debug!(error = %e, "udp receive");
        }
        r
    }
}
