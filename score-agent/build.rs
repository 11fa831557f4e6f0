//! Builds score-ebpf for the BPF target through aya-build (as the aya
//! template does), so one `cargo build` builds both sides. Where the eBPF
//! toolchain is missing (no bpf-linker, no pinned nightly), it writes an
//! empty stub object instead and the agent says so at run time; the user
//! space still builds and unit-tests.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::Context as _;

/// The nightly that builds the eBPF side; bpf-linker 0.10.4 loads this
/// rustc's own LLVM, so a moved `nightly` (another LLVM) breaks it; the
/// same pin as xtask/src/setup.rs's `EBPF_TOOLCHAIN`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
/// The objects score-ebpf's two binaries become: what the agent loads, and
/// the same plus the `score_bench_*` programs, for the benches.
const OBJECTS: [&str; 2] = ["score-tc", "score-tc-bench"];

fn toolchain_present() -> bool {
    let linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let nightly = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    linker && nightly
}

/// The commit `score-agent --version` names: SCORE_GIT_COMMIT when set
/// (a build from a tarball, which has no .git), else git's HEAD when the
/// build script ran (uncommitted changes are not marked); "unknown"
/// without either.
fn git_commit() -> String {
    println!("cargo:rerun-if-env-changed=SCORE_GIT_COMMIT");
    if let Some(c) = env::var_os("SCORE_GIT_COMMIT") {
        return c.to_string_lossy().into_owned();
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // Rebuild when HEAD moves: the files git keeps it in (a worktree's
    // HEAD is its own; the branch ref may be loose or packed).
    let mut watch = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &name])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    head
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rustc-env=SCORE_GIT_COMMIT={}", git_commit());
    println!("cargo:rustc-check-cfg=cfg(score_ebpf_stub)");
    println!("cargo:rerun-if-env-changed=SCORE_EBPF_STUB");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let forced_stub = env::var_os("SCORE_EBPF_STUB").is_some_and(|v| v == "1");
    if forced_stub || !toolchain_present() {
        println!(
            "cargo:warning=building score-agent WITHOUT its eBPF program (no bpf-linker or {EBPF_TOOLCHAIN}); run `cargo xtask setup`"
        );
        println!("cargo:rustc-cfg=score_ebpf_stub");
        for object in OBJECTS {
            fs::write(out_dir.join(object), []).context("writing the stub eBPF objects")?;
        }
        return Ok(());
    }
    let package = aya_build::Package {
        name: "score-ebpf",
        root_dir: "../score-ebpf",
        ..Default::default()
    };
    // aya-build watches score-ebpf's own files; the kernel side also
    // compiles score-common (the map layouts, the slot hash), and an
    // object left stale by a change there disagrees with the agent.
    println!("cargo:rerun-if-changed=../score-common");
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
        .context("building score-ebpf")?;
    Ok(())
}
