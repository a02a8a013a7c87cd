//! Latency samples and what is reported of them.

use std::time::Duration;

use serde::Serialize;

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One figure of one repetition of a workload.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: &'static str,
    pub value: f64,
    pub unit: &'static str,
}

impl Figure {
    pub fn new(name: &'static str, value: f64, unit: &'static str) -> Self {
        Self { name, value, unit }
    }
}

/// Latency percentiles and rate of `n` operations that took `wall` in all.
pub fn latency_figures(
    mut samples: Vec<Duration>,
    wall: Duration,
    rate_name: &'static str,
) -> Vec<Figure> {
    samples.sort_unstable();
    let n = samples.len();
    vec![
        Figure::new(
            rate_name,
            n as f64 / wall.as_secs_f64().max(f64::EPSILON),
            "/s",
        ),
        Figure::new("p50", percentile(&samples, 50.0).as_secs_f64() * 1e6, "µs"),
        Figure::new("p99", percentile(&samples, 99.0).as_secs_f64() * 1e6, "µs"),
    ]
}

/// Median, min and max of one figure over the repetitions.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub workload: String,
    pub figure: &'static str,
    pub unit: &'static str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
    pub target: Option<&'static str>,
    /// This figure divided by the matching baseline figure, when baseline ran too.
    pub vs_baseline: Option<f64>,
}

pub fn summarize(workload: &str, runs: &[Vec<Figure>]) -> Vec<Summary> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|f| {
            let mut samples: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.iter().find(|g| g.name == f.name).map(|g| g.value))
                .collect();
            let mut sorted = samples.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[sorted.len() / 2];
            samples.shrink_to_fit();
            Summary {
                workload: workload.to_owned(),
                figure: f.name,
                unit: f.unit,
                median,
                min: sorted[0],
                max: sorted[sorted.len() - 1],
                samples,
                target: None,
                vs_baseline: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn summaries_take_the_median_of_repetitions() {
        let runs = vec![
            vec![Figure::new("rate", 10.0, "/s")],
            vec![Figure::new("rate", 30.0, "/s")],
            vec![Figure::new("rate", 20.0, "/s")],
        ];
        let s = summarize("w", &runs);
        assert_eq!((s[0].median, s[0].min, s[0].max), (20.0, 10.0, 30.0));
    }
}
