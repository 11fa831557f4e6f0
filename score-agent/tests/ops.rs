//! Privileged tests of the operator's kit: the agent run as an unprivileged
//! user holding exactly the capabilities docs/OPERATIONS.md lists counts
//! exactly and answers `score-agent status`; without one of them it stops
//! with one line naming it; the Debian package installs, passes
//! `systemd-analyze verify` and `man`, keeps pinned counters across an
//! upgrade and purges without a trace. Needs root; `#[ignore]`d under plain
//! `cargo test`, run by `cargo xtask test` (which builds the package and
//! passes its path in SCORE_DEB).

mod dc;
mod support;

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use support::*;

const A: &str = "198.18.3.1";
const B: &str = "198.18.3.2";
/// Where the agent serves HTTP, inside the host namespace.
const AGENT: &str = "127.0.0.1:9464";
/// The user the unprivileged agent runs as (nobody).
const UID: u32 = 65534;
/// The capabilities the agent needs to count (docs/OPERATIONS.md).
const CAPS: &[&str] = &["bpf", "net_admin"];
/// The capabilities the agent needs with the peer protocol, whatever the
/// backend (docs/OPERATIONS.md): CAPS, and what the verifier wants for the
/// classifiers that intercept control datagrams.
const CLUSTER_CAPS: &[&str] = &["bpf", "net_admin", "perfmon"];
/// The capabilities the agent needs with the netns backend
/// (docs/OPERATIONS.md): CAPS, and what moving a link between namespaces
/// (`ip -n`, setns) and the gratuitous ARP (a packet socket) take;
/// CAP_SYS_ADMIN stands in for CAP_PERFMON in the kernel.
const NETNS_CAPS: &[&str] = &["bpf", "net_admin", "sys_admin", "net_raw"];

