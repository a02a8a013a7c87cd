//! Where gRPC handlers find runs without asking the store: the live run actors by id, and
//! the final views of runs that finished lately. A client typically watches or gets a run
//! right after it ends; answering that from memory spares a journal replay per run.
//!
//! Both are written by the runs themselves: a run registers when it starts (which also
//! forgets any finished view of it: a retried run is live again) and, when it stops
//! finished, leaves its final view before it unregisters, so that a reader always finds
//! the run in one of the two or, past both, in the store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use mesh_proto::domain::{Namespace, RunId, RunView};
use ractor::ActorRef;
use serde_json::Value;
use tokio::sync::Notify;

use crate::run::RunMsg;

/// Finished views kept at most, and their approximate size in all.
const RECENT_VIEWS: usize = 4096;
const RECENT_BYTES: usize = 32 << 20;

#[derive(Clone, Debug, Default)]
pub struct RunDirectory {
    live: Arc<DashMap<RunId, (ActorRef<RunMsg>, Namespace)>>,
    /// Live runs by namespace, for the namespaces' quotas.
    by_namespace: Arc<DashMap<Namespace, usize>>,
    finished: Arc<Mutex<Recent>>,
    /// Told of every run that comes live or leaves: waiters for a run wait on it instead of
    /// polling.
    changed: Arc<Notify>,
}

impl RunDirectory {
    pub fn get(&self, run_id: &RunId) -> Option<ActorRef<RunMsg>> {
        self.live.get(run_id).map(|r| r.0.clone())
    }

    /// A run of `namespace` is live: it answers for itself from now on.
    pub fn insert(&self, run_id: RunId, run: ActorRef<RunMsg>, namespace: Namespace) {
        self.recent().remove(&run_id);
        if let Some((_, (_, was))) = self.live.remove(&run_id) {
            self.left(&was);
        }
        *self.by_namespace.entry(namespace.clone()).or_default() += 1;
        self.live.insert(run_id, (run, namespace));
        self.changed.notify_waiters();
    }

    /// Live runs of `namespace`.
    pub fn live_in(&self, namespace: &Namespace) -> usize {
        self.by_namespace.get(namespace).map_or(0, |n| *n)
    }

    /// One run of `namespace` left; a namespace with none left is forgotten, so that the
    /// map holds only namespaces with live runs.
    fn left(&self, namespace: &Namespace) {
        if let Some(mut n) = self.by_namespace.get_mut(namespace) {
            *n = n.saturating_sub(1);
        }
        self.by_namespace.remove_if(namespace, |_, n| *n == 0);
    }

    /// A run stops: its entry goes (only if it is still this actor's), and a finished run
    /// leaves its final view first.
    pub fn retire(&self, run_id: &RunId, run: &ActorRef<RunMsg>, finished: Option<RunView>) {
        if let Some(view) = finished {
            self.recent().insert(view);
        }
        if let Some((_, (_, ns))) = self
            .live
            .remove_if(run_id, |_, r| r.0.get_id() == run.get_id())
        {
            self.left(&ns);
        }
        self.changed.notify_waiters();
    }

    /// A run's actor failed (it stops without `post_stop`, so it cannot retire itself):
    /// its entry goes, if it is still this actor's.
    pub fn forget(&self, run_id: &RunId, actor: ractor::ActorId) {
        if let Some((_, (_, ns))) = self.live.remove_if(run_id, |_, r| r.0.get_id() == actor) {
            self.left(&ns);
        }
        self.changed.notify_waiters();
    }

    /// Whether the run has a live actor. An entry whose actor has stopped without retiring
    /// (killed with a failed parent) is forgotten on the way.
    pub fn is_live(&self, run_id: &RunId) -> bool {
        let Some(run) = self.get(run_id) else {
            return false;
        };
        if run.get_status() == ractor::ActorStatus::Stopped {
            self.forget(run_id, run.get_id());
            return false;
        }
        true
    }

    /// Notified when a run comes live or leaves. Take interest (`notified()` then `enable`)
    /// before looking, then await it: no change in between is missed.
    pub fn changes(&self) -> Arc<Notify> {
        Arc::clone(&self.changed)
    }

    /// The final view of a run that finished lately.
    pub fn finished(&self, run_id: &RunId) -> Option<RunView> {
        self.recent().views.get(run_id).map(|(v, _)| v.clone())
    }

    pub fn contains(&self, run_id: &RunId) -> bool {
        self.live.contains_key(run_id)
    }

    pub fn all(&self) -> Vec<ActorRef<RunMsg>> {
        self.live.iter().map(|e| e.value().0.clone()).collect()
    }

    /// Live runs.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        // The map stays consistent whatever panicked while holding it.
        self.finished.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Finished views, oldest out first, bounded in number and in bytes.
#[derive(Debug, Default)]
struct Recent {
    views: HashMap<RunId, (RunView, usize)>,
    order: VecDeque<RunId>,
    bytes: usize,
}

impl Recent {
    fn insert(&mut self, view: RunView) {
        let size = approx_size(&view);
        // A view that would crowd out many others is read from the store when needed.
        if size > RECENT_BYTES / 64 {
            return;
        }
        self.remove(&view.run_id);
        while self.views.len() >= RECENT_VIEWS || self.bytes + size > RECENT_BYTES {
            match self.order.pop_front() {
                Some(old) => self.remove(&old),
                None => break,
            }
        }
        self.bytes += size;
        self.order.push_back(view.run_id.clone());
        self.views.insert(view.run_id.clone(), (view, size));
    }

