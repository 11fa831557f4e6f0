//! `cargo xtask`: what plain cargo cannot do. Installs the eBPF toolchain
//! and test tools (`setup`), runs every tier of tests (`test`), and runs the
//! benchmarks (`bench`), builds the emulated data centre (`testbed`),
//! runs S-CORE on it (`demo`), and packs the agent for operators (`dist`).
//! Building stays with cargo: score-agent's build.rs builds the eBPF object.

mod demo;
mod dist;
mod measure;
mod optimum;
mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use score_testbed::{
    agents, check, config::AgentOptions, guests, image, libvirt, plan, process, state, status,
    testbed, traffic, xen, xen_cluster,
};

pub use score_testbed::process::run;

#[derive(Parser)]
#[command(name = "xtask", about = "score's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (pinned nightly, bpf-linker,
    /// apt packages); a no-op when everything is there.
    Setup,
    /// Run setup, lints, unit and unprivileged tests, then the privileged
    /// tests one at a time.
    Test {
        /// Skip the formatting and clippy checks.
        #[arg(long)]
        no_lint: bool,
        /// Only run privileged tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Run a benchmark suite and print its results.
    Bench {
        /// Which suite: flows (datapath), compare (score against OVS and
        /// nftables), live (the classifier's live-path cost against live
        /// pairs and map types), scale (agent cost at 1k-1M pairs, token at
        /// 1k-1M VMs), core (decision, wire), sim.
        suite: String,
    },
    /// Many seeded fault runs of the real peer protocol in simulation
    /// (`score-sim protocol`, release build); prints seeds, simulated
    /// hours, faults injected and invariant violations.
    Soak {
        /// Number of seeds.
        #[arg(long, default_value_t = 10_000)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Hosts per simulated data centre.
        #[arg(long, default_value_t = 16)]
        hosts: u32,
    },
    /// The emulated data centre: network namespaces as switches, hosts and
    /// VMs, one score-agent per host (root).
    Testbed {
        #[command(subcommand)]
        command: TestbedCommand,
    },
    /// S-CORE on the emulated data centre, from nothing: builds, sets up,
    /// runs agents and traffic, reports the measured cost per round, tears
    /// down (root).
    Demo(demo::DemoArgs),
    /// Build the release agent and pack it: a Debian package and a tarball
    /// (binary, hardened systemd unit, /etc/score/agent.toml, man pages,
    /// completions, docs, Grafana dashboard, Prometheus alert rules).
    Dist(dist::DistArgs),
    /// Install QEMU (bookworm-backports) and build the tiny real guest
    /// (Debian cloud kernel + busybox initramfs) into /var/cache/score-guest,
    /// unless it is current; install libvirt for the libvirt backend's
    /// tests (root).
    Guest {
        /// Rebuild even if the cached guest is current.
        #[arg(long)]
        force: bool,
    },
    /// Real Xen hosts (QEMU TCG VMs running Xen 4.17 and a PV dom0, built
    /// from Debian packages into /var/cache/score-xen) for the xl
    /// backend's tests and the agent on a real dom0 (root).
    Xen {
        #[command(subcommand)]
        command: XenCommand,
    },
    /// Traffic generator run inside a VM namespace by the testbed: listens
    /// on --listen (discarding) and sends UDP to every --to at its rate.
    #[command(hide = true)]
    Traffic {
        /// Address and port to listen on (the VM's own).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// ADDR:PORT:BYTES_PER_SECOND (frame bytes); repeatable.
        #[arg(long = "to")]
        to: Vec<traffic::Target>,
        /// Stop after this many seconds (default: run until killed).
        #[arg(long)]
        duration: Option<f64>,
    },
}

