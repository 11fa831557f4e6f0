//! The agent's configuration: one TOML file per host, parsed with serde and
//! validated in full before anything is loaded, attached or bound (as
//! linkerd2-proxy does), so a bad file costs nothing but one clear line.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Why a configuration was refused. Every message names the file or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or has the wrong type.
    #[error("config {path}: line {line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending text.
        line: usize,
        /// What the parser said, on one line.
        message: String,
    },
    /// A key has a value the agent cannot use.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The key, as written in the file.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
}

/// The daemon's configuration (`score-agent run --config FILE`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interface name patterns of the VM backend interfaces to watch (glob
    /// syntax: `vif*`, `tap?`, `vif[0-9]*.0`). Xen's are `vif*`.
    pub interfaces: Vec<String>,
    /// What `/metrics` exports (`[metrics]` table; every key optional).
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
    /// How often the kernel maps are drained into the flow table. The
    /// default, 4 s, is the first whole second at least one bucket of the
    /// default rate window (30 s / 8 = 3.75 s, `flows::WINDOW_BUCKETS`):
    /// the flow table keeps one sample per bucket, so more frequent drains
    /// only refresh the newest sample, and a drain costs the same CPU
    /// whatever its interval (docs/BENCHMARKS.md, "The default drain
    /// interval").
    #[serde(default = "defaults::drain_interval", with = "humantime_serde")]
    pub drain_interval: Duration,
    /// The window over which per-pair rates are averaged (the paper's
    /// "average rate over a time window", §IV-B).
    #[serde(default = "defaults::rate_window", with = "humantime_serde")]
    pub rate_window: Duration,
    /// A pair that has sent nothing for this long is evicted from the flow
    /// table and from the kernel map, which frees its slot.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// bpffs directory where the maps are pinned, so that counters survive
    /// a restart of the agent. Mounted if no bpffs is there yet.
    #[serde(default = "defaults::pin_path")]
    pub pin_path: PathBuf,
    /// Capacity of the kernel flow map, in directed pairs.
    #[serde(default = "defaults::flows_max")]
    pub flows_max: u32,
    /// How the classifiers attach: `auto` (TCX on kernels >= 6.6, else a
    /// clsact qdisc, as on Debian 12's 6.1 Xen dom0), `tcx` or `clsact`.
    #[serde(default)]
    pub attach: crate::datapath::AttachMode,
    /// Where the agent serves `/metrics`, `/flows` and `/healthz`. Loopback
    /// by default: the flow table is not for the world to read.
    #[serde(default = "defaults::http_listen")]
    pub http_listen: SocketAddr,
    /// This host (distributed mode; with `[topology]` and `[peer]`).
    #[serde(default)]
    pub node: Option<crate::cluster::NodeConfig>,
    /// The data-centre tree (distributed mode).
    #[serde(default)]
    pub topology: Option<crate::cluster::TopologyConfig>,
    /// The peer protocol (distributed mode).
    #[serde(default)]
    pub peer: Option<crate::cluster::PeerConfig>,
    /// Token policy and decision rule.
    #[serde(default)]
    pub policy: crate::cluster::PolicyConfig,
    /// The hypervisor backend (advisory when absent: nothing moves).
    #[serde(default)]
    pub backend: crate::backend::BackendConfig,
}

mod defaults {
    use std::{net::SocketAddr, path::PathBuf, time::Duration};

