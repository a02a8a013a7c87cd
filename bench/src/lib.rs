//! The load generator behind `mesh bench`, kept out of the product's crates. Every workload
//! starts its own processes (the running `mesh` binary as coordinator and nodes, on loopback,
//! through the harness the tests share, `mesh-harness`) and reports its figures; `--repeat N`
//! gives medians with min–max; `--quick` shrinks every workload to check that it works. The
//! caller (the CLI) prints the summaries. The definitions live in BENCHMARKS.md.

mod baseline;
mod cluster;
mod stats;
mod workloads;

use std::time::Duration;

use anyhow::Result;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

pub use baseline::{serve_echo, serve_relay};
pub use stats::Summary;
use stats::{Figure, summarize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    W1,
    W2,
    /// w1 with mutual TLS and tokens.
    W1Secure,
    /// w2 with mutual TLS and tokens.
    W2Secure,
    /// w2 with every process exporting its spans over OTLP (to a sink in this process).
    W2Traced,
    /// The dashboard's page of a finished run of 1,000 steps.
    Dashboard,
    W3,
    W4,
    Durable,
    Runs,
    Fanout,
    Registry,
    /// Simulated nodes (10, 100, 1,000) × 10 agents serving echo tasks: dispatch throughput and
    /// heartbeat cost as the node count grows.
    Scale,
    Failover,
    /// Two coordinators on PostgreSQL with the default 5 s lease, 100 runs in flight: from
    /// kill -9, then from SIGSTOP, of the leader until the standby serves.
    LeaderFailover,
    Llm,
    /// A step whose agent calls `echo` as a skill (a tool call through the coordinator),
    /// against an `echo` step: the cost of a skill called as a tool.
    SkillCall,
    /// Messages between agents: latency one at a time, and throughput with 8 senders.
    Messages,
    Baseline,
}

impl Workload {
    const ALL: [Workload; 19] = [
        Workload::Baseline,
        Workload::W1,
        Workload::W2,
        Workload::W1Secure,
        Workload::W2Secure,
        Workload::W2Traced,
        Workload::Dashboard,
        Workload::W3,
        Workload::W4,
        Workload::Durable,
        Workload::Runs,
        Workload::Fanout,
        Workload::Registry,
        Workload::Scale,
        Workload::Failover,
        Workload::LeaderFailover,
        Workload::Llm,
        Workload::SkillCall,
        Workload::Messages,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::W1 => "w1",
            Workload::W2 => "w2",
            Workload::W1Secure => "w1-secure",
            Workload::W2Secure => "w2-secure",
            Workload::W2Traced => "w2-traced",
            Workload::Dashboard => "dashboard",
            Workload::W3 => "w3",
            Workload::W4 => "w4",
            Workload::Durable => "durable",
            Workload::Runs => "runs",
            Workload::Fanout => "fanout",
            Workload::Registry => "registry",
            Workload::Scale => "scale",
            Workload::Failover => "failover",
            Workload::LeaderFailover => "leader-failover",
            Workload::Llm => "llm",
            Workload::SkillCall => "skill-call",
            Workload::Messages => "messages",
            Workload::Baseline => "baseline",
        }
    }
}

/// DESIGN.md §7 targets, by (workload, figure).
fn target(workload: &str, figure: &str) -> Option<&'static str> {
    Some(match (workload, figure) {
        ("w1", "p50") => "< 250 µs",
        ("w2", "steps/s") => "> 20,000 /s",
        ("w4", "cold start") => "< 1,000 ms",
        ("durable", "step transitions/s") => "> 5,000 /s",
        ("durable", "p50 per step, one chain") => "< 1,000 µs overhead",
        ("runs", "coordinator RSS") => "< 500 MiB at 10,000 runs",
        ("registry", "coordinator CPU") => "< 0.25 cores at 1,000 × 10",
        ("failover", "kill -9 to all re-dispatched") => "< lease + 1 s = 6,000 ms",
        ("leader-failover", "kill -9 to the standby serving") => "< lease + 1 s = 6,000 ms",
        ("leader-failover", "SIGSTOP to the standby serving") => "< lease + 1 s = 6,000 ms",
        ("leader-failover", "SIGTERM to the standby serving") => "< lease = 5,000 ms",
        ("llm", "added p50") => "< 1,000 µs",
        ("dashboard", "p50, run page of 1,000 steps") => "< 50 ms",
        _ => return None,
    })
}

/// The baseline figure each figure is compared with.
fn baseline_of(workload: &str, figure: &str) -> Option<&'static str> {
    Some(match (workload, figure) {
        ("w1" | "w1-secure", "steps/s" | "steps/s, submit + watch") => "sequential rate",
        ("w1" | "w1-secure", "p50" | "p50, submit + watch") => "sequential p50",
        ("w1" | "w1-secure", "p99" | "p99, submit + watch") => "sequential p99",
        ("w2" | "w2-secure" | "w2-traced" | "w3", "steps/s" | "steps/s, submit + watch") => {
            "64 in flight rate"
        }
        ("w2" | "w2-secure" | "w2-traced" | "w3", "p50" | "p50, submit + watch") => {
            "64 in flight p50"
        }
        ("w2" | "w2-secure" | "w2-traced" | "w3", "p99" | "p99, submit + watch") => {
            "64 in flight p99"
        }
        ("durable", "p50 per step, one chain") => "sequential p50",
        ("llm", "p50 through the mesh") => "sequential p50",
        ("llm", "p99 through the mesh") => "sequential p99",
        ("skill-call", "p50, echo step") | ("skill-call", "p50, step calling echo") => {
            "sequential p50"
        }
        _ => return None,
    })
}

