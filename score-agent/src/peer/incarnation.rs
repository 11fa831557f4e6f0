//! This host's incarnation: a counter kept in a file of the state
//! directory and raised at every start, before the first datagram is sent.
//! Peers key their replay windows by (sender, incarnation) and refuse an
//! older incarnation, so the datagrams of an earlier run die with it even
//! though the new run numbers its datagrams from 1 again.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// The file that holds the incarnation of the agent at `address`: one per
/// address, so agents of an emulated data centre may share the directory.
pub fn path(state_dir: &Path, address: Ipv4Addr) -> PathBuf {
    state_dir.join(format!("incarnation-{address}"))
}

/// Reads the last incarnation (0 if there is no file yet), raises it by
/// one, writes it back durably (a temporary file, fsync, rename) and
/// returns it. A file that does not hold a number is an error: starting
/// over at 1 would make peers refuse this host as an old incarnation.
pub fn next(state_dir: &Path, address: Ipv4Addr) -> std::io::Result<u32> {
    std::fs::create_dir_all(state_dir)?;
    let file = path(state_dir, address);
    let last = match std::fs::read_to_string(&file) {
        Ok(text) => text.trim().parse::<u32>().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", file.display()),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let next = last.checked_add(1).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: incarnation counter exhausted", file.display()),
        )
    })?;
    // Not `with_extension`: the address's dots would make every host's
    // temporary file the same name, and agents sharing the directory
    // would rename each other's away.
    let tmp = state_dir.join(format!("incarnation-{address}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{next}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &file)?;
    if let Ok(dir) = std::fs::File::open(state_dir) {
        let _ = dir.sync_all();
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_start_raises_it_and_addresses_are_apart() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(next(dir.path(), a).unwrap(), 1);
        assert_eq!(next(dir.path(), a).unwrap(), 2);
        assert_eq!(next(dir.path(), b).unwrap(), 1);
        assert_eq!(next(dir.path(), a).unwrap(), 3);
        // Hosts that share the directory start at once.
        let hosts: Vec<Ipv4Addr> = (1..=8).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect();
        std::thread::scope(|s| {
            for &h in &hosts {
                let d = dir.path();
                s.spawn(move || {
                    for want in 1..=50 {
                        assert_eq!(next(d, h).unwrap(), want);
                    }
                });
            }
        });
        std::fs::write(path(dir.path(), b), "garbage").unwrap();
        assert!(next(dir.path(), b).is_err());
    }
}
