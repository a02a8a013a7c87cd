//! The contract every store backend keeps, as tests written against [`Backend`] alone.
//! A backend runs the whole suite with `conformance_suite!(fixture)`, where the fixture
//! opens its store (the same data on every open) and can mark that data as written by
//! another layout.

use std::collections::HashSet;

use mesh_proto::domain::*;
use mesh_workflow::WorkflowDef;
use serde_json::json;

use super::{Backend, JournalEvent, NewRun, NewWorkflow, StoredGoal, now_ms};
use crate::error::{Error, Result};

/// How the suite reaches one backend.
pub(crate) trait Fixture {
    type Store: Backend;
    /// Opens the fixture's store: empty the first time, the same data after.
    async fn open(&self) -> Result<Self::Store>;
    /// Marks the stored data as written by layout `version` (the next open must refuse it).
    async fn set_layout(&self, version: &str);
}

/// Runs every case of the suite against the fixture `$make` builds (fresh for each case).
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::store::conformance::conformance_suite!(@cases $make;
            an_idempotency_key_has_one_run,
            a_new_run_is_stored_with_its_first_decisions,
            the_journal_survives_a_reopen_whole_and_in_order,
            a_finished_run_leaves_the_unfinished_list,
            writes_side_by_side_are_isolated_and_keys_stay_unique,
            runs_list_in_pages_newest_first,
            workflow_versions_never_change,
            workflows_list_in_pages,
            swarm_members_are_kept_once,
            unknown_things_are_not_found,
            the_store_can_be_probed,
            another_layout_is_refused,
            memory_is_saved_with_its_result_kept_per_key_and_expires,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $make;
                $crate::store::conformance::$case(&fixture).await;
            }
        )*
    };
}
pub(crate) use conformance_suite;

fn goal(key: Option<&str>) -> StoredGoal {
    let workflow: WorkflowDef = serde_json::from_value(json!({
        "steps": [
            { "id": "a", "uses": "echo", "with": { "x": 1 } },
            { "id": "b", "uses": "echo", "needs": ["a"] },
        ]
    }))
    .unwrap();
    StoredGoal {
        request_digest: key.map(|_| "digest-1".to_owned()),
        objective: "test".into(),
        inputs: json!({}),
        workflow,
        idempotency_key: key.map(str::to_owned),
        planned: false,
        budget: None,
        namespace: Default::default(),
    }
}

fn new_run(goal: StoredGoal) -> NewRun {
    let (goal_id, run_id) = NewRun::ids();
    NewRun {
        goal,
        goal_id,
        run_id,
        at_ms: now_ms(),
        events: Vec::new(),
    }
}

/// A run stored in `store`, for tests of one backend.
pub(crate) async fn a_run(store: &impl Backend) -> RunId {
    store.submit(new_run(goal(None))).await.unwrap().run_id
}

fn started(step: &str, attempt: u32) -> JournalEvent {
    JournalEvent::StepStarted {
        step: step.into(),
        index: 0,
        attempt,
        epoch: 1,
    }
}

fn workflow(name: &str, version: u32, steps: usize) -> NewWorkflow {
    let steps: Vec<_> = (0..steps)
        .map(|i| json!({ "id": format!("s{i}"), "uses": "echo" }))
        .collect();
    let def: WorkflowDef = serde_json::from_value(json!({
        "name": name, "version": version, "description": "d", "steps": steps,
    }))
    .unwrap();
    NewWorkflow {
        source: serde_json::to_string(&def).unwrap(),
        def,
    }
}

