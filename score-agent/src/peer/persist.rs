//! What the protocol keeps across a restart (score-core's
//! `proto::Persisted`): the incarnation, raised at every start
//! ([`super::incarnation`] keeps it), and the highest token epoch this host
//! knew, so that epochs never go back. The epoch lives in a file of its own
//! beside the incarnation's, written durably (a temporary file, fsync,
//! rename) whenever the node says so.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use score_core::proto::Persisted;

/// The epoch file of the agent at one address.
#[derive(Clone, Debug)]
pub struct StateFile {
    dir: PathBuf,
    address: Ipv4Addr,
}

impl StateFile {
    /// The file for `address` in `state_dir`.
    pub fn new(state_dir: &Path, address: Ipv4Addr) -> Self {
        StateFile {
            dir: state_dir.to_owned(),
            address,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(format!("epoch-{}", self.address))
    }

    /// The epoch kept, 0 if none yet. A file that does not hold a number
    /// is an error: starting over at 0 would let this host take an old
    /// token for a live one.
    pub fn epoch(&self) -> std::io::Result<u64> {
        match std::fs::read_to_string(self.path()) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.path().display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Writes the epoch of `p` durably (the incarnation was written at the
    /// start, by [`super::incarnation::next`]).
    pub fn write(&self, p: Persisted) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!("epoch-{}.tmp", self.address));
        {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{}", p.epoch)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let f = StateFile::new(dir.path(), a);
        assert_eq!(f.epoch().unwrap(), 0);
        f.write(Persisted {
            incarnation: 3,
            epoch: 7 << 32,
        })
        .unwrap();
        assert_eq!(StateFile::new(dir.path(), a).epoch().unwrap(), 7 << 32);
        std::fs::write(dir.path().join("epoch-10.0.0.1"), "x").unwrap();
        assert!(f.epoch().is_err());
    }
}
