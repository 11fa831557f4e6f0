//! The tiny real guest of `cargo xtask guest`, as the real-VM tests (qemu
//! and libvirt backends) see it: whether it is installed, what its status
//! service says, and waiting for it.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use super::http_get;

/// Where `cargo xtask guest` leaves the kernel and initramfs.
pub const GUEST_DIR: &str = "/var/cache/score-guest";

/// Why a real guest cannot run here, if it cannot: no QEMU or no guest.
pub fn skip_reason() -> Option<String> {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qemu {
        return Some("no qemu-system-x86_64: run `cargo xtask guest` (installs it)".into());
    }
    for f in ["vmlinuz", "initrd.img"] {
        if !Path::new(GUEST_DIR).join(f).exists() {
            return Some(format!("no {GUEST_DIR}/{f}: run `cargo xtask guest`"));
        }
    }
    None
}

/// Prints why a test is skipped, or fails instead under `cargo xtask
/// test`, which prepares QEMU, libvirt and the guest and sets
/// `SCORE_REQUIRE_GUESTS=1`, so that CI cannot pass by skipping. Returns
/// whether the caller should skip.
pub fn skip(why: Option<String>) -> bool {
    let Some(why) = why else { return false };
    assert!(
        std::env::var_os("SCORE_REQUIRE_GUESTS").is_none(),
        "SCORE_REQUIRE_GUESTS is set but {why}"
    );
    eprintln!("SKIPPED: {why}");
    true
}

/// What the guest's status service says.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub boot_id: String,
    pub uptime: f64,
    pub counter: u64,
}

/// The status of guest `vm` asked from namespace `ns`, if it answers.
pub fn status_of(ns: &str, vm: Ipv4Addr) -> Option<Status> {
    let body = http_get(ns, &format!("{vm}:80"), "/cgi-bin/status")?;
    let field = |k: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_owned)
    };
    Some(Status {
        boot_id: field("boot_id")?,
        uptime: field("uptime")?.parse().ok()?,
        counter: field("counter")?.parse().ok()?,
    })
}

/// The status of guest `vm` as asked from `ns`, waiting for an answer: a
/// TCG guest on a loaded machine may take seconds to serve one.
pub fn wait_status_of(ns: &str, vm: Ipv4Addr, timeout: Duration) -> Status {
    wait_until(
        timeout,
        &format!("guest {vm} answering from {ns}"),
        || status_of(ns, vm),
        String::new,
    )
}

/// Polls `probe` every 200 ms until it gives a value; fails after
/// `timeout` naming `what`, with `context()` (agent logs, say).
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {timeout:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A runtime for calling the async backends from a plain test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Median, minimum and maximum.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (median, s[0], s[n - 1])
}
