//! A real Prometheus server (Debian's `prometheus`, installed by `cargo
//! xtask setup`) in a namespace, scraping agents every second, its storage
//! in a temporary directory; PromQL through its HTTP API. Killed in
//! `Drop`; panics on failure, as the test that made it would.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::http::{self, url_encode};

/// `GET path` from `addr` inside `ns`; the body of a 200 answer.
fn get(ns: &str, addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().expect("a host:port address");
    http::get(ns, addr, path).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Where Debian's `prometheus` package (installed by `cargo xtask setup`)
/// puts the server.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A real Prometheus server in a namespace, scraping `targets` every
/// second, its storage in a temporary directory; killed in `Drop`.
pub struct Prometheus {
    child: Option<Child>,
    ns: String,
    /// Its HTTP address (`host:port`) inside the namespace.
    pub addr: String,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, listening on `listen`, scraping `targets`
    /// (`host:port`, path `/metrics`) every second.
    pub fn start(ns: &str, listen: &str, targets: &[&str]) -> Prometheus {
        assert!(
            std::path::Path::new(PROMETHEUS_BIN).exists(),
            "{PROMETHEUS_BIN} is missing: run `cargo xtask setup` (Debian package prometheus)"
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: score\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let data = dir.path().join("data");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, PROMETHEUS_BIN])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn prometheus");
        let log = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Prometheus {
            child: Some(child),
            ns: ns.to_owned(),
            addr: listen.to_owned(),
            log,
            _dir: dir,
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `/-/ready` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while get(&self.ns, &self.addr, "/-/ready").is_none() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after {timeout:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs an instant PromQL query through the HTTP API; the result
    /// vector as (labels, value). `None` if the server did not answer.
    pub fn query(&self, promql: &str) -> Option<Vec<(serde_json::Value, f64)>> {
        let body = get(
            &self.ns,
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        if v["status"] != "success" {
            return None;
        }
        let result = v["data"]["result"].as_array()?;
        let mut out = Vec::new();
        for r in result {
            // An instant vector sample is [unix time, "value"].
            let value = r["value"][1].as_str()?.parse().ok()?;
            out.push((r["metric"].clone(), value));
        }
        Some(out)
    }

    /// Polls `promql` until it returns exactly one sample equal to `want`
    /// (the first scrape is queryable only ~5.5 s after start, TESTBED.md).
    /// Panics with the last answer, the targets' health and the log.
    pub fn wait_for_value(&self, promql: &str, want: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            let answer = self.query(promql);
            if let Some(v) = &answer
                && v.len() == 1
                && v[0].1 == want
            {
                return;
            }
            last = answer;
            thread::sleep(Duration::from_millis(250));
        }
        let targets = get(&self.ns, &self.addr, "/api/v1/targets");
        panic!(
            "prometheus never answered {promql} = {want}; last answer: {last:?}\n\
             targets: {targets:?}\nlog:\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
