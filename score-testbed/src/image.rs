//! `cargo xtask guest`: builds the tiny real guest that the qemu backend's
//! tests and measurements live-migrate: Debian's cloud kernel plus a
//! busybox-static initramfs written here (no `cpio` tool needed), cached
//! under [`GUEST_DIR`]. Also installs what running it needs (QEMU from
//! bookworm-backports, busybox-static): see [`install`].
//!
//! What the guest does (its `/init`, [`INIT`]): loads the virtio-net modules
//! itself, takes its address from the kernel command line, counts seconds
//! in `/run/counter`, answers `GET /cgi-bin/status` on port 80 with its
//! boot id, uptime and counter (so a test can tell a migration from a
//! reboot), runs iperf3 servers on ports 5201-5204, and sends UDP to the
//! peers named on its command line at their rates.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::process::run;

/// Where the built guest lives: `vmlinuz`, `initrd.img`, `STAMP`.
pub const GUEST_DIR: &str = "/var/cache/score-guest";

/// The Debian suite QEMU comes from: bookworm's qemu-system-x86 7.2
/// conflicts with the image's qemu-utils 10.0 from backports (TESTBED.md).
const BACKPORTS: &str = "bookworm-backports";
/// The apt source file this task adds for it.
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/score-bookworm-backports.sources";

/// Kernel modules the guest loads, in dependency order (the .deb ships no
/// modules.dep: depmod runs at install time).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
];

/// The guest's `/init`. Kernel command line keys (all optional):
/// `score.ip=ADDR/LEN` its address on eth0, `score.gw=ADDR` a default
/// route, `score.peers=ADDR:RATE,...` UDP traffic to each peer at an
/// iperf3 rate (`10M`, `500K`), `score.name=NAME` its host name.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
while read -r m; do insmod "/lib/modules/$m" || echo "score-guest: insmod $m failed"; done < /lib/modules/order
ip=; gw=; peers=; name=score-guest
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    score.ip=*) ip="${arg#score.ip=}" ;;
    score.gw=*) gw="${arg#score.gw=}" ;;
    score.peers=*) peers="${arg#score.peers=}" ;;
    score.name=*) name="${arg#score.name=}" ;;
  esac
done
hostname "$name"
ip link set lo up
i=0
while ! ip link show eth0 >/dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 100 ] && echo "score-guest: no eth0" && break
  sleep 0.05
done
ip link set eth0 up
[ -n "$ip" ] && ip addr add "$ip" dev eth0
[ -n "$gw" ] && ip route add default via "$gw"
# The counter: one tick a second, kept in RAM, so it survives a live
# migration and restarts from 0 on a reboot.
( n=0; while :; do echo $n > /run/counter.new; mv /run/counter.new /run/counter; n=$((n+1)); sleep 1; done ) &
httpd -p 80 -h /www
if [ -x /usr/bin/iperf3 ]; then
  for p in 5201 5202 5203 5204; do iperf3 -s -D -p $p >/dev/null 2>&1; done
  # A busy server refuses a second client: try the next port, and keep
  # trying while the peer is not up yet.
  for peer in $(echo "$peers" | tr ',' ' '); do
    addr="${peer%%:*}"; rate="${peer#*:}"
    ( while :; do
        for p in 5201 5202 5203 5204; do
          iperf3 -c "$addr" -p $p -u -b "$rate" -l 1400 -t 0 >/dev/null 2>&1
        done
        sleep 1
      done ) &
  done
fi
echo "score-guest: up ip=$ip boot_id=$(cat /proc/sys/kernel/random/boot_id)"
while :; do sleep 3600; done
"#;

/// `GET /cgi-bin/status`: what a test reads to tell a live migration (same
/// boot id, uptime still counting) from a reboot.
pub(crate) const STATUS_CGI: &str = r#"#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"
echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "counter=$(cat /run/counter 2>/dev/null)"
echo "name=$(hostname)"
"#;

