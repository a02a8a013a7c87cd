//! Micro-benchmarks of the coordinator's hot paths: dispatcher selection, journal append,
//! run state transition and goal validation. `cargo bench -p mesh-coordinator`.
//!
//! They allocate with mimalloc, as the `mesh` binary does.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_coordinator::dispatcher::{DispatchRequest, DispatchState, LoadBoard, Sent};
use mesh_coordinator::intake;
use mesh_coordinator::run::{RetryPolicy, RunMachine};
use mesh_coordinator::store::{Backend, JournalEvent, NewRun, Store, StoredGoal, now_ms};
use mesh_proto::domain::*;
use mesh_workflow::Limits;
use serde_json::json;
use tokio::time::Instant;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A goal to store, with nothing decided yet.
fn new_run(goal: GoalSpec) -> NewRun {
    let (goal_id, run_id) = NewRun::ids();
    NewRun {
        goal: stored(goal),
        goal_id,
        run_id,
        at_ms: now_ms(),
        events: Vec::new(),
    }
}

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
        workflow: None,
        workflow_ref: None,
        budget: None,
        namespace: Default::default(),
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
                    index: 0,
                },
                skill: "echo".into(),
                input: json!({}),
                idempotency_key: String::new(),
                timeout: None,
                labels: Default::default(),
                secrets: Default::default(),
                traceparent: None,
                agent: None,
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

fn stored(goal: GoalSpec) -> StoredGoal {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(intake::prepare(goal, &Limits::default(), &store))
        .unwrap()
        .0
}

fn journal_append(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let run = rt.block_on(store.submit(new_run(chain(2)))).unwrap().run_id;
    let event = || JournalEvent::TaskSucceeded {
        step: "s0".into(),
        index: 0,
        attempt: 1,
        output: serde_json::json!({ "payload": "x".repeat(100) }),
        agent: Some(AgentKey {
            node: "n1".into(),
            agent: "echo".into(),
        }),
        elapsed_ms: 12,
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
        .map(|_| rt.block_on(store.submit(new_run(chain(2)))).unwrap().run_id)
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
    let goal = stored(chain(10));
    let mut policy = RetryPolicy::from_config(&Default::default());
    policy.max_attempts = 3;
    c.bench_function("run: ten-step chain through the state machine", |b| {
        b.iter(|| {
            let mut m = RunMachine::new(
                "r".into(),
                "g".into(),
                goal.clone(),
                1,
                policy.clone(),
                Limits::default(),
            )
            .unwrap();
            let mut events = m.advance();
            while !events.is_empty() {
                let started: Vec<_> = events
                    .iter()
                    .filter_map(|e| match e {
                        JournalEvent::StepStarted { step, index, .. } => {
                            Some(m.token(m.position(step).unwrap(), *index))
                        }
                        _ => None,
                    })
                    .collect();
                events = Vec::new();
                for token in started {
                    let d = m
                        .on_result(&TaskResult::new(token, Ok(json!({ "ok": true }))))
                        .unwrap();
                    events.extend(d.events);
                }
            }
            black_box(m.state())
        })
    });
}

fn goal_validation(c: &mut Criterion) {
    let goal = chain(1000);
    c.bench_function("validate: 1,000-step goal", |b| {
        b.iter(|| black_box(&goal).validate().unwrap())
    });
    // A 10,000-step chain in the workflow language, each step with a template: the same
    // expression in every step (compiled once, then found in the cache), or a different one
    // in each (every one parsed).
    let definition = |expr: &dyn Fn(usize) -> String| {
        let steps: Vec<serde_json::Value> = (0..10_000)
            .map(|i| {
                let mut s =
                    json!({ "id": format!("s{i}"), "uses": "echo", "with": { "n": expr(i) } });
                if i > 0 {
                    s["needs"] = json!([format!("s{}", i - 1)]);
                }
                s
            })
            .collect();
        serde_json::to_string(&json!({ "steps": steps })).unwrap()
    };
    let repeated = definition(&|_| "${{ inputs.n }}".to_owned());
    let distinct = definition(&|i| format!("${{{{ inputs.n + {i} }}}}"));
    let mut group = c.benchmark_group("workflow");
    group.sample_size(10);
    group.bench_function("validate: 10,000-step definition, one expression", |b| {
        b.iter(|| black_box(mesh_workflow::load(&repeated, &Limits::default()).unwrap()))
    });
    group.bench_function(
        "validate: 10,000-step definition, 10,000 expressions",
        |b| b.iter(|| black_box(mesh_workflow::load(&distinct, &Limits::default()).unwrap())),
    );
    group.finish();
}

criterion_group!(
    benches,
    dispatcher_selection,
    journal_append,
    run_transition,
    goal_validation
);
criterion_main!(benches);
