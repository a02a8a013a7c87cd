//! Goal files: YAML or JSON, checked before anything is sent.

use std::path::Path;

use anyhow::{Context, Result, bail};
use mesh_proto::domain::{GoalSpec, StepId, StepSpec};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoalFile {
    #[serde(default)]
    objective: String,
    #[serde(default)]
    inputs: Option<Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
    steps: Vec<StepFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    id: String,
    uses: String,
    #[serde(default)]
    with: Option<Value>,
    #[serde(default)]
    needs: Vec<String>,
}

/// Parses and validates a goal; errors name the file and the field.
pub fn parse(name: &str, text: &str) -> Result<GoalSpec> {
    let file: GoalFile = if name.ends_with(".json") {
        serde_json::from_str(text).with_context(|| format!("{name}: not a valid goal"))?
    } else {
        serde_saphyr::from_str(text).with_context(|| format!("{name}: not a valid goal"))?
    };
    let goal = GoalSpec {
        objective: file.objective,
        inputs: file
            .inputs
            .unwrap_or_else(|| Value::Object(Default::default())),
        steps: file
            .steps
            .into_iter()
            .map(|s| StepSpec {
                id: StepId(s.id),
                uses: s.uses,
                with: s.with.unwrap_or_else(|| Value::Object(Default::default())),
                needs: s.needs.into_iter().map(StepId).collect(),
            })
            .collect(),
        idempotency_key: file.idempotency_key,
    };
    if let Err(e) = goal.validate() {
        bail!("{name}: {e}");
    }
    Ok(goal)
}

pub fn read(path: &Path) -> Result<GoalSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&path.display().to_string(), &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_goal_is_valid() {
        let goal = parse(
            "hello.yaml",
            include_str!("../../examples/goals/hello.yaml"),
        )
        .unwrap();
        assert_eq!(goal.steps.len(), 5);
    }

    #[test]
    fn names_the_file_and_field() {
        let err = parse(
            "g.yaml",
            "steps:\n  - id: a\n    uses: echo\n    needs: [b]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("steps[0].needs[0]"), "{err}");
        let err = parse("g.json", r#"{"steps": [], "bogus": 1}"#).unwrap_err();
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
    }
}
