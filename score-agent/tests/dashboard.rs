//! Privileged test: every query of the shipped Grafana dashboard
//! (dist/grafana/score.json) is evaluated the way Grafana evaluates it (a
//! range query over the run, step 1 s) by a real Prometheus that scrapes
//! the real agents of a small emulated data centre over its network, while
//! they count real traffic, pass the token, decide, swap and migrate VMs.
//! Every query returns data (a number, not NaN), and every panel shows
//! something other than zero at some point of the run, except the one
//! whose series count faults that a healthy cluster does not have. Needs
//! root; `#[ignore]`d under plain `cargo test`, run by `cargo xtask test`.

mod dc;
mod support;

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use dc::{Dc, Options, PORT};
use support::{Prometheus, http_get, in_netns, url_encode};

/// Where Prometheus listens, inside the first host's namespace.
const PROM: &str = "127.0.0.1:9090";
/// The agents' HTTP port (they listen on every address of their host).
const AGENT_PORT: u16 = 9464;

/// Panels whose series count faults (maps full): zero on a healthy
/// cluster, which is what they must show here. Their queries must still
/// return data.
const FAULT_PANELS: &[&str] = &["Pairs and MACs lost to full maps (per hour)"];

/// One query of the dashboard.
struct Query {
    panel: String,
    expr: String,
}

/// Grafana's built-in interval variables, as Grafana would fill them for
/// a short time range with a 1 s scrape interval. A dashboard variable
/// the test does not know fails the test: it would have to be given a
/// value here first.
fn substitute(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (var, value) in [
        ("$__rate_interval", "1m"),
        ("${__rate_interval}", "1m"),
        ("$__interval", "1s"),
        ("${__interval}", "1s"),
        ("$__range", "5m"),
        ("${__range}", "5m"),
    ] {
        out = out.replace(var, value);
    }
    assert!(
        !out.contains('$'),
        "a dashboard variable this test does not know in {expr:?}"
    );
    out
}

/// Every query of the dashboard with its panel's title.
fn dashboard_queries() -> Vec<Query> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/grafana/score.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                panel: p["title"].as_str().unwrap().to_owned(),
                expr: substitute(t["expr"].as_str().unwrap()),
            });
        }
    }
    out
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What one range query answered.
#[derive(Debug, Default)]
struct Answer {
    /// Series in the answer.
    series: usize,
    /// Samples that are numbers (not NaN, not infinite).
    finite: usize,
    /// Of those, samples other than zero.
    nonzero: usize,
}

/// `promql` as a Grafana time-series panel asks it: a range query from
/// `start` to now, step 1 s. `None` if Prometheus refused it (a bad query
/// answers 400) or did not answer.
fn query_range(ns: &str, promql: &str, start: f64) -> Option<Answer> {
    let path = format!(
        "/api/v1/query_range?query={}&start={start:.3}&end={:.3}&step=1",
        url_encode(promql),
        unix_now()
    );
    let body = http_get(ns, PROM, &path)?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    if v["status"] != "success" {
        return None;
    }
    let mut a = Answer::default();
    for series in v["data"]["result"].as_array()? {
        a.series += 1;
        for sample in series["values"].as_array()? {
            // A range sample is [unix time, "value"].
            let x: f64 = sample[1].as_str()?.parse().ok()?;
            if x.is_finite() {
                a.finite += 1;
                if x != 0.0 {
                    a.nonzero += 1;
                }
            }
        }
    }
    Some(a)
}

/// What is still missing: queries without data, and panels (other than
/// [`FAULT_PANELS`]) that showed nothing but zero.
fn missing(ns: &str, queries: &[Query], start: f64) -> Vec<String> {
    let mut out = Vec::new();
    let mut panels: Vec<(&str, bool)> = Vec::new();
    for q in queries {
        let answer = query_range(ns, &q.expr, start);
        match &answer {
            None => out.push(format!("{}: {}: refused or unanswered", q.panel, q.expr)),
            Some(a) if a.finite == 0 => {
                out.push(format!("{}: {}: no data ({a:?})", q.panel, q.expr))
            }
            Some(_) => {}
        }
        let shown = answer.is_some_and(|a| a.nonzero > 0);
        match panels.iter_mut().find(|(p, _)| *p == q.panel) {
            Some((_, s)) => *s |= shown,
            None => panels.push((&q.panel, shown)),
        }
    }
    for (p, shown) in panels {
        if !shown && !FAULT_PANELS.contains(&p) {
            out.push(format!("panel {p}: only zeros"));
        }
    }
    out
}

