//! What `GET /status` shows and `score-agent status` prints: the answers an
//! operator asks for first (hosted VMs with cost, level and rate; the
//! token's epoch, round and last sighting; the last decisions; migrations
//! in flight; map fill; rejected datagrams). The numbers are read from the
//! same registry `/metrics` serves, so the two never disagree; the
//! protocol's own view comes through [`ProtocolView`].

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use prometheus::proto::{MetricFamily, MetricType};
use serde::{Deserialize, Serialize};

use crate::{collector::Collector, peer::Migrator};

/// The protocol's side of `/status`: what the token ring looks like from
/// this host. The peer protocol implements it; a test can too.
pub trait ProtocolView: Send + Sync {
    /// A snapshot, taken now.
    fn protocol_status(&self) -> ProtocolStatus;
}

/// The token ring as this host sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProtocolStatus {
    /// The newest token epoch this host knows.
    pub epoch: u64,
    /// Seconds since this host last saw the token (a chunk or a sighting).
    pub token_seen_seconds_ago: f64,
    /// Epochs this host regenerated after a token loss.
    pub regenerated: Vec<u64>,
    /// The last decisions made here, newest last, with score-core's
    /// numbers (cost before and after, benefit, target) and the outcome.
    pub decisions: Vec<serde_json::Value>,
}

/// A migration the backend is carrying out now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    /// The VM.
    pub vm: Ipv4Addr,
    /// The host it is going to.
    pub to: Ipv4Addr,
    /// Seconds since the backend was asked.
    pub seconds: f64,
}

/// What `/status` needs beyond the metrics: the protocol (once it runs)
/// and the migrations the backend is busy with. Shared by the daemon, the
/// migrator and the HTTP face.
#[derive(Default)]
pub struct StatusBoard {
    protocol: OnceLock<Arc<dyn ProtocolView>>,
    in_flight: Mutex<Vec<(Ipv4Addr, Ipv4Addr, Instant)>>,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBoard")
            .field("protocol", &self.protocol.get().is_some())
            .finish()
    }
}

/// Removes its migration from the board when the migration ends, however
/// it ends (a cancelled future included).
struct InFlightGuard {
    board: Arc<StatusBoard>,
    vm: Ipv4Addr,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut v = self
            .board
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(i) = v.iter().position(|(vm, _, _)| *vm == self.vm) {
            v.remove(i);
        }
    }
}

impl StatusBoard {
    /// An empty board: counting only, nothing in flight.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The protocol now runs; `/status` shows its view from here on.
    pub fn set_protocol(&self, p: Arc<dyn ProtocolView>) {
        let _ = self.protocol.set(p);
    }

    /// `migrate`, recording each call on the board while it runs.
    pub fn track(self: &Arc<Self>, migrate: Migrator) -> Migrator {
        let board = self.clone();
        Arc::new(move |vm, to| {
            let board = board.clone();
            let migrate = migrate.clone();
            Box::pin(async move {
                board
                    .in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((vm.ip, to, Instant::now()));
                let _guard = InFlightGuard {
                    board: board.clone(),
                    vm: vm.ip,
                };
                migrate(vm, to).await
            })
        })
    }

    fn in_flight(&self) -> Vec<InFlight> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(vm, to, at)| InFlight {
                vm: *vm,
                to: *to,
                seconds: at.elapsed().as_secs_f64(),
            })
            .collect()
    }
}

/// One hosted VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Its address (its ID in the token).
    pub vm: Ipv4Addr,
    /// Its backend interface here.
    pub vif: String,
    /// Its communication cost (paper eq. 1, its own terms) at its last
    /// decision; absent before the first.
    pub cost: Option<f64>,
    /// The highest level its traffic crosses, at its last decision.
    pub level: Option<u8>,
    /// Bytes per second it sends, over the rate window.
    pub transmit_bytes_per_second: f64,
    /// Bytes per second it receives, over the rate window.
    pub receive_bytes_per_second: f64,
}

