//! The agents' /metrics, read with one Prometheus text parser
//! (prometheus-parse): a series is picked by a selector, `name` or
//! `name{label="value",...}` (every label given must match), and its
//! samples are summed or maxed. A histogram's buckets are the series
//! `name_bucket{le="..."}` and a summary's `name{quantile="..."}`, as in
//! the text; label values that are numbers match by value (`le="60"` is
//! `le="60.0"`).

use prometheus_parse::{Scrape, Value};

/// One sample of a text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

/// The samples of a Prometheus text exposition, one per line of it.
pub fn samples(text: &str) -> Vec<Sample> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let Ok(scrape) = Scrape::parse(lines) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for s in scrape.samples {
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let one = |name: String, extra: Option<(&str, f64)>, value: f64| {
            let mut labels = labels.clone();
            if let Some((k, bound)) = extra {
                labels.push((k.to_owned(), number(bound)));
            }
            Sample {
                name,
                labels,
                value,
            }
        };
        // The parser gathers a histogram's buckets (and a summary's
        // quantiles) into one value: spread them out again.
        match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                out.push(one(s.metric.clone(), None, *v));
            }
            Value::Histogram(buckets) => out.extend(buckets.iter().map(|b| {
                one(
                    format!("{}_bucket", s.metric),
                    Some(("le", b.less_than)),
                    b.count,
                )
            })),
            Value::Summary(quantiles) => out.extend(
                quantiles
                    .iter()
                    .map(|q| one(s.metric.clone(), Some(("quantile", q.quantile)), q.count)),
            ),
        }
    }
    out
}

/// A bucket bound as the text writes it (`+Inf`, `60`, `0.05`).
fn number(x: f64) -> String {
    if x == f64::INFINITY {
        "+Inf".to_owned()
    } else {
        x.to_string()
    }
}

/// Whether two label values are the same: as text, or as numbers.
fn same_value(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (a.parse::<f64>(), b.parse::<f64>()),
            (Ok(x), Ok(y)) if x == y
        )
}

/// A selector `name{k="v",...}` split into the name and the wanted labels.
fn selector(sel: &str) -> (&str, Vec<(&str, &str)>) {
    let Some((name, rest)) = sel.split_once('{') else {
        return (sel.trim(), Vec::new());
    };
    let wanted = rest
        .trim_end_matches('}')
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim(), v.trim().trim_matches('"')))
        })
        .collect();
    (name.trim(), wanted)
}

/// The values of the samples of `text` that `sel` picks.
pub fn select(text: &str, sel: &str) -> Vec<f64> {
    let (name, wanted) = selector(sel);
    samples(text)
        .into_iter()
        .filter(|s| {
            s.name == name
                && wanted
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && same_value(lv, v)))
        })
        .map(|s| s.value)
        .collect()
}

/// Sum of the samples `sel` picks in `text`; 0 when there are none.
pub fn value(text: &str, sel: &str) -> f64 {
    select(text, sel).into_iter().sum()
}

/// The largest sample `sel` picks over every agent's /metrics (`None` for
/// an agent that did not answer), if any agent exports one.
pub fn max(metrics: &[Option<String>], sel: &str) -> Option<f64> {
    metrics
        .iter()
        .flatten()
        .flat_map(|t| select(t, sel))
        .reduce(f64::max)
}

/// The sum of the samples `sel` picks over every agent, if any agent
/// exports one.
pub fn sum(metrics: &[Option<String>], sel: &str) -> Option<f64> {
    let all: Vec<f64> = metrics
        .iter()
        .flatten()
        .flat_map(|t| select(t, sel))
        .collect();
    (!all.is_empty()).then(|| all.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x y\n# TYPE score_token_round gauge\nscore_token_round 7\n\
        # TYPE score_migrations_total counter\n\
        score_migrations_total{outcome=\"done\"} 3\n\
        score_migrations_total{outcome=\"failed\",vm=\"198.18.1.1\"} 1\n\
        # TYPE score_drain_duration_seconds histogram\n\
        score_drain_duration_seconds_bucket{le=\"0.1\"} 4\n\
        score_drain_duration_seconds_bucket{le=\"+Inf\"} 5\n\
        score_drain_duration_seconds_sum 0.25\n\
        score_drain_duration_seconds_count 5\n";

    #[test]
    fn selectors_pick_sum_and_max() {
        let m = vec![
            Some(TEXT.to_string()),
            None,
            Some("score_token_round 9\n".into()),
        ];
        assert_eq!(max(&m, "score_token_round"), Some(9.0));
        assert_eq!(
            sum(&m, "score_migrations_total{outcome=\"done\"}"),
            Some(3.0)
        );
        assert_eq!(sum(&m, "score_migrations_total"), Some(4.0));
        assert_eq!(max(&m, "score_nothing"), None);
        assert_eq!(
            value(TEXT, "score_migrations_total{outcome=\"failed\"}"),
            1.0
        );
        assert_eq!(value(TEXT, "score_migrations_total{outcome=\"lost\"}"), 0.0);
        assert_eq!(value(TEXT, "score_drain_duration_seconds_sum"), 0.25);
        assert_eq!(value(TEXT, "score_drain_duration_seconds_count"), 5.0);
        assert_eq!(
            value(TEXT, "score_drain_duration_seconds_bucket{le=\"0.1\"}"),
            4.0
        );
        assert_eq!(
            value(TEXT, "score_drain_duration_seconds_bucket{le=\"+Inf\"}"),
            5.0
        );
        assert_eq!(value(TEXT, "score_drain_duration_seconds_bucket"), 9.0);
        // A prefix of a name is not the name.
        assert_eq!(value(TEXT, "score_token"), 0.0);
    }
}
