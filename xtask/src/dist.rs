//! `cargo xtask dist`: the operator's package. Builds the agent (with its
//! eBPF object, which its build.rs embeds), stages the installed tree once
//! (binary, hardened systemd unit, /etc/score/agent.toml, man pages and
//! completions generated from the agent's own clap definitions, docs,
//! dashboard and alert rules), and packs that one tree twice: a Debian
//! package with `dpkg-deb` and a tarball.
//!
//! dpkg-deb from a staged tree rather than cargo-deb: the man pages and
//! completions come from running the built agent, the tarball must hold the
//! same files, and the maintainer scripts (system user, pins, purge) are
//! ours either way; dpkg-deb is on every Debian host, where cargo-deb would
//! be one more tool to install and pin.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, run};

/// The package's name, as dpkg and the tarball know it.
pub(crate) const PACKAGE: &str = "score-agent";
/// Where `cargo xtask test` tells the privileged tests the .deb is.
pub(crate) const PACKAGE_ENV: &str = "SCORE_DEB";
/// Where `cargo xtask test` tells the privileged tests the tarball is.
pub(crate) const TARBALL_ENV: &str = "SCORE_TARBALL";

/// `cargo xtask dist`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct DistArgs {
    /// Where the .deb and the tarball go.
    #[arg(long, default_value = "target/dist")]
    pub out: PathBuf,
    /// Package the dev-profile agent instead of the release one (quicker;
    /// what `cargo xtask test` installs and purges).
    #[arg(long)]
    pub dev: bool,
}

/// What `dist` made.
#[derive(Debug)]
pub(crate) struct Artifacts {
    /// The Debian package.
    pub deb: PathBuf,
    /// The tarball with the same files.
    pub tarball: PathBuf,
}

/// Builds the agent and packs it.
pub(crate) fn dist(args: &DistArgs) -> Result<Artifacts> {
    let mut build = cargo();
    build.args(["build", "--locked", "-p", PACKAGE]);
    if !args.dev {
        build.arg("--release");
    }
    run(&mut build)?;
    let bin = Path::new("target")
        .join(if args.dev { "debug" } else { "release" })
        .join(PACKAGE);
    let version_line = output_of(Command::new(&bin).arg("--version"))?;
    if !version_line.contains("eBPF embedded: yes") {
        bail!(
            "{} carries no eBPF program ({}): run `cargo xtask setup` and build again",
            bin.display(),
            version_line.trim()
        );
    }
    let version = package_version()?;
    let arch = output_of(Command::new("dpkg").arg("--print-architecture"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "amd64".to_owned());
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let stage = args.out.join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    stage_tree(&stage, &bin)?;
    let deb = args.out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let tarball = args.out.join(format!("{PACKAGE}-{version}-{arch}.tar.gz"));
    write_control(&stage, &version, &arch)?;
    // xz for releases; the tests' dev package (an unstripped binary ten
    // times the size) packs in seconds with gzip instead of minutes.
    let compression = if args.dev { "-Zgzip" } else { "-Zxz" };
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", compression, "--build"])
        .arg(&stage)
        .arg(&deb))?;
    run(Command::new("tar")
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--sort=name",
            "--exclude=./DEBIAN",
            "-czf",
        ])
        .arg(&tarball)
        .arg("-C")
        .arg(&stage)
        .arg("."))?;
    println!("dist: {}", deb.display());
    println!("dist: {}", tarball.display());
    println!("dist: agent {}", version_line.trim());
    Ok(Artifacts { deb, tarball })
}

fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// score-agent's version from its manifest.
fn package_version() -> Result<String> {
    let manifest = fs::read_to_string("score-agent/Cargo.toml")?;
    let v: toml::Value = toml::from_str(&manifest).context("parsing score-agent/Cargo.toml")?;
    v.get("package")
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .context("score-agent/Cargo.toml has no package.version")
}

