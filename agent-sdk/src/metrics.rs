//! Metric names of the node runtime.

use metrics::{describe_counter, describe_gauge};

pub const TASKS: &str = "mesh_node_tasks_total";
pub const TASKS_RUNNING: &str = "mesh_node_tasks_running";
pub const AGENT_RESTARTS: &str = "mesh_node_agent_restarts_total";
pub const RESULTS_REJECTED: &str = "mesh_node_results_rejected_total";
pub const CONNECTED: &str = "mesh_node_connected";
pub const RECONNECTS: &str = "mesh_node_reconnects_total";

pub fn describe() {
    describe_counter!(
        TASKS,
        "Attempts finished by hosted agents, by agent and outcome"
    );
    describe_gauge!(TASKS_RUNNING, "Attempts running on this node");
    describe_counter!(
        AGENT_RESTARTS,
        "Agent actors restarted after a panic, by agent"
    );
    describe_counter!(
        RESULTS_REJECTED,
        "Results the coordinator rejected as stale"
    );
    describe_gauge!(CONNECTED, "1 while registered with the coordinator");
    describe_counter!(RECONNECTS, "Connection attempts after the first");
}
