//! Metric names of the coordinator, described once at start-up.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const NODES: &str = "mesh_registry_nodes";
pub const AGENTS: &str = "mesh_registry_agents";
pub const NODE_DEATHS: &str = "mesh_registry_node_deaths_total";
pub const DISPATCH_LATENCY: &str = "mesh_dispatch_latency_seconds";
pub const DISPATCH_PENDING: &str = "mesh_dispatch_pending_steps";
pub const DISPATCH_IN_FLIGHT: &str = "mesh_dispatch_in_flight_attempts";
pub const ATTEMPTS_REDISPATCHED: &str = "mesh_dispatch_redispatched_attempts_total";
pub const OPEN_CIRCUITS: &str = "mesh_dispatch_open_circuits";
pub const STALE_RESULTS: &str = "mesh_dispatch_stale_results_total";
pub const STEP_OUTCOMES: &str = "mesh_step_outcomes_total";
pub const STEP_DURATION: &str = "mesh_step_duration_seconds";
pub const RUNS_ACTIVE: &str = "mesh_runs_active";
pub const RUNS_FINISHED: &str = "mesh_runs_finished_total";
pub const ACTOR_RESTARTS: &str = "mesh_actor_restarts_total";
pub const SKILL_HEALTHY_AGENTS: &str = "mesh_registry_skill_healthy_agents";
pub const STEPS_PARKED: &str = "mesh_steps_parked_total";
pub const MESSAGES: &str = "mesh_messages_total";
pub const MESSAGES_DROPPED: &str = "mesh_messages_dropped_total";
/// Most distinct `skill` labels published.
pub const MAX_SKILL_LABELS: usize = 256;

pub fn describe() {
    describe_gauge!(NODES, "Nodes known to the registry, by health");
    describe_gauge!(AGENTS, "Agents known to the registry, by health");
    describe_counter!(NODE_DEATHS, "Node instances declared dead, by cause");
    describe_histogram!(
        DISPATCH_LATENCY,
        Unit::Seconds,
        "Time from a step becoming ready to its task being sent to a node"
    );
    describe_gauge!(DISPATCH_PENDING, "Steps waiting for a free agent");
    describe_gauge!(
        DISPATCH_IN_FLIGHT,
        "Attempts sent to nodes and not yet answered"
    );
    describe_counter!(
        ATTEMPTS_REDISPATCHED,
        "Attempts lost with their node or agent and dispatched again"
    );
    describe_gauge!(
        OPEN_CIRCUITS,
        "Agents whose circuit breaker is open or half-open"
    );
    describe_counter!(
        STALE_RESULTS,
        "Task results rejected because their fencing token was stale"
    );
    describe_counter!(STEP_OUTCOMES, "Finished step attempts, by outcome");
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Time from dispatch to result, per attempt"
    );
    describe_gauge!(RUNS_ACTIVE, "Runs in progress on this coordinator");
    describe_counter!(RUNS_FINISHED, "Runs finished, by state");
    describe_gauge!(
        SKILL_HEALTHY_AGENTS,
        "Healthy agents that serve each skill (0: none can take its steps)"
    );
    describe_counter!(
        STEPS_PARKED,
        "Steps parked for an operator (on_failure: park, or held at a budget)"
    );
    describe_counter!(
        MESSAGES,
        "Messages between agents, by outcome: taken, refused, delivered (each delivery)"
    );
    describe_counter!(
        MESSAGES_DROPPED,
        "Messages dropped after their handler failed at every delivery"
    );
    describe_counter!(
        ACTOR_RESTARTS,
        "Actors restarted by their supervisor, by actor"
    );
}
