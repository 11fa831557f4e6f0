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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> ClusterKey {
        ClusterKey::new(
            &(0..32u8)
                .map(|b| b.wrapping_mul(7).wrapping_add(seed))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    /// Two agents on loopback addresses (127.0.0.0/8 all answer), same port.
    async fn pair() -> (Arc<Net>, Arc<Net>) {
        for port in 40_000..40_100u16 {
            let a = Net::bind(Ipv4Addr::new(127, 0, 0, 1), port, key(1), 4).await;
            let b = Net::bind(Ipv4Addr::new(127, 0, 0, 2), port, key(1), 4).await;
            if let (Ok(a), Ok(b)) = (a, b) {
                return (a, b);
            }
        }
        panic!("no free port pair on loopback");
    }

    #[tokio::test]
    async fn a_request_gets_its_answer() {
        let (a, b) = pair().await;
        let server = tokio::spawn({
            let b = b.clone();
            async move {
                let mut buf = [0u8; 2048];
                let (n, _) = b.recv(&mut buf).await.unwrap();
                let d = b.open(&buf[..n]).unwrap();
                assert_eq!(d.message, Message::CapacityRequest { vm: 9 });
                let reply = Message::CapacityResponse {
                    in_reply_to: d.header.seq,
                    free_slots: 3,
                    free_memory_mib: 512,
                };
                b.send(d.header.sender, 0, &reply).await.unwrap();
            }
        });
        let client = tokio::spawn({
            let a = a.clone();
            async move {
                let mut buf = [0u8; 2048];
                let (n, _) = a.recv(&mut buf).await.unwrap();
                let d = a.open(&buf[..n]).unwrap();
                if let Message::CapacityResponse { in_reply_to, .. } = d.message {
                    a.answer(in_reply_to, d.message);
                }
            }
        });
        let got = a
            .request(
                b.me(),
                0,
                &Message::CapacityRequest { vm: 9 },
                Duration::from_secs(2),
            )
            .await;
        server.await.unwrap();
        client.await.unwrap();
        assert!(
            matches!(got, Some(Message::CapacityResponse { free_slots: 3, .. })),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn an_unanswered_request_times_out() {
        let (a, b) = pair().await;
        let got = a
            .request(
                b.me(),
                0,
                &Message::LocationRequest { vm: 1 },
                Duration::from_millis(50),
            )
            .await;
        assert!(got.is_none());
        assert!(
            a.pending.lock().unwrap().is_empty(),
            "the waiter is unregistered"
        );
    }

    #[tokio::test]
    async fn replays_and_foreign_keys_are_refused() {
        let (a, b) = pair().await;
        a.send(b.me(), 0, &Message::LocationRequest { vm: 5 })
            .await
            .unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = b.recv(&mut buf).await.unwrap();
        let bytes = buf[..n].to_vec();
        assert!(b.open(&bytes).is_ok());
        let again = b.open(&bytes).unwrap_err();
        assert_eq!(again.reason(), "replayed");
        let stranger = Net::bind(Ipv4Addr::new(127, 0, 0, 3), b.port(), key(2), 4)
            .await
            .unwrap();
        stranger
            .send(b.me(), 0, &Message::LocationRequest { vm: 5 })
            .await
            .unwrap();
        let (n, _) = b.recv(&mut buf).await.unwrap();
        assert_eq!(b.open(&buf[..n]).unwrap_err().reason(), "bad_mac");
    }

    #[tokio::test]
    async fn acks_reach_their_transfer_only() {
        let (a, _b) = pair().await;
        let mut waiter = a.await_acks(77);
        let ack = |t| HopAck {
            transfer: t,
            received: score_core::wire::ChunkBitmap::full(2),
        };
        assert!(!a.deliver_ack(ack(78)), "no one waits for transfer 78");
        assert!(a.deliver_ack(ack(77)));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        assert_eq!(
            waiter.next_until(deadline).await.map(|x| x.transfer),
            Some(77)
        );
        drop(waiter);
        assert!(!a.deliver_ack(ack(77)), "unregistered when dropped");
    }
}