    pub(super) fn drain_interval() -> Duration {
        Duration::from_secs(4)
    }
    pub(super) fn rate_window() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn idle_timeout() -> Duration {
        Duration::from_secs(120)
    }
    pub(super) fn pin_path() -> PathBuf {
        PathBuf::from("/sys/fs/bpf/score")
    }
    pub(super) fn flows_max() -> u32 {
        score_common::DEFAULT_FLOWS_MAX
    }
    pub(super) fn http_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9464))
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` is only for messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    1 + text.as_bytes()[..s.start.min(text.len())]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                })
                .unwrap_or(1);
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                message: e.message().replace('\n', " "),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The distributed settings, files read and checked; `None` when the
    /// agent only counts (no `[node]`, `[topology]` or `[peer]` table).
    pub fn cluster(
        &self,
        coordinator: bool,
    ) -> Result<Option<crate::cluster::ClusterSettings>, ConfigError> {
        match (&self.node, &self.topology, &self.peer) {
            (None, None, None) if !coordinator => Ok(None),
            (Some(n), Some(t), Some(p)) => {
                crate::cluster::ClusterSettings::resolve(n, t, p, &self.policy, coordinator)
                    .map(Some)
            }
            _ => {
                let missing = [
                    ("node", self.node.is_none()),
                    ("topology", self.topology.is_none()),
                    ("peer", self.peer.is_none()),
                ]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(", ");
                Err(ConfigError::Invalid {
                    key: missing,
                    reason: "the distributed agent needs [node], [topology] and [peer]".into(),
                })
            }
        }
    }

    /// Checks every value; called by [`Config::load`] before anything runs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            key: key.into(),
            reason,
        };
        self.backend.validate().map_err(|e| match e {
            crate::backend::BackendConfigError::Invalid { key, reason } => {
                ConfigError::Invalid { key, reason }
            }
            other => invalid("backend", other.to_string()),
        })?;
        validate_patterns(&self.interfaces)
            .map_err(|(i, reason)| invalid(&format!("interfaces[{i}]"), reason))?;
        if self.interfaces.is_empty() {
            return Err(invalid(
                "interfaces",
                "at least one interface pattern is needed".into(),
            ));
        }
        if self.drain_interval.is_zero() {
            return Err(invalid(
                "drain_interval",
                "must be greater than zero".into(),
            ));
        }
        if self.rate_window < self.drain_interval {
            return Err(invalid(
                "rate_window",
                format!(
                    "{:?} is shorter than drain_interval {:?}: no window would hold two samples",
                    self.rate_window, self.drain_interval
                ),
            ));
        }
        if self.idle_timeout < self.drain_interval {
            return Err(invalid(
                "idle_timeout",
                "must be at least drain_interval".into(),
            ));
        }
        if self.flows_max == 0 {
            return Err(invalid("flows_max", "must be at least 1".into()));
        }
        if !self.pin_path.is_absolute() {
            return Err(invalid(
                "pin_path",
                "must be an absolute path under a bpffs".into(),
            ));
        }
        if self.metrics.top_k > crate::metrics::MAX_TOP_K {
            // Each exported pair is two series: keep the label set bounded.
            return Err(invalid(
                "metrics.top_k",
                format!(
                    "{} is above the maximum of {}",
                    self.metrics.top_k,
                    crate::metrics::MAX_TOP_K
                ),
            ));
        }
        Ok(())
    }
}

/// Compiled interface name patterns.
#[derive(Clone, Debug)]
pub struct IfacePatterns(Vec<glob::Pattern>);

impl IfacePatterns {
    /// Compiles patterns that have already passed validation, or reports
    /// the first bad one.
    pub fn new(patterns: &[String]) -> Result<Self, ConfigError> {
        validate_patterns(patterns).map_err(|(i, reason)| ConfigError::Invalid {
            key: format!("interfaces[{i}]"),
            reason,
        })?;
        Ok(IfacePatterns(
            patterns
                .iter()
                .filter_map(|p| glob::Pattern::new(p).ok())
                .collect(),
        ))
    }

    /// Whether an interface name matches any pattern.
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }
}

/// Interface names are at most 15 bytes (IFNAMSIZ - 1) and cannot contain
/// '/' or whitespace: a pattern that cannot match any name is a mistake.
fn validate_patterns(patterns: &[String]) -> Result<(), (usize, String)> {
    for (i, p) in patterns.iter().enumerate() {
        if p.is_empty() {
            return Err((i, "empty interface pattern".into()));
        }
        if p.contains('/') || p.chars().any(char::is_whitespace) {
            return Err((
                i,
                format!("{p:?}: interface names contain no '/' or whitespace"),
            ));
        }
        if let Err(e) = glob::Pattern::new(p) {
            return Err((i, format!("{p:?} is not a valid pattern: {}", e.msg)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("interfaces = [\"vif*\"]\n").unwrap();
        assert_eq!(c.drain_interval, Duration::from_secs(4));
        assert_eq!(c.rate_window, Duration::from_secs(30));
        assert_eq!(c.flows_max, score_common::DEFAULT_FLOWS_MAX);
        assert!(c.http_listen.ip().is_loopback());
    }

    #[test]
    fn default_drains_once_per_bucket_of_the_default_window() {
        // At least one bucket: each drain is a sample of its own, and no
        // drain only refreshes the newest one. Under two: the rate's
        // span stays within the window plus one drain interval.
        let c = parse("interfaces = [\"vif*\"]\n").unwrap();
        let bucket = c.rate_window / crate::flows::WINDOW_BUCKETS as u32;
        assert!(
            c.drain_interval >= bucket,
            "{:?} < {bucket:?}",
            c.drain_interval
        );
        assert!(c.drain_interval < 2 * bucket, "{:?}", c.drain_interval);
    }

    #[test]
    fn durations_are_human() {
        let c =
            parse("interfaces = [\"vif*\"]\ndrain_interval = \"250ms\"\nrate_window = \"1m\"\n")
                .unwrap();
        assert_eq!(c.drain_interval, Duration::from_millis(250));
        assert_eq!(c.rate_window, Duration::from_secs(60));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = parse("interfaces = [\"vif*\"]\nflows_maxx = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("flows_maxx"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn bad_pattern_is_named() {
        let e = parse("interfaces = [\"vif*\", \"tap[\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config key `interfaces[1]`"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("interfaces = []", "interfaces"),
            (
                "interfaces = [\"a\"]\ndrain_interval = \"0s\"",
                "drain_interval",
            ),
            (
                "interfaces = [\"a\"]\nrate_window = \"100ms\"",
                "rate_window",
            ),
            ("interfaces = [\"a\"]\nflows_max = 0", "flows_max"),
            ("interfaces = [\"a\"]\npin_path = \"rel\"", "pin_path"),
            ("interfaces = [\"a b\"]", "interfaces[0]"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        }
    }

    #[test]
    fn metrics_table_is_optional_and_checked() {
        let c = parse("interfaces = [\"vif*\"]\n").unwrap();
        assert_eq!(c.metrics.top_k, crate::metrics::DEFAULT_TOP_K);
        let c = parse("interfaces = [\"vif*\"]\n[metrics]\ntop_k = 3\n").unwrap();
        assert_eq!(c.metrics.top_k, 3);
        let e = parse("interfaces = [\"vif*\"]\n[metrics]\ntop_k = 5000\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config key `metrics.top_k`"), "{e}");
        let e = parse("interfaces = [\"vif*\"]\n[metrics]\ntopk = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("topk") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn patterns_match_names() {
        let p = IfacePatterns::new(&["vif*".into(), "tap[0-3]".into()]).unwrap();
        assert!(p.matches("vif3.0"));
        assert!(p.matches("tap2"));
        assert!(!p.matches("tap7"));
        assert!(!p.matches("eth0"));
    }
}