/// The token, as this host knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenStatus {
    /// The newest epoch known here.
    pub epoch: u64,
    /// The round of the last token this host handled.
    pub round: u64,
    /// Seconds since it was last seen here.
    pub seen_seconds_ago: f64,
    /// Epochs this host regenerated.
    pub regenerated: Vec<u64>,
}

/// The kernel maps' health.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapStatus {
    /// Entries in the flow map at the last drain.
    pub flow_entries: u64,
    /// The flow map's capacity.
    pub flow_capacity: u64,
    /// `flow_entries / flow_capacity`.
    pub flow_fill: f64,
    /// New pairs the kernel could not count because the flow map was full.
    pub flow_map_full_total: u64,
    /// VM MACs not recorded because their map was full.
    pub vm_map_full_total: u64,
}

/// The body of `GET /status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The agent's version and commit.
    pub version: String,
    /// The VMs hosted here.
    pub vms: Vec<VmStatus>,
    /// Absent when the agent only counts (no `[node]`/`[peer]`).
    pub token: Option<TokenStatus>,
    /// The last decisions made here, newest last.
    pub decisions: Vec<serde_json::Value>,
    /// Migrations the backend is carrying out now.
    pub migrations_in_flight: Vec<InFlight>,
    /// Migrations ended since start, by outcome (done, failed, advisory).
    pub migrations_total: BTreeMap<String, u64>,
    /// The kernel maps.
    pub maps: MapStatus,
    /// Peer datagrams dropped since start, by reason.
    pub datagrams_rejected_total: BTreeMap<String, u64>,
}

/// The version `--version` and `/status` show: the package version, the
/// commit it was built from, and whether the eBPF program is in the binary
/// (a build without the eBPF toolchain carries none and cannot count).
#[cfg(not(score_ebpf_stub))]
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SCORE_GIT_COMMIT"),
    ", eBPF embedded: yes)"
);
/// The version `--version` and `/status` show (a build without eBPF).
#[cfg(score_ebpf_stub)]
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SCORE_GIT_COMMIT"),
    ", eBPF embedded: no)"
);

/// Reads the metric families once; looks values up by name and label.
struct Gathered(Vec<MetricFamily>);

impl Gathered {
    fn family(&self, name: &str) -> Option<&MetricFamily> {
        self.0.iter().find(|f| f.name() == name)
    }

    /// (label value, value) of every series of `name`, by `label`.
    fn by_label(&self, name: &str, label: &str) -> Vec<(String, f64)> {
        let Some(f) = self.family(name) else {
            return Vec::new();
        };
        f.get_metric()
            .iter()
            .filter_map(|m| {
                let l = m.get_label().iter().find(|l| l.name() == label)?;
                Some((l.value().to_owned(), value_of(f, m)))
            })
            .collect()
    }

    /// The value of the unlabelled series `name`.
    fn scalar(&self, name: &str) -> f64 {
        self.family(name)
            .and_then(|f| f.get_metric().first().map(|m| value_of(f, m)))
            .unwrap_or(0.0)
    }
}

fn value_of(f: &MetricFamily, m: &prometheus::proto::Metric) -> f64 {
    match f.get_field_type() {
        MetricType::GAUGE => m.get_gauge().get_value(),
        MetricType::COUNTER => m.get_counter().get_value(),
        _ => 0.0,
    }
}

fn lookup(series: &[(String, f64)], vm: Ipv4Addr) -> Option<f64> {
    let vm = vm.to_string();
    series.iter().find(|(l, _)| *l == vm).map(|(_, v)| *v)
}