/// The sum over every agent of a metric.
fn total(dc: &Dc, name: &str) -> f64 {
    (0..dc.hosts.len()).map(|i| dc.metric(i, name)).sum()
}

#[test]
#[ignore = "privileged: needs root, BPF, netns and prometheus; run by cargo xtask test"]
fn every_dashboard_query_returns_data_from_real_agents() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for p in FAULT_PANELS {
        assert!(
            queries.iter().any(|q| q.panel == *p),
            "no panel {p} any more: update FAULT_PANELS"
        );
    }

    // Two pods of one rack of two hosts, h1 h2 | h3 h4. v1 and v2 on h1,
    // v3 and v4 on h3, two slots per host: v1 talks to v3 and v2 to v4
    // across the core. Each VM's peer sits on a full host, so the paper's
    // rule cannot move anything: the agents decide, round after round,
    // and the costs stay high. Then, with swaps on and one VM of headroom,
    // they swap (two migrations), as in tests/distributed.rs.
    let tree = vec![vec![vec![0, 1]], vec![vec![2, 3]]];
    let mut dc = Dc::build("sct-dash-", tree, &[0, 0, 2, 2]);
    let prom_ns = dc.hosts[0].ns.clone();
    // Prometheus scrapes every agent over the data centre's network, as
    // it would in a fleet.
    let targets: Vec<String> = dc
        .hosts
        .iter()
        .map(|h| format!("{}:{AGENT_PORT}", h.addr))
        .collect();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let start = unix_now();
    let mut prom = Prometheus::start(&prom_ns, PROM, &targets);
    prom.wait_ready(Duration::from_secs(20));

    dc.chat(0, 2, 150_000);
    dc.chat(2, 0, 150_000);
    dc.chat(1, 3, 100_000);
    dc.chat(3, 1, 100_000);
    let paper = Options {
        http_listen: "0.0.0.0:9464",
        ..Options::default()
    };
    dc.start_agents(&paper);
    dc.wait_until("two rounds of decisions", Duration::from_secs(60), |dc| {
        total(dc, "score_decisions_evaluated_total") >= 8.0
    });
    // A VM's cost is set when the token visits it: wait until Prometheus
    // has scraped the high costs before the swap brings them to zero.
    let scraped = Instant::now() + Duration::from_secs(30);
    while prom
        .query("sum(score_vm_communication_cost) > 0 and sum(score_host_communication_cost) > 0")
        .is_none_or(|r| r.is_empty())
    {
        assert!(Instant::now() < scraped, "no cost scraped:\n{}", prom.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    dc.stop_agents();

    let swaps = Options {
        swaps: true,
        headroom: 1,
        ..paper
    };
    dc.start_agents(&swaps);
    dc.wait_until("both pairs together", Duration::from_secs(90), |dc| {
        let (h0, h1, h2, h3) = (dc.host_of(0), dc.host_of(1), dc.host_of(2), dc.host_of(3));
        h0.is_some() && h0 == h2 && h1.is_some() && h1 == h3
    });
    dc.wait_until("the swap counted", Duration::from_secs(20), |dc| {
        total(dc, "score_swaps_total{outcome=\"done\"}") >= 1.0
    });

    // A datagram that is not the protocol's, from h2 to h1's peer port:
    // what the rejected-datagrams panel exists for.
    let to = SocketAddr::from((dc.hosts[0].addr, PORT));
    in_netns(&dc.hosts[1].ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"not a score datagram", to).unwrap();
    });
    dc.wait_until(
        "the stray datagram counted",
        Duration::from_secs(10),
        |dc| dc.metric(0, "score_datagrams_rejected_total") >= 1.0,
    );

    // Prometheus has scraped every target (they are up), then every query
    // gets data within a few scrapes.
    prom.wait_for_value(
        "count(up == 1)",
        dc.hosts.len() as f64,
        Duration::from_secs(20),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut left = missing(&prom_ns, &queries, start);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        left = missing(&prom_ns, &queries, start);
    }
    let health = http_get(&prom_ns, PROM, "/api/v1/targets");
    assert!(
        left.is_empty(),
        "{} of {} dashboard queries or panels lack data:\n{}\ntargets: {health:?}\nprometheus log:\n{}",
        left.len(),
        queries.len(),
        left.join("\n"),
        prom.log()
    );
    eprintln!(
        "{} dashboard queries answered with data, {:.0} s after Prometheus started",
        queries.len(),
        unix_now() - start
    );
    drop(prom);
    dc.stop_agents();
}