pub(crate) async fn an_idempotency_key_has_one_run(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    let first = store.submit(new_run(goal(Some("k1")))).await.unwrap();
    let again = store.submit(new_run(goal(Some("k1")))).await.unwrap();
    assert!(first.created);
    assert!(!again.created);
    assert_eq!(
        (&first.run_id, &first.goal_id),
        (&again.run_id, &again.goal_id)
    );
    assert!(store.knows_idempotency_key("k1").await.unwrap());
    assert!(!store.knows_idempotency_key("k2").await.unwrap());
    // The same key for another request is refused, naming the key and the run.
    let mut other = goal(Some("k1"));
    other.request_digest = Some("digest-2".into());
    match store.submit(new_run(other)).await {
        Err(Error::AlreadyExists(msg)) => {
            assert!(
                msg.contains("`k1`") && msg.contains(&first.run_id.0),
                "{msg}"
            )
        }
        r => panic!("expected AlreadyExists, got {r:?}"),
    }
    let unkeyed = store.submit(new_run(goal(None))).await.unwrap();
    assert!(unkeyed.created);
    assert_ne!(unkeyed.run_id, first.run_id);
}

pub(crate) async fn a_new_run_is_stored_with_its_first_decisions(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    let mut new = new_run(goal(Some("first")));
    new.events = vec![started("a", 1)];
    let run = store.submit(new.clone()).await.unwrap();
    assert!(run.created);
    assert_eq!((&run.run_id, &run.goal_id), (&new.run_id, &new.goal_id));
    let stored = store.load_run(&run.run_id).await.unwrap();
    assert_eq!(
        stored.events,
        vec![JournalEvent::RunCreated, started("a", 1)]
    );
    assert_eq!(stored.next_seq, 2);
    assert_eq!(stored.state, RunState::Running);
    assert_eq!(stored.goal, new.goal);
    assert_eq!(stored.created_at_ms, new.at_ms);
    // The same key again: the first run, and nothing journaled twice.
    let again = store.submit(new_run(goal(Some("first")))).await.unwrap();
    assert_eq!((again.created, &again.run_id), (false, &run.run_id));
    assert_eq!(store.load_run(&run.run_id).await.unwrap().events.len(), 2);
}

pub(crate) async fn the_journal_survives_a_reopen_whole_and_in_order(f: &impl Fixture) {
    let run = {
        let store = f.open().await.unwrap();
        assert_eq!(store.bump_epoch().await.unwrap(), 1);
        let run = store.submit(new_run(goal(None))).await.unwrap();
        let events = vec![
            started("a", 1),
            JournalEvent::StepSucceeded {
                step: "a".into(),
                output: json!({"ok": true}),
            },
        ];
        let back = store.record(&run.run_id, 1, events.clone()).await.unwrap();
        assert_eq!(back, events, "the events come back to the caller");
        run
    };
    let store = f.open().await.unwrap();
    assert_eq!(store.bump_epoch().await.unwrap(), 2, "the epoch is durable");
    let stored = store.load_run(&run.run_id).await.unwrap();
    assert_eq!(stored.next_seq, 3);
    assert_eq!(stored.goal, goal(None));
    assert_eq!(stored.events[0], JournalEvent::RunCreated);
    assert!(
        matches!(&stored.events[2], JournalEvent::StepSucceeded { output, .. } if output == &json!({"ok": true}))
    );
    assert_eq!(
        store.unfinished_runs().await.unwrap(),
        vec![run.run_id.clone()]
    );
    // A journal entry is written once; a write that collides changes nothing, not even its
    // entries that did not collide.
    let dup = vec![
        JournalEvent::StepSkipped {
            step: "b".into(),
            reason: "test".into(),
        },
        started("b", 1),
    ];
    assert!(store.record(&run.run_id, 2, dup).await.is_err());
    assert_eq!(
        store.load_run(&run.run_id).await.unwrap().events,
        stored.events
    );
}