/// The status of this agent now.
pub fn snapshot(collector: &Collector, board: &StatusBoard) -> Status {
    let g = Gathered(collector.metrics().registry().gather());
    let hosted = collector
        .with_datapath(|d| d.hosted_vms())
        .unwrap_or_default();
    let cost = g.by_label("score_vm_communication_cost", "vm");
    let level = g.by_label("score_vm_communication_level", "vm");
    let tx = g.by_label("score_vm_transmit_bytes_per_second", "vm");
    let rx = g.by_label("score_vm_receive_bytes_per_second", "vm");
    let mut vms: Vec<VmStatus> = hosted
        .into_iter()
        .map(|h| VmStatus {
            vm: h.ip,
            cost: lookup(&cost, h.ip),
            level: lookup(&level, h.ip).map(|l| l as u8),
            transmit_bytes_per_second: lookup(&tx, h.ip).unwrap_or(0.0),
            receive_bytes_per_second: lookup(&rx, h.ip).unwrap_or(0.0),
            vif: h.vif,
        })
        .collect();
    vms.sort_by_key(|v| v.vm);
    let protocol = board.protocol.get().map(|p| p.protocol_status());
    let token = protocol.as_ref().map(|p| TokenStatus {
        epoch: p.epoch,
        round: g.scalar("score_token_round") as u64,
        seen_seconds_ago: p.token_seen_seconds_ago,
        regenerated: p.regenerated.clone(),
    });
    let counts = |name: &str, label: &str| -> BTreeMap<String, u64> {
        g.by_label(name, label)
            .into_iter()
            .map(|(l, v)| (l, v as u64))
            .collect()
    };
    let flow_entries = g.scalar("score_bpf_flow_map_entries") as u64;
    let flow_capacity = g.scalar("score_bpf_flow_map_capacity") as u64;
    Status {
        version: VERSION.to_owned(),
        vms,
        token,
        decisions: protocol.map(|p| p.decisions).unwrap_or_default(),
        migrations_in_flight: board.in_flight(),
        migrations_total: counts("score_migrations_total", "outcome"),
        maps: MapStatus {
            flow_entries,
            flow_capacity,
            flow_fill: if flow_capacity == 0 {
                0.0
            } else {
                flow_entries as f64 / flow_capacity as f64
            },
            flow_map_full_total: g.scalar("score_bpf_flow_map_full_total") as u64,
            vm_map_full_total: g.scalar("score_bpf_vm_map_full_total") as u64,
        },
        datagrams_rejected_total: counts("score_datagrams_rejected_total", "reason"),
    }
}

/// Why `score-agent status` could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No connection, or it broke.
    #[error("asking the agent at {addr}: {source}")]
    Io {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// It answered something other than 200 and a body.
    #[error("the agent at {addr} answered {line:?}")]
    Status {
        /// Where.
        addr: SocketAddr,
        /// Its status line.
        line: String,
    },
    /// The body is not a status.
    #[error("the agent at {addr} sent a status that does not parse: {source}")]
    Json {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: serde_json::Error,
    },
}

/// GETs `/status` from the agent at `addr` (plain HTTP/1.1 on loopback:
/// the agent's own face, so no client library is needed).
pub fn fetch(addr: SocketAddr, timeout: Duration) -> Result<Status, FetchError> {
    let io = |source| FetchError::Io { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).map_err(io)?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let line = head.lines().next().unwrap_or_default();
    if !line.contains(" 200 ") {
        return Err(FetchError::Status {
            addr,
            line: line.to_owned(),
        });
    }
    serde_json::from_str(body).map_err(|source| FetchError::Json { addr, source })
}

fn age(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("{seconds:.1} s ago")
    } else if seconds < 7200.0 {
        format!("{:.1} min ago", seconds / 60.0)
    } else {
        format!("{:.1} h ago", seconds / 3600.0)
    }
}

