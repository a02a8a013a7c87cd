//! The operator assets in `deploy/`: the Prometheus alert rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`: each alert fires on its series and not on a
//! healthy mesh); every metric the rules and the Grafana dashboard query is one the mesh
//! exports. `promtool` comes from Debian's `prometheus` package (installed by `.ci/run`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    mesh_tests::run_tool("promtool", args, dir)
}

/// Metric names the mesh declares (the coordinator's and the SDK's constants).
fn exported() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["coordinator/src/metrics.rs", "agent-sdk/src/metrics.rs"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        for part in text.split('"').skip(1).step_by(2) {
            if part.starts_with("mesh_")
                && part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                names.insert(part.to_owned());
            }
        }
    }
    names
}

/// The `mesh_…` names an expression queries.
fn queried(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("mesh_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        out.push(expr[start..end].to_owned());
        i = end;
    }
    out
}

#[test]
fn the_alert_rules_are_valid_and_fire_on_what_they_are_about() {
    let dir = root().join("deploy/prometheus");
    let checked = promtool(&["check", "rules", "alerts.yaml"], &dir);
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yaml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    let rules = std::fs::read_to_string(dir.join("alerts.yaml")).unwrap();
    let known = exported();
    for name in queried(&rules) {
        assert!(
            known.contains(&name),
            "alerts.yaml queries {name}, which the mesh does not export"
        );
    }
}

#[test]
fn the_grafana_dashboard_queries_only_what_the_mesh_exports() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/agentmesh.json")).unwrap();
    let board: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = board["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let known = exported();
    let mut seen = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            for name in queried(t["expr"].as_str().unwrap()) {
                assert!(
                    known.contains(&name),
                    "{}: {name} is not exported",
                    p["title"]
                );
                seen.insert(name);
            }
        }
    }
    // The figures operators page on are all on the board.
    for name in [
        "mesh_registry_nodes",
        "mesh_registry_skill_healthy_agents",
        "mesh_runs_finished_total",
        "mesh_dispatch_pending_steps",
        "mesh_llm_cost_usd_total",
    ] {
        assert!(seen.contains(name), "{name} is not on the dashboard");
    }
}