pub(crate) async fn a_finished_run_leaves_the_unfinished_list(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    let a = store.submit(new_run(goal(None))).await.unwrap().run_id;
    let b = store.submit(new_run(goal(None))).await.unwrap().run_id;
    assert_eq!(
        store.unfinished_runs().await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    let finished = JournalEvent::RunFinished {
        state: RunState::Succeeded,
        output: Some(json!({"answer": 42})),
        error: None,
    };
    store.record(&a, 1, vec![finished]).await.unwrap();
    assert_eq!(store.unfinished_runs().await.unwrap(), vec![b.clone()]);
    assert_eq!(store.load_run(&a).await.unwrap().state, RunState::Succeeded);
    let succeeded = ListRunsQuery {
        state: Some(RunState::Succeeded),
        page_size: 10,
        page_token: None,
        namespace: Default::default(),
    };
    let page = store.list_runs(&succeeded).await.unwrap();
    assert_eq!(page.runs.len(), 1);
    assert_eq!(page.runs[0].run_id, a);
    // Resumed (a retry of a finished run): running again.
    store
        .record(&a, 2, vec![JournalEvent::RunResumed])
        .await
        .unwrap();
    assert_eq!(store.load_run(&a).await.unwrap().state, RunState::Running);
    assert_eq!(store.unfinished_runs().await.unwrap(), vec![a, b]);
}

pub(crate) async fn writes_side_by_side_are_isolated_and_keys_stay_unique(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    let run = store.submit(new_run(goal(None))).await.unwrap().run_id;
    // Many writes at once; a bad one fails alone.
    let mut writes = Vec::new();
    for i in 0..200u64 {
        let (store, run) = (store.clone(), run.clone());
        // Entry 1 is written twice: exactly one of those two fails.
        let seq = if i == 0 { 1 } else { i };
        writes.push(tokio::spawn(async move {
            store
                .record(&run, seq, vec![started("a", i as u32)])
                .await
                .is_ok()
        }));
    }
    let mut ok = 0;
    for w in writes {
        ok += usize::from(w.await.unwrap());
    }
    assert_eq!(ok, 199);
    assert_eq!(store.load_run(&run).await.unwrap().next_seq, 200);
    // One key, fifty racing submissions: one run.
    let mut keyed = Vec::new();
    for _ in 0..50 {
        let store = store.clone();
        keyed.push(tokio::spawn(async move {
            store.submit(new_run(goal(Some("same")))).await.unwrap()
        }));
    }
    let mut runs = HashSet::new();
    let mut created = 0;
    for k in keyed {
        let r = k.await.unwrap();
        created += usize::from(r.created);
        runs.insert(r.run_id);
    }
    assert_eq!((created, runs.len()), (1, 1));
}

pub(crate) async fn runs_list_in_pages_newest_first(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(store.submit(new_run(goal(None))).await.unwrap().run_id);
    }
    let q = |token: Option<String>| ListRunsQuery {
        state: None,
        page_size: 2,
        page_token: token.map(RunId),
        namespace: Default::default(),
    };
    let mut seen = Vec::new();
    let mut token = None;
    for expected_len in [2, 2, 1] {
        let page = store.list_runs(&q(token)).await.unwrap();
        assert_eq!(page.runs.len(), expected_len);
        assert!(page.runs.iter().all(|r| r.objective == "test"));
        seen.extend(page.runs.into_iter().map(|r| r.run_id));
        token = page.next_page_token;
    }
    assert_eq!(token, None, "the last page has no next");
    ids.reverse();
    assert_eq!(seen, ids);
    let failed = ListRunsQuery {
        state: Some(RunState::Failed),
        page_size: 10,
        page_token: None,
        namespace: Default::default(),
    };
    assert!(store.list_runs(&failed).await.unwrap().runs.is_empty());
}