/// One line for a decision: the VM, the epoch, what score-core said with
/// its numbers, and what the backend did. The decision is score-core's
/// `Step` as JSON: tagged `step` (`single` or `swap`), a single step being
/// a `Decision`, tagged `decision` (`migrate` or `stay`), with its numbers
/// beside the tags.
fn decision_line(d: &serde_json::Value) -> String {
    let vm = d["vm"].as_str().unwrap_or("?");
    let epoch = &d["epoch"];
    let step = &d["decision"];
    let kind = match (step["step"].as_str(), step["decision"].as_str()) {
        (Some("swap"), _) => "Swap",
        (_, Some("migrate")) => "Migrate",
        (_, Some("stay")) => "Stay",
        _ => "?",
    };
    let mut numbers: Vec<String> = step
        .as_object()
        .map(|o| {
            o.iter()
                // The tags are the kind; `vm` is the VM's ID in the token,
                // which the line names by address already.
                .filter(|(k, _)| !matches!(k.as_str(), "step" | "decision" | "vm"))
                .filter(|(_, v)| v.is_number() || v.is_string())
                .map(|(k, v)| match v.as_f64() {
                    Some(x) if x.fract() != 0.0 => format!("{k}={x:.1}"),
                    _ => format!("{k}={}", v.to_string().trim_matches('"')),
                })
                .collect()
        })
        .unwrap_or_default();
    numbers.sort();
    let outcome = d["outcome"]
        .as_str()
        .map(|o| format!(" -> {o}"))
        .unwrap_or_default();
    format!(
        "  {vm:<15} epoch {epoch} {kind} {}{outcome}",
        numbers.join(" ")
    )
}

