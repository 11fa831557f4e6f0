//! `cargo xtask xen up|status|down|exec|build`: two real Xen hosts for the
//! xl backend's tests, each a QEMU TCG virtual machine running Debian's
//! Xen 4.17 with a Linux PV dom0 (xl, xenstored, xenconsoled, and the
//! hotplug scripts that put each guest's `vifD.N` on the bridge `xenbr0`).
//!
//! Built from Debian packages into [`XEN_DIR`], nothing installed on this
//! machine but the build tools: the Xen tools and kernel come from
//! `apt-get download` + `dpkg -x`; the hypervisor is rebuilt from Debian's
//! source with `CONFIG_SHADOW_PAGING=y`, because Debian's own build cannot
//! live-migrate a PV guest ("Failed to enable logdirty"; docs/TESTBED.md).
//!
//! Each dom0 is driven through a small control service started by its
//! init (the serial console drops characters of typed commands): one
//! command line in over TCP, its exit code, stdout and stderr back (see
//! [`DOM0_CTL`]). `xtask xen exec HOST -- CMD...` is its client, and the
//! rig writes `RUN_DIR/hN/xl`, a wrapper that runs `xl` in that dom0, so
//! that the xl backend can be pointed at a real toolstack.
//!
//! The hosts' data link is QEMU's `-netdev dgram` between two UDP ports on
//! 127.0.0.1 (no tap or bridge on this machine, so the rig is two hosts);
//! the control link is QEMU's user network with one forwarded port.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

use crate::{image::Cpio, process::run};

/// The largest offset of a dom0's clock from this machine's that
/// [`Host::set_clock`] leaves: the agents' peer protocol rejects datagrams
/// older than `max_datagram_age` (30 s by default) by the sender's clock.
pub const CLOCK_TOLERANCE: Duration = Duration::from_secs(2);

/// Where the built rig lives: `xen` (the hypervisor), `vmlinuz`,
/// `dom0.img`, and their stamps.
pub const XEN_DIR: &str = "/var/cache/score-xen";
/// Where a running rig keeps its state: `hN/{qemu.pid,console.log,xl,exec}`.
pub const RUN_DIR: &str = "/run/score-xen";
/// Number of Xen hosts: a `dgram` link joins exactly two.
pub const HOSTS: usize = 2;
/// The data network of the dom0s (on each one's bridge `xenbr0`): host
/// `i` (from 1) is `10.77.0.i`; guests take addresses from `10.77.0.100`.
pub const NET: &str = "10.77.0";
/// Control port of host `i` (from 1) on 127.0.0.1 is `CTL_PORT_BASE + i`.
const CTL_PORT_BASE: u16 = 37700;
/// UDP port of host `i`'s end of the data link on 127.0.0.1.
const LINK_PORT_BASE: u16 = 37710;
/// The port of the control service inside each dom0.
const CTL_PORT: u16 = 7001;
/// Memory of each Xen host, and of its dom0 (the rest is for guests).
const HOST_MIB: u32 = 1024;
const DOM0_MIB: u32 = 512;

/// QEMU's CPU model for the hosts, unless `SCORE_XEN_CPU` names another.
/// The guests are PV, so the hosts need no SVM or VMX.
const CPU_MODEL: &str = "qemu64";

/// QEMU's NIC model for each host's data link, unless `SCORE_XEN_NIC`
/// names another: it carries the migrations.
const NIC_MODEL: &str = "virtio-net-pci";

fn nic_model() -> String {
    std::env::var("SCORE_XEN_NIC").unwrap_or_else(|_| NIC_MODEL.to_owned())
}

fn cpu_model() -> String {
    std::env::var("SCORE_XEN_CPU").unwrap_or_else(|_| CPU_MODEL.to_owned())
}

/// The apt source this task adds for `apt-get source xen`.
const SRC_SOURCES: &str = "/etc/apt/sources.list.d/score-xen-src.sources";
/// The suite whose Xen source is rebuilt: bookworm-security's 4.17.7
/// source is not on the archive mirror here (404), bookworm's 4.17.5 is; a
/// 4.17.5 hypervisor under the 4.17.7 tools migrates (docs/TESTBED.md).
const SRC_SUITE: &str = "bookworm";

/// The Debian binary packages unpacked into the dom0: the Xen tools and
/// their libraries (`apt-cache depends xen-utils-4.17`), the hypervisor
/// package for its build configuration, and the kernel.
const PACKAGES: &[&str] = &[
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxenmisc4.17",
    "libxenforeignmemory1",
    "libxenevtchn1",
    "libxengnttab1",
    "libxencall1",
    "libxentoolcore1",
    "libxentoollog1",
    "libxenhypfs1",
    "libxendevicemodel1",
    "libxenstore4",
    "libyajl2",
];

/// Where the Xen tools live in the dom0 (Debian's layout).
const XEN_BIN: &str = "usr/lib/xen-4.17/bin";

/// The programs of the dom0 whose libraries are copied with them: from the
/// unpacked packages, then from this machine (bash and flock for the
/// hotplug scripts, which busybox cannot run: `#!/bin/bash`, `flock`).
const DOM0_PROGRAMS: &[&str] = &[
    "usr/lib/xen-4.17/bin/xl",
    "usr/lib/xen-4.17/bin/xenstored",
    "usr/lib/xen-4.17/bin/xenconsoled",
    "usr/lib/xen-4.17/bin/xen-init-dom0",
    "usr/lib/xen-4.17/bin/libxl-save-helper",
    "usr/bin/xenstore-read",
    "usr/bin/xenstore-write",
    "usr/bin/xenstore-rm",
    "usr/bin/xenstore-exists",
    "usr/bin/xenstore-list",
    "usr/bin/xenstore-ls",
    "usr/bin/xenstore",
];
const HOST_PROGRAMS: &[&str] = &["/bin/bash", "/usr/bin/flock"];

/// Kernel modules dom0 loads (dependencies are added from modules.dep).
const DOM0_MODULES: &[&str] = &[
    "xen-evtchn",
    "xen-privcmd",
    "xenfs",
    "xen-gntdev",
    "xen-gntalloc",
    "xen-netback",
    "xen-blkback",
    "e1000",
    "virtio_net",
    "virtio_pci",
    "bridge",
    "sch_ingress",
    "cls_bpf",
];
/// Kernel modules each guest loads.
const DOMU_MODULES: &[&str] = &["xen-netfront"];

