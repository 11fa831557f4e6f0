//! Rigs one privileged test makes for itself: [`Lab`], a set of network
//! namespaces named with the test's prefix standing in for hosts (a bridge
//! `br0`) and VMs (behind a veth whose host end is the vif); a bpffs mount;
//! one ping or a paced burst of UDP from inside a VM; the links and
//! addresses of a small tree of hosts; the score classifiers loaded in the
//! kernel. Everything is removed in `Drop`, also when the test fails; a
//! failing step panics, as a test does.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use crate::{netns::in_netns, process::must_sh as sh};

/// Bytes of a UDP datagram with `payload` bytes as the classifier counts
/// it: Ethernet header (14) + IPv4 header (20) + UDP header (8) + payload.
pub fn udp_frame(payload: usize) -> u64 {
    (14 + 20 + 8 + payload) as u64
}

/// Bytes of one default `ping` frame: 14 + 20 + 8 (ICMP) + 56 data.
pub const PING_FRAME: u64 = 98;

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
        add_address(ns, "eth0", ip);
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
        let sock = UdpSocket::bind(src)?;
        let buf = vec![0x5au8; payload];
        for i in 0..count {
            sock.send_to(&buf, dst)?;
            if i % 20 == 19 {
                thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("udp from {ns}: {e:#}"));
    // Let the frames cross the bridge before anyone reads the counters.
    thread::sleep(Duration::from_millis(50));
}

/// IDs of the score classifiers loaded in the kernel now. A test takes
/// them before starting its agent and checks afterwards that the agent
/// left none of its own behind (programs of other processes may exist).
pub fn score_program_ids() -> BTreeSet<u64> {
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
pub fn new_score_programs(before: &BTreeSet<u64>) -> Vec<u64> {
    score_program_ids().difference(before).copied().collect()
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

/// Gives `dev` in namespace `ns` the address `ip`/16 (the test beds' one
/// flat network).
fn add_address(ns: &str, dev: &str, ip: &str) {
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{ip}/16"),
        "dev",
        dev,
    ]);
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
    add_address(ns, "br0", &addr.to_string());
}
