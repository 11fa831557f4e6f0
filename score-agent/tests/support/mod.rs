//! Test bed for the privileged tests: network namespaces standing in for
//! hosts and VMs, veth pairs standing in for vifs, and the agent binary run
//! inside them. Everything a test creates is removed in `Drop`, also when
//! the test fails.
#![allow(dead_code)]

pub mod guest;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Bytes of a UDP datagram with `payload` bytes as the classifier counts
/// it: Ethernet header (14) + IPv4 header (20) + UDP header (8) + payload.
pub fn udp_frame(payload: usize) -> u64 {
    (14 + 20 + 8 + payload) as u64
}

/// Bytes of one default `ping` frame: 14 + 20 + 8 (ICMP) + 56 data.
pub const PING_FRAME: u64 = 98;

/// Runs a command and panics with its stderr if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread that has entered network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: a valid netns fd; this thread alone changes namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A set of namespaces that one test owns. Names start with the test's
/// prefix; leftovers of an earlier crashed run are removed first.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    pub fn new(prefix: &str) -> Lab {
        let lab = Lab {
            prefix: prefix.to_owned(),
            namespaces: Vec::new(),
        };
        lab.remove_leftovers();
        lab
    }

    fn remove_leftovers(&self) {
        let list = sh(&["ip", "netns", "list"]);
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&self.prefix) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }

    fn netns(&mut self, name: &str) -> String {
        let ns = format!("{}{}", self.prefix, name);
        sh(&["ip", "netns", "add", &ns]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        self.namespaces.push(ns.clone());
        ns
    }

    /// A hypervisor host: a namespace with a bridge `br0`.
    pub fn host(&mut self, name: &str) -> String {
        let ns = self.netns(name);
        sh(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &ns, "link", "set", "br0", "up"]);
        ns
    }

    /// A VM behind `host`'s bridge: its own namespace with `eth0` at `ip`
    /// (/16), and the host end of its veth named `vif`.
    pub fn vm(&mut self, host: &str, vif: &str, name: &str, ip: &str) -> String {
        let ns = self.netns(name);
        self.plug(host, vif, &ns, ip);
        ns
    }

    /// Plugs namespace `ns` into `host`'s bridge through a veth whose host
    /// end is `vif`.
    pub fn plug(&self, host: &str, vif: &str, ns: &str, ip: &str) {
        sh(&[
            "ip", "-n", host, "link", "add", vif, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ]);
        sh(&["ip", "-n", host, "link", "set", vif, "master", "br0", "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/16"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
    }

    /// Deletes a vif (the VM stopped).
    pub fn unplug(&self, host: &str, vif: &str) {
        sh(&["ip", "-n", host, "link", "del", vif]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// One `ping` from `ns` to `dst`: resolves ARP and adds a known
/// [`PING_FRAME`] each way.
pub fn ping(ns: &str, dst: &str) {
    sh(&[
        "ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", "-q", dst,
    ]);
}

/// Sends `count` UDP datagrams of `payload` bytes from `ns` (bound to
/// `src`) to `dst`, paced so that no veth backlog overflows.
pub fn udp(ns: &str, src: &str, dst: &str, count: usize, payload: usize) {
    let src: SocketAddr = format!("{src}:0").parse().unwrap();
    let dst: SocketAddr = format!("{dst}:9").parse().unwrap();
    in_netns(ns, move || {
        let sock = UdpSocket::bind(src).expect("bind");
        let buf = vec![0x5au8; payload];
        for i in 0..count {
            sock.send_to(&buf, dst).expect("send");
            if i % 20 == 19 {
                thread::sleep(Duration::from_millis(2));
            }
        }
    });
    // Let the frames cross the bridge before anyone reads the counters.
    thread::sleep(Duration::from_millis(50));
}

/// `GET path` on `addr` from inside `ns`; returns the body.
pub fn http_get(ns: &str, addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let path = path.to_owned();
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: score\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.0 200")
            .then(|| body.to_owned())
            .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_owned()))
    })
}

/// A score-agent process running in a namespace, its stderr collected.
pub struct Agent {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    stdout: Option<thread::JoinHandle<String>>,
}

impl Agent {
    pub fn start(ns: &str, args: &[&str]) -> Agent {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_score-agent")])
            .args(args)
            .env("RUST_LOG", "info,netlink_packet_route=error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn score-agent");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("  agent: {line}");
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut out = child.stdout.take().unwrap();
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Agent {
            child: Some(child),
            stderr,
            stdout: Some(stdout),
        }
    }

