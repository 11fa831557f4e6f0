//! A small emulated data centre for the distributed agent's privileged
//! tests: host namespaces with a bridge and an address, joined by a core
//! bridge; VM namespaces behind vifs; one real `score-agent run` per host
//! with a configuration a test tunes through [`Options`]; UDP traffic
//! between VMs that keeps flowing when a VM moves. Everything is removed
//! in `Drop`; a failing step panics, as the test would.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use crate::{
    agents::Agent,
    http,
    lab::{BpfFs, Lab},
    metrics,
    process::must_sh as sh,
    traffic::{Sink, Stream, sink},
};

/// Where the hosts are in the tree: pods of racks of host indices.
pub type Tree = Vec<Vec<Vec<usize>>>;

pub struct Host {
    pub ns: String,
    pub addr: Ipv4Addr,
}

pub struct Vm {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub vif: String,
}

/// Knobs a test may turn before the agents start.
pub struct Options {
    pub policy: &'static str,
    pub backend: &'static str,
    pub slots: u32,
    /// Host index -> namespace name in the netns backend's table (to make
    /// one target unreachable).
    pub host_ns_override: Vec<(usize, String)>,
    /// (agent index, host index, namespace name): like `host_ns_override`,
    /// in one agent's table only (to make one direction of a swap fail).
    pub ns_override_at: Vec<(usize, usize, String)>,
    pub token_timeout: &'static str,
    /// `[policy] swaps`.
    pub swaps: bool,
    /// `[policy] chains`: ejection chains when a VM would stay.
    pub chains: bool,
    /// `[policy] rotations`: three-VM rotations when a VM would stay.
    pub rotations: bool,
    /// `[policy] groups`: group moves when a VM would stay.
    pub groups: bool,
    /// `[node] migration_headroom`.
    pub headroom: u32,
    /// (host index, headroom): another `migration_headroom` on that host.
    pub headroom_at: Vec<(usize, u32)>,
    /// `[policy] candidates`.
    pub candidates: &'static str,
    /// `[policy] migration_cost`, as written in the file (`None`: the
    /// default, 0).
    pub migration_cost: Option<&'static str>,
    /// `http_listen`: [`HTTP`], loopback, unless a test scrapes the agents
    /// from another namespace (then `0.0.0.0:9464`, still [`HTTP`] too).
    pub http_listen: &'static str,
    /// Who the agents run as: root (`None`), or another user holding
    /// exactly some capabilities.
    pub run_as: Option<RunAs>,
    /// `[peer] key_file` and `previous_key_files`, as names of files
    /// in the data centre's directory ([`Dc::write_key`]); `None`: the
    /// data centre's own key, alone.
    pub keys: Option<(&'static str, &'static [&'static str])>,
}

/// An agent run as a user other than root with exactly `caps` (setpriv:
/// inheritable and ambient, so that they survive the exec of the agent
/// and of the programs it runs), as the packaged unit runs it.
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Capability names as setpriv takes them (`bpf`, `net_admin`).
    pub caps: Vec<&'static str>,
    /// An agent binary that user may execute (the build's target/ may be
    /// closed to others).
    pub binary: std::path::PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            policy: "distributed",
            backend: "netns",
            slots: 2,
            host_ns_override: Vec::new(),
            ns_override_at: Vec::new(),
            token_timeout: "4s",
            swaps: false,
            chains: false,
            rotations: false,
            groups: false,
            headroom: 0,
            headroom_at: Vec::new(),
            candidates: "paper",
            migration_cost: None,
            http_listen: HTTP,
            run_as: None,
            keys: None,
        }
    }
}

pub struct Dc {
    pub prefix: String,
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    pub agents: Vec<Option<Agent>>,
    pub tree: Tree,
    pub key: Vec<u8>,
    pub topology: String,
    traffic: Vec<Stream>,
    sinks: Vec<Sink>,
    dir: tempfile::TempDir,
    _bpffs: BpfFs,
    /// Its namespaces, deleted when the data centre is dropped.
    _lab: Lab,
}

