//! `mesh bench`: runs the load generator (crate `mesh-bench`) and prints its figures.

use anyhow::Result;

use crate::Output;
use crate::output::table;
pub use mesh_bench::{BenchArgs, serve_echo, serve_relay};

pub async fn run(args: BenchArgs, format: Output) -> Result<()> {
    let summaries = mesh_bench::run(args).await?;
    match format {
        Output::Json => crate::output::json(&summaries),
        Output::Table => {
            let fmt = |v: f64| {
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            };
            let rows = summaries
                .iter()
                .map(|s| {
                    vec![
                        s.workload.clone(),
                        s.figure.to_owned(),
                        format!("{} {}", fmt(s.median), s.unit),
                        format!("{}–{}", fmt(s.min), fmt(s.max)),
                        s.target.unwrap_or("").to_owned(),
                        s.vs_baseline
                            .map(|r| format!("{r:.2}×"))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            table(
                &[
                    "workload",
                    "figure",
                    "median",
                    "min–max",
                    "target",
                    "vs baseline",
                ],
                rows,
            );
        }
    }
    Ok(())
}
