//! score-agent processes: one per host of the test bed (started through
//! `ip netns exec`, logging to a file, healthy when /healthz answers), and
//! [`Agent`], one agent a test starts in its own namespace with its stderr
//! collected.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    config::{AgentOptions, agent_config},
    http,
    plan::{AGENT_HTTP, Host},
    process::{alive, close_inherited_fds},
    state::State,
};

/// Starts one score-agent per host namespace with the given options, waits
/// until every one serves /healthz, and records the PIDs. If the agent
/// refuses the full configuration because it does not know the S-CORE
/// tables yet, falls back to the flow-counting part and says so.
pub fn start_agents(state: &mut State, opts: &AgentOptions) -> Result<()> {
    if !opts.binary.exists() {
        bail!("no score-agent binary at {}", opts.binary.display());
    }
    let mut full = true;
    for h in &state.hosts {
        fs::write(&h.config, agent_config(state, h, opts, true))?;
    }
    // Try the first host alone: a config refusal shows within a moment.
    let first = state.hosts[0].clone();
    let global = opts.policy == "global";
    let pid = spawn_agent(&first, &opts.binary, global)?;
    match wait_healthy(&first, pid, Duration::from_secs(20))? {
        Health::Up => state.hosts[0].agent_pid = Some(pid),
        Health::Exited(log) if log.contains("unknown field `node`") => {
            eprintln!(
                "testbed: this score-agent does not know the [node]/[peer]/[policy] tables yet: \
                 running it as a flow counter only (no token, no migrations)"
            );
            full = false;
            for h in &state.hosts {
                fs::write(&h.config, agent_config(state, h, opts, false))?;
            }
            let pid = spawn_agent(&first, &opts.binary, false)?;
            match wait_healthy(&first, pid, Duration::from_secs(20))? {
                Health::Up => state.hosts[0].agent_pid = Some(pid),
                Health::Exited(log) => bail!("agent on {} exited:\n{log}", first.name),
            }
        }
        Health::Exited(log) => bail!("agent on {} exited:\n{log}", first.name),
    }
    let mut pids = Vec::new();
    for h in &state.hosts[1..] {
        pids.push(spawn_agent(h, &opts.binary, false)?);
    }
    for (h, pid) in state.hosts[1..].iter_mut().zip(&pids) {
        h.agent_pid = Some(*pid);
    }
    state.agents = Some(opts.clone());
    state.agent_mode = Some(if full { "full" } else { "flows-only" }.into());
    state.save()?;
    for (h, pid) in state.hosts[1..].iter().zip(pids) {
        if let Health::Exited(log) = wait_healthy(h, pid, Duration::from_secs(20))? {
            bail!("agent on {} exited:\n{log}", h.name);
        }
    }
    Ok(())
}

/// Starts the agent of host `h`; `coordinator` adds `--coordinator` (the
/// global policy's central planner, on the first host).
fn spawn_agent(h: &Host, binary: &Path, coordinator: bool) -> Result<u32> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&h.log)
        .with_context(|| format!("opening {}", h.log.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &h.name])
        .arg(binary)
        .arg("run")
        .arg("--config")
        .arg(&h.config)
        .args(coordinator.then_some("--coordinator"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C at the terminal reaches xtask,
        // which tears down in order, not every agent at once.
        .process_group(0);
    close_inherited_fds(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting the agent in {}", h.name))?;
    // `ip netns exec` execs the agent: this PID is the agent's.
    Ok(child.id())
}

enum Health {
    Up,
    /// The agent exited; the tail of its log.
    Exited(String),
}

fn wait_healthy(h: &Host, pid: u32, timeout: Duration) -> Result<Health> {
    let addr: SocketAddr = AGENT_HTTP.parse()?;
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            let log = fs::read_to_string(&h.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            return Ok(Health::Exited(
                tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            ));
        }
        if http::get(&h.name, addr, "/healthz")?.is_some() {
            return Ok(Health::Up);
        }
        if Instant::now() > deadline {
            bail!(
                "agent on {} did not serve /healthz within {timeout:?} (log: {})",
                h.name,
                h.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The score-agent binary cargo built beside the running test or bench:
/// an integration test runs from `target/PROFILE/deps/`, and cargo puts
/// the package's binaries (what `CARGO_BIN_EXE_score-agent` names) in
/// `target/PROFILE/`.
pub fn score_agent_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("score-agent"))
        .expect("a test binary under target/PROFILE/deps");
    assert!(
        bin.exists(),
        "no score-agent at {} (cargo builds it for score-agent's tests and benches)",
        bin.display()
    );
    bin
}

/// A score-agent process running in a namespace, its stderr collected.
pub struct Agent {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    stdout: Option<thread::JoinHandle<String>>,
}

impl Agent {
    /// Starts `score-agent ARGS` (the one cargo built beside the running
    /// test, see [`score_agent_bin`]) inside namespace `ns`.
    pub fn start(ns: &str, args: &[&str]) -> Agent {
        Agent::start_bin(&score_agent_bin(), ns, args)
    }

    /// Starts `binary ARGS` inside namespace `ns`.
    pub fn start_bin(binary: &Path, ns: &str, args: &[&str]) -> Agent {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(binary)
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
            for line in BufReader::new(err)
                .lines()
                .map_while(std::result::Result::ok)
            {
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

    /// What the agent wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `signal` and waits; returns (exit code, stdout, stderr).
    pub fn stop(mut self, signal: i32) -> (Option<i32>, String, String) {
        let mut child = self.child.take().unwrap();
        crate::process::signal(child.id(), signal);
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
