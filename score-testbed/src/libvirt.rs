//! What the libvirt backend's real tests need on this machine: libvirtd
//! with its QEMU driver and virsh, from Debian bookworm (libvirt 9.0, which
//! drives the QEMU 10.0 that `cargo xtask guest` installs from
//! bookworm-backports). Not `libvirt-daemon-system`, and not libvirt from
//! bookworm-backports: both pull in a newer systemd (TESTBED.md; checked
//! with `apt-get install -s` here). The tests start their own daemons, one
//! per host namespace ([`LibvirtHost`]), so nothing is enabled or started
//! by the install.
//!
//! Real libvirt hosts on one machine, for the libvirt backend's privileged
//! tests: each "host" is a network namespace (with its bridge `br0`) plus a
//! libvirtd in a mount namespace of its own, whose config, run, state,
//! cache and log directories are private bind mounts, with its own
//! `host_uuid` (libvirt refuses to migrate a domain to itself) and
//! listening on TCP 16509 at the host's address with no authentication
//! (test only). QEMU runs as root with no security driver, no cgroups and
//! no private /dev, so nothing depends on the users and services of a full
//! libvirt install; a private /etc/passwd adds the `libvirt-qemu` user that
//! Debian's libvirtd looks up at start even when qemu.conf says root.
//!
//! `virsh` reaches a host as its agent would, from inside it: the wrapper
//! script [`LibvirtHost::virsh_path`] enters the daemon's network and mount
//! namespaces, where `qemu:///system` is that host's libvirtd.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Result;

/// The packages, installed without their recommendations.
pub const PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
];

/// Installs [`PACKAGES`] unless they are all there (idempotent; root).
/// QEMU itself comes from `guest::install`. Called by `cargo xtask guest`
/// and `cargo xtask test`.
pub fn ensure_libvirt() -> Result<()> {
    crate::apt::ensure(PACKAGES)
}

/// The directories each libvirtd gets privately: (host path, name under
/// the host's private root).
const PRIVATE: &[(&str, &str)] = &[
    ("/etc/libvirt", "etc"),
    ("/run/libvirt", "run"),
    ("/var/lib/libvirt", "lib"),
    ("/var/log/libvirt", "log"),
];

/// Where a host's capabilities cache survives between runs: probing QEMU
/// is most of libvirtd's start-up time.
const CACHE_ROOT: &str = "/var/tmp/score-libvirt-test-cache";

/// Why real libvirt tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    for (bin, package) in [
        ("/usr/sbin/libvirtd", "libvirt-daemon"),
        ("/usr/bin/virsh", "libvirt-clients"),
    ] {
        if !Path::new(bin).exists() {
            return Some(format!(
                "no {bin}: run `cargo xtask guest` or apt-get install --no-install-recommends {package}"
            ));
        }
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")
        .exists()
    {
        return Some("no libvirt QEMU driver: apt-get install libvirt-daemon-driver-qemu".into());
    }
    if !Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some("no qemu-system-x86_64: run `cargo xtask guest`".into());
    }
    for tool in ["nsenter", "unshare"] {
        if !Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(format!("no {tool} (util-linux)"));
        }
    }
    None
}

/// One libvirtd standing in for a host's.
pub struct LibvirtHost {
    /// The host's network namespace.
    pub ns: String,
    /// Its address on `br0`, where libvirtd listens.
    pub addr: Ipv4Addr,
    /// Its private directories.
    pub root: PathBuf,
    child: Option<Child>,
}