/// The dom0's `/init`. Kernel command line keys: `score.ip=ADDR/LEN` the
/// address on `xenbr0`, `score.name=NAME`, `score.data=MAC` and
/// `score.ctl=MAC` the two NICs.
const DOM0_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# xenconsoled gives each guest's console a pty.
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mkdir -p /run/xen /run/xenstored /run/xen-hotplug /var/lib/xen /var/lib/xenstored /var/log/xen/console
while read -r m; do insmod "/lib/modules/$m" || echo "score-xen: insmod $m failed"; done < /lib/modules/order
mount -t xenfs xenfs /proc/xen
ip=; name=xen; data=; ctl=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    score.ip=*) ip="${arg#score.ip=}" ;;
    score.name=*) name="${arg#score.name=}" ;;
    score.data=*) data="${arg#score.data=}" ;;
    score.ctl=*) ctl="${arg#score.ctl=}" ;;
  esac
done
hostname "$name"
ip link set lo up
# The NICs by MAC: PCI probe order is not the command line's.
nic() {
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address")" = "$1" ] && basename "$d" && return
  done
}
i=0
while [ -z "$(nic "$data")" ] || [ -z "$(nic "$ctl")" ]; do
  i=$((i+1)); [ $i -gt 200 ] && echo "score-xen: NICs missing" && break
  sleep 0.1
done
d=$(nic "$data"); c=$(nic "$ctl")
# A new bridge has STP off, so its ports forward at once.
brctl addbr xenbr0
brctl addif xenbr0 "$d"
ip link set "$d" up
ip link set xenbr0 up
[ -n "$ip" ] && ip addr add "$ip" dev xenbr0
ip addr add 10.0.2.15/24 dev "$c"
ip link set "$c" up
xenstored --pid-file /run/xenstored.pid
xen-init-dom0
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
score-receiver start
nc -ll -p 7001 -e /bin/score-ctl &
echo "score-xen: dom0 $name up ip=$ip"
while :; do sleep 3600; done
"#;

/// The control service, run by `nc -ll -e` for each connection: reads one
/// command line, runs it with `sh -c`, and answers
/// `score-ctl RC OUT_LEN ERR_LEN\n`, then OUT_LEN bytes of stdout and
/// ERR_LEN of stderr.
const DOM0_CTL: &str = r#"#!/bin/sh
read -r cmd
sh -c "$cmd" >/tmp/ctl.$$.out 2>/tmp/ctl.$$.err </dev/null
rc=$?
printf 'score-ctl %d %d %d\n' "$rc" "$(wc -c </tmp/ctl.$$.out)" "$(wc -c </tmp/ctl.$$.err)"
cat /tmp/ctl.$$.out /tmp/ctl.$$.err
rm -f /tmp/ctl.$$.out /tmp/ctl.$$.err
"#;

/// `score-receiver start|stop|status`: the target side of `xl migrate -s
/// "" DOMAIN "nc HOST 7000"`, one `xl migrate-receive` per connection.
/// Tests stop it to make a target without a receiver.
const DOM0_RECEIVER: &str = r#"#!/bin/sh
pidfile=/run/score-receiver.pid
case "$1" in
  start)
    [ -f $pidfile ] && kill -0 "$(cat $pidfile)" 2>/dev/null && exit 0
    nc -ll -p 7000 -e /bin/score-xl-receive </dev/null >/dev/null 2>&1 &
    echo $! > $pidfile ;;
  stop)
    [ -f $pidfile ] && kill "$(cat $pidfile)" 2>/dev/null
    rm -f $pidfile ;;
  status)
    [ -f $pidfile ] && kill -0 "$(cat $pidfile)" 2>/dev/null && echo running && exit 0
    echo stopped; exit 1 ;;
esac
"#;

/// What `nc -e` runs for each incoming migration: the stream is its stdin
/// and stdout; xl's messages go to a log the tests read.
const DOM0_XL_RECEIVE: &str = r#"#!/bin/sh
exec xl migrate-receive 2>>/var/log/xen/migrate-receive.log
"#;

/// `score-xl-send HOST [COMMAND...]`: the sender's transport, in place of
/// ssh (`xl migrate -s score-xl-send DOMAIN HOST` runs it as `score-xl-send
/// HOST xl migrate-receive`): a TCP connection to HOST's receiver on port
/// 7000, relayed to xl's pipes in 64 KiB blocks; the command is the
/// receiver's own. busybox `nc` relays in small blocks, and every system
/// call of a PV dom0 under TCG is dear: a 128 MiB guest took over 3 min
/// with `nc` and 38 s with this.
const DOM0_XL_SEND: &str = r#"#!/bin/bash
exec 3<>"/dev/tcp/$1/7000" || exit 1
dd bs=64k <&3 2>/dev/null &
dd bs=64k >&3 2>/dev/null
wait
"#;

/// `score-domu NAME IP MAC [PEERS]`: writes `/etc/xen/NAME.cfg` for a tiny
/// PV guest on `xenbr0` and creates it. PEERS is the guest's
/// `score.peers=` (ADDR:RATE,...).
const DOM0_DOMU: &str = r#"#!/bin/sh
name=$1; ip=$2; mac=$3; peers=$4
cat > /etc/xen/$name.cfg <<EOF
name = "$name"
type = "pv"
kernel = "/usr/share/score/vmlinuz"
ramdisk = "/usr/share/score/domu.img"
extra = "console=hvc0 score.ip=$ip/24 score.name=$name score.peers=$peers"
memory = 128
vcpus = 1
vif = [ "mac=$mac,bridge=xenbr0" ]
on_crash = "preserve"
EOF
exec xl create /etc/xen/$name.cfg
"#;

/// xl's configuration: JSON for `xl list -l` (the xl backend reads it),
/// and no autoballooning (dom0 has a fixed size).
const XL_CONF: &str = "autoballoon=\"off\"\noutput_format=\"json\"\n";

