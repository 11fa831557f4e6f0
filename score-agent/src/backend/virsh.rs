//! What `virsh` prints, read: the tables, state words, job figures and
//! error lines the libvirt backend acts on. The formats are libvirt 9's
//! (`tools/virsh-domain.c`, `tools/virsh-domain-monitor.c`); the tests
//! read output captured from the real virsh 9.0 in
//! `tests/fixtures/virsh/`.

use super::{LibvirtJobStats, parse_mac, tail};

/// What `virsh list --uuid` printed that is not a UUID.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("`virsh list --uuid` printed `{0}`, not a UUID")]
pub(crate) struct NotAUuid(pub(crate) String);

/// A domain's state as `virsh domstate --reason` prints it:
/// `running (migrated)`, `shut off (destroyed)`, `paused (migration)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DomState {
    /// The state word(s): `running`, `idle`, `paused`, `in shutdown`,
    /// `shut off`, `crashed`, `pmsuspended`, `no state`.
    pub(crate) state: String,
    /// The reason in brackets, if printed.
    pub(crate) reason: Option<String>,
}

impl DomState {
    pub(crate) fn running(&self) -> bool {
        self.state == "running"
    }

    pub(crate) fn paused(&self) -> bool {
        self.state == "paused"
    }
}

impl std::fmt::Display for DomState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            Some(r) => write!(f, "{} ({r})", self.state),
            None => f.write_str(&self.state),
        }
    }
}

/// The `error: ...` lines virsh printed, without the prefix, joined.
pub(crate) fn virsh_error(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("error:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        tail(stderr, 3)
    } else {
        tail(&lines.join("\n"), 4)
    }
}

/// Whether virsh's stderr says the connection worked and the domain does
/// not exist there: libvirt 9 prints "failed to get domain 'X'", older
/// ones "Domain not found: no domain with matching uuid 'X'".
pub(crate) fn says_no_domain(stderr: &str) -> bool {
    let connection_failed = stderr.contains("failed to connect to the hypervisor");
    !connection_failed
        && (stderr.contains("failed to get domain")
            || stderr.contains("Domain not found")
            || stderr.contains("no domain with matching"))
}

/// The UUIDs `virsh list --uuid` prints, one a line.
pub(crate) fn parse_uuids(stdout: &str) -> Result<Vec<String>, NotAUuid> {
    let mut out = Vec::new();
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let ok = line.len() == 36 && line.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if !ok {
            return Err(NotAUuid(line.to_owned()));
        }
        out.push(line.to_owned());
    }
    Ok(out)
}

/// The MACs in `virsh domiflist`'s table:
///
/// ```text
///  Interface   Type     Source   Model    MAC
/// -----------------------------------------------------------
///  vnet0       bridge   br0      virtio   52:54:00:01:00:05
/// ```
///
/// The MAC is the last column (an inactive domain's interface is `-`).
pub(crate) fn parse_domiflist(stdout: &str) -> Vec<[u8; 6]> {
    let mut lines = stdout.lines();
    // Rows start after the line of dashes; without one (no header, as
    // with `virsh -q`), every line is a row.
    let rows: Vec<&str> = if stdout.lines().any(|l| l.trim_start().starts_with("---")) {
        lines
            .by_ref()
            .skip_while(|l| !l.trim_start().starts_with("---"))
            .skip(1)
            .collect()
    } else {
        lines.collect()
    };
    rows.iter()
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(parse_mac)
        .collect()
}

/// `virsh domstate --reason`'s answer: `running (booted)`, `shut off`.
pub(crate) fn parse_domstate(stdout: &str) -> Option<DomState> {
    let line = stdout.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(match line.split_once(" (") {
        Some((state, reason)) => DomState {
            state: state.trim().to_owned(),
            reason: Some(reason.trim_end_matches(')').trim().to_owned()),
        },
        None => DomState {
            state: line.to_owned(),
            reason: None,
        },
    })
}

