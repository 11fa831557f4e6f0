//! `cargo xtask`: what plain cargo cannot do. Installs the eBPF toolchain
//! and test tools (`setup`), runs every tier of tests (`test`), and runs the
//! benchmarks (`bench`). Building stays with cargo: score-agent's build.rs
//! builds the eBPF object.

mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

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
        /// Which suite: flows (datapath), core (decision, wire), sim.
        suite: String,
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
    }
}

fn workspace_root() -> Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(dir
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

/// Runs a command, echoing it, and fails if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
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
    // Default members: every userspace crate. Privileged tests are
    // #[ignore]d there, so this tier needs no root.
    run(cargo().args(["test", "--locked"]))?;

    if !is_root() {
        eprintln!("xtask: SKIPPING privileged tests: they need root (BPF, network namespaces)");
        return Ok(());
    }
    // One at a time: they share the kernel (bpffs, namespaces, links).
    let mut cmd = cargo();
    // Every #[ignore]d test of score-agent is privileged; cargo runs the
    // test binaries one after another and --test-threads=1 serialises
    // the tests inside each.
    cmd.args(["test", "--locked", "-p", "score-agent", "--"]);
    cmd.args(["--ignored", "--test-threads=1"]);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run(&mut cmd)?;
    eprintln!("xtask: all tests passed");
    Ok(())
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
        "core" => {
            run(cargo().args([
                "bench",
                "--locked",
                "-p",
                "score-core",
                "--bench",
                "decision",
            ]))?;
            run(cargo().args(["bench", "--locked", "-p", "score-core", "--bench", "wire"]))
        }
        "sim" => run(cargo().args(["bench", "--locked", "-p", "score-sim"])),
        other => bail!("unknown bench suite {other:?}: expected flows, core or sim"),
    }
}