/// The guest's `/init`: loads xen-netfront, then as the tiny QEMU guest
/// (`crate::image`): address from the command line, a counter, `GET
/// /cgi-bin/status`, iperf3 servers and UDP to its peers.
const DOMU_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
while read -r m; do insmod "/lib/modules/$m" || echo "score-domu: insmod $m failed"; done < /lib/modules/order
ip=; peers=; name=score-domu
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    score.ip=*) ip="${arg#score.ip=}" ;;
    score.peers=*) peers="${arg#score.peers=}" ;;
    score.name=*) name="${arg#score.name=}" ;;
  esac
done
hostname "$name"
ip link set lo up
i=0
while ! ip link show eth0 >/dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 100 ] && echo "score-domu: no eth0" && break
  sleep 0.05
done
ip link set eth0 up
[ -n "$ip" ] && ip addr add "$ip" dev eth0
( n=0; while :; do echo $n > /run/counter.new; mv /run/counter.new /run/counter; n=$((n+1)); sleep 1; done ) &
httpd -p 80 -h /www
if [ -x /usr/bin/iperf3 ]; then
  for p in 5201 5202; do iperf3 -s -D -p $p >/dev/null 2>&1; done
  for peer in $(echo "$peers" | tr ',' ' '); do
    addr="${peer%%:*}"; rate="${peer#*:}"
    ( while :; do
        for p in 5201 5202; do
          iperf3 -c "$addr" -p $p -u -b "$rate" -l 1400 -t 0 >/dev/null 2>&1
        done
        sleep 1
      done ) &
  done
fi
echo "score-domu: up ip=$ip boot_id=$(cat /proc/sys/kernel/random/boot_id)"
while :; do sleep 3600; done
"#;

/// The built rig's files.
#[derive(Debug)]
pub struct Images {
    /// The hypervisor, a multiboot ELF.
    pub xen: PathBuf,
    /// dom0's (and the guests') kernel.
    pub kernel: PathBuf,
    /// dom0's initramfs (it carries the guests' kernel and initramfs).
    pub dom0: PathBuf,
}

/// `cargo xtask xen build`: installs what building needs, then builds the
/// hypervisor and the images unless the cached ones are current.
pub fn build(force: bool) -> Result<Images> {
    crate::image::install()?;
    install_build_tools()?;
    let dir = Path::new(XEN_DIR);
    fs::create_dir_all(dir).with_context(|| format!("creating {XEN_DIR}"))?;
    // Debian 12's dom0 kernel: the plain flavour (the cloud one has no Xen
    // backend drivers).
    let kernel_pkg = crate::image::kernel_package("-amd64-unsigned")?;
    let packages: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .chain([kernel_pkg.as_str()])
        .collect();
    let versions = package_versions(&packages)?;
    let root = dir.join("root");
    unpack(&root, &packages, &versions, force)?;
    let xen = build_hypervisor(dir, &root, force)?;
    let images = build_images(dir, &root, &kernel_pkg, &versions, force)?;
    Ok(Images { xen, ..images })
}

/// flex and bison build the hypervisor's Kconfig; busybox-static is the
/// userland of dom0 and guests.
fn install_build_tools() -> Result<()> {
    crate::apt::ensure(&["flex", "bison", "busybox-static", "make", "gcc"])
        .context("installing the hypervisor's build tools")
}

/// `PACKAGE=VERSION` of the candidate of each package.
fn package_versions(packages: &[&str]) -> Result<String> {
    let out = Command::new("apt-cache")
        .arg("policy")
        .args(packages)
        .output()
        .context("running apt-cache policy")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut versions = String::new();
    let mut current = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            current = line.strip_suffix(':').map(str::to_owned);
        } else if let (Some(p), Some(v)) = (&current, line.trim().strip_prefix("Candidate: ")) {
            if v == "(none)" {
                bail!("apt has no candidate for {p}");
            }
            versions.push_str(&format!("{p}={v}\n"));
        }
    }
    Ok(versions)
}

/// Downloads and unpacks `packages` into `root` unless it holds exactly
/// these versions.
fn unpack(root: &Path, packages: &[&str], versions: &str, force: bool) -> Result<()> {
    let stamp = root.join(".score-versions");
    if !force && fs::read_to_string(&stamp).ok().as_deref() == Some(versions) {
        return Ok(());
    }
    let _ = fs::remove_dir_all(root);
    let debs = Path::new(XEN_DIR).join("debs");
    let _ = fs::remove_dir_all(&debs);
    fs::create_dir_all(&debs)?;
    run(Command::new("apt-get")
        .current_dir(&debs)
        .args(["download", "-qq"])
        .args(packages))
    .context("downloading the Xen and kernel packages")?;
    for deb in fs::read_dir(&debs)?.flatten().map(|e| e.path()) {
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(root))?;
    }
    let _ = fs::remove_dir_all(&debs);
    fs::write(&stamp, versions)?;
    Ok(())
}

