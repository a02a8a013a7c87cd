//! What a node's connection remembers about its attempts, apart from any stream I/O: the
//! attempts handed to agents, the attempts held for agents that are restarting, the results
//! not yet acknowledged, and whether the node drains. Each method is one decision that the
//! `Connection` actor then carries out on the stream; unit tests drive it alone.

use std::collections::HashMap;

use mesh_proto::domain::{AckCode, FencingToken, Task, TaskError, TaskResult};

/// Unacknowledged results kept for re-sending; past it one is dropped per new result (the
/// coordinator re-dispatches their steps anyway).
pub(crate) const MAX_UNACKED: usize = 10_000;

/// Where the agent a task names stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AgentState {
    Live,
    Restarting,
    Absent,
}

/// What to do with a task that arrived.
#[derive(Debug, PartialEq)]
pub(crate) enum Admit {
    /// Hand it to its agent now.
    Run(Task),
    /// Held until its agent is back.
    Held,
    /// Answer at once with this result (kept until acknowledged).
    Refuse(TaskResult),
}

/// What a result acknowledgement meant.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Acked {
    Accepted,
    /// The coordinator refused the result (a stale attempt).
    Rejected,
    /// Not a result this node was keeping (acknowledged twice, or dropped).
    Unknown,
}

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Attempts handed to agents or held for them, with the agent's name.
    tasks: HashMap<FencingToken, String>,
    /// Attempts for agents that are restarting, in arrival order.
    held: Vec<Task>,
    unacked: HashMap<FencingToken, TaskResult>,
    max_unacked: usize,
    draining: bool,
}