pub(crate) async fn workflow_versions_never_change(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    let (v1, created) = store
        .register_workflow(workflow("team.review", 1, 1))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(
        (v1.name.as_str(), v1.version, v1.steps),
        ("team.review", 1, 1)
    );
    let (same, created) = store
        .register_workflow(workflow("team.review", 1, 1))
        .await
        .unwrap();
    assert!(!created, "the same content again is not new");
    assert_eq!(same, v1);
    match store.register_workflow(workflow("team.review", 1, 2)).await {
        Err(Error::AlreadyExists(msg)) => assert!(msg.contains("team.review@1"), "{msg}"),
        r => panic!("expected AlreadyExists, got {r:?}"),
    }
    store
        .register_workflow(workflow("team.review", 2, 3))
        .await
        .unwrap();
    assert_eq!(
        store.workflow("team.review", None).await.unwrap().version,
        2
    );
    let first = store.workflow("team.review", Some(1)).await.unwrap();
    assert_eq!(first, v1);
    let parsed: WorkflowDef = serde_json::from_str(&first.definition).unwrap();
    assert_eq!(parsed.steps.len(), 1, "the text as registered");
    match store.workflow("team.review", Some(3)).await {
        Err(Error::WorkflowNotFound(what)) => assert_eq!(what, "team.review@3"),
        r => panic!("expected WorkflowNotFound, got {r:?}"),
    }
}

pub(crate) async fn workflows_list_in_pages(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    for (name, version) in [("a", 1), ("a", 2), ("b", 1), ("c", 1), ("c", 2)] {
        store
            .register_workflow(workflow(name, version, 1))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = store
            .list_workflows(&Namespace::default(), None, 2, after)
            .await
            .unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|w| format!("{}@{}", w.name, w.version)));
        let Some(next) = next else { break };
        let (n, v) = next.split_once('@').unwrap();
        after = Some((n.to_owned(), v.parse().unwrap()));
    }
    assert_eq!(seen, ["a@2", "a@1", "b@1", "c@2", "c@1"]);
    let (only_c, next) = store
        .list_workflows(&Namespace::default(), Some("c"), 10, None)
        .await
        .unwrap();
    assert_eq!(only_c.iter().map(|w| w.version).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(next, None);
    // Another namespace's workflows (stored under its prefix) are listed to it alone.
    let team = Namespace("team".into());
    store
        .register_workflow(workflow(&crate::intake::stored_name(&team, "a"), 1, 1))
        .await
        .unwrap();
    let (theirs, _) = store.list_workflows(&team, None, 10, None).await.unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(crate::intake::plain_name(&theirs[0].name), "a");
    let (ours, _) = store
        .list_workflows(&Namespace::default(), None, 10, None)
        .await
        .unwrap();
    assert_eq!(ours.len(), 5, "the default namespace's only");
}

pub(crate) async fn swarm_members_are_kept_once(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    let run = store.submit(new_run(goal(None))).await.unwrap();
    let member = |node: &str| SwarmMember {
        skill: "echo".into(),
        agent: AgentKey {
            node: NodeId(node.into()),
            agent: "echo".into(),
        },
    };
    for node in ["n2", "n1", "n2"] {
        store
            .add_swarm_member(&run.goal_id, &member(node))
            .await
            .unwrap();
    }
    let stored = store.load_run(&run.run_id).await.unwrap();
    assert_eq!(stored.swarm, vec![member("n1"), member("n2")]);
}

pub(crate) async fn unknown_things_are_not_found(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    match store.load_run(&RunId("run-none".into())).await {
        Err(Error::RunNotFound(id)) => assert_eq!(id, "run-none"),
        r => panic!("expected RunNotFound, got {r:?}"),
    }
    match store.workflow("nope", None).await {
        Err(Error::WorkflowNotFound(what)) => assert_eq!(what, "nope"),
        r => panic!("expected WorkflowNotFound, got {r:?}"),
    }
    let q = ListRunsQuery {
        state: None,
        page_size: 10,
        page_token: None,
        namespace: Default::default(),
    };
    let page = store.list_runs(&q).await.unwrap();
    assert!(page.runs.is_empty() && page.next_page_token.is_none());
    assert!(store.unfinished_runs().await.unwrap().is_empty());
}