/// UDP port of the peer protocol between the agents (the agent's default).
pub const PORT: u16 = 7760;
/// Where every agent serves /flows and /metrics, inside its host namespace.
pub const HTTP: &str = "127.0.0.1:9464";

impl Dc {
    /// Builds the tree with `vms[i]` = host index of VM i, and starts no
    /// agent yet.
    pub fn build(prefix: &str, tree: Tree, vm_hosts: &[usize]) -> Dc {
        let mut lab = Lab::new(prefix);
        let core = lab.host("core");
        let n_hosts = tree.iter().flatten().flatten().count();
        let mut hosts = Vec::new();
        for i in 0..n_hosts {
            let ns = lab.host(&format!("h{}", i + 1));
            let addr = Ipv4Addr::new(198, 18, 0, i as u8 + 1);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/16"),
                "dev",
                "br0",
            ]);
            let up = format!("up{}", i + 1);
            sh(&[
                "ip", "-n", &core, "link", "add", &up, "type", "veth", "peer", "name", "up0",
                "netns", &ns,
            ]);
            sh(&["ip", "-n", &core, "link", "set", &up, "master", "br0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "up0", "master", "br0", "up"]);
            hosts.push(Host { ns, addr });
        }
        let mut vms = Vec::new();
        let mut sinks = Vec::new();
        for (i, &h) in vm_hosts.iter().enumerate() {
            let ip = Ipv4Addr::new(198, 18, 1, i as u8 + 1);
            let vif = format!("vif{}.0", i + 1);
            let ns = lab.vm(&hosts[h].ns, &vif, &format!("vm-{ip}"), &ip.to_string());
            sinks.push(sink(&ns, &ip.to_string()));
            vms.push(Vm { ns, ip, vif });
        }
        let dir = tempfile::tempdir().unwrap();
        let key: Vec<u8> = (0..32u8)
            .map(|b| b.wrapping_mul(37).wrapping_add(11))
            .collect();
        let key_path = dir.path().join("cluster.key");
        std::fs::write(&key_path, &key).unwrap();
        std::fs::set_permissions(
            &key_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let mut topo = String::from("weights = [1.0, 2.718281828459045, 20.085536923187668]\n");
        for pod in &tree {
            topo.push_str("[[children]]\n");
            for rack in pod {
                let list: Vec<String> = rack
                    .iter()
                    .map(|&h| format!("\"{}\"", hosts[h].addr))
                    .collect();
                topo.push_str(&format!(
                    "[[children.children]]\nhosts = [{}]\n",
                    list.join(", ")
                ));
            }
        }
        std::fs::write(dir.path().join("topology.toml"), &topo).unwrap();
        let bpffs = BpfFs::mount(&format!("/run/{prefix}bpf-{}", std::process::id()));
        Dc {
            prefix: prefix.to_owned(),
            agents: hosts.iter().map(|_| None).collect(),
            hosts,
            vms,
            tree,
            key,
            topology: topo,
            traffic: Vec::new(),
            sinks,
            dir,
            _bpffs: bpffs,
            _lab: lab,
        }
    }

    fn config(&self, i: usize, o: &Options) -> String {
        let h = &self.hosts[i];
        let mut host_table = String::new();
        for (j, other) in self.hosts.iter().enumerate() {
            let ns = o
                .ns_override_at
                .iter()
                .find(|(a, k, _)| *a == i && *k == j)
                .map(|(_, _, n)| n.clone())
                .or_else(|| {
                    o.host_ns_override
                        .iter()
                        .find(|(k, _)| *k == j)
                        .map(|(_, n)| n.clone())
                })
                .unwrap_or_else(|| other.ns.clone());
            host_table.push_str(&format!("\"{}\" = \"{}\"\n", other.addr, ns));
        }
        let backend = match o.backend {
            "netns" => format!(
                "[backend]\nkind = \"netns\"\nvm_netns_prefix = \"{}vm-\"\n[backend.hosts]\n{host_table}",
                self.prefix
            ),
            other => format!("[backend]\nkind = \"{other}\"\n"),
        };
        let dir = self.dir.path().display();
        let (key, previous) = o.keys.unwrap_or(("cluster.key", &[]));
        let previous = previous
            .iter()
            .map(|k| format!("\"{dir}/{k}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let coordinator = if o.policy == "global" {
            format!("coordinator = \"{}\"\n", self.hosts[0].addr)
        } else {
            String::new()
        };
        format!(
            "interfaces = [\"vif*\"]\ndrain_interval = \"200ms\"\nrate_window = \"3s\"\nidle_timeout = \"6s\"\n\
             pin_path = \"{bpf}/{ns}\"\nhttp_listen = \"{http}\"\n\
             [node]\naddress = \"{addr}\"\nvm_slots = {slots}\nmemory_mib = 4096\nvm_memory_mib = 256\n\
             migration_headroom = {headroom}\n\
             [topology]\nfile = \"{dir}/topology.toml\"\n\
             [peer]\nport = {PORT}\nkey_file = \"{dir}/{key}\"\nprevious_key_files = [{previous}]\nstate_dir = \"{dir}/state\"\nhop_timeout = \"200ms\"\nhop_retries = 3\n\
             request_timeout = \"300ms\"\ntoken_timeout = \"{tt}\"\nreport_interval = \"1s\"\n{coordinator}\
             [policy]\nkind = \"{policy}\"\ntoken_hold = \"400ms\"\nhold_down = \"30s\"\nswaps = {swaps}\nchains = {chains}\nrotations = {rotations}\ngroups = {groups}\n\
             candidates = \"{candidates}\"\nswap_timeout = \"20s\"\n{cm}{backend}",
            bpf = self._bpffs.path,
            ns = h.ns,
            addr = h.addr,
            slots = o.slots,
            tt = o.token_timeout,
            policy = o.policy,
            headroom = o
                .headroom_at
                .iter()
                .find(|(h, _)| *h == i)
                .map_or(o.headroom, |(_, n)| *n),
            swaps = o.swaps,
            chains = o.chains,
            rotations = o.rotations,
            groups = o.groups,
            candidates = o.candidates,
            cm = o
                .migration_cost
                .map(|c| format!("migration_cost = {c}\n"))
                .unwrap_or_default(),
            http = o.http_listen,
        )
    }

    /// Writes a key file `name` into the data centre's directory, readable
    /// by its owner only (as the agent requires).
    pub fn write_key(&self, name: &str, key: &[u8]) {
        let path = self.dir.path().join(name);
        std::fs::write(&path, key).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }

    /// Starts every host's agent.
    pub fn start_agents(&mut self, o: &Options) {
        for i in 0..self.hosts.len() {
            self.start_agent(i, o);
        }
        for a in self.agents.iter().flatten() {
            a.wait_for(&["score-agent running"], Duration::from_secs(30));
        }
    }

    pub fn start_agent(&mut self, i: usize, o: &Options) {
        let path = self.dir.path().join(format!("agent-{i}.toml"));
        std::fs::write(&path, self.config(i, o)).unwrap();
        let mut args = vec!["run", "--config", path.to_str().unwrap()];
        if o.policy == "global" && i == 0 {
            args.push("--coordinator");
        }
        let agent = match &o.run_as {
            None => Agent::start(&self.hosts[i].ns, &args),
            Some(r) => {
                // What the user must read and write: the configuration's
                // directory, the key (which stays 0600) and its pin
                // directory, as the package's prepare-pins makes it.
                let owner = format!("{}:{}", r.uid, r.gid);
                std::fs::set_permissions(
                    self.dir.path(),
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )
                .unwrap();
                let key = self.dir.path().join("cluster.key");
                sh(&["chown", &owner, key.to_str().unwrap()]);
                let state = self.dir.path().join("state");
                std::fs::create_dir_all(&state).unwrap();
                sh(&["chown", &owner, state.to_str().unwrap()]);
                let pins = format!("{}/{}", self._bpffs.path, self.hosts[i].ns);
                std::fs::create_dir_all(&pins).unwrap();
                sh(&["chown", &owner, &pins]);
                let set = std::iter::once("-all".to_owned())
                    .chain(r.caps.iter().map(|c| format!("+{c}")))
                    .collect::<Vec<_>>()
                    .join(",");
                let (reuid, regid) = (format!("--reuid={}", r.uid), format!("--regid={}", r.gid));
                let (inh, ambient) = (format!("--inh-caps={set}"), format!("--ambient-caps={set}"));
                let mut wrapped = vec![
                    reuid.as_str(),
                    regid.as_str(),
                    "--clear-groups",
                    inh.as_str(),
                    ambient.as_str(),
                    "--",
                    r.binary.to_str().unwrap(),
                ];
                wrapped.extend(&args);
                Agent::start_bin(
                    std::path::Path::new("/usr/bin/setpriv"),
                    &self.hosts[i].ns,
                    &wrapped,
                )
            }
        };
        self.agents[i] = Some(agent);
    }

    /// Sends `rate` bytes/s of UDP from VM `a` to VM `b` until dropped.
    pub fn chat(&mut self, a: usize, b: usize, rate: u64) {
        self.traffic.push(Stream::start(
            &self.vms[a].ns,
            self.vms[a].ip,
            self.vms[b].ip,
            rate,
        ));
    }

    /// The host whose namespace holds VM `v`'s vif now, if exactly one.
    pub fn host_of(&self, v: usize) -> Option<usize> {
        let found: Vec<usize> = (0..self.hosts.len())
            .filter(|&h| {
                std::process::Command::new("ip")
                    .args(["-n", &self.hosts[h].ns, "link", "show", &self.vms[v].vif])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .collect();
        (found.len() == 1).then(|| found[0])
    }

    /// GET a path from host `i`'s agent.
    pub fn get(&self, i: usize, path: &str) -> Option<String> {
        let addr: SocketAddr = HTTP.parse().expect("HTTP is an address");
        http::get(&self.hosts[i].ns, addr, path).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A metric's value from host `i`'s agent (sum over matching series).
    pub fn metric(&self, i: usize, name: &str) -> f64 {
        let Some(text) = self.get(i, "/metrics") else {
            return f64::NAN;
        };
        metrics::value(&text, name)
    }

    /// The measured rates: every directed pair, the largest rate any agent
    /// reports (a pair between two hosts is counted on both).
    pub fn measured_rates(&self) -> HashMap<(Ipv4Addr, Ipv4Addr), f64> {
        let mut out: HashMap<(Ipv4Addr, Ipv4Addr), f64> = HashMap::new();
        for i in 0..self.hosts.len() {
            let Some(body) = self.get(i, "/flows") else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            for p in v["pairs"].as_array().unwrap() {
                let k = (
                    p["src"].as_str().unwrap().parse().unwrap(),
                    p["dst"].as_str().unwrap().parse().unwrap(),
                );
                let r = p["rate_bps"].as_f64().unwrap();
                let e = out.entry(k).or_default();
                *e = e.max(r);
            }
        }
        out
    }

    /// Index of a VM by address.
    pub fn vm_index(&self, ip: Ipv4Addr) -> Option<usize> {
        self.vms.iter().position(|v| v.ip == ip)
    }

    /// Waits until `f` holds, polling.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Dc) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f(self) {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
        let logs: Vec<String> = self.agents.iter().flatten().map(|a| a.stderr()).collect();
        panic!("timed out waiting for {what}\n{}", logs.join("\n----\n"));
    }

    /// Stops every agent (SIGTERM) and returns their stderr.
    pub fn stop_agents(&mut self) -> Vec<String> {
        let mut logs = Vec::new();
        for a in self.agents.iter_mut() {
            if let Some(a) = a.take() {
                let (code, _, err) = a.stop(libc::SIGTERM);
                assert_eq!(code, Some(0), "agent exit: {err}");
                logs.push(err);
            }
        }
        logs
    }
}

impl Drop for Dc {
    fn drop(&mut self) {
        self.traffic.clear();
        for a in self.agents.iter_mut() {
            a.take();
        }
        self.sinks.clear();
    }
}