/// A copy of the agent binary that an unprivileged user can execute (the
/// build's target/ may be closed to others).
fn world_executable_agent(dir: &Path) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("score-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_score-agent"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// A process started in a namespace as user `UID` with exactly `caps`
/// (inheritable and ambient, so that they survive the exec), stderr kept.
struct Unprivileged {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
}

impl Unprivileged {
    fn start(ns: &str, caps: &[&str], bin: &Path, args: &[&str]) -> Unprivileged {
        Self::start_as(ns, (UID, UID), caps, bin, args)
    }

    /// As `start`, as user and group `ids`.
    fn start_as(
        ns: &str,
        (uid, gid): (u32, u32),
        caps: &[&str],
        bin: &Path,
        args: &[&str],
    ) -> Unprivileged {
        let set = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(format!("--inh-caps={set}"))
            .arg(format!("--ambient-caps={set}"))
            .arg("--")
            .arg(bin)
            .args(args)
            // The transport's debug lines name what it refuses and why.
            .env(
                "RUST_LOG",
                "info,netlink_packet_route=error,score_agent::peer::net=debug",
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn setpriv score-agent");
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
        Unprivileged {
            child: Some(child),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_for(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "agent never logged {needle:?}:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit (killing after `timeout`).
    fn wait(mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent did not exit in {timeout:?}:\n{}", self.stderr());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.as_ref().unwrap().id();
        // setpriv execs the agent: this pid is ip's, which execs setpriv,
        // which execs the agent; one process throughout.
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        self.wait(timeout)
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A bpffs with a pin directory that `UID` owns, as the unit's
/// prepare-pins makes it.
fn pin_dir(name: &str) -> (BpfFs, String) {
    let bpffs = BpfFs::mount(&format!("/run/score-test-{name}-{}", std::process::id()));
    let pins = format!("{}/score", bpffs.path);
    std::fs::create_dir_all(&pins).unwrap();
    sh(&["chown", &format!("{UID}:{UID}"), &pins]);
    (bpffs, pins)
}

fn write_config(dir: &Path, pins: &str) -> PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"vif*\"]\ndrain_interval = \"100ms\"\nrate_window = \"60s\"\n\
             pin_path = \"{pins}\"\nhttp_listen = \"{AGENT}\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    config
}

/// The value of the series `name` in the agent's /metrics, if there.
fn metric(ns: &str, name: &str) -> Option<f64> {
    let text = http_get(ns, AGENT, "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn wait_metric(ns: &str, name: &str, want: f64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = metric(ns, name);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: want {want}, last {got:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes of the directed pair `src -> dst` in the agent's /flows: the
/// kernel's own totals, which the pinned map keeps across restarts.
fn pair_bytes(ns: &str, src: &str, dst: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(&http_get(ns, AGENT, "/flows")?).ok()?;
    v["pairs"]
        .as_array()?
        .iter()
        .find(|p| p["src"] == src && p["dst"] == dst)?["bytes"]
        .as_u64()
}

fn wait_pair_bytes(ns: &str, src: &str, dst: &str, want: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = pair_bytes(ns, src, dst);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{src} -> {dst}: want {want} bytes, last {got:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `score-agent status ARGS` run in `ns`; (exit code, stdout, stderr).
fn status_cmd(ns: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_score-agent"),
            "status",
        ])
        .args(args)
        .output()
        .expect("run score-agent status");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "privileged: needs root, BPF, netns and setpriv; run by cargo xtask test"]
fn least_privilege_agent_counts_exactly_and_answers_status() {
    let mut lab = Lab::new("sct-ops-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    let _sinks = [sink(&a, A), sink(&b, B)];
    let (_bpffs, pins) = pin_dir("ops");
    let dir = tempfile::tempdir().unwrap();
    let bin = world_executable_agent(dir.path());
    let config = write_config(dir.path(), &pins);

    let agent = Unprivileged::start(
        &h,
        CAPS,
        &bin,
        &["run", "--config", config.to_str().unwrap()],
    );
    agent.wait_for("score-agent running", Duration::from_secs(30));
    agent.wait_for("attached iface=vif2.0", Duration::from_secs(30));

    ping(&a, B);
    udp(&a, A, B, 100, 500);
    udp(&b, B, A, 30, 200);
    let a_to_b = PING_FRAME + 100 * udp_frame(500);
    let b_to_a = PING_FRAME + 30 * udp_frame(200);
    let wait = Duration::from_secs(30);
    wait_metric(
        &h,
        &format!("score_vm_transmit_bytes_total{{vm=\"{A}\"}}"),
        a_to_b as f64,
        wait,
    );
    wait_metric(
        &h,
        &format!("score_vm_transmit_bytes_total{{vm=\"{B}\"}}"),
        b_to_a as f64,
        wait,
    );
    wait_metric(
        &h,
        &format!("score_vm_receive_bytes_total{{vm=\"{A}\"}}"),
        b_to_a as f64,
        wait,
    );

    // The pins belong to the unprivileged user: the next run reopens them.
    for m in ["SCORE_FLOWS", "SCORE_SLOTS", "SCORE_STATS", "SCORE_VM_MACS"] {
        let out = sh(&["stat", "-c", "%u", &format!("{pins}/{m}")]);
        assert_eq!(out.trim(), UID.to_string(), "owner of pin {m}");
    }

    // `score-agent status --json`: both VMs with their rates, the map.
    let (code, out, err) = status_cmd(&h, &["--addr", AGENT, "--json"]);
    assert_eq!(code, Some(0), "status --json failed: {err}");
    let s: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    let vms = s["vms"].as_array().expect("vms");
    let ips: Vec<&str> = vms.iter().filter_map(|v| v["vm"].as_str()).collect();
    assert!(ips.contains(&A) && ips.contains(&B), "{out}");
    let va = vms.iter().find(|v| v["vm"] == A).unwrap();
    assert_eq!(va["vif"], "vif1.0");
    assert!(
        va["transmit_bytes_per_second"].as_f64().unwrap() > 0.0,
        "{out}"
    );
    assert_eq!(s["maps"]["flow_capacity"], 65536, "{out}");
    assert!(s["maps"]["flow_entries"].as_u64().unwrap() >= 2, "{out}");
    assert!(s["token"].is_null(), "counting only: no token: {out}");
    assert!(
        s["version"]
            .as_str()
            .unwrap()
            .contains("eBPF embedded: yes")
    );

    // The text form answers the same questions.
    let (code, out, err) = status_cmd(&h, &["--addr", AGENT]);
    assert_eq!(code, Some(0), "status failed: {err}");
    for needle in [
        "hosted VMs: 2",
        A,
        "vif2.0",
        "of 65536 entries",
        "rejected datagrams: 0",
        "token: none",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }

    assert_eq!(
        agent.terminate(Duration::from_secs(20)).code(),
        Some(0),
        "clean exit expected"
    );

    // Nothing answers any more: status says so in one line, exit 1.
    let (code, _, err) = status_cmd(&h, &["--addr", AGENT, "--timeout", "2"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(AGENT), "{err}");
}

#[test]
#[ignore = "privileged: needs root, BPF, netns and setpriv; run by cargo xtask test"]
fn without_one_capability_the_agent_names_it() {
    let mut lab = Lab::new("sct-opc-");
    let h = lab.host("h");
    let _a = lab.vm(&h, "vif1.0", "a", A);
    let (_bpffs, pins) = pin_dir("opc");
    let dir = tempfile::tempdir().unwrap();
    let bin = world_executable_agent(dir.path());
    let config = write_config(dir.path(), &pins);
    for missing in CAPS {
        let have: Vec<&str> = CAPS.iter().copied().filter(|c| c != missing).collect();
        let agent = Unprivileged::start(
            &h,
            &have,
            &bin,
            &["run", "--config", config.to_str().unwrap()],
        );
        let code = agent_wait(agent);
        assert_eq!(code.0, Some(3), "exit code 3 without {missing}: {}", code.1);
        let err = code.1;
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
        let name = format!("missing capability CAP_{}", missing.to_uppercase());
        assert!(err.contains(&name), "{name:?} not in {err:?}");
    }
    // Nothing was pinned by the refused runs.
    assert_eq!(std::fs::read_dir(&pins).unwrap().count(), 0);
}

fn agent_wait(agent: Unprivileged) -> (Option<i32>, String) {
    let stderr = agent.stderr.clone();
    let code = agent.wait(Duration::from_secs(20)).code();
    let err = stderr.lock().unwrap().clone();
    (code, err)
}

/// The package `cargo xtask test` built for these tests.
fn package() -> String {
    std::env::var("SCORE_DEB")
        .expect("SCORE_DEB: the .deb to test; `cargo xtask test` builds it and sets this")
}

/// The paths the package installs, from `dpkg-deb -c` (leading "." cut).
fn package_paths(deb: &str) -> Vec<String> {
    sh(&["dpkg-deb", "-c", deb])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').trim_end_matches('/').to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Each entry of a `dpkg-deb -c` or `tar -tvzf` listing as (mode, size,
/// path and link target), the leading "." and a directory's "/" cut.
fn listing(text: &str) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(5..)?.join(" ");
            let path = path.trim_start_matches('.').trim_end_matches('/');
            Some((f[0].to_owned(), f[2].to_owned(), path.to_owned()))
        })
        .collect();
    v.sort();
    v
}

#[test]
#[ignore = "needs the .deb and tarball that cargo xtask test builds; run by cargo xtask test"]
fn the_tarball_holds_what_the_package_installs() {
    let tarball = std::env::var("SCORE_TARBALL")
        .expect("SCORE_TARBALL: the tarball to test; `cargo xtask test` builds it and sets this");
    let deb = listing(&sh(&["dpkg-deb", "-c", &package()]));
    let tar = listing(&sh(&["tar", "-tvzf", &tarball]));
    assert!(
        deb.iter().any(|(_, _, p)| p == "/usr/bin/score-agent"),
        "{deb:?}"
    );
    assert_eq!(deb, tar, "the .deb and the tarball differ");
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "score-agent"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn has_user(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `cmd`; (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("spawn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `man`'s output without its overstrike bold (X, backspace, X).
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\u{8}' {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out
}

/// Purges the package however the test ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "score-agent"])
            .stdout(Stdio::null())
            .status();
    }
}

#[test]
#[ignore = "privileged: needs root, dpkg, BPF and netns; run by cargo xtask test"]
fn package_installs_upgrades_with_counters_kept_and_purges_cleanly() {
    let deb = package();
    if installed() || has_user("score") {
        panic!("score-agent is installed here already (or a user `score` exists): not touching it");
    }
    let paths = package_paths(&deb);
    assert!(
        paths.iter().any(|p| p == "/usr/bin/score-agent"),
        "{paths:?}"
    );
    let before: Vec<bool> = paths.iter().map(|p| Path::new(p).exists()).collect();

    let purge = Purge;
    let (ok, _, err) = run(Command::new("dpkg").args(["-i", &deb]));
    assert!(ok, "dpkg -i: {err}");
    assert!(installed());
    assert!(has_user("score"), "postinst creates the agent's user");
    let conffiles = sh(&["dpkg-query", "-W", "-f", "${Conffiles}", "score-agent"]);
    assert!(conffiles.contains("/etc/score/agent.toml"), "{conffiles}");
    let version = sh(&["/usr/bin/score-agent", "--version"]);
    assert!(version.contains("eBPF embedded: yes"), "{version}");
    assert!(version.contains("commit "), "{version}");

    // The unit passes systemd's own check (which also looks up the man
    // pages its Documentation= names and the commands it runs).
    let (ok, out, err) =
        run(Command::new("systemd-analyze")
            .args(["verify", "/lib/systemd/system/score-agent.service"]));
    assert!(
        ok && !err.contains("score-agent.service"),
        "systemd-analyze verify: {out}{err}"
    );

    // man renders every page, without a warning.
    for page in ["score-agent", "score-agent-run", "score-agent-status"] {
        let (ok, out, err) = run(Command::new("man")
            .args(["-P", "cat", page])
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0"));
        assert!(ok && err.trim().is_empty(), "man {page}: {err}");
        let out = plain(&out);
        assert!(
            out.contains("NAME") && out.contains(page),
            "man {page}:\n{out}"
        );
    }
    let (ok, out, _) = run(Command::new("man").args(["-P", "cat", "score-agent"]));
    assert!(
        ok && out.contains("status"),
        "the status subcommand in man score-agent"
    );

    // The unit grants exactly the capabilities the peer protocol needs.
    let unit = std::fs::read_to_string("/lib/systemd/system/score-agent.service").unwrap();
    let granted: Vec<String> = CLUSTER_CAPS
        .iter()
        .map(|c| format!("CAP_{}", c.to_uppercase()))
        .collect();
    for key in ["AmbientCapabilities=", "CapabilityBoundingSet="] {
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"));
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            granted,
            "{key}"
        );
    }

    // The packaged agent, run as the package's user the way the unit runs
    // it (prepare-pins, then the agent with exactly its capabilities),
    // counts; the counters survive a package upgrade.
    let mut lab = Lab::new("sct-opd-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    let _sinks = [sink(&a, A), sink(&b, B)];
    let bpffs = BpfFs::mount(&format!("/run/score-test-opd-{}", std::process::id()));
    let pins = format!("{}/score", bpffs.path);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = write_config(dir.path(), &pins);
    let id = |flag: &str| -> u32 { sh(&["id", flag, "score"]).trim().parse().unwrap() };
    let score = (id("-u"), id("-g"));
    let start = || {
        sh(&["/usr/lib/score-agent/prepare-pins", &pins, "score"]);
        let agent = Unprivileged::start_as(
            &h,
            score,
            CLUSTER_CAPS,
            Path::new("/usr/bin/score-agent"),
            &["run", "--config", config.to_str().unwrap()],
        );
        agent.wait_for("attached iface=vif2.0", Duration::from_secs(30));
        agent
    };
    let agent = start();
    ping(&a, B);
    udp(&a, A, B, 50, 400);
    let first = PING_FRAME + 50 * udp_frame(400);
    wait_pair_bytes(&h, A, B, first, Duration::from_secs(30));
    assert_eq!(agent.terminate(Duration::from_secs(20)).code(), Some(0));

    // The upgrade path of the maintainer scripts (prerm upgrade, postinst
    // configure with the old version): the pins are left alone.
    let (ok, _, err) = run(Command::new("dpkg").args(["-i", &deb]));
    assert!(ok, "dpkg -i (upgrade): {err}");
    let agent = start();
    udp(&a, A, B, 20, 100);
    let second = 20 * udp_frame(100);
    wait_pair_bytes(&h, A, B, first + second, Duration::from_secs(30));
    assert_eq!(agent.terminate(Duration::from_secs(20)).code(), Some(0));

    // Purge: every path the package brought is gone, and its user.
    drop(purge);
    assert!(!installed());
    assert!(!has_user("score"), "purge removes the user");
    for (p, existed) in paths.iter().zip(before) {
        if !existed {
            assert!(!Path::new(p).exists(), "{p} left behind by purge");
        }
    }
    assert!(!Path::new("/etc/score").exists(), "/etc/score left behind");
    drop(bpffs);
}

/// The netns backend's data centre: h1 and h2 in one rack, v1 on h1
/// talking to v2 on h2, so that the agents bring them together.
fn netns_pair(prefix: &str) -> dc::Dc {
    let mut dc = dc::Dc::build(prefix, vec![vec![vec![0, 1]]], &[0, 1]);
    dc.chat(0, 1, 200_000);
    dc.chat(1, 0, 100_000);
    dc
}

fn run_as(caps: &[&'static str], binary: &Path) -> dc::Options {
    dc::Options {
        run_as: Some(dc::RunAs {
            uid: UID,
            gid: UID,
            caps: caps.to_vec(),
            binary: binary.to_owned(),
        }),
        ..dc::Options::default()
    }
}

#[test]
#[ignore = "privileged: needs root, BPF, netns and setpriv; run by cargo xtask test"]
fn netns_backend_migrates_with_exactly_its_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let bin = world_executable_agent(dir.path());
    let mut dc = netns_pair("sct-opn-");
    dc.start_agents(&run_as(NETNS_CAPS, &bin));
    dc.wait_until("the pair together", Duration::from_secs(60), |dc| {
        dc.host_of(0).is_some() && dc.host_of(0) == dc.host_of(1)
    });
    dc.wait_until("the migration counted", Duration::from_secs(10), |dc| {
        (0..2)
            .map(|i| dc.metric(i, "score_migrations_total{outcome=\"done\"}"))
            .sum::<f64>()
            == 1.0
    });
    let failed: f64 = (0..2)
        .map(|i| dc.metric(i, "score_migrations_total{outcome=\"failed\"}"))
        .sum();
    assert_eq!(failed, 0.0);
    // The moved VM reaches its peer: its vif is on the new bridge and the
    // gratuitous ARP told the bridges where it is.
    let (v1, v2) = (dc.vms[0].ns.clone(), dc.vms[1].ip.to_string());
    let moved = Instant::now();
    let reached = || {
        Command::new("ip")
            .args([
                "netns", "exec", &v1, "ping", "-c", "1", "-W", "1", "-q", &v2,
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    while !reached() {
        assert!(
            moved.elapsed() < Duration::from_secs(10),
            "the moved VM does not reach its peer"
        );
    }
    eprintln!("moved VM reached its peer after {:?}", moved.elapsed());
    let logs = dc.stop_agents();
    assert!(
        logs.iter().any(|l| l.contains("migration done")),
        "{logs:?}"
    );
    assert!(
        !logs.iter().any(|l| l.contains("Operation not permitted")),
        "{logs:?}"
    );
    // Each agent ran as the unprivileged user: its pins are that user's.
    for h in &dc.hosts {
        let pins = sh(&[
            "find",
            "/run",
            "-maxdepth",
            "3",
            "-path",
            &format!("*/{}/SCORE_FLOWS", h.ns),
        ]);
        let pin = pins.lines().next().expect("the agent's pinned flow map");
        assert_eq!(sh(&["stat", "-c", "%u", pin]).trim(), UID.to_string());
    }
}

#[test]
#[ignore = "privileged: needs root, BPF, netns and setpriv; run by cargo xtask test"]
fn netns_backend_without_one_of_its_capabilities_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let bin = world_executable_agent(dir.path());
    let mut dc = netns_pair("sct-opm-");
    for missing in NETNS_CAPS {
        let have: Vec<&'static str> = NETNS_CAPS
            .iter()
            .copied()
            .filter(|c| c != missing)
            .collect();
        dc.start_agent(0, &run_as(&have, &bin));
        let agent = dc.agents[0].take().unwrap();
        let name = format!("missing capability CAP_{}", missing.to_uppercase());
        agent.wait_for(&[&name], Duration::from_secs(20));
        // Signal 0: nothing sent, only the wait for its own exit.
        let (code, _, err) = agent.stop(0);
        assert_eq!(code, Some(3), "exit code 3 without {missing}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    }
}

#[test]
#[ignore = "privileged: needs root, BPF, netns and setpriv; run by cargo xtask test"]
fn advisory_cluster_runs_with_its_documented_capabilities() {
    // The peer protocol (UDP above port 1024, the control datagrams the
    // classifiers intercept) and the decisions need CAP_PERFMON beyond
    // what counting needs, and nothing else: without it the agent names it.
    // `score-agent status` then shows what the cluster agent knows.
    let dir = tempfile::tempdir().unwrap();
    let bin = world_executable_agent(dir.path());
    let mut dc = netns_pair("sct-opa-");
    let counting_only = dc::Options {
        backend: "advisory",
        ..run_as(CAPS, &bin)
    };
    dc.start_agent(0, &counting_only);
    let agent = dc.agents[0].take().unwrap();
    agent.wait_for(&["missing capability CAP_PERFMON"], Duration::from_secs(20));
    // Signal 0: nothing sent, only the wait for its own exit.
    let (code, _, err) = agent.stop(0);
    assert_eq!(code, Some(3), "{err}");

    let o = dc::Options {
        backend: "advisory",
        ..run_as(CLUSTER_CAPS, &bin)
    };
    dc.start_agents(&o);
    let total = |dc: &dc::Dc, name: &str| (0..2).map(|i| dc.metric(i, name)).sum::<f64>();
    // Every VM decided for (its cost known), one move advised.
    dc.wait_until("an advisory decision", Duration::from_secs(60), |dc| {
        total(dc, "score_migrations_total{outcome=\"advisory\"}") >= 1.0
            && (0..2).all(|i| dc.metric(i, "score_decisions_evaluated_total") >= 1.0)
    });
    assert!(total(&dc, "score_token_passed_total") >= 1.0);
    assert!(total(&dc, "score_bpf_control_intercepted_total") >= 1.0);
    // Nothing refused, not even at the start: the freshness floor is taken
    // before the classifiers attach, so a peer's datagram they queue for
    // the new run is never older than it.
    let refused = total(&dc, "score_datagrams_rejected_total");
    if refused != 0.0 {
        let logs = dc.stop_agents();
        let why: Vec<&str> = logs
            .iter()
            .flat_map(|l| l.lines())
            .filter(|l| l.contains("refused") || l.contains("rejected"))
            .collect();
        panic!("{refused} datagrams refused in a healthy cluster: {why:#?}");
    }
    assert_eq!(
        (dc.host_of(0), dc.host_of(1)),
        (Some(0), Some(1)),
        "advisory moves nothing"
    );

    // `score-agent status` on a cluster agent: the token, the decision with
    // its numbers, the VM's cost and level.
    let mut advised = 0;
    let mut answers = Vec::new();
    for h in &dc.hosts {
        let (code, out, err) = status_cmd(&h.ns, &["--addr", dc::HTTP, "--json"]);
        answers.push(out.clone());
        assert_eq!(code, Some(0), "status --json: {err}");
        let s: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        assert!(s["token"]["epoch"].as_u64().unwrap() >= 1, "{out}");
        assert!(
            s["token"]["seen_seconds_ago"].as_f64().unwrap() < 30.0,
            "{out}"
        );
        let vm = &s["vms"].as_array().unwrap()[0];
        assert!(vm["cost"].as_f64().unwrap() > 0.0, "{out}");
        assert!(vm["level"].as_u64().is_some(), "{out}");
        let decisions = s["decisions"].as_array().unwrap();
        assert!(!decisions.is_empty(), "{out}");
        if decisions.iter().any(|d| d["outcome"] == "Advisory") {
            advised += 1;
            assert!(s["migrations_total"]["advisory"].as_u64().unwrap() >= 1);
            let (code, text, err) = status_cmd(&h.ns, &["--addr", dc::HTTP]);
            assert_eq!(code, Some(0), "status: {err}");
            for needle in [
                "token: epoch",
                "Migrate",
                "benefit=",
                "-> Advisory",
                "hosted VMs: 1",
            ] {
                assert!(text.contains(needle), "{needle:?} not in:\n{text}");
            }
        }
    }
    assert!(
        advised >= 1,
        "no host shows its advisory decision: {answers:#?}"
    );
    let logs = dc.stop_agents();
    assert!(
        logs.iter().any(|l| l.contains("advisory: would migrate")),
        "{logs:?}"
    );
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("not permitted") || l.contains("Permission denied")),
        "{logs:?}"
    );
}
