//! The `score-agent` command: parses arguments, sets up logging, and hands
//! over to the library. Exit codes: 0 fine, 1 runtime failure, 2 bad
//! configuration or arguments.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use score_agent::{AgentError, config::Config};

#[derive(Debug, Parser)]
#[command(
    name = "score-agent",
    version,
    about = "S-CORE: network-aware live VM migration, one agent per hypervisor host"
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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            Command::Watch {
                ifaces,
                duration,
                json,
                flows_max,
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
                let report = score_agent::watch::watch(&ifaces, flows_max, stop).await?;
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