    /// Waits until stderr contains every one of `needles`.
    pub fn wait_for(&self, needles: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let s = self.stderr.lock().unwrap();
                if needles.iter().all(|n| s.contains(n)) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent never logged {needles:?}:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `signal` and waits; returns (exit code, stdout, stderr).
    pub fn stop(mut self, signal: i32) -> (Option<i32>, String, String) {
        let mut child = self.child.take().unwrap();
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().expect("wait");
        let out = self.stdout.take().unwrap().join().unwrap_or_default();
        thread::sleep(Duration::from_millis(50));
        (status.code(), out, self.stderr())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// IDs of the score classifiers loaded in the kernel now. A test takes
/// them before starting its agent and checks afterwards that the agent
/// left none of its own behind (programs of other processes may exist).
pub fn score_program_ids() -> std::collections::BTreeSet<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    progs
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| {
                    p["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("score_vif"))
                })
                .filter_map(|p| p["id"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether classifiers other than those in `before` are loaded.
pub fn new_score_programs(before: &std::collections::BTreeSet<u64>) -> Vec<u64> {
    score_program_ids().difference(before).copied().collect()
}

/// A UDP socket on port 9 inside a VM that swallows what the tests send,
/// so that the VM's kernel answers no datagram with an ICMP "port
/// unreachable" (which would be real, but unplanned, traffic).
pub struct Sink {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

pub fn sink(ns: &str, ip: &str) -> Sink {
    let path = format!("/var/run/netns/{ns}");
    let addr: SocketAddr = format!("{ip}:9").parse().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: a valid netns fd; this thread alone changes namespace.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let sock = UdpSocket::bind(addr).expect("bind sink");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = sock.recv(&mut buf);
        }
    });
    ready_rx.recv().expect("sink bound");
    Sink {
        stop,
        thread: Some(thread),
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A bpffs mounted for one test, unmounted and removed in `Drop`.
pub struct BpfFs {
    pub path: String,
}

impl BpfFs {
    pub fn mount(path: &str) -> BpfFs {
        let _ = Command::new("umount")
            .arg(path)
            .stderr(Stdio::null())
            .status();
        std::fs::create_dir_all(path).unwrap();
        sh(&["mount", "-t", "bpf", "bpf", path]);
        BpfFs {
            path: path.to_owned(),
        }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Percent-encodes `s` for a URL query value (RFC 3986 unreserved kept).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where Debian's `prometheus` package (installed by `cargo xtask setup`)
/// puts the server.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A real Prometheus server in a namespace, scraping `targets` every
/// second, its storage in a temporary directory; killed in `Drop`.
pub struct Prometheus {
    child: Option<Child>,
    ns: String,
    /// Its HTTP address (`host:port`) inside the namespace.
    pub addr: String,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, listening on `listen`, scraping `targets`
    /// (`host:port`, path `/metrics`) every second.
    pub fn start(ns: &str, listen: &str, targets: &[&str]) -> Prometheus {
        assert!(
            std::path::Path::new(PROMETHEUS_BIN).exists(),
            "{PROMETHEUS_BIN} is missing: run `cargo xtask setup` (Debian package prometheus)"
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: score\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let data = dir.path().join("data");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, PROMETHEUS_BIN])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn prometheus");
        let log = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Prometheus {
            child: Some(child),
            ns: ns.to_owned(),
            addr: listen.to_owned(),
            log,
            _dir: dir,
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `/-/ready` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while http_get(&self.ns, &self.addr, "/-/ready").is_none() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after {timeout:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs an instant PromQL query through the HTTP API; the result
    /// vector as (labels, value). `None` if the server did not answer.
    pub fn query(&self, promql: &str) -> Option<Vec<(serde_json::Value, f64)>> {
        let body = http_get(
            &self.ns,
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        if v["status"] != "success" {
            return None;
        }
        let result = v["data"]["result"].as_array()?;
        let mut out = Vec::new();
        for r in result {
            // An instant vector sample is [unix time, "value"].
            let value = r["value"][1].as_str()?.parse().ok()?;
            out.push((r["metric"].clone(), value));
        }
        Some(out)
    }

    /// Polls `promql` until it returns exactly one sample equal to `want`
    /// (the first scrape is queryable only ~5.5 s after start, TESTBED.md).
    /// Panics with the last answer, the targets' health and the log.
    pub fn wait_for_value(&self, promql: &str, want: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            let answer = self.query(promql);
            if let Some(v) = &answer
                && v.len() == 1
                && v[0].1 == want
            {
                return;
            }
            last = answer;
            thread::sleep(Duration::from_millis(250));
        }
        let targets = http_get(&self.ns, &self.addr, "/api/v1/targets");
        panic!(
            "prometheus never answered {promql} = {want}; last answer: {last:?}\n\
             targets: {targets:?}\nlog:\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Joins the `br0` bridges of namespaces `a` and `b` with a veth pair,
/// `a_end` in `a` and `b_end` in `b`: one link of the data-centre tree.
pub fn bridge_link(a: &str, a_end: &str, b: &str, b_end: &str) {
    sh(&[
        "ip", "-n", a, "link", "add", a_end, "type", "veth", "peer", "name", b_end, "netns", b,
    ]);
    sh(&["ip", "-n", a, "link", "set", a_end, "master", "br0", "up"]);
    sh(&["ip", "-n", b, "link", "set", b_end, "master", "br0", "up"]);
}

/// Gives host namespace `ns` its address `addr`/16 on br0, and br0 a MAC
/// of its own (02:01: + the address), set by hand so that the kernel never
/// recalculates it from the ports: a bridge whose MAC was never set takes
/// the lowest MAC among its ports, so a tap coming or going could change
/// the host's MAC under its neighbours' ARP caches (the testbed does the
/// same).
pub fn address_host(ns: &str, addr: std::net::Ipv4Addr) {
    let o = addr.octets();
    let mac = format!("02:01:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    sh(&["ip", "-n", ns, "link", "set", "br0", "address", &mac]);
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/16"),
        "dev",
        "br0",
    ]);
}