#[derive(Subcommand)]
enum XenCommand {
    /// Build the hypervisor (with shadow paging) and the dom0 image,
    /// unless the cached ones are current.
    Build {
        /// Rebuild even if the cache is current.
        #[arg(long)]
        force: bool,
    },
    /// Build if needed, boot the two Xen hosts, wait for their dom0s.
    Up {
        /// Also put this score-agent binary into each dom0
        /// (/usr/bin/score-agent).
        #[arg(long)]
        agent_bin: Option<std::path::PathBuf>,
    },
    /// Each host's QEMU and `xl list`.
    Status,
    /// The Xen tier: build the agent, bring the rig up (it must be down),
    /// run score-agent's Xen tests one at a time, take the rig down.
    Test {
        /// Only run Xen tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// The agents on real Xen: build the agent, bring the rig up with it,
    /// start two chatty guests on different hosts and score-agent in each
    /// dom0 (token protocol, xl backend), and show the agents bringing the
    /// guests together with a live `xl migrate`, the cost before and
    /// after; then take the rig down.
    Demo {
        /// Leave the rig, guests and agents up at the end
        /// (`cargo xtask xen down`).
        #[arg(long)]
        keep: bool,
        /// Run this score-agent binary instead of building one.
        #[arg(long)]
        agent_bin: Option<std::path::PathBuf>,
    },
    /// Paper Fig. 4 on the rig: live migrations of a 128 MiB PV guest back
    /// and forth, idle and while it exchanges UDP with a guest on the
    /// other host; migration time and the longest gap in pings from the
    /// source dom0. Brings the rig up and down (it must be down).
    Bench {
        /// Migrations per case (idle, loaded).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Each guest's UDP rate to the other in the loaded case (iperf3
        /// `-b`, bits per second of payload).
        #[arg(long, default_value = "2M")]
        rate: String,
    },
    /// Stop the hosts and remove their state. Safe when nothing is up.
    Down,
    /// Run a command in a host's dom0 (xen1, xen2), with its output and
    /// exit code.
    Exec {
        /// The host: xen1, xen2 or its address.
        host: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TestbedCommand {
    /// Build the data centre and write its state, topology, key and agent
    /// configs under /run/score-testbed.
    Up {
        #[command(flatten)]
        sizes: plan::Sizes,
        /// What stands in for the VMs: network namespaces, or real QEMU
        /// guests (TCG, built by `cargo xtask guest`) behind taps, which
        /// the agents live-migrate with the qemu backend.
        #[arg(long, value_enum, default_value_t = guests::GuestKind::Netns)]
        guests: guests::GuestKind,
        /// Also build score-agent and start one per host.
        #[arg(long)]
        agents: bool,
        /// Also start the traffic generators in the VMs.
        #[arg(long)]
        traffic: bool,
        #[command(flatten)]
        rates: traffic::Rates,
        /// Token policy of the agents: round-robin, global, distributed,
        /// load-aware.
        #[arg(long, default_value = "distributed")]
        policy: String,
        /// How long a host holds the token for one VM.
        #[arg(long, default_value = "1s")]
        token_hold: String,
        /// Build and run the release agent.
        #[arg(long)]
        release: bool,
        /// Run this score-agent binary instead of building one (implies
        /// --agents).
        #[arg(long)]
        agent_bin: Option<std::path::PathBuf>,
    },
    /// Stop agents and traffic, delete every namespace, unmount the bpffs,
    /// remove the state. Safe when nothing is up.
    Down,
    /// Hosts, where each VM is now, agents alive; with --cost, the measured
    /// communication cost and the best centralised one.
    Status {
        /// Also print the measured cost (needs agents).
        #[arg(long)]
        cost: bool,
        /// Print JSON (hosts, agents, where each VM is, cost with --cost).
        #[arg(long)]
        json: bool,
        /// Also ping every VM at its address from the first host.
        #[arg(long)]
        ping: bool,
    },
    /// Check the testbed itself on a fresh one (no agents): reachability,
    /// traffic between pods crosses the core, a UDP stream survives a
    /// move, down leaves nothing.
    Check,
    /// Move a VM to another host as the netns backend does (by hand).
    Migrate {
        /// The VM: address, namespace or vif.
        vm: String,
        /// The host: namespace (dc-h3) or address.
        host: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root).context("entering the workspace root")?;
    match cli.command {
        Task::Setup => setup::setup(),
        Task::Test { no_lint, filter } => test(no_lint, filter.as_deref()),
        Task::Bench { suite } => bench(&suite),
        Task::Soak { seeds, seed, hosts } => soak(seed, seeds, hosts, 3600, &[]),
        Task::Testbed { command } => testbed_command(command),
        Task::Demo(args) => demo::demo(&args),
        Task::Dist(args) => dist::dist(&args).map(|_| ()),
        Task::Guest { force } => {
            image::guest(force)?;
            libvirt::ensure_libvirt()
        }
        Task::Xen { command } => xen_command(command),
        Task::Traffic {
            listen,
            to,
            duration,
        } => {
            traffic::check(&to)?;
            traffic::generate(listen, &to, duration)
        }
    }
}

fn testbed_command(command: TestbedCommand) -> Result<()> {
    match command {
        TestbedCommand::Up {
            sizes,
            guests,
            agents,
            traffic: with_traffic,
            rates,
            policy,
            token_hold,
            release,
            agent_bin,
        } => {
            let binary = match agent_bin {
                Some(path) => Some(
                    std::fs::canonicalize(&path)
                        .with_context(|| format!("--agent-bin {}", path.display()))?,
                ),
                None if agents => Some(demo::build_agent(release)?),
                None => None,
            };
            let mut state = testbed::up_with(&sizes, guests)?;
            println!(
                "testbed: {} namespaces up in {:.2} s (state in {})",
                state.namespaces.len(),
                state.setup_seconds,
                score_testbed::state::STATE_FILE
            );
            let started = (|| -> Result<()> {
                if state.guests.is_some() {
                    // A guest takes its peers from its kernel command
                    // line: the plan comes before the boot.
                    let flows = if with_traffic {
                        traffic::plan(&state, &rates)
                    } else {
                        Vec::new()
                    };
                    guests::boot_guests(&mut state, &flows)?;
                    println!(
                        "testbed: {} real guests answering in {:.1} s",
                        state.vms.len(),
                        state.guests.as_ref().map_or(0.0, |g| g.boot_seconds)
                    );
                }
                if let Some(binary) = binary {
                    let opts = AgentOptions::paper(binary, policy, token_hold);
                    agents::start_agents(&mut state, &opts)?;
                }
                if with_traffic && state.guests.is_none() {
                    let flows = traffic::plan(&state, &rates);
                    traffic::start(&mut state, &flows, &demo::generator()?)?;
                }
                Ok(())
            })();
            if let Err(e) = started {
                let _ = testbed::down();
                return Err(e.context("starting agents/traffic (the testbed was removed)"));
            }
            status::status(false)
        }
        TestbedCommand::Down => {
            let r = testbed::down()?;
            println!(
                "testbed: removed {} namespaces, stopped {} processes in {:.2} s",
                r.namespaces, r.processes, r.seconds
            );
            if r.settings_restored > 0 {
                println!(
                    "testbed: put back {} host settings (neighbour-table limits)",
                    r.settings_restored
                );
            }
            for (s, now) in &r.settings_left {
                println!(
                    "testbed: left {} at {now:?}: changed since up (up wrote {}, it was {})",
                    s.path, s.set, s.before
                );
            }
            Ok(())
        }
        TestbedCommand::Status { cost, json, ping } => {
            if json {
                let state = state::State::load()?.context("no testbed is up")?;
                let mut report = status::status_report(&state, ping)?;
                if cost {
                    report.cost = Some(measure::cost_report(&state)?);
                }
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            status::status(ping)?;
            if cost && let Some(state) = state::State::load()? {
                measure::print_cost(&state)?;
            }
            Ok(())
        }
        TestbedCommand::Check => check::check(),
        TestbedCommand::Migrate { vm, host } => {
            let state = state::State::load()?.context("no testbed is up")?;
            let took = testbed::migrate(&state, &vm, &host)?;
            println!(
                "testbed: {vm} relinked to {host} in {:.1} ms",
                took.as_secs_f64() * 1e3
            );
            Ok(())
        }
    }
}

fn xen_command(command: XenCommand) -> Result<()> {
    match command {
        XenCommand::Build { force } => xen::build(force).map(drop),
        XenCommand::Up { agent_bin } => xen::up(agent_bin.as_deref()),
        XenCommand::Status => xen::status(),
        XenCommand::Test { filter } => xen_tier(filter.as_deref()),
        XenCommand::Demo { keep, agent_bin } => xen_demo(keep, agent_bin),
        XenCommand::Bench { reps, rate } => xen_bench(reps, &rate),
        XenCommand::Down => xen::down(),
        XenCommand::Exec { host, command } => {
            let code = xen::exec(&host, &command)?;
            std::process::exit(code)
        }
    }
}

/// The Xen tier (`cargo xtask xen test`): builds the agent and (cached)
/// the rig, boots it with the agent in each dom0, runs score-agent's Xen
/// tests (score-agent/tests/xen.rs) one at a time, and takes the rig down
/// again, also when they fail.
fn xen_tier(filter: Option<&str>) -> Result<()> {
    let started = std::time::Instant::now();
    let agent = demo::build_agent(false)?;
    xen::up(Some(&agent))?;
    let mut cmd = cargo();
    cmd.env(xen::REQUIRE_XEN_ENV, "1");
    cmd.args(["test", "--locked", "-p", "score-agent", "--test", "xen"]);
    // --nocapture: the tests' progress and timings (the migrations, the
    // agents' decision) belong in the tier's log, passed or failed.
    cmd.args(["--", "--ignored", "--test-threads=1", "--nocapture"]);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    let result = run(&mut cmd);
    xen::down()?;
    eprintln!(
        "xtask: Xen tier took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    result
}

/// `cargo xtask xen demo`: the rig up with the agent, score_testbed's
/// `xen_cluster::bring_together`, a summary, and the rig down again (also
/// when it fails) unless `keep`.
fn xen_demo(keep: bool, agent_bin: Option<std::path::PathBuf>) -> Result<()> {
    let started = std::time::Instant::now();
    let agent = match agent_bin {
        Some(p) => {
            std::fs::canonicalize(&p).with_context(|| format!("--agent-bin {}", p.display()))?
        }
        None => demo::build_agent(false)?,
    };
    xen::up(Some(&agent))?;
    let say = |line: &str| {
        println!(
            "xen demo [{:>4.0} s] {line}",
            started.elapsed().as_secs_f64()
        )
    };
    let result = xen_cluster::bring_together(&mut |line| say(line));
    match &result {
        Ok(r) => {
            let g = &xen_cluster::GUESTS[r.moved];
            say(&format!(
                "done: {} moved live xen{} -> xen{} (boot id kept, uptime {:.0} s -> {:.0} s); \
                 cost {:.0} -> {:.0}",
                g.name,
                r.from,
                r.to,
                r.status_before.uptime,
                r.status_after.uptime,
                r.before.cost,
                r.after.cost
            ));
        }
        Err(_) => {
            for h in xen::hosts() {
                eprintln!(
                    "--- {}'s agent log:\n{}",
                    h.name(),
                    xen_cluster::agent_log(&h, 40)
                );
            }
        }
    }
    if keep {
        say("left up: `cargo xtask xen status`, `cargo xtask xen down`");
    } else {
        let _ = xen_cluster::stop_agents();
        xen::down()?;
    }
    result.map(drop)
}

/// `cargo xtask xen bench`: the rig up, score_testbed's
/// `xen_cluster::migration_times`, a table, the rig down (also on error).
fn xen_bench(reps: usize, rate: &str) -> Result<()> {
    let started = std::time::Instant::now();
    xen::up(None)?;
    let result = xen_cluster::migration_times(reps, rate, &mut |line| {
        println!(
            "xen bench [{:>4.0} s] {line}",
            started.elapsed().as_secs_f64()
        )
    });
    xen::down()?;
    let samples = result?;
    println!("| case | n | xl migrate (s) | longest ping gap (s) | pings answered |");
    println!("|---|---|---|---|---|");
    for loaded in [false, true] {
        let of: Vec<&xen_cluster::Sample> = samples.iter().filter(|s| s.loaded == loaded).collect();
        let stat = |v: Vec<f64>| {
            let mut v = v;
            v.sort_by(f64::total_cmp);
            format!("{:.2} ({:.2}-{:.2})", v[v.len() / 2], v[0], v[v.len() - 1])
        };
        if of.is_empty() {
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} of {} |",
            if loaded {
                format!("UDP {rate}bit/s each way")
            } else {
                "idle".to_owned()
            },
            of.len(),
            stat(of.iter().map(|s| s.seconds).collect()),
            stat(of.iter().map(|s| s.gap).collect()),
            of.iter().map(|s| s.pings.1).sum::<u32>(),
            of.iter().map(|s| s.pings.0).sum::<u32>()
        );
    }
    eprintln!(
        "xtask: Xen bench took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `score-sim protocol` over `seeds` seeds from `first`, with `extra`
/// options: fails on any invariant violation.
fn soak(first: u64, seeds: u64, hosts: u32, seconds: u64, extra: &[&str]) -> Result<()> {
    run(cargo()
        .args([
            "run",
            "--locked",
            "--release",
            "-p",
            "score-sim",
            "--",
            "protocol",
            "--seed",
            &first.to_string(),
            "--seeds",
            &seeds.to_string(),
            "--hosts",
            &hosts.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .args(extra))
}

fn workspace_root() -> Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(dir
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn is_root() -> bool {
    process::is_root()
}

fn test(no_lint: bool, filter: Option<&str>) -> Result<()> {
    setup::setup()?;
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run(cargo().args([
            "clippy",
            "--locked",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    if !no_lint {
        check_rust_version()?;
    }
    // Default members: every userspace crate. Privileged tests are
    // #[ignore]d there, so this tier needs no root.
    run(cargo().args(["test", "--locked"]))?;
    // The peer protocol under seeded faults (docs/PROTOCOL.md): a few
    // hundred runs of small and medium data centres, in release (a debug
    // build is ten times slower). Any violation fails and names its seed.
    soak(0, 300, 8, 1800, &[])?;
    soak(1_000_000, 40, 32, 1800, &[])?;
    // The repertoire beyond the paper: ejection chains and a decaying c_m
    // (docs/PROTOCOL.md), under the same faults.
    soak(
        2_000_000,
        200,
        8,
        1800,
        &["--chains", "--cm", "10/0.5/0.003"],
    )?;
    // Rotations (docs/PROTOCOL.md, "Rotations"): on the seeds with swaps
    // every host is full, with one VM of headroom.
    soak(
        3_000_000,
        120,
        8,
        1800,
        &["--rotations", "--cm", "10/0.5/0.003"],
    )?;
    // Group moves (docs/PROTOCOL.md, "Group moves"): half the hosts of
    // the seeds with swaps get one VM fewer, so a group has somewhere to go.
    soak(
        4_000_000,
        120,
        8,
        1800,
        &["--groups", "--cm", "10/0.5/0.003"],
    )?;

    if !is_root() {
        eprintln!("xtask: SKIPPING privileged tests: they need root (BPF, network namespaces)");
        return Ok(());
    }
    // The real-guest tests (score-agent/tests/backend_qemu.rs, and
    // backend_libvirt.rs) need QEMU, the tiny guest and libvirt: install
    // and build them here, so that on a fresh machine they run instead of
    // skipping. Cached: a no-op when current.
    let started = std::time::Instant::now();
    image::guest(false).context("preparing the real guest for the qemu backend's tests")?;
    libvirt::ensure_libvirt().context("installing libvirt for the libvirt backend's tests")?;
    eprintln!(
        "xtask: real guest ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The operator's package, for the tests that install, upgrade and
    // purge it (score-agent/tests/ops.rs): the dev-profile agent, which
    // `cargo test` above has built already.
    let package = dist::dist(&dist::DistArgs {
        out: std::path::PathBuf::from("target/xtask-dist"),
        dev: true,
    })
    .context("building the package for the privileged tests")?;
    // One at a time: they share the kernel (bpffs, namespaces, links).
    let mut cmd = cargo();
    // Absolute: cargo runs each test binary from its own package's
    // directory, not the workspace root these paths are relative to.
    let absolute = |p: &std::path::Path| std::path::absolute(p).context("making a path absolute");
    cmd.env(dist::PACKAGE_ENV, absolute(&package.deb)?);
    cmd.env(dist::TARBALL_ENV, absolute(&package.tarball)?);
    // The real-guest tests fail, rather than skip, if QEMU or the guest
    // is still missing: in this command they must really run.
    cmd.env(guests::REQUIRE_GUESTS_ENV, "1");
    // Every #[ignore]d test of score-agent is privileged; cargo runs the
    // test binaries one after another and --test-threads=1 serialises
    // the tests inside each.
    cmd.args(["test", "--locked", "-p", "score-agent", "--"]);
    // The Xen tests need the Xen rig up: their own tier, below.
    cmd.args(["--ignored", "--test-threads=1", "--skip", "xen_"]);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run(&mut cmd)?;
    // The Xen tier (docs/TESTBED.md, "Real Xen hosts"): builds the rig
    // (cached in /var/cache/score-xen), boots it with the agent, runs
    // score-agent/tests/xen.rs with SCORE_REQUIRE_XEN=1 (a missing rig
    // fails, never skips) and takes it down.
    if filter.is_none_or(|f| f.contains("xen")) {
        xen_tier(filter.filter(|f| *f != "xen"))?;
    }
    if filter.is_none() {
        // The emulated data centre's own check: reachability, traffic
        // really crossing the core, a VM move, a clean teardown.
        eprintln!("xtask: checking the emulated data centre (testbed check)");
        check::check()?;
    }
    eprintln!("xtask: all tests passed");
    Ok(())
}

/// Builds the userspace crates with exactly the toolchain `rust-version`
/// in the workspace Cargo.toml names (installed with rustup if missing),
/// so that the version we declare is one that builds. Libraries and
/// binaries only, in a target directory of its own, without the eBPF
/// object: that keeps it to about a minute once cached.
fn check_rust_version() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let manifest: toml::Value = toml::from_str(
        &std::fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?,
    )
    .context("parsing Cargo.toml")?;
    let version = manifest
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("rust-version"))
        .and_then(toml::Value::as_str)
        .context("Cargo.toml sets no workspace.package.rust-version")?;
    let installed = Command::new("rustup")
        .args(["run", version, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            version,
            "--profile",
            "minimal",
            "--no-self-update",
        ]))
        .with_context(|| format!("installing Rust {version}, the declared rust-version"))?;
    }
    run(Command::new("rustup")
        .args(["run", version, "cargo", "check", "--locked"])
        .current_dir(root)
        .env("CARGO_TARGET_DIR", root.join("target/rust-version"))
        .env("SCORE_EBPF_STUB", "1"))
    .with_context(|| format!("the workspace does not build with Rust {version}, its rust-version"))
}

fn bench(suite: &str) -> Result<()> {
    match suite {
        "flows" => {
            setup::setup()?;
            if !is_root() {
                bail!("the flows benchmark loads eBPF programs: run it as root");
            }
            run(cargo().args(["bench", "--locked", "-p", "score-agent", "--bench", "flows"]))
        }
        "compare" | "live" | "scale" => {
            setup::setup()?;
            if !is_root() {
                bail!("the {suite} benchmark needs root (eBPF, namespaces, OVS, nftables)");
            }
            run(cargo().args([
                "bench",
                "--locked",
                "-p",
                "score-agent",
                "--bench",
                "compare",
                "--",
                suite,
            ]))
        }
        "core" => {
            run(cargo().args([
                "bench",
                "--locked",
                "-p",
                "score-core",
                "--bench",
                "decision",
            ]))?;
            run(cargo().args(["bench", "--locked", "-p", "score-core", "--bench", "wire"]))?;
            run(cargo().args(["bench", "--locked", "-p", "score-core", "--bench", "hop"]))
        }
        "sim" => run(cargo().args(["bench", "--locked", "-p", "score-sim"])),
        other => {
            bail!(
                "unknown bench suite {other:?}: expected flows, compare, live, scale, core or sim"
            )
        }
    }
}