impl Ledger {
    pub(crate) fn new(max_unacked: usize) -> Self {
        Self {
            max_unacked: max_unacked.max(1),
            ..Self::default()
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.tasks.len()
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining
    }

    /// A task arrived for an agent in `agent` state.
    pub(crate) fn admit(&mut self, task: Task, agent: AgentState) -> Admit {
        let refuse = |ledger: &mut Self, token: FencingToken, error: TaskError| {
            Admit::Refuse(ledger.keep(TaskResult::new(token, Err(error))))
        };
        if self.draining {
            let error = TaskError::new("draining", "the node is draining", true);
            return refuse(self, task.token, error);
        }
        match agent {
            AgentState::Live => {
                self.tasks.insert(task.token.clone(), task.agent.clone());
                Admit::Run(task)
            }
            AgentState::Restarting => {
                self.tasks.insert(task.token.clone(), task.agent.clone());
                self.held.push(task);
                Admit::Held
            }
            AgentState::Absent => {
                let error = TaskError::new(
                    "agent_unavailable",
                    format!("agent `{}` is down or not hosted on this node", task.agent),
                    true,
                );
                refuse(self, task.token, error)
            }
        }
    }

    /// A task that could not be read fails its attempt for good.
    pub(crate) fn unreadable(&mut self, token: FencingToken, error: &str) -> TaskResult {
        self.keep(TaskResult::new(
            token,
            Err(TaskError::new(
                "bad_input",
                format!("the node could not read this task: {error}"),
                false,
            )),
        ))
    }

    /// The coordinator cancels an attempt: the agent to tell, if it is running there. A held
    /// attempt is simply forgotten (the coordinator no longer waits for it).
    pub(crate) fn cancel(&mut self, token: &FencingToken) -> Option<String> {
        if let Some(i) = self.held.iter().position(|t| &t.token == token) {
            self.held.remove(i);
            self.tasks.remove(token);
            return None;
        }
        self.tasks.get(token).cloned()
    }

    /// An agent finished an attempt: its result is kept until acknowledged. Returns the
    /// result to send, and the token of a result dropped to stay within the bound.
    pub(crate) fn finished(&mut self, result: TaskResult) -> (TaskResult, Option<FencingToken>) {
        self.tasks.remove(&result.token);
        let dropped = if self.unacked.len() >= self.max_unacked
            && !self.unacked.contains_key(&result.token)
        {
            let victim = self.unacked.keys().next().cloned();
            if let Some(v) = &victim {
                self.unacked.remove(v);
            }
            victim
        } else {
            None
        };
        (self.keep(result), dropped)
    }

    pub(crate) fn acked(&mut self, token: &FencingToken, code: AckCode) -> Acked {
        match (self.unacked.remove(token), code) {
            (None, _) => Acked::Unknown,
            (Some(_), AckCode::Stale) => Acked::Rejected,
            (Some(_), _) => Acked::Accepted,
        }
    }

    /// An agent spent its restart budget: the attempts held for it fail now (retryable, so
    /// the coordinator places them elsewhere).
    pub(crate) fn agent_down(&mut self, agent: &str, reason: &str) -> Vec<TaskResult> {
        let (failed, kept): (Vec<Task>, Vec<Task>) =
            self.held.drain(..).partition(|t| t.agent == agent);
        self.held = kept;
        failed
            .into_iter()
            .map(|task| {
                self.tasks.remove(&task.token);
                let message = format!("agent `{agent}` is down: {reason}");
                self.keep(TaskResult::new(
                    task.token,
                    Err(TaskError::new("agent_down", message, true)),
                ))
            })
            .collect()
    }

    /// A restarted agent is back: the attempts held for it, in arrival order.
    pub(crate) fn agent_back(&mut self, agent: &str) -> Vec<Task> {
        let (ready, kept): (Vec<Task>, Vec<Task>) =
            self.held.drain(..).partition(|t| t.agent == agent);
        self.held = kept;
        ready
    }

    /// Every result not acknowledged yet, to send again on a new stream.
    pub(crate) fn to_resend(&self) -> Vec<TaskResult> {
        self.unacked.values().cloned().collect()
    }

    /// Take no new attempts from now on.
    pub(crate) fn drain(&mut self) {
        self.draining = true;
    }

    /// Draining, with nothing running, held or waiting for an acknowledgement.
    pub(crate) fn drained(&self) -> bool {
        self.draining && self.tasks.is_empty() && self.unacked.is_empty()
    }

    fn keep(&mut self, result: TaskResult) -> TaskResult {
        self.unacked.insert(result.token.clone(), result.clone());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::domain::{RunId, StepId};
    use serde_json::json;

    fn task(agent: &str, attempt: u32) -> Task {
        Task {
            token: FencingToken {
                run_id: RunId("run-1".into()),
                step_id: StepId::from("s"),
                index: 0,
                attempt,
                epoch: 1,
            },
            agent: agent.into(),
            skill: "work".into(),
            input: json!({}),
            idempotency_key: "k".into(),
            deadline_ms: 1_000,
            secrets: Default::default(),
            traceparent: String::new(),
        }
    }

    fn ok(task: &Task) -> TaskResult {
        TaskResult::new(task.token.clone(), Ok(json!(1)))
    }

    fn code(result: &TaskResult) -> &str {
        match &result.outcome {
            Err(e) => &e.code,
            Ok(_) => "ok",
        }
    }

    #[test]
    fn a_result_is_kept_until_acknowledged_and_sent_again_until_then() {
        let mut l = Ledger::new(MAX_UNACKED);
        let t = task("a", 1);
        assert_eq!(l.admit(t.clone(), AgentState::Live), Admit::Run(t.clone()));
        assert_eq!(l.in_flight(), 1);
        let (sent, dropped) = l.finished(ok(&t));
        assert_eq!((sent, dropped), (ok(&t), None));
        assert_eq!(l.in_flight(), 0);
        assert_eq!(
            l.to_resend(),
            vec![ok(&t)],
            "after a reconnect it goes again"
        );
        assert_eq!(l.acked(&t.token, AckCode::Accepted), Acked::Accepted);
        assert!(l.to_resend().is_empty());
        assert_eq!(l.acked(&t.token, AckCode::Accepted), Acked::Unknown);
    }

    #[test]
    fn a_stale_acknowledgement_forgets_the_result_and_says_so() {
        let mut l = Ledger::new(MAX_UNACKED);
        let t = task("a", 1);
        l.admit(t.clone(), AgentState::Live);
        l.finished(ok(&t));
        assert_eq!(l.acked(&t.token, AckCode::Stale), Acked::Rejected);
        assert!(l.to_resend().is_empty());
    }

    #[test]
    fn unacknowledged_results_are_bounded_dropping_one_per_new_result() {
        let mut l = Ledger::new(2);
        let tasks: Vec<Task> = (1..=3).map(|i| task("a", i)).collect();
        for t in &tasks {
            l.admit(t.clone(), AgentState::Live);
        }
        assert_eq!(l.finished(ok(&tasks[0])).1, None);
        assert_eq!(l.finished(ok(&tasks[1])).1, None);
        let dropped = l.finished(ok(&tasks[2])).1.expect("one dropped");
        assert_ne!(dropped, tasks[2].token, "never the newest");
        assert_eq!(l.to_resend().len(), 2);
    }

    #[test]
    fn attempts_for_a_restarting_agent_are_held_then_delivered_in_order() {
        let mut l = Ledger::new(MAX_UNACKED);
        let (a1, b1, a2) = (task("a", 1), task("b", 2), task("a", 3));
        assert_eq!(l.admit(a1.clone(), AgentState::Restarting), Admit::Held);
        assert_eq!(l.admit(b1.clone(), AgentState::Restarting), Admit::Held);
        assert_eq!(l.admit(a2.clone(), AgentState::Restarting), Admit::Held);
        assert_eq!(l.in_flight(), 3, "held attempts count as in flight");
        assert_eq!(l.agent_back("a"), vec![a1, a2]);
        assert!(l.agent_back("a").is_empty(), "delivered once");
        assert_eq!(l.agent_back("b"), vec![b1]);
        assert!(l.to_resend().is_empty(), "nothing answered yet");
    }

    #[test]
    fn attempts_held_for_an_agent_that_goes_down_fail_retryably() {
        let mut l = Ledger::new(MAX_UNACKED);
        let (a1, b1) = (task("a", 1), task("b", 2));
        l.admit(a1.clone(), AgentState::Restarting);
        l.admit(b1.clone(), AgentState::Restarting);
        let failed = l.agent_down("a", "restarted 5 times");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].token, a1.token);
        let Err(e) = &failed[0].outcome else {
            panic!("a failure")
        };
        assert_eq!(e.code, "agent_down");
        assert!(e.retryable);
        assert!(
            e.message.contains("`a` is down: restarted 5 times"),
            "{}",
            e.message
        );
        assert_eq!(l.to_resend(), failed, "kept until acknowledged");
        assert_eq!(l.in_flight(), 1, "b's attempt is still held");
        assert_eq!(l.agent_back("b"), vec![b1]);
    }

