//! Micro-benchmarks of the coordinator's hot paths: dispatcher selection, journal append,
//! run state transition and goal validation. `cargo bench -p mesh-coordinator`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_coordinator::dispatcher::{DispatchRequest, DispatchState, LoadBoard, Sent};
use mesh_coordinator::run::{RetryPolicy, RunMachine};
use mesh_coordinator::store::{JournalEvent, Store, StoredRun};
use mesh_proto::domain::*;
use serde_json::json;
use tokio::time::Instant;

fn card(name: &str, max: u32) -> AgentCard {
    AgentCard::new(name).skill("echo").max_concurrency(max)
}

fn chain(n: usize) -> GoalSpec {
    GoalSpec {
        objective: "bench".into(),
        inputs: json!({}),
        steps: (0..n)
            .map(|i| StepSpec {
                id: StepId(format!("s{i}")),
                uses: "echo".into(),
                with: json!({ "i": i }),
                needs: if i == 0 {
                    vec![]
                } else {
                    vec![StepId(format!("s{}", i - 1))]
                },
            })
            .collect(),
        idempotency_key: None,
    }
}

fn dispatcher_selection(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut st: DispatchState<u32> = DispatchState::new(LoadBoard::default());
    let mut receivers = Vec::new();
    for n in 0..100 {
        let (tx, rx) = tokio::sync::mpsc::channel(1 << 16);
        receivers.push(rx);
        let cards = (0..10).map(|a| card(&format!("a{a}"), 1_000_000)).collect();
        st.node_up(&NodeId(format!("n{n}")), n, cards, tx);
    }
    let mut i = 0u64;
    c.bench_function("dispatch: pick among 1,000 agents and send", |b| {
        b.iter(|| {
            i += 1;
            let req = DispatchRequest {
                token: FencingToken {
                    run_id: "r".into(),
                    step_id: StepId(format!("s{i}")),
                    attempt: 1,
                    epoch: 1,
                },
                skill: "echo".into(),
                input: json!({}),
                idempotency_key: String::new(),
                run: 0u32,
                ready_at: Instant::now(),
            };
            let sent = st.dispatch(req, 1000, 10, Instant::now());
            black_box(matches!(sent, Sent::Sent(_)));
            // Keep the in-flight set and the channels small.
            st.in_flight.clear();
            for rx in &mut receivers {
                while rx.try_recv().is_ok() {}
            }
        })
    });
}

fn journal_append(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let run = rt.block_on(store.submit(&chain(2))).unwrap().run_id;
    let event = || JournalEvent::StepAssigned {
        step: "s0".into(),
        attempt: 1,
        agent: AgentKey {
            node: "n1".into(),
            agent: "echo".into(),
        },
    };
    let mut seq = 1;
    c.bench_function("store: journal append, one writer (one commit each)", |b| {
        b.iter(|| {
            rt.block_on(store.record(&run, seq, vec![event()])).unwrap();
            seq += 1;
        })
    });
    // 64 runs writing at once: their writes share commits.
    let runs: Vec<RunId> = (0..64)
        .map(|_| rt.block_on(store.submit(&chain(2))).unwrap().run_id)
        .collect();
    let mut seqs = vec![1u64; runs.len()];
    c.bench_function(
        "store: 64 journal appends from 64 runs at once (group commit)",
        |b| {
            b.iter(|| {
                rt.block_on(async {
                    let writes = runs
                        .iter()
                        .zip(seqs.iter())
                        .map(|(run, &seq)| store.record(run, seq, vec![event()]));
                    for r in futures::future::join_all(writes).await {
                        r.unwrap();
                    }
                });
                for s in &mut seqs {
                    *s += 1;
                }
            })
        },
    );
}

fn run_transition(c: &mut Criterion) {
    let stored = StoredRun::fresh("r".into(), "g".into(), chain(10));
    let policy = RetryPolicy {
        max_attempts: 3,
        max_total_attempts: 10,
        backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    };
    c.bench_function("run: ten-step chain through the state machine", |b| {
        b.iter(|| {
            let mut m = RunMachine::from_stored(stored.clone(), 1, policy.clone()).unwrap();
            let mut events = m.next();
            while !events.is_empty() {
                for e in &events {
                    m.apply(e);
                }
                let running: Vec<_> = m
                    .steps
                    .iter()
                    .filter(|s| s.state == StepState::Running)
                    .map(|s| m.token(s))
                    .collect();
                for token in running {
                    let d = m
                        .on_result(&TaskResult {
                            token,
                            outcome: Ok(json!({ "ok": true })),
                        })
                        .unwrap();
                    for e in &d.events {
                        m.apply(e);
                    }
                }
                events = m.next();
            }
            black_box(m.state)
        })
    });
}

fn goal_validation(c: &mut Criterion) {
    let goal = chain(1000);
    c.bench_function("validate: 1,000-step goal", |b| {
        b.iter(|| black_box(&goal).validate().unwrap())
    });
}

criterion_group!(
    benches,
    dispatcher_selection,
    journal_append,
    run_transition,
    goal_validation
);
criterion_main!(benches);