/// How many operations each workload does.
pub struct Sizes {
    pub warmup: usize,
    pub sequential: usize,
    pub parallel: usize,
    pub spread: usize,
    pub durable_runs: usize,
    pub held_runs: usize,
    pub fan_out: usize,
    pub sim_nodes: usize,
    pub sim_seconds: u64,
    /// The node counts of `scale`, and the goals it runs at each.
    pub scale_nodes: &'static [usize],
    pub scale_goals: usize,
    pub failover_runs: usize,
}

impl Sizes {
    fn full() -> Self {
        Self {
            warmup: 200,
            sequential: 2_000,
            parallel: 20_000,
            spread: 10_000,
            durable_runs: 2_000,
            held_runs: 10_000,
            fan_out: 10_000,
            sim_nodes: 1_000,
            sim_seconds: 20,
            scale_nodes: &[10, 100, 1_000],
            scale_goals: 10_000,
            failover_runs: 100,
        }
    }

    fn quick() -> Self {
        Self {
            warmup: 10,
            sequential: 50,
            parallel: 200,
            spread: 200,
            durable_runs: 20,
            held_runs: 100,
            fan_out: 500,
            sim_nodes: 20,
            sim_seconds: 2,
            scale_nodes: &[2, 5],
            scale_goals: 100,
            failover_runs: 10,
        }
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// Workloads to run (default: all).
    #[arg(value_enum)]
    workloads: Vec<Workload>,
    /// Run every workload.
    #[arg(long)]
    all: bool,
    /// Small sizes: checks that each workload works, not how fast.
    #[arg(long)]
    quick: bool,
    /// Repetitions of each workload; figures are medians with min–max.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// The coordinator's store in every workload: the embedded SQLite store, or a PostgreSQL
    /// server this process starts for each cluster (Debian's binaries, fsync on, on loopback).
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    store: StoreKind,
}

/// Which store the coordinators of a run of `mesh bench` use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    #[default]
    Sqlite,
    Postgres,
}

static STORE: std::sync::OnceLock<StoreKind> = std::sync::OnceLock::new();

/// The store this run's clusters use.
fn store() -> StoreKind {
    STORE.get().copied().unwrap_or_default()
}

pub fn progress(label: &str, len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn run_one(w: Workload, sizes: &Sizes) -> Result<Vec<Figure>> {
    match w {
        Workload::W1 => workloads::w1(sizes).await,
        Workload::W2 => workloads::w2(sizes).await,
        Workload::W1Secure => workloads::w1_secure(sizes).await,
        Workload::W2Secure => workloads::w2_secure(sizes).await,
        Workload::W2Traced => workloads::w2_traced(sizes).await,
        Workload::SkillCall => workloads::skill_call(sizes).await,
        Workload::Messages => workloads::messages(sizes).await,
        Workload::Dashboard => workloads::dashboard(sizes).await,
        Workload::W3 => workloads::w3(sizes).await,
        Workload::W4 => workloads::w4(sizes).await,
        Workload::Durable => workloads::durable(sizes).await,
        Workload::Runs => workloads::runs(sizes).await,
        Workload::Fanout => workloads::fanout(sizes).await,
        Workload::Registry => workloads::registry(sizes).await,
        Workload::Scale => workloads::scale(sizes).await,
        Workload::LeaderFailover => workloads::leader_failover(sizes).await,
        Workload::Failover => workloads::failover(sizes).await,
        Workload::Llm => workloads::llm(sizes).await,
        Workload::Baseline => baseline::run(sizes).await,
    }
}

/// Runs the chosen workloads; each figure with its target and its ratio to the baseline
/// (when the baseline ran too).
pub async fn run(args: BenchArgs) -> Result<Vec<Summary>> {
    let _ = STORE.set(args.store);
    let sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let chosen: Vec<Workload> = if args.all || args.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        Workload::ALL
            .iter()
            .copied()
            .filter(|w| args.workloads.contains(w))
            .collect()
    };
    let mut summaries: Vec<Summary> = Vec::new();
    for w in chosen {
        let mut repetitions = Vec::new();
        for i in 0..args.repeat.max(1) {
            eprintln!("{} ({}/{})", w.name(), i + 1, args.repeat.max(1));
            repetitions.push(run_one(w, &sizes).await?);
        }
        summaries.extend(summarize(w.name(), &repetitions));
    }
    let baseline: Vec<(&'static str, f64)> = summaries
        .iter()
        .filter(|s| s.workload == "baseline")
        .map(|s| (s.figure, s.median))
        .collect();
    for s in &mut summaries {
        s.target = target(&s.workload, s.figure);
        s.vs_baseline = baseline_of(&s.workload, s.figure)
            .and_then(|b| baseline.iter().find(|(name, _)| *name == b))
            .map(|(_, v)| s.median / v);
    }
    Ok(summaries)
}
