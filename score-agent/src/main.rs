//! The `score-agent` command: parses arguments, sets up logging, and hands
//! over to the library. Exit codes: 0 fine, 1 runtime failure, 2 bad
//! configuration or arguments, 3 a capability the agent needs is missing.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory as _, Parser, Subcommand};
use score_agent::{AgentError, caps, config::Config};

/// Where `score-agent status` looks for the agent without --config/--addr.
const DEFAULT_CONFIG: &str = "/etc/score/agent.toml";

/// Exit code of a missing capability: like a bad configuration, restarting
/// does not fix it (the unit's RestartPreventExitStatus names it).
const EXIT_CAPS: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "score-agent",
    version = score_agent::status::VERSION,
    about = "S-CORE: network-aware live VM migration, one agent per hypervisor host",
    after_help = "Exit codes: 0 fine, 1 runtime failure, 2 bad configuration or arguments, 3 missing capability."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Count per-VM-pair traffic on matching interfaces and print it at the end.
    Watch {
        /// Interface name pattern to watch (glob: `vif*`, `tap?`); repeatable.
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        /// Stop after this many seconds (default: at Ctrl-C).
        #[arg(long)]
        duration: Option<f64>,
        /// Print a JSON array of {src, dst, bytes, packets, rate_bps}.
        #[arg(long)]
        json: bool,
        /// Capacity of the kernel flow map, in directed pairs.
        #[arg(long, default_value_t = score_common::DEFAULT_FLOWS_MAX)]
        flows_max: u32,
        /// How the classifiers attach: auto (TCX on kernels >= 6.6, else a
        /// clsact qdisc), tcx or clsact.
        #[arg(long, value_enum, default_value = "auto")]
        attach: score_agent::datapath::AttachMode,
    },
    /// Run the daemon with a configuration file.
    Run {
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Also act as the global policy's coordinator: collect every
        /// host's flow reports and send the token order.
        #[arg(long)]
        coordinator: bool,
    },
    /// Ask the local agent what it is doing (GET /status): hosted VMs with
    /// cost, level and rate, the token, the last decisions, migrations in
    /// flight, map fill and rejected datagrams.
    Status {
        /// Read the agent's http_listen from this configuration file
        /// (default /etc/score/agent.toml, if it exists).
        #[arg(long, conflicts_with = "addr")]
        config: Option<PathBuf>,
        /// The agent's HTTP address (default: the configuration's
        /// http_listen, else 127.0.0.1:9464).
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Print the JSON /status returns.
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Write the man pages and shell completions (bash, zsh, fish) into a
    /// directory; used by packaging.
    #[command(hide = true)]
    GenerateDocs {
        /// The output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        // Without signal handlers the process can still be killed; wait
        // for Ctrl-C the portable way.
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `score-agent status`: finds the agent's address, asks it, prints.
fn status(config: Option<PathBuf>, addr: Option<SocketAddr>, json: bool, timeout: f64) -> ExitCode {
    let addr = match (addr, config) {
        (Some(a), _) => a,
        (None, Some(path)) => match Config::load(&path) {
            Ok(c) => c.http_listen,
            Err(e) => {
                eprintln!("score-agent: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => match std::path::Path::new(DEFAULT_CONFIG).exists() {
            true => match Config::load(std::path::Path::new(DEFAULT_CONFIG)) {
                Ok(c) => c.http_listen,
                Err(e) => {
                    eprintln!("score-agent: {e}");
                    return ExitCode::from(2);
                }
            },
            false => SocketAddr::from(([127, 0, 0, 1], 9464)),
        },
    };
    if !(timeout.is_finite() && timeout > 0.0) {
        eprintln!("score-agent: --timeout must be a positive number of seconds");
        return ExitCode::from(2);
    }
    match score_agent::status::fetch(addr, Duration::from_secs_f64(timeout)) {
        Ok(s) if json => match serde_json::to_string_pretty(&s) {
            Ok(j) => {
                println!("{j}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("score-agent: encoding JSON: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(s) => {
            print!("{}", score_agent::status::render(&s));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("score-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `score-agent generate-docs`: man pages (one per subcommand) from the
/// clap definitions, and completions.
fn generate_docs(out: &std::path::Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "score-agent", &completions)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status {
            config,
            addr,
            json,
            timeout,
        } => return status(config, addr, json, timeout),
        Command::GenerateDocs { out } => {
            return match generate_docs(&out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("score-agent: writing docs into {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // Validate before building the runtime, loading or binding anything.
    let config = match &cli.command {
        Command::Run {
            config,
            coordinator,
        } => match Config::load(config).and_then(|c| c.cluster(*coordinator).map(|cl| (c, cl))) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("score-agent: {e}");
                return ExitCode::from(2);
            }
        },
        Command::Status { .. } | Command::GenerateDocs { .. } => unreachable!("handled above"),
        Command::Watch {
            duration: Some(d), ..
        } if !(d.is_finite() && *d > 0.0) => {
            eprintln!("score-agent: --duration must be a positive number of seconds");
            return ExitCode::from(2);
        }
        Command::Watch { ifaces, .. } => {
            if let Err(e) = score_agent::config::IfacePatterns::new(ifaces) {
                eprintln!("score-agent: {e}");
                return ExitCode::from(2);
            }
            None
        }
    };

    // Before anything is loaded: a missing capability is named in one
    // line, rather than surfacing as EPERM from some syscall.
    let need = match &config {
        Some((c, cluster)) => caps::required(cluster.is_some().then_some(&c.backend)),
        None => caps::required(None),
    };
    if let Err(e) = caps::check(&need) {
        eprintln!("score-agent: {e}");
        return ExitCode::from(EXIT_CAPS);
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("score-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { .. } => {
                let (config, cluster) = config.expect("validated above");
                score_agent::daemon::run(config, cluster, shutdown_signal()).await
            }
            Command::Status { .. } | Command::GenerateDocs { .. } => {
                unreachable!("handled above")
            }
            Command::Watch {
                ifaces,
                duration,
                json,
                flows_max,
                attach,
            } => {
                let stop = async move {
                    match duration {
                        Some(d) => tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs_f64(d)) => {}
                            _ = shutdown_signal() => {}
                        },
                        None => shutdown_signal().await,
                    }
                };
                let report = score_agent::watch::watch(&ifaces, flows_max, attach, stop).await?;
                print_report(&report, json);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ AgentError::Config(_)) => {
            eprintln!("score-agent: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("score-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_report(report: &score_agent::watch::WatchReport, json: bool) {
    if json {
        match serde_json::to_string_pretty(&report.pairs) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("score-agent: encoding JSON: {e}"),
        }
    } else {
        println!(
            "{:<15} {:<15} {:>14} {:>10} {:>14}",
            "SRC", "DST", "BYTES", "PACKETS", "RATE_B/S"
        );
        for p in &report.pairs {
            println!(
                "{:<15} {:<15} {:>14} {:>10} {:>14.1}",
                p.src.to_string(),
                p.dst.to_string(),
                p.bytes,
                p.packets,
                p.rate_bps
            );
        }
    }
    let s = report.stats;
    eprintln!(
        "score-agent: watched {:.1} s; {} pairs; updates lost to a full flow map: {}; non-IPv4 frames: {}",
        report.seconds,
        report.pairs.len(),
        s.flows_map_full,
        s.not_ipv4
    );
}