impl LibvirtHost {
    /// Starts a libvirtd in namespace `ns` (which must have `br0` at
    /// `addr`), private directories under `root`; does not wait for it
    /// ([`LibvirtHost::wait_ready`]).
    pub fn start(ns: &str, addr: Ipv4Addr, root: &Path, host_uuid: &str) -> LibvirtHost {
        let _ = std::fs::remove_dir_all(root);
        for (_, name) in PRIVATE {
            std::fs::create_dir_all(root.join(name)).unwrap();
        }
        // The serial console's file; a full install's packaging makes it.
        std::fs::create_dir_all(root.join("log/qemu")).unwrap();
        let cache = Path::new(CACHE_ROOT).join(ns);
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(
            root.join("etc/libvirtd.conf"),
            format!(
                "listen_tls = 0\nlisten_tcp = 1\nlisten_addr = \"{addr}\"\n\
                 auth_tcp = \"none\"\nauth_unix_rw = \"none\"\n\
                 host_uuid = \"{host_uuid}\"\n\
                 log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
             security_driver = \"none\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n\
             stdio_handler = \"file\"\n",
        )
        .unwrap();
        let mut passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        if !passwd.lines().any(|l| l.starts_with("libvirt-qemu:")) {
            passwd.push_str(
                "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n",
            );
        }
        let mut group = std::fs::read_to_string("/etc/group").unwrap();
        for g in ["libvirt-qemu:x:64055:\n", "kvm:x:64056:\n"] {
            let name = g.split(':').next().unwrap();
            if !group.lines().any(|l| l.starts_with(&format!("{name}:"))) {
                group.push_str(g);
            }
        }
        std::fs::write(root.join("passwd"), passwd).unwrap();
        std::fs::write(root.join("group"), group).unwrap();

        // Mount points on the shared file system stay empty: the daemon
        // mounts its own directories over them, in its own namespace.
        let mut script = String::from("set -e\n");
        for (path, name) in PRIVATE {
            std::fs::create_dir_all(path).unwrap();
            script.push_str(&format!(
                "mount --bind '{}' '{path}'\n",
                root.join(name).display()
            ));
        }
        std::fs::create_dir_all("/var/cache/libvirt").unwrap();
        script.push_str(&format!(
            "mount --bind '{}' /var/cache/libvirt\n\
             mount --bind '{}' /etc/passwd\nmount --bind '{}' /etc/group\n\
             exec /usr/sbin/libvirtd --listen -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid\n",
            cache.display(),
            root.join("passwd").display(),
            root.join("group").display(),
        ));
        let log = std::fs::File::create(root.join("libvirtd.stderr")).unwrap();
        // `ip netns exec` and `unshare` exec, they do not fork: the child
        // is libvirtd itself.
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns, "unshare", "--mount", "--propagation"])
            .args(["private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // The daemon must not inherit the test's descriptors: above all
        // the one `flock /work/PRIV.lock` holds the shared lock by, which
        // a libvirtd outliving the test would keep taken.
        // Marked close-on-exec rather than closed: std's own exec-error
        // pipe is among them.
        // SAFETY: only fcntl(2), async-signal-safe, between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                for fd in 3..1024 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn libvirtd");
        let host = LibvirtHost {
            ns: ns.to_owned(),
            addr,
            root: root.to_owned(),
            child: Some(child),
        };
        host.write_virsh_wrapper();
        host
    }

    /// The URI other hosts reach this libvirtd by.
    pub fn uri(&self) -> String {
        format!("qemu+tcp://{}/system", self.addr)
    }

    /// A `virsh` that runs inside this host (its network and mount
    /// namespaces): what this host's agent would run.
    pub fn virsh_path(&self) -> PathBuf {
        self.root.join("virsh")
    }

    /// Links score-agent/tests/fixtures/virsh-nsenter (a link, not a
    /// written script: see score-agent/tests/fixtures/mod.rs) and writes
    /// the PID it enters.
    fn write_virsh_wrapper(&self) {
        let pid = self.child.as_ref().map(Child::id).unwrap_or(0);
        std::fs::write(self.root.join("pid"), pid.to_string()).unwrap();
        let _ = std::fs::remove_file(self.virsh_path());
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../score-agent/tests/fixtures/virsh-nsenter"
        );
        std::os::unix::fs::symlink(script, self.virsh_path()).unwrap();
    }

    /// Runs `virsh -c qemu:///system ARGS` on this host.
    pub fn virsh(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.virsh_path())
            .args(["-c", "qemu:///system"])
            .args(args)
            .output()
            .expect("run virsh")
    }

    /// Like [`LibvirtHost::virsh`], panicking on failure; returns stdout.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?} on {}: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the daemon answers on its TCP address (as another host
    /// sees it) and on its local socket.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let uri = self.uri();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "libvirtd in {} exited ({status}): {}\n{}",
                    self.ns,
                    std::fs::read_to_string(self.root.join("libvirtd.stderr")).unwrap_or_default(),
                    self.log_tail()
                );
            }
            let tcp = Command::new(self.virsh_path())
                .args(["-c", &uri, "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if tcp && self.virsh(&["version"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd in {} not ready after {timeout:?}:\n{}",
                self.ns,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The end of libvirtd's own log (errors and warnings).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.root.join("log/libvirtd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The state word(s) `virsh domstate` gives for `dom` here, or `None`
    /// if this libvirtd has no such domain.
    pub fn domstate(&self, dom: &str) -> Option<String> {
        let out = self.virsh(&["domstate", dom]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops the daemon (its QEMUs keep running, as with a real libvirtd
    /// restart).
    pub fn stop_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the QEMUs this daemon started (their pid files).
    fn kill_guests(&self) {
        let Ok(files) = std::fs::read_dir(self.root.join("run/qemu")) else {
            return;
        };
        for f in files.flatten() {
            if f.path().extension().is_some_and(|e| e == "pid")
                && let Ok(pid) = std::fs::read_to_string(f.path())
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                // SAFETY: kill(2) on a PID that this host's libvirtd wrote
                // for a QEMU it started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        self.kill_guests();
        self.stop_daemon();
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The domain XML of the tiny guest of `cargo xtask guest` (direct kernel
/// boot, TCG, 256 MiB), its NIC a tap named `tap` on the host's `br0`;
/// `extra` is added to its kernel command line (`score.peers=...`).
/// `<acpi/>`: without it the guest kernel does not power off or reboot
/// cleanly, and libvirt's q35 machine expects it.
pub fn guest_xml(
    name: &str,
    uuid: &str,
    guest_dir: &str,
    ip: Ipv4Addr,
    mac: &str,
    tap: &str,
    extra: &str,
) -> String {
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest_dir}/vmlinuz</kernel>
    <initrd>{guest_dir}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 score.ip={ip}/16 score.name=vm-{ip} {extra}</cmdline>
  </os>
  <features><acpi/></features>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='bridge'>
      <source bridge='br0'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
      <target dev='{tap}'/>
      <rom enabled='no'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/libvirt/qemu/{name}-serial.log'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"#
    )
}