    /// Forgets a view (its id may stay in `order`, where it is skipped when it comes up).
    fn remove(&mut self, run_id: &RunId) {
        if let Some((_, size)) = self.views.remove(run_id) {
            self.bytes -= size;
        }
    }
}

/// Roughly what a view holds on the heap: its strings and JSON values.
fn approx_size(view: &RunView) -> usize {
    fn value(v: &Value) -> usize {
        32 + match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(value).sum(),
            Value::Object(map) => map.iter().map(|(k, v)| k.len() + value(v)).sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
    }
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let steps: usize = view
        .steps
        .iter()
        .map(|s| 256 + s.output.as_ref().map_or(0, value) + text(&s.error) + text(&s.detail))
        .sum();
    512 + view.objective.len()
        + view.output.as_ref().map_or(0, value)
        + text(&view.error)
        + steps
        + 128 * view.swarm.len()
}

#[cfg(test)]
mod tests {
    use mesh_proto::domain::{GoalId, RunState};
    use serde_json::json;

    use super::*;

    fn view(id: &str, output: Value) -> RunView {
        RunView {
            run_id: RunId(id.to_owned()),
            goal_id: GoalId(format!("goal-{id}")),
            objective: String::new(),
            state: RunState::Succeeded,
            steps: Vec::new(),
            output: Some(output),
            error: None,
            swarm: Vec::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            output_elided_bytes: None,
            usage: Default::default(),
            budget: None,
            namespace: Default::default(),
        }
    }

    fn ids(r: &Recent) -> Vec<String> {
        let mut ids: Vec<String> = r.views.keys().map(|k| k.0.clone()).collect();
        ids.sort();
        ids
    }

    #[test]
    fn keeps_the_newest_views_within_the_count() {
        let mut r = Recent::default();
        for i in 0..RECENT_VIEWS + 3 {
            r.insert(view(&format!("run-{i:05}"), json!(i)));
        }
        assert_eq!(r.views.len(), RECENT_VIEWS);
        let kept = ids(&r);
        assert_eq!(kept[0], "run-00003", "the three oldest went");
        assert_eq!(
            kept.last().unwrap(),
            &format!("run-{:05}", RECENT_VIEWS + 2)
        );
    }

    #[test]
    fn keeps_the_bytes_within_the_bound_and_skips_a_view_too_big_to_keep() {
        let mut r = Recent::default();
        let big = "x".repeat(RECENT_BYTES / 100);
        for i in 0..150 {
            r.insert(view(&format!("run-{i:03}"), json!(big)));
        }
        assert!(r.bytes <= RECENT_BYTES, "{} bytes", r.bytes);
        assert!(
            r.views.len() < 150 && r.views.len() > 50,
            "{}",
            r.views.len()
        );
        assert!(r.views.contains_key(&RunId("run-149".to_owned())));
        assert_eq!(r.bytes, r.views.values().map(|(_, s)| s).sum::<usize>());

        r.insert(view("huge", json!("y".repeat(RECENT_BYTES / 32))));
        assert!(!r.views.contains_key(&RunId("huge".to_owned())));
    }

    struct Idle;

    impl ractor::Actor for Idle {
        type Msg = RunMsg;
        type State = ();
        type Arguments = ();
        async fn pre_start(
            &self,
            _: ActorRef<RunMsg>,
            _: (),
        ) -> Result<(), ractor::ActorProcessingErr> {
            Ok(())
        }
    }

    /// Waiting for a run to come live is a message, not a poll: a waiter that looked before
    /// the run arrived is woken when it does, and again when it leaves.
    #[tokio::test]
    async fn a_waiter_is_woken_when_a_run_comes_live_and_when_it_leaves() {
        let dir = RunDirectory::default();
        let id = RunId("run-w".to_owned());
        let wait_for = |live: bool| {
            let (dir, id) = (dir.clone(), id.clone());
            tokio::spawn(async move {
                let changes = dir.changes();
                loop {
                    let changed = changes.notified();
                    tokio::pin!(changed);
                    changed.as_mut().enable();
                    if dir.contains(&id) == live {
                        return;
                    }
                    changed.await;
                }
            })
        };
        let arrived = wait_for(true);
        tokio::task::yield_now().await;
        let (actor, handle) = ractor::Actor::spawn(None, Idle, ()).await.unwrap();
        let team = Namespace("team".into());
        dir.insert(id.clone(), actor.clone(), team.clone());
        assert_eq!(dir.live_in(&team), 1, "counted in its namespace");
        assert_eq!(dir.live_in(&Namespace::default()), 0);
        tokio::time::timeout(std::time::Duration::from_secs(1), arrived)
            .await
            .expect("woken when the run came live")
            .unwrap();
        let left = wait_for(false);
        tokio::task::yield_now().await;
        dir.retire(&id, &actor, None);
        assert_eq!(dir.live_in(&team), 0, "and no longer");
        assert!(
            dir.by_namespace.is_empty(),
            "a namespace without runs is forgotten"
        );
        tokio::time::timeout(std::time::Duration::from_secs(1), left)
            .await
            .expect("woken when the run left")
            .unwrap();
        actor.stop(None);
        handle.await.unwrap();
    }

    #[test]
    fn a_removed_view_is_forgotten_and_its_bytes_released() {
        let mut r = Recent::default();
        r.insert(view("run-a", json!("a")));
        r.insert(view("run-b", json!("b")));
        r.remove(&RunId("run-a".to_owned()));
        assert_eq!(ids(&r), ["run-b"]);
        assert_eq!(r.bytes, r.views[&RunId("run-b".to_owned())].1);
        // Inserting again replaces, never duplicates.
        r.insert(view("run-b", json!("bb")));
        assert_eq!(r.views.len(), 1);
        assert_eq!(r.bytes, r.views[&RunId("run-b".to_owned())].1);
    }
}