/// Rebuilds the hypervisor from Debian's source with shadow paging,
/// starting from Debian's own configuration; cached by source version.
fn build_hypervisor(dir: &Path, root: &Path, force: bool) -> Result<PathBuf> {
    let out = dir.join("xen");
    if !Path::new(SRC_SOURCES).exists() {
        let uri = "http://deb.debian.org/debian";
        fs::write(
            SRC_SOURCES,
            format!(
                "Types: deb-src\nURIs: {uri}\nSuites: {SRC_SUITE}\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )
        .with_context(|| format!("writing {SRC_SOURCES}"))?;
        run(Command::new("apt-get").args(["update", "-qq"]))?;
    }
    let uris = Command::new("apt-get")
        .args(["source", "--print-uris", "-qq"])
        .arg(format!("xen/{SRC_SUITE}"))
        .output()
        .context("asking apt for the Xen source")?;
    let listing = String::from_utf8_lossy(&uris.stdout);
    let dsc = listing
        .split_whitespace()
        .find(|w| w.ends_with(".dsc"))
        .context("apt knows no Xen source package (deb-src, apt-get update?)")?
        .to_owned();
    let stamp_text = format!("{dsc} CONFIG_SHADOW_PAGING=y\n");
    let stamp = dir.join("xen.STAMP");
    if !force && out.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(&stamp_text) {
        return Ok(out);
    }
    let src = dir.join("src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src)?;
    run(Command::new("apt-get")
        .current_dir(&src)
        .args(["source", "-qq"])
        .arg(format!("xen/{SRC_SUITE}")))
    .context("fetching and unpacking Debian's Xen source")?;
    let tree = fs::read_dir(&src)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .context("apt-get source left no source tree")?;
    let config = fs::read_to_string(root.join("boot/xen-4.17-amd64.config"))
        .context("reading Debian's hypervisor configuration")?;
    let config = config.replace(
        "# CONFIG_SHADOW_PAGING is not set",
        "CONFIG_SHADOW_PAGING=y",
    );
    fs::write(tree.join("xen/.config"), config)?;
    let started = Instant::now();
    run(Command::new("make")
        .current_dir(&tree)
        .args(["-C", "xen", "olddefconfig"]))?;
    let config = fs::read_to_string(tree.join("xen/.config"))?;
    if !config.lines().any(|l| l == "CONFIG_SHADOW_PAGING=y") {
        bail!("olddefconfig dropped CONFIG_SHADOW_PAGING");
    }
    run(Command::new("make")
        .current_dir(&tree)
        .args(["-C", "xen", "-j2"]))
    .context("building the hypervisor")?;
    fs::copy(tree.join("xen/xen"), &out).context("copying the built hypervisor")?;
    fs::write(&stamp, stamp_text)?;
    let _ = fs::remove_dir_all(&src);
    println!(
        "xen: hypervisor rebuilt with shadow paging in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// Builds `vmlinuz`, `dom0.img` (with the guest's files) unless current.
fn build_images(
    dir: &Path,
    root: &Path,
    kernel_pkg: &str,
    versions: &str,
    force: bool,
) -> Result<Images> {
    let images = Images {
        xen: dir.join("xen"),
        kernel: dir.join("vmlinuz"),
        dom0: dir.join("dom0.img"),
    };
    let busybox = fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    let stamp_text = format!(
        "{kernel_pkg} {:016x}\n",
        crate::image::fnv(&[
            versions.as_bytes(),
            DOM0_INIT.as_bytes(),
            DOM0_CTL.as_bytes(),
            DOM0_RECEIVER.as_bytes(),
            DOM0_XL_RECEIVE.as_bytes(),
            DOM0_XL_SEND.as_bytes(),
            DOM0_DOMU.as_bytes(),
            XL_CONF.as_bytes(),
            DOMU_INIT.as_bytes(),
            crate::image::STATUS_CGI.as_bytes(),
            DOM0_MODULES.join(" ").as_bytes(),
            &busybox,
        ])
    );
    let stamp = dir.join("STAMP");
    if !force
        && images.kernel.exists()
        && images.dom0.exists()
        && fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str())
    {
        println!("xen: images up to date in {XEN_DIR}");
        return Ok(images);
    }
    let (vmlinuz, release) = crate::image::unpacked_kernel(root)?;
    // The .deb ships no modules.dep: make one.
    run(Command::new("depmod").arg("-b").arg(root).arg(&release))
        .context("running depmod on the unpacked kernel")?;
    let moddir = root.join("lib/modules").join(&release);
    let deps = fs::read_to_string(moddir.join("modules.dep"))?;

    // The guest first: dom0 carries it.
    let mut domu = Cpio::default();
    base_dirs(&mut domu);
    domu.dir("www");
    domu.dir("www/cgi-bin");
    domu.file("init", 0o755, DOMU_INIT.as_bytes());
    domu.file("bin/busybox", 0o755, &busybox);
    domu.file(
        "www/cgi-bin/status",
        0o755,
        crate::image::STATUS_CGI.as_bytes(),
    );
    domu.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n");
    add_modules(&mut domu, &moddir, &deps, DOMU_MODULES)?;
    crate::image::add_iperf3(&mut domu)?;
    // Compressed: xl copies the ramdisk into the guest's memory, where the
    // kernel unpacks it again, so its size counts twice against the guest.
    let domu = gzip(&domu.finish())?;

    let mut dom0 = Cpio::default();
    base_dirs(&mut dom0);
    for d in ["etc/xen", "usr/share", "usr/share/score", "var", "var/lib"] {
        dom0.dir(d);
    }
    dom0.symlink("var/run", "/run");
    dom0.file("init", 0o755, DOM0_INIT.as_bytes());
    dom0.file("bin/busybox", 0o755, &busybox);
    dom0.file("bin/score-ctl", 0o755, DOM0_CTL.as_bytes());
    dom0.file("bin/score-receiver", 0o755, DOM0_RECEIVER.as_bytes());
    dom0.file("bin/score-xl-receive", 0o755, DOM0_XL_RECEIVE.as_bytes());
    dom0.file("bin/score-xl-send", 0o755, DOM0_XL_SEND.as_bytes());
    dom0.file("bin/score-domu", 0o755, DOM0_DOMU.as_bytes());
    dom0.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n");
    dom0.file("etc/xen/xl.conf", 0o644, XL_CONF.as_bytes());
    dom0.file("usr/share/score/vmlinuz", 0o644, &fs::read(&vmlinuz)?);
    dom0.file("usr/share/score/domu.img", 0o644, &domu);
    // The hotplug scripts xl runs for each vif (vif-bridge and helpers).
    let scripts = root.join("etc/xen/scripts");
    add_tree(&mut dom0, root, &scripts)?;
    add_tree(&mut dom0, root, &root.join(XEN_BIN))?;
    let libdir = root.join("usr/lib/x86_64-linux-gnu");
    let mut elves: Vec<PathBuf> = DOM0_PROGRAMS.iter().map(|p| root.join(p)).collect();
    elves.extend(HOST_PROGRAMS.iter().map(PathBuf::from));
    for p in DOM0_PROGRAMS.iter().filter(|p| p.starts_with("usr/bin/")) {
        add_file(&mut dom0, &root.join(p), p)?;
    }
    for p in HOST_PROGRAMS {
        add_file(&mut dom0, Path::new(p), p.trim_start_matches('/'))?;
    }
    // libgcc_s is loaded by pthread_cancel at run time: `ldd` misses it,
    // and without it `xl create` aborts in pthread_cancel.
    add_file(
        &mut dom0,
        Path::new("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
        "lib/x86_64-linux-gnu/libgcc_s.so.1",
    )?;
    for lib in libraries(&elves, &libdir)? {
        let inside = match lib.strip_prefix(root) {
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => lib.to_string_lossy().trim_start_matches('/').to_owned(),
        };
        add_file(&mut dom0, &lib, &inside)?;
    }
    add_modules(&mut dom0, &moddir, &deps, DOM0_MODULES)?;
    let image = dom0.finish();

    fs::copy(&vmlinuz, &images.kernel)?;
    fs::write(&images.dom0, &image)?;
    fs::write(&stamp, stamp_text)?;
    println!(
        "xen: built {} ({release}) and {} ({:.1} MB, guest {:.1} MB)",
        images.kernel.display(),
        images.dom0.display(),
        image.len() as f64 / 1e6,
        domu.len() as f64 / 1e6
    );
    Ok(images)
}

/// `data` compressed with `gzip -9`.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::process::Stdio;
    let mut child = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running gzip")?;
    let mut stdin = child.stdin.take().context("gzip's stdin")?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().context("running gzip")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writing to gzip panicked"))?
        .context("writing to gzip")?;
    if !out.status.success() {
        bail!("gzip failed: {}", out.status);
    }
    Ok(out.stdout)
}

fn base_dirs(cpio: &mut Cpio) {
    for d in [
        "bin", "dev", "etc", "lib", "lib64", "proc", "run", "sys", "tmp", "usr", "usr/bin",
        "usr/sbin",
    ] {
        cpio.dir(d);
    }
    // The console exists before devtmpfs is mounted: the kernel opens it
    // for init's stdio.
    cpio.chardev("dev/console", 5, 1);
}

/// Adds `from` as `inside`, with its parent directories.
fn add_file(cpio: &mut Cpio, from: &Path, inside: &str) -> Result<()> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    cpio.parents(inside);
    let mode = fs::metadata(from)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0o755);
    cpio.file(inside, mode, &data);
    Ok(())
}

/// Adds every file under `dir` (a directory inside `root`), keeping paths.
fn add_tree(cpio: &mut Cpio, root: &Path, dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let rel = path
            .strip_prefix(root)
            .context("a path outside the unpacked root")?
            .to_string_lossy()
            .into_owned();
        if path.is_dir() {
            add_tree(cpio, root, &path)?;
        } else if path.is_file() {
            add_file(cpio, &path, &rel)?;
        }
    }
    Ok(())
}

/// The shared libraries `ldd` names for `programs`, looked up first in the
/// unpacked packages' `libdir`.
fn libraries(programs: &[PathBuf], libdir: &Path) -> Result<Vec<PathBuf>> {
    let mut libs = std::collections::BTreeSet::new();
    for p in programs {
        let out = Command::new("ldd")
            .arg(p)
            .env("LD_LIBRARY_PATH", libdir)
            .output()
            .context("running ldd")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("not found") {
            bail!("ldd {}: a library is missing:\n{text}", p.display());
        }
        libs.extend(ldd_paths(&text));
    }
    Ok(libs.into_iter().collect())
}

/// The library paths of `ldd`'s output: "libc.so.6 => /lib/.../libc.so.6
/// (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
fn ldd_paths(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        })
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// Adds `wanted` modules and everything they depend on, in load order,
/// as `lib/modules/NAME.ko` plus `lib/modules/order`.
fn add_modules(cpio: &mut Cpio, moddir: &Path, deps: &str, wanted: &[&str]) -> Result<()> {
    let order = module_order(deps, wanted)?;
    cpio.dir("lib/modules");
    let mut list = String::new();
    for rel in order {
        let name = Path::new(&rel)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let data = fs::read(moddir.join(&rel)).with_context(|| format!("reading module {rel}"))?;
        cpio.file(&format!("lib/modules/{name}"), 0o644, &data);
        list.push_str(&name);
        list.push('\n');
    }
    cpio.file("lib/modules/order", 0o644, list.as_bytes());
    Ok(())
}

