//! Builds score-ebpf for the BPF target through aya-build (as the aya
//! template does), so one `cargo build` builds both sides. Where the eBPF
//! toolchain is missing (no bpf-linker, no pinned nightly), it writes an
//! empty stub object instead and the agent says so at run time; the user
//! space still builds and unit-tests.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::Context as _;

/// The nightly that builds the eBPF side; bpf-linker 0.10.4 loads this
/// rustc's own LLVM (see shared TOOLCHAIN.md: a moved `nightly` breaks it).
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

fn main() -> anyhow::Result<()> {
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
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
        .context("building score-ebpf")?;
    Ok(())
}