/// Copies `from` to `stage/to` with `mode`, creating directories.
fn put(stage: &Path, from: &Path, to: &str, mode: u32) -> Result<()> {
    let dest = stage.join(to);
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(from, &dest)
        .with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Where each completion script goes, by the name clap_complete gives it.
const COMPLETIONS: &[(&str, &str)] = &[
    (
        "score-agent.bash",
        "usr/share/bash-completion/completions/score-agent",
    ),
    (
        "_score-agent",
        "usr/share/zsh/vendor-completions/_score-agent",
    ),
    (
        "score-agent.fish",
        "usr/share/fish/vendor_completions.d/score-agent.fish",
    ),
];

/// Documents that go into /usr/share/doc/score-agent (those that exist).
const DOCS: &[&str] = &[
    "README.md",
    "docs/OPERATIONS.md",
    "docs/METRICS.md",
    "docs/BACKENDS.md",
    "docs/WIRE.md",
];

/// The installed tree, as it lands on a host.
fn stage_tree(stage: &Path, bin: &Path) -> Result<()> {
    put(stage, bin, "usr/bin/score-agent", 0o755)?;
    put(
        stage,
        Path::new("dist/score-agent.service"),
        "lib/systemd/system/score-agent.service",
        0o644,
    )?;
    put(
        stage,
        Path::new("dist/prepare-pins"),
        "usr/lib/score-agent/prepare-pins",
        0o755,
    )?;
    put(
        stage,
        Path::new("dist/agent.example.toml"),
        "etc/score/agent.toml",
        0o644,
    )?;
    put(
        stage,
        Path::new("dist/grafana/score.json"),
        "usr/share/score-agent/grafana/score.json",
        0o644,
    )?;
    put(
        stage,
        Path::new("dist/prometheus/score-rules.yml"),
        "usr/share/score-agent/prometheus/score-rules.yml",
        0o644,
    )?;
    for doc in DOCS {
        let p = Path::new(doc);
        if p.exists() {
            let name = p.file_name().context("doc name")?.to_string_lossy();
            put(
                stage,
                p,
                &format!("usr/share/doc/score-agent/{name}"),
                0o644,
            )?;
        }
    }
    fs::write(
        stage.join("usr/share/doc/score-agent/copyright"),
        copyright(),
    )?;

    // Man pages and completions from the agent's own clap definitions.
    let generated = stage.join("../generated");
    if generated.exists() {
        fs::remove_dir_all(&generated)?;
    }
    run(Command::new(bin)
        .arg("generate-docs")
        .arg("--out")
        .arg(&generated))?;
    let man_dir = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man_dir)?;
    let mut pages = 0;
    for entry in fs::read_dir(generated.join("man"))? {
        let path = entry?.path();
        let name = path.file_name().context("man page name")?.to_owned();
        let dest = man_dir.join(&name);
        fs::copy(&path, &dest)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o644))?;
        // -n: no name or time stamp in the header, so that the same
        // sources give the same package.
        run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&dest))?;
        pages += 1;
    }
    if pages == 0 {
        bail!("the agent generated no man page");
    }
    for (name, to) in COMPLETIONS {
        put(stage, &generated.join("completions").join(name), to, 0o644)?;
    }
    fs::remove_dir_all(&generated)?;
    // Directories 0755 whatever the umask.
    set_dir_modes(stage)?;
    Ok(())
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_dir_modes(&entry.path())?;
        }
    }
    Ok(())
}

fn copyright() -> String {
    let license = crate_license().unwrap_or_else(|| "MIT OR Apache-2.0".to_owned());
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: score\n\n\
         Files: *\n\
         Copyright: the score authors\n\
         License: {license}\n"
    )
}

fn crate_license() -> Option<String> {
    let manifest = fs::read_to_string("Cargo.toml").ok()?;
    let v: toml::Value = toml::from_str(&manifest).ok()?;
    Some(
        v.get("workspace")?
            .get("package")?
            .get("license")?
            .as_str()?
            .to_owned(),
    )
}

/// Bytes of every file under `dir`, in KiB rounded up, as dpkg counts them.
fn installed_size_kib(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += installed_size_kib(&entry.path())?;
        } else {
            total += meta.len().div_ceil(1024);
        }
    }
    Ok(total)
}

/// DEBIAN/: control, conffiles, maintainer scripts.
fn write_control(stage: &Path, version: &str, arch: &str) -> Result<()> {
    let size = installed_size_kib(stage)?;
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    fs::write(
        debian.join("control"),
        format!(
            "Package: {PACKAGE}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: score maintainers <score@example.invalid>\n\
             Installed-Size: {size}\n\
             Depends: libc6 (>= 2.34), passwd\n\
             Recommends: prometheus\n\
             Section: admin\n\
             Priority: optional\n\
             Homepage: https://example.invalid/score\n\
             Description: network-aware live VM migration agent (S-CORE)\n \
             One agent per hypervisor host (Xen dom0, KVM with libvirt or QEMU)\n \
             counts the bytes every VM exchanges with every other VM with an eBPF\n \
             program on the VM interfaces, and with the other hosts' agents\n \
             live-migrates VMs to lower the data centre's communication cost.\n"
        ),
    )?;
    fs::write(debian.join("conffiles"), "/etc/score/agent.toml\n")?;
    for script in ["postinst", "prerm", "postrm"] {
        put(
            stage,
            &Path::new("dist/debian").join(script),
            &format!("DEBIAN/{script}"),
            0o755,
        )?;
    }
    fs::set_permissions(&debian, fs::Permissions::from_mode(0o755))?;
    Ok(())
}