/// The paths (relative to the modules directory) of `wanted` and their
/// dependencies from `modules.dep`, each after what it needs.
fn module_order(deps: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let table: std::collections::HashMap<String, (String, Vec<String>)> = deps
        .lines()
        .filter_map(|l| {
            let (module, needs) = l.split_once(':')?;
            let name = Path::new(module)
                .file_name()?
                .to_string_lossy()
                .trim_end_matches(".ko")
                .replace('_', "-");
            let needs = needs.split_whitespace().map(str::to_owned).collect();
            Some((name, (module.to_owned(), needs)))
        })
        .collect();
    let mut order: Vec<String> = Vec::new();
    for w in wanted {
        let (path, needs) = table
            .get(&w.replace('_', "-"))
            .with_context(|| format!("no module {w} in modules.dep"))?;
        // modules.dep lists a module's dependencies transitively, the ones
        // needed first last.
        for dep in needs.iter().rev().chain([path]) {
            if !order.contains(dep) {
                order.push(dep.clone());
            }
        }
    }
    Ok(order)
}

/// One Xen host of the rig.
#[derive(Clone, Debug)]
pub struct Host {
    /// 1-based.
    pub index: usize,
}

impl Host {
    /// `xen1`, `xen2`.
    pub fn name(&self) -> String {
        format!("xen{}", self.index)
    }
    /// Its dom0's address on the data network.
    pub fn addr(&self) -> String {
        format!("{NET}.{}", self.index)
    }
    fn dir(&self) -> PathBuf {
        Path::new(RUN_DIR).join(self.name())
    }
    fn ctl_port(&self) -> u16 {
        CTL_PORT_BASE + self.index as u16
    }
    fn mac(&self, nic: u8) -> String {
        format!("52:54:00:77:{nic:02x}:{:02x}", self.index)
    }