pub(crate) async fn the_store_can_be_probed(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    store.probe().await.unwrap();
    store.probe().await.unwrap();
}

pub(crate) async fn another_layout_is_refused(f: &impl Fixture) {
    let store = f.open().await.unwrap();
    store.submit(new_run(goal(None))).await.unwrap();
    drop(store);
    // A layout newer than any this build knows.
    f.set_layout("99").await;
    let err = f
        .open()
        .await
        .err()
        .expect("a store of another layout opens")
        .to_string();
    assert!(err.contains("layout 99"), "names the layout found: {err}");
}

pub(crate) async fn memory_is_saved_with_its_result_kept_per_key_and_expires(f: &impl Fixture) {
    use crate::memory::{MAX_ENTRIES_PER_KEY, NewMemory};
    let store = f.open().await.unwrap();
    let run = store.submit(new_run(goal(None))).await.unwrap();
    let saved = |n: u32| JournalEvent::MemorySaved {
        step: "a".into(),
        index: 0,
        scope: "workflow:w".into(),
        key: "k".into(),
        value: json!({ "n": n }),
        ttl_ms: 0,
    };
    // Saved in the same write as the journal entries around it.
    store
        .record(&run.run_id, 1, vec![started("a", 1), saved(1)])
        .await
        .unwrap();
    let got = store
        .memory("default", "workflow:w", "k", 10)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, json!({ "n": 1 }));
    assert_eq!(
        (got[0].run_id.as_str(), got[0].step_id.as_str()),
        (run.run_id.0.as_str(), "a")
    );
    // Another namespace, scope or key sees nothing of it.
    assert!(
        store
            .memory("other", "workflow:w", "k", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .memory("default", "agent:w", "k", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A key keeps its newest MAX_ENTRIES_PER_KEY, and `last` takes the newest, oldest first.
    for n in 0..MAX_ENTRIES_PER_KEY + 5 {
        store
            .put_memory(NewMemory {
                namespace: "default".into(),
                scope: "agent:a".into(),
                key: "many".into(),
                value: json!(n),
                ttl_ms: 0,
            })
            .await
            .unwrap();
    }
    let all = store
        .memory("default", "agent:a", "many", 5000)
        .await
        .unwrap();
    assert_eq!(all.len(), MAX_ENTRIES_PER_KEY as usize);
    assert_eq!(all[0].value, json!(5));
    let last = store.memory("default", "agent:a", "many", 2).await.unwrap();
    let values: Vec<_> = last.iter().map(|e| e.value.clone()).collect();
    assert_eq!(
        values,
        [
            json!(MAX_ENTRIES_PER_KEY + 3),
            json!(MAX_ENTRIES_PER_KEY + 4)
        ]
    );
    // An entry past its time is not read, and keys list in pages.
    store
        .put_memory(NewMemory {
            namespace: "default".into(),
            scope: "agent:a".into(),
            key: "brief".into(),
            value: json!("gone soon"),
            ttl_ms: 1,
        })
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(
        store
            .memory("default", "agent:a", "brief", 10)
            .await
            .unwrap()
            .is_empty()
    );
    let page = store.list_memory("default", None, 1, None).await.unwrap();
    assert_eq!(page.keys.len(), 1);
    assert_eq!(
        (page.keys[0].scope.as_str(), page.keys[0].key.as_str()),
        ("agent:a", "many")
    );
    let rest = store
        .list_memory("default", None, 10, page.next.clone())
        .await
        .unwrap();
    let keys: Vec<_> = rest
        .keys
        .iter()
        .map(|k| (k.scope.as_str(), k.key.as_str()))
        .collect();
    assert_eq!(keys, [("workflow:w", "k")]);
    assert_eq!(rest.next, None);
    store
        .delete_memory("default", "agent:a", "many")
        .await
        .unwrap();
    assert!(
        store
            .memory("default", "agent:a", "many", 10)
            .await
            .unwrap()
            .is_empty()
    );
}