    #[test]
    fn a_task_for_an_absent_agent_is_refused_retryably() {
        let mut l = Ledger::new(MAX_UNACKED);
        let Admit::Refuse(r) = l.admit(task("gone", 1), AgentState::Absent) else {
            panic!("refused")
        };
        assert_eq!(code(&r), "agent_unavailable");
        assert_eq!(l.in_flight(), 0);
        assert_eq!(l.to_resend(), vec![r]);
    }

    #[test]
    fn an_unreadable_task_fails_for_good() {
        let mut l = Ledger::new(MAX_UNACKED);
        let r = l.unreadable(task("a", 1).token, "input_json: expected value");
        let Err(e) = &r.outcome else {
            panic!("a failure")
        };
        assert_eq!(e.code, "bad_input");
        assert!(!e.retryable);
        assert!(e.message.contains("input_json"));
    }

    #[test]
    fn a_cancel_reaches_a_running_attempt_and_forgets_a_held_one() {
        let mut l = Ledger::new(MAX_UNACKED);
        let (run, held) = (task("a", 1), task("b", 2));
        l.admit(run.clone(), AgentState::Live);
        l.admit(held.clone(), AgentState::Restarting);
        assert_eq!(l.cancel(&run.token), Some("a".into()));
        assert_eq!(l.cancel(&held.token), None);
        assert!(l.agent_back("b").is_empty(), "the held attempt is gone");
        assert_eq!(l.in_flight(), 1, "the running one ends with its result");
        assert_eq!(l.cancel(&task("c", 9).token), None, "unknown");
    }

    #[test]
    fn a_drain_refuses_new_attempts_and_ends_when_nothing_is_left() {
        let mut l = Ledger::new(MAX_UNACKED);
        let t = task("a", 1);
        l.admit(t.clone(), AgentState::Live);
        assert!(!l.drained(), "not draining yet");
        l.drain();
        assert!(l.draining());
        let Admit::Refuse(r) = l.admit(task("a", 2), AgentState::Live) else {
            panic!("refused while draining")
        };
        assert_eq!(code(&r), "draining");
        assert!(
            !l.drained(),
            "an attempt runs and a refusal waits for its ack"
        );
        l.acked(&r.token, AckCode::Accepted);
        assert!(!l.drained(), "the attempt still runs");
        l.finished(ok(&t));
        assert!(!l.drained(), "its result is not acknowledged yet");
        l.acked(&t.token, AckCode::Accepted);
        assert!(l.drained());
    }
}