/// `virsh domjobinfo --completed`'s figures (`Time elapsed:  2615  ms`,
/// `Data processed:  106.938 MiB`, `Total downtime:  62  ms`).
pub(crate) fn parse_jobinfo(stdout: &str) -> LibvirtJobStats {
    let field = |name: &str| {
        stdout.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let ms = |name: &str| {
        let v = field(name)?;
        let mut parts = v.split_whitespace();
        let n: u64 = parts.next()?.parse().ok()?;
        (parts.next() == Some("ms")).then_some(n)
    };
    let bytes = |name: &str| {
        let v = field(name)?;
        let mut parts = v.split_whitespace();
        let n: f64 = parts.next()?.parse().ok()?;
        let unit = match parts.next()? {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "TiB" => 1024.0f64.powi(4),
            _ => return None,
        };
        Some((n * unit).round() as u64)
    };
    LibvirtJobStats {
        elapsed_ms: ms("Time elapsed"),
        downtime_ms: ms("Total downtime"),
        processed_bytes: bytes("Data processed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output of the real virsh 9.0, captured from its built-in test
    /// driver (`virsh -c test:///default ...`, whose one domain is `test`
    /// with UUID 6695eb01-...; `suspend test` and `destroy test` before
    /// the paused and shut-off states), and of a connection to a port
    /// nobody listens on.
    macro_rules! captured {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/virsh/",
                $name
            ))
        };
    }

    #[test]
    fn reads_what_virsh_prints() {
        assert_eq!(
            parse_uuids(captured!("list-uuid.out")).unwrap(),
            ["6695eb01-f6a4-8304-79aa-97f2502e193f"]
        );
        assert_eq!(
            parse_domiflist(captured!("domiflist.out")),
            [[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]]
        );
        let state = |text| {
            let s = parse_domstate(text).unwrap();
            (s.state, s.reason.unwrap())
        };
        assert_eq!(
            state(captured!("domstate-running.out")),
            ("running".into(), "unknown".into())
        );
        let paused = parse_domstate(captured!("domstate-paused.out")).unwrap();
        assert!(paused.paused() && !paused.running(), "{paused}");
        assert_eq!(paused.to_string(), "paused (user)");
        assert_eq!(
            state(captured!("domstate-shut-off.out")),
            ("shut off".into(), "destroyed".into())
        );
        let gone = captured!("domstate-no-domain.err");
        assert!(says_no_domain(gone));
        assert_eq!(
            virsh_error(gone),
            "failed to get domain '00000000-0000-0000-0000-000000000000'"
        );
        let refused = captured!("connect-refused.err");
        assert!(!says_no_domain(refused));
        assert_eq!(
            virsh_error(refused),
            "failed to connect to the hypervisor | unable to connect to server at '127.0.0.1:1': Connection refused"
        );
    }

    #[test]
    fn reads_other_forms() {
        // A bridged NIC, and `-q` (no header, where every line is a row).
        let table = " Interface   Type      Source    Model   MAC\n\
            ------------------------------------------------------------\n \
            vnet1       bridge    br0       virtio  52:54:00:01:00:05\n\n";
        assert_eq!(parse_domiflist(table), [[0x52, 0x54, 0, 1, 0, 5]]);
        // The header's "MAC" is not a MAC.
        assert!(parse_domiflist(" Interface Type Source Model MAC\n---\n\n").is_empty());
        assert_eq!(
            parse_domiflist(" -   bridge   br0   virtio   52:54:00:01:00:06\n").len(),
            1
        );
        assert_eq!(parse_domstate("paused\n").unwrap().reason, None);
        assert_eq!(parse_domstate("\n"), None);
        assert_eq!(parse_uuids("test\n"), Err(NotAUuid("test".into())));
        assert!(parse_uuids("\n").unwrap().is_empty());
        // Older libvirt names a missing domain in a second line.
        assert!(says_no_domain(
            "error: failed to get domain 'x'\nerror: Domain not found: no domain with matching uuid 'x'\n"
        ));
        // No `error:` line: the last lines as they are.
        assert_eq!(virsh_error("Migration: [ 12 %]\n"), "Migration: [ 12 %]");
    }

    #[test]
    fn parses_completed_job_info() {
        // The test driver keeps no job statistics: a target's
        // `domjobinfo --completed` in libvirt 9's layout.
        let text = "Job type:         Completed\nOperation:        Incoming migration\n\
            Time elapsed:     2615         ms\nTime elapsed w/o network: 2613 ms\n\
            Data processed:   106.938 MiB\nData remaining:   0.000 B\n\
            Total downtime:   62           ms\nDowntime w/o network: 60 ms\n";
        let s = parse_jobinfo(text);
        assert_eq!(s.elapsed_ms, Some(2615));
        assert_eq!(s.downtime_ms, Some(62));
        assert_eq!(s.processed_bytes, Some(112_132_620));
        assert_eq!(
            parse_jobinfo("Job type: None\n"),
            LibvirtJobStats::default()
        );
    }
}