/// The text `score-agent status` prints.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "score-agent {}", s.version);
    match &s.token {
        Some(t) => {
            let _ = writeln!(
                o,
                "token: epoch {} round {}, last seen here {}{}",
                t.epoch,
                t.round,
                age(t.seen_seconds_ago),
                if t.regenerated.is_empty() {
                    String::new()
                } else {
                    format!(", regenerated here: epochs {:?}", t.regenerated)
                }
            );
        }
        None => {
            let _ = writeln!(o, "token: none (counting only: no [node]/[peer])");
        }
    }
    let _ = writeln!(o, "\nhosted VMs: {}", s.vms.len());
    if !s.vms.is_empty() {
        let _ = writeln!(
            o,
            "  {:<15} {:<12} {:>14} {:>5} {:>14} {:>14}",
            "VM", "VIF", "COST", "LEVEL", "TX_B/S", "RX_B/S"
        );
        for v in &s.vms {
            let _ = writeln!(
                o,
                "  {:<15} {:<12} {:>14} {:>5} {:>14.1} {:>14.1}",
                v.vm.to_string(),
                v.vif,
                v.cost.map_or("-".to_owned(), |c| format!("{c:.1}")),
                v.level.map_or("-".to_owned(), |l| l.to_string()),
                v.transmit_bytes_per_second,
                v.receive_bytes_per_second
            );
        }
    }
    let _ = writeln!(
        o,
        "\nlast decisions: {} (newest last)",
        s.decisions.len().min(10)
    );
    let skip = s.decisions.len().saturating_sub(10);
    for d in &s.decisions[skip..] {
        let _ = writeln!(o, "{}", decision_line(d));
    }
    let _ = writeln!(
        o,
        "\nmigrations in flight: {}",
        s.migrations_in_flight.len()
    );
    for m in &s.migrations_in_flight {
        let _ = writeln!(o, "  {} -> {} for {:.1} s", m.vm, m.to, m.seconds);
    }
    let totals: Vec<String> = s
        .migrations_total
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(o, "migrations since start: {}", totals.join(", "));
    let m = &s.maps;
    let _ = writeln!(
        o,
        "\nflow map: {} of {} entries ({:.1}% full); pairs lost to a full map: {}; VM MACs lost: {}",
        m.flow_entries,
        m.flow_capacity,
        m.flow_fill * 100.0,
        m.flow_map_full_total,
        m.vm_map_full_total
    );
    let rejected: u64 = s.datagrams_rejected_total.values().sum();
    let reasons: Vec<String> = s
        .datagrams_rejected_total
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(
        o,
        "rejected datagrams: {rejected}{}",
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        }
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use score_core::{decision::Decision, swap::Step};

    fn sample() -> Status {
        Status {
            version: "0.1.0 (commit abc, eBPF embedded: yes)".into(),
            vms: vec![VmStatus {
                vm: Ipv4Addr::new(198, 18, 0, 1),
                vif: "vif1.0".into(),
                cost: Some(1234.5),
                level: Some(3),
                transmit_bytes_per_second: 10.0,
                receive_bytes_per_second: 20.0,
            }],
            token: Some(TokenStatus {
                epoch: 2,
                round: 7,
                seen_seconds_ago: 1.5,
                regenerated: vec![2],
            }),
            // As the peer records it: score-core's own step, serialized.
            decisions: vec![serde_json::json!({
                "vm": "198.18.0.1", "epoch": 2,
                "decision": Step::Single(Decision::Migrate {
                    vm: 7,
                    from: 1,
                    to: 3,
                    cost_before: 60.0,
                    cost_after: 10.25,
                    benefit: 99.5,
                    c_m: 0.0,
                    level_after: 1,
                    asked: 2,
                }),
                "outcome": "Done(1.2s)"
            })],
            migrations_in_flight: vec![InFlight {
                vm: Ipv4Addr::new(198, 18, 0, 2),
                to: Ipv4Addr::new(10, 0, 0, 2),
                seconds: 0.5,
            }],
            migrations_total: [("done".to_owned(), 1)].into(),
            maps: MapStatus {
                flow_entries: 5,
                flow_capacity: 100,
                flow_fill: 0.05,
                flow_map_full_total: 0,
                vm_map_full_total: 0,
            },
            datagrams_rejected_total: [("bad_mac".to_owned(), 3), ("replay".to_owned(), 0)].into(),
        }
    }

    #[test]
    fn json_round_trips() {
        let s = sample();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&j).unwrap(), s);
    }

    #[test]
    fn text_answers_the_first_questions() {
        let t = render(&sample());
        for needle in [
            "token: epoch 2 round 7, last seen here 1.5 s ago",
            "198.18.0.1",
            "1234.5",
            "epoch 2 Migrate asked=2 benefit=99.5 c_m=0.0 cost_after=10.2 cost_before=60.0 from=1 level_after=1 to=3 -> Done(1.2s)",
            "198.18.0.2 -> 10.0.0.2 for 0.5 s",
            "5 of 100 entries (5.0% full)",
            "rejected datagrams: 3 (bad_mac 3)",
        ] {
            assert!(t.contains(needle), "{needle:?} not in\n{t}");
        }
    }

    #[test]
    fn counting_only_has_no_token() {
        let mut s = sample();
        s.token = None;
        assert!(render(&s).contains("token: none"));
    }

    #[test]
    fn in_flight_migrations_leave_the_board_when_done() {
        let board = StatusBoard::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = Arc::new(Mutex::new(Some(rx)));
        let inner: Migrator = Arc::new(move |_, _| {
            let rx = rx.lock().unwrap().take();
            Box::pin(async move {
                if let Some(rx) = rx {
                    let _ = rx.await;
                }
                crate::peer::MigrationResult::Advisory
            })
        });
        let tracked = board.track(inner);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let vm = crate::datapath::HostedVm {
                ip: Ipv4Addr::new(198, 18, 0, 9),
                mac: [0; 6],
                vif: "vif9.0".into(),
            };
            let run = tokio::spawn(tracked(vm, Ipv4Addr::new(10, 0, 0, 7)));
            tokio::task::yield_now().await;
            let now = board.in_flight();
            assert_eq!(now.len(), 1);
            assert_eq!(now[0].vm, Ipv4Addr::new(198, 18, 0, 9));
            assert_eq!(now[0].to, Ipv4Addr::new(10, 0, 0, 7));
            tx.send(()).unwrap();
            run.await.unwrap();
            assert!(board.in_flight().is_empty());
        });
    }
}