/// The built guest's files.
#[derive(Debug)]
pub struct Guest {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// `cargo xtask guest`: installs QEMU and busybox if missing, then builds
/// the guest unless the cached one is current. `force` rebuilds anyway.
pub fn guest(force: bool) -> Result<Guest> {
    install()?;
    build(force)
}

/// Adds bookworm-backports (from the archive the image's own sources name)
/// and installs qemu-system-x86 from it, plus busybox-static. Kept out of
/// plain `cargo xtask setup`: QEMU with its dependencies took 99 MiB here
/// that only the real-guest tests use.
pub fn install() -> Result<()> {
    let missing = crate::apt::missing(&["qemu-system-x86", "busybox-static"]);
    if missing.is_empty() {
        return Ok(());
    }
    if !Path::new(BACKPORTS_SOURCES).exists() {
        let uri = debian_archive().unwrap_or_else(|| "http://deb.debian.org/debian".into());
        fs::write(
            BACKPORTS_SOURCES,
            format!(
                "Types: deb\nURIs: {uri}\nSuites: {BACKPORTS}\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )
        .with_context(|| format!("writing {BACKPORTS_SOURCES}"))?;
    }
    crate::apt::install(&missing, Some(BACKPORTS))
}

/// The Debian archive URI the image's apt sources use for `bookworm`.
fn debian_archive() -> Option<String> {
    let text = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .map(str::trim)
        .find(|u| u.ends_with("/debian"))
        .map(str::to_owned)
}

/// The newest `linux-image-6.1.0-N<flavour>` apt knows. The guest uses
/// the cloud flavour (`-cloud-amd64-unsigned`): the 6.1 kernel is what
/// TESTBED.md found to boot under TCG here.
pub(crate) fn kernel_package(flavour: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["pkgnames", "linux-image-6.1.0-"])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let best = text
        .lines()
        .filter_map(|p| {
            let abi = p
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix(flavour)?;
            abi.parse::<u32>().ok().map(|n| (n, p.to_owned()))
        })
        .max();
    match best {
        Some((_, p)) => Ok(p),
        None => bail!("apt knows no linux-image-6.1.0-*{flavour} (apt-get update?)"),
    }
}

/// The kernel image of a linux-image package unpacked at `root`, and its
/// release (the name after `vmlinuz-`).
pub(crate) fn unpacked_kernel(root: &Path) -> Result<(PathBuf, String)> {
    let vmlinuz = fs::read_dir(root.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    Ok((vmlinuz, release))
}

/// A short content hash (FNV-1a) to notice that the guest's files changed.
pub(crate) fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
    }
    h
}

/// Builds the guest into [`GUEST_DIR`] unless its stamp says it is current.
pub fn build(force: bool) -> Result<Guest> {
    let dir = Path::new(GUEST_DIR);
    let guest = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    let package = kernel_package("-cloud-amd64-unsigned")?;
    let busybox = fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    let stamp = format!(
        "{package} {:016x}\n",
        fnv(&[
            INIT.as_bytes(),
            STATUS_CGI.as_bytes(),
            MODULES.join(" ").as_bytes(),
            &busybox
        ])
    );
    let stamp_file = dir.join("STAMP");
    if !force
        && guest.kernel.exists()
        && guest.initrd.exists()
        && fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str())
    {
        println!("guest: up to date in {GUEST_DIR} ({package})");
        return Ok(guest);
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {GUEST_DIR}"))?;
    let work = dir.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    // apt's sandbox user cannot write into root's directories.
    run(Command::new("apt-get")
        .current_dir(&work)
        .args(["download", "-qq", &package]))
    .with_context(|| format!("downloading {package}"))?;
    let deb = fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = work.join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;

    let (vmlinuz, release) = unpacked_kernel(&root)?;
    let moddir = root.join("lib/modules").join(&release).join("kernel");

    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "lib64",
        "proc",
        "run",
        "sys",
        "tmp",
        "usr",
        "usr/bin",
        "www",
        "www/cgi-bin",
    ] {
        cpio.dir(d);
    }
    // The console exists before devtmpfs is mounted: the kernel opens it
    // for init's stdio.
    cpio.chardev("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("www/cgi-bin/status", 0o755, STATUS_CGI.as_bytes());
    cpio.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n");
    let mut order = String::new();
    for m in MODULES {
        let path = moddir.join(m);
        let name = Path::new(m)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        cpio.file(&format!("lib/modules/{name}"), 0o644, &data);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("lib/modules/order", 0o644, order.as_bytes());
    add_iperf3(&mut cpio)?;
    let image = cpio.finish();

    fs::copy(&vmlinuz, &guest.kernel).with_context(|| format!("copying {}", vmlinuz.display()))?;
    fs::write(&guest.initrd, &image)?;
    fs::write(&stamp_file, stamp)?;
    let _ = fs::remove_dir_all(&work);
    println!(
        "guest: built {} ({release}, {:.1} MB) and {} ({:.1} MB)",
        guest.kernel.display(),
        fs::metadata(&guest.kernel)?.len() as f64 / 1e6,
        guest.initrd.display(),
        image.len() as f64 / 1e6
    );
    Ok(guest)
}

/// Copies the host's iperf3 and the libraries `ldd` names into the image:
/// the guests' traffic generator. Left out (with a note) if the host has
/// none.
pub(crate) fn add_iperf3(cpio: &mut Cpio) -> Result<()> {
    let bin = Path::new("/usr/bin/iperf3");
    if !bin.exists() {
        eprintln!("guest: no /usr/bin/iperf3 on this host; the guest will send no traffic");
        return Ok(());
    }
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let mut files = vec![bin.to_path_buf()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let data = fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.to_string_lossy().trim_start_matches('/').to_owned();
        cpio.parents(&name);
        cpio.file(&name, 0o755, &data);
    }
    Ok(())
}

/// A `newc` cpio archive, the format the kernel unpacks as an initramfs
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
#[derive(Default)]
pub(crate) struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub(crate) fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_owned()) {
            self.entry(name, 0o040755, (0, 0), &[]);
        }
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    /// A symbolic link `name` -> `target`.
    pub(crate) fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }

    /// The directories above `name`, each once.
    pub(crate) fn parents(&mut self, name: &str) {
        let mut parent = PathBuf::new();
        for c in Path::new(name)
            .parent()
            .map(|p| p.components().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            parent.push(c);
            self.dir(&parent.to_string_lossy());
        }
    }

    pub(crate) fn chardev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        // Header 110 bytes, name "bin\0" padded to 4-byte alignment.
        assert_eq!(&out[110..113], b"bin");
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("TRAILER!!!"));
        // The file's size field (7th) is 10 bytes.
        let second = text.find("init").unwrap() - 110;
        assert_eq!(&text[second + 6 + 6 * 8..second + 6 + 7 * 8], "0000000a");
    }
}