    /// QEMU's arguments for this host; the peer is the other end of the
    /// data link.
    fn qemu_args(&self, images: &Images, peer: &Host) -> Vec<String> {
        let dir = self.dir();
        // `-initrd` takes the multiboot modules comma-separated: a comma
        // inside a module's command line is written twice.
        let dom0_cmdline = format!(
            "console=hvc0 earlyprintk=xen score.ip={}/24 score.name={} score.data={} score.ctl={}",
            self.addr(),
            self.name(),
            self.mac(0),
            self.mac(1)
        );
        vec![
            "-accel".into(),
            "tcg".into(),
            "-cpu".into(),
            cpu_model(),
            "-machine".into(),
            "q35".into(),
            "-smp".into(),
            "1".into(),
            "-m".into(),
            HOST_MIB.to_string(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", dir.join("console.log").display()),
            "-kernel".into(),
            images.xen.display().to_string(),
            "-append".into(),
            format!("console=com1 com1=115200,8n1 dom0_mem={DOM0_MIB}M,max:{DOM0_MIB}M"),
            "-initrd".into(),
            format!(
                "{} {},{}",
                images.kernel.display(),
                dom0_cmdline.replace(',', ",,"),
                self.dom0_image().display()
            ),
            "-netdev".into(),
            format!(
                "dgram,id=data,local.type=inet,local.host=127.0.0.1,local.port={},\
                 remote.type=inet,remote.host=127.0.0.1,remote.port={}",
                LINK_PORT_BASE + self.index as u16,
                LINK_PORT_BASE + peer.index as u16
            ),
            "-device".into(),
            format!("{},netdev=data,mac={}", nic_model(), self.mac(0)),
            "-netdev".into(),
            format!(
                "user,id=ctl,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{}-10.0.2.15:{CTL_PORT}",
                self.ctl_port()
            ),
            "-device".into(),
            format!("e1000,netdev=ctl,mac={}", self.mac(1)),
            "-pidfile".into(),
            dir.join("qemu.pid").display().to_string(),
            "-daemonize".into(),
        ]
    }

    /// The dom0 image this host boots: the cached one, plus an archive
    /// with the agent when one is given (the kernel unpacks both).
    fn dom0_image(&self) -> PathBuf {
        self.dir().join("dom0.img")
    }

    /// Runs `command` (one shell line) in this host's dom0.
    pub fn exec(&self, command: &str, timeout: Duration) -> Result<Reply> {
        exec_at(self.ctl_port(), command, timeout)
    }

    fn pid(&self) -> Option<i32> {
        fs::read_to_string(self.dir().join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn alive(&self) -> bool {
        // SAFETY: kill with signal 0 only checks the process exists.
        self.pid().is_some_and(|p| unsafe { libc::kill(p, 0) } == 0)
    }
}

impl Host {
    /// As [`Host::exec`], and an error naming the command and its output
    /// when it fails; its stdout when it succeeds.
    pub fn exec_ok(&self, command: &str, timeout: Duration) -> Result<String> {
        let r = self.exec(command, timeout)?;
        if r.code != 0 {
            bail!(
                "{}: `{command}` exited with {}: {}{}",
                self.name(),
                r.code,
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&r.stdout).into_owned())
    }

    /// The names of the domains this host runs, Domain-0 left out
    /// (`NAME--incoming` while one arrives).
    pub fn domains(&self) -> Result<Vec<String>> {
        Ok(self
            .exec_ok("xl list", Duration::from_secs(120))?
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect())
    }

    /// Stops the agent (if [`crate::xen_cluster`] started one) and a test's
    /// background watcher (its pid in `/run/score-watcher.pid`), destroys
    /// every guest, starts the migration receiver and sets the dom0's
    /// clock ([`Host::set_clock`]): an empty host.
    pub fn reset(&self) -> Result<()> {
        self.exec_ok(
            &format!(
                "{}; [ -f /run/score-watcher.pid ] && kill $(cat /run/score-watcher.pid) 2>/dev/null; \
                 rm -f /run/score-watcher.pid /tmp/killed; \
                 for d in $(xl list | tail -n +3 | awk '{{print $1}}'); do xl destroy $d; done; \
                 score-receiver start",
                crate::xen_cluster::STOP_AGENT
            ),
            Duration::from_secs(300),
        )?;
        let left = self.domains()?;
        if !left.is_empty() {
            bail!("{}: domains left after a reset: {left:?}", self.name());
        }
        self.set_clock()?;
        Ok(())
    }

    /// Sets this dom0's clock from this machine's, so that the two dom0s'
    /// agents agree on the time their datagrams were sent (the dom0s run
    /// no time service). busybox `date -s` takes whole seconds: the dom0
    /// sleeps to the second it is given, so the clock lands within the
    /// control connection's latency; checked with
    /// [`Host::clock_offset`], and set a second time, shifted by what the
    /// first missed, if it is off by more than a quarter second.
    pub fn set_clock(&self) -> Result<f64> {
        let mut lag = 0.0;
        let mut offset = 0.0;
        for _ in 0..2 {
            let now = unix_now();
            // Two seconds ahead: the line reaches the dom0 well before.
            let target = now.floor() + 2.0;
            let wait = (target - now - lag).max(0.0);
            self.exec_ok(
                &format!("sleep {wait:.3}; date -u -s @{target:.0} >/dev/null"),
                Duration::from_secs(60),
            )?;
            offset = self.clock_offset()?;
            if offset.abs() < 0.25 {
                break;
            }
            // Behind by the latency: start the sleep that much earlier.
            lag -= offset;
        }
        if offset.abs() > CLOCK_TOLERANCE.as_secs_f64() {
            bail!(
                "{}'s clock is {offset:+.2} s off this machine's after setting it",
                self.name()
            );
        }
        Ok(offset)
    }

    /// This dom0's clock minus this machine's, in seconds (busybox
    /// `adjtimex` prints the time to the microsecond), taken against the
    /// middle of the control round trip.
    pub fn clock_offset(&self) -> Result<f64> {
        let before = unix_now();
        let out = self.exec_ok("adjtimex", Duration::from_secs(60))?;
        let after = unix_now();
        let dom0 = parse_adjtimex(&out)
            .with_context(|| format!("{}: unexpected `adjtimex` output {out:?}", self.name()))?;
        Ok(dom0 - (before + after) / 2.0)
    }
}

/// Seconds since the Unix epoch on this machine.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The time busybox `adjtimex` prints (`time.tv_sec:` and
/// `time.tv_usec:`), in seconds since the epoch.
fn parse_adjtimex(out: &str) -> Option<f64> {
    let field = |name: &str| {
        out.lines().find_map(|l| {
            l.trim()
                .strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
    };
    Some(field("time.tv_sec:")? + field("time.tv_usec:")? / 1e6)
}

/// A tiny PV guest of the rig (`score-domu`): its name, address and MAC.
#[derive(Clone, Copy, Debug)]
pub struct Guest {
    /// Its domain name.
    pub name: &'static str,
    /// Its address on the hosts' network.
    pub ip: Ipv4Addr,
    /// The MAC of its one vif.
    pub mac: [u8; 6],
}

/// What a guest's status service answered.
#[derive(Clone, Debug)]
pub struct Status {
    /// The kernel's boot id: the same after a live migration.
    pub boot_id: String,
    /// Seconds since it booted: continuing after a live migration.
    pub uptime: f64,
}

impl Guest {
    /// Its MAC as xl writes it.
    pub fn mac_text(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Creates it on `host`, sending UDP to `peers` (`ADDR:RATE,...`,
    /// iperf3's `-b`; empty for none), and waits until its status service
    /// answers.
    pub fn create(&self, host: &Host, peers: &str) -> Result<Status> {
        host.exec_ok(
            &format!(
                "score-domu {} {} {} {}",
                self.name,
                self.ip,
                self.mac_text(),
                shell_quote(peers)
            ),
            Duration::from_secs(600),
        )?;
        // A guest boots in about a minute under TCG; minutes on a loaded
        // machine.
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(s) = self.status(host) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer on {} within 600 s",
                    self.name,
                    host.name()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Its status service, asked from `host`'s dom0; `None` if it does not
    /// answer.
    pub fn status(&self, host: &Host) -> Option<Status> {
        let r = host
            .exec(
                &format!(
                    "printf 'GET /cgi-bin/status HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 80",
                    self.ip
                ),
                Duration::from_secs(120),
            )
            .ok()?;
        if r.code != 0 {
            return None;
        }
        let body = String::from_utf8_lossy(&r.stdout);
        let field = |k: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
        };
        Some(Status {
            boot_id: field("boot_id")?,
            uptime: field("uptime")?.parse().ok()?,
        })
    }

    /// Its vif on `host`, `vifDOMID.0`.
    pub fn vif(&self, host: &Host) -> Result<String> {
        let domid = host.exec_ok(&format!("xl domid {}", self.name), Duration::from_secs(120))?;
        Ok(format!("vif{}.0", domid.trim()))
    }
}

/// The rig's hosts.
pub fn hosts() -> Vec<Host> {
    (1..=HOSTS).map(|index| Host { index }).collect()
}

/// What a command run in a dom0 returned.
#[derive(Debug)]
pub struct Reply {
    /// Its exit code.
    pub code: i32,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
}

fn exec_at(port: u16, command: &str, timeout: Duration) -> Result<Reply> {
    if command.contains('\n') {
        bail!("a dom0 command is one line");
    }
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to the dom0 control port {port}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("reading the reply to {command:?}"))?;
    parse_reply(&buf)
}

/// Parses `score-ctl RC OUT_LEN ERR_LEN\n` + stdout + stderr.
fn parse_reply(buf: &[u8]) -> Result<Reply> {
    let nl = buf
        .iter()
        .position(|b| *b == b'\n')
        .context("no reply from the dom0 (still booting?)")?;
    let head = String::from_utf8_lossy(&buf[..nl]);
    let fields: Vec<&str> = head.split_whitespace().collect();
    let [tag, rc, out, err] = fields.as_slice() else {
        bail!("unexpected control reply {head:?}");
    };
    if *tag != "score-ctl" {
        bail!("unexpected control reply {head:?}");
    }
    let (out, err): (usize, usize) = (out.parse()?, err.parse()?);
    let body = &buf[nl + 1..];
    if body.len() != out + err {
        bail!(
            "control reply cut short: {} of {} bytes",
            body.len(),
            out + err
        );
    }
    Ok(Reply {
        code: rc.parse()?,
        stdout: body[..out].to_vec(),
        stderr: body[out..].to_vec(),
    })
}

/// Quotes `arg` for `sh`.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b))
    {
        return arg.to_owned();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// `cargo xtask xen up`: builds (cached), boots both hosts, waits until
/// each dom0's `xl info` answers, and writes the wrappers. Tears down what
/// it started if it fails.
pub fn up(agent: Option<&Path>) -> Result<()> {
    let images = build(false)?;
    if hosts().iter().any(Host::alive) {
        bail!("a Xen rig is already up: `cargo xtask xen down` first");
    }
    let started = Instant::now();
    let result = boot(&images, agent);
    if let Err(e) = result {
        let _ = down();
        return Err(e.context(format!(
            "bringing the Xen rig up (removed again; consoles were in {RUN_DIR}/xenN)"
        )));
    }
    println!(
        "xen: {HOSTS} Xen hosts up in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        hosts()
            .iter()
            .map(|h| format!("{} {}", h.name(), h.addr()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn boot(images: &Images, agent: Option<&Path>) -> Result<()> {
    let all = hosts();
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let extra = match agent {
        Some(bin) => Some(agent_archive(bin)?),
        None => None,
    };
    for (i, host) in all.iter().enumerate() {
        let dir = host.dir();
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut image = fs::read(&images.dom0)?;
        if let Some(extra) = &extra {
            image.extend_from_slice(extra);
        }
        fs::write(host.dom0_image(), image)?;
        write_wrappers(host, &xtask)?;
        let peer = &all[(i + 1) % all.len()];
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(host.qemu_args(images, peer));
        // The daemonized QEMU outlives this command: it must not keep the
        // descriptors this process inherited, such as a lock that
        // `flock LOCK cargo xtask xen up` holds (it would stay held until
        // `xen down`).
        // CLOSE_RANGE_CLOEXEC: closed at the exec, so that a failing exec
        // is still reported through the standard library's own pipe.
        const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
        // SAFETY: close_range between fork and exec touches no memory.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut qemu, || {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
                Ok(())
            });
        }
        run(&mut qemu).with_context(|| format!("starting {}", host.name()))?;
    }
    // Boot under TCG on a loaded machine: minutes, not seconds.
    let deadline = Instant::now() + Duration::from_secs(600);
    for host in &all {
        loop {
            if !host.alive() {
                bail!(
                    "{}'s QEMU exited; see {}",
                    host.name(),
                    host.dir().join("console.log").display()
                );
            }
            if let Ok(r) = host.exec("xl info >/dev/null && echo ok", Duration::from_secs(60))
                && r.code == 0
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}'s dom0 did not answer `xl info` within 10 min; see {}",
                    host.name(),
                    host.dir().join("console.log").display()
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        host.set_clock()?;
    }
    Ok(())
}

/// A second initramfs archive with the agent binary and its libraries,
/// appended to the dom0 image (the kernel unpacks both).
fn agent_archive(bin: &Path) -> Result<Vec<u8>> {
    // Without debug information: dom0's root file system is in its RAM.
    fs::create_dir_all(RUN_DIR)?;
    let stripped = Path::new(RUN_DIR).join("score-agent");
    run(Command::new("strip").arg("-o").arg(&stripped).arg(bin))
        .context("stripping the agent for dom0")?;
    let mut cpio = Cpio::default();
    add_file(&mut cpio, &stripped, "usr/bin/score-agent")?;
    for lib in libraries(&[bin.to_owned()], Path::new("/nonexistent"))? {
        let inside = lib.to_string_lossy().trim_start_matches('/').to_owned();
        add_file(&mut cpio, &lib, &inside)?;
    }
    Ok(cpio.finish())
}

/// `RUN_DIR/hN/exec CMD...` runs a command in that dom0, `RUN_DIR/hN/xl`
/// runs xl there: for tests and for the xl backend's `xl_path`.
fn write_wrappers(host: &Host, xtask: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    // Linux names a running program whose file was replaced (xtask rebuilt
    // while the rig is up) "PATH (deleted)": the wrappers run the new one.
    let xtask = xtask.to_string_lossy();
    let xtask = xtask.strip_suffix(" (deleted)").unwrap_or(&xtask);
    for (name, prefix) in [("exec", ""), ("xl", "xl ")] {
        let path = host.dir().join(name);
        fs::write(
            &path,
            format!(
                "#!/bin/sh\n# Runs {prefix}ARGS in {}'s dom0 (cargo xtask xen exec).\n\
                 exec {} xen exec {} -- {prefix}\"$@\"\n",
                host.name(),
                shell_quote(xtask),
                host.name()
            ),
        )?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// `cargo xtask xen exec HOST -- CMD...`: runs CMD in HOST's dom0, with
/// its stdout, stderr and exit code.
pub fn exec(host: &str, args: &[String]) -> Result<i32> {
    let h = hosts()
        .into_iter()
        .find(|h| h.name() == host || h.addr() == host)
        .with_context(|| format!("no Xen host {host} (xen1, xen2)"))?;
    let line: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    let r = h.exec(&line.join(" "), Duration::from_secs(3600))?;
    std::io::stdout().write_all(&r.stdout)?;
    std::io::stderr().write_all(&r.stderr)?;
    Ok(r.code)
}

/// `cargo xtask xen status`: each host's QEMU and its domains.
pub fn status() -> Result<()> {
    for h in hosts() {
        if !h.alive() {
            println!("{} ({}): down", h.name(), h.addr());
            continue;
        }
        match h.exec("xl list", Duration::from_secs(30)) {
            Ok(r) => {
                println!(
                    "{} ({}): up, QEMU pid {}",
                    h.name(),
                    h.addr(),
                    h.pid().unwrap_or(0)
                );
                print!("{}", String::from_utf8_lossy(&r.stdout));
            }
            Err(e) => println!(
                "{} ({}): QEMU runs, dom0 not answering: {e:#}",
                h.name(),
                h.addr()
            ),
        }
    }
    Ok(())
}

/// `cargo xtask xen down`: stops every host's QEMU and removes the state.
/// Safe when nothing is up.
pub fn down() -> Result<()> {
    for h in hosts() {
        if let Some(pid) = h.pid() {
            // SAFETY: signals the QEMU this rig started (its pid file).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(20);
            while h.alive() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(100));
            }
            if h.alive() {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = fs::remove_dir_all(RUN_DIR);
    println!("xen: down");
    Ok(())
}

/// Set for the Xen tier by [`test_tier`]: a Xen test that finds no rig
/// fails instead of skipping.
pub const REQUIRE_XEN_ENV: &str = "SCORE_REQUIRE_XEN";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_replies_parse() {
        let r = parse_reply(b"score-ctl 3 4 3\nout\nerr").unwrap();
        assert_eq!(r.code, 3);
        assert_eq!(r.stdout, b"out\n");
        assert_eq!(r.stderr, b"err");
        assert!(parse_reply(b"score-ctl 0 9 0\nshort").is_err());
        assert!(parse_reply(b"").is_err());
        assert!(parse_reply(b"hello 1 2\n").is_err());
    }

    #[test]
    fn quoting_keeps_arguments_whole() {
        assert_eq!(shell_quote("list"), "list");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("nc 10.77.0.2 7000"), "'nc 10.77.0.2 7000'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let deps = "kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
                    kernel/net/802/stp.ko: kernel/net/llc/llc.ko\n\
                    kernel/net/llc/llc.ko:\n\
                    kernel/net/sched/sch_ingress.ko:\n";
        let order = module_order(deps, &["bridge", "sch_ingress"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/llc/llc.ko",
                "kernel/net/802/stp.ko",
                "kernel/net/bridge/bridge.ko",
                "kernel/net/sched/sch_ingress.ko"
            ]
        );
        assert!(module_order(deps, &["nope"]).is_err());
    }

    #[test]
    fn ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibxenlight.so.4.17 => /x/usr/lib/libxenlight.so.4.17 (0x1)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        assert_eq!(
            ldd_paths(text),
            [
                PathBuf::from("/x/usr/lib/libxenlight.so.4.17"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn adjtimex_gives_the_time() {
        let out = "    mode:         0\n    time.tv_sec:  1796481087\n    time.tv_usec: 736874\n\
                   \x20   return value: 5 (clock not synchronized)\n";
        assert_eq!(parse_adjtimex(out), Some(1_796_481_087.736_874));
        assert_eq!(parse_adjtimex("time.tv_sec: 1\n"), None);
    }

    #[test]
    fn hosts_link_to_each_other() {
        let images = Images {
            xen: "/c/xen".into(),
            kernel: "/c/vmlinuz".into(),
            dom0: "/c/dom0.img".into(),
        };
        let all = hosts();
        let args = all[0].qemu_args(&images, &all[1]).join(" ");
        assert!(args.contains("local.port=37711"));
        assert!(args.contains("remote.port=37712"));
        assert!(args.contains("hostfwd=tcp:127.0.0.1:37701-10.0.2.15:7001"));
        assert!(args.contains("/c/vmlinuz console=hvc0"));
        assert!(args.contains(",/run/score-xen/xen1/dom0.img"));
    }
}
